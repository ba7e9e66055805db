"""The canary rollout controller: walk the canary through the plan ``canary.steps``.

A plan is a list of steps ``{weight: W, bake: D}`` (route W % of customers to the canary for
at least D) and ``{pause: true}`` (wait for a person: :func:`resume`); a ``weight: 100``
step (only the last may have one) is the promotion. :func:`tick`, run every ``--every`` by
``churn canary run`` (or the ``canary`` entry point of the MLproject), does one step of work
under the model's rollout lock:

- no state on the canary version yet: start at step 0 (its weight goes live);
- an alarm breached (:mod:`mlflow_churn.serving.alarms`: the canary's error rate, p99 latency
  or scores over the last ``canary.alarms.window``, checked on every tick of a running or
  paused rollout from one read of the prediction log): roll back at once, without the judge,
  and raise the alert ``ChurnCanaryAlarm`` (resolved when the next rollout starts or one is
  promoted);
- the judge says ``fail``: roll back at once, bake or not
  (:func:`mlflow_churn.serving.transitions.rollback`, signed);
- the bake time is not over, or an arm (champion, canary) served fewer than
  ``canary.min_requests`` logged predictions since the step started, or the judge has too
  little data: wait;
- ``marginal``: pause (a person looks, then ``churn canary resume`` restarts the step);
- ``pass``: advance to the next step (its weight goes live), pause at a ``pause`` step, or,
  at the end of the plan (the last step passed, or the next step is ``weight: 100``),
  promote (:func:`mlflow_churn.serving.transitions.promote`) on the judge's evidence recorded
  as the signed canary verdict (``churn.sig.canary``): the same decision a ``churn-guard``
  server requires for the champion move, so a promotion without the judge's pass is refused.

The state (plan, step, when it started, status ``running | paused | rolled_back |
promoted``, the last step changes) lives on the canary version as the tag
``churn.rollout.state`` (JSON), and the weight in force as ``churn.rollout.weight`` (percent),
which ``churn serve`` reads on every alias reload (``serving.reload_seconds``): a controller
restarted anywhere resumes at the same step, and the service follows the weight without a
restart. The plan is fixed when the rollout starts (a config change applies to the next
canary). Every step change is an MLflow run (kind ``canary-rollout``, ``decision.json`` with
the judge's evidence).

Two controllers never act at once: each tick holds
:func:`mlflow_churn.registry.lock.model_lock` in its own namespace (a PostgreSQL advisory
lock when the tracking store is PostgreSQL, else ``fcntl`` on
``<workspace>/locks/rollout/``) and re-reads the state after taking it, so the second finds
the step the first just started and waits for its bake.

The judge is a callback ``judge(cfg, as_of, served_since, record) -> JudgeOutcome``, by
default :func:`canary_judge`: the statistical canary judge (:mod:`mlflow_churn.serving.judge`)
on the step's own traffic, through :func:`mlflow_churn.serving.canary.evaluate_canary`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

import mlflow
from matplotlib.figure import Figure
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mlflow_churn.config import ChurnConfig, RolloutStep
from mlflow_churn.errors import ChurnError, first_line, is_missing
from mlflow_churn.jsonable import jsonable
from mlflow_churn.registry.aliases import CANARY
from mlflow_churn.registry.lock import model_lock
from mlflow_churn.registry.promotion import verified_decision
from mlflow_churn.registry.signing import (
    default_actor,
    metrics_digest,
    record_signed,
    verifier_for,
    version_ref,
)
from mlflow_churn.registry.vocab import SignedKind
from mlflow_churn.serving.alarms import AlarmCheck, check_rollout, clear_alarm, raise_alarm
from mlflow_churn.serving.canary import (
    CanaryEvaluation,
    decision_run,
    default_as_of,
    evaluate_canary,
    log_json,
    registry_client,
)
from mlflow_churn.serving.judge import JudgeGrade
from mlflow_churn.serving.routing import WEIGHT_TAG
from mlflow_churn.serving.transitions import promote, rollback
from mlflow_churn.tags import ROLLOUT_STATE_TAG as STATE_TAG
from mlflow_churn.times import utc

_log = logging.getLogger("mlflow_churn.rollout")

#: step changes kept in the state tag (every one is also an MLflow run)
HISTORY_KEPT = 30

#: the judge's verdict, or ``insufficient`` (too few canary rows to ask it)
Verdict = JudgeGrade


class RolloutStatus(StrEnum):
    """Where a rollout is: ``running`` (stepping through its plan), ``paused`` (a marginal
    judge, a plan pause or a refused promotion: waits for ``resume``), ``rolled_back`` or
    ``promoted`` (done). A StrEnum: it equals (and is stored as) its string."""

    RUNNING = "running"
    PAUSED = "paused"
    ROLLED_BACK = "rolled_back"
    PROMOTED = "promoted"


Status = RolloutStatus


# --------------------------------------------------------------------------- the judge
@dataclass
class JudgeOutcome:
    """What the judge says about the traffic of one step.

    ``verdict``: ``pass`` (advance), ``marginal`` (pause for a person), ``fail`` (roll back),
    ``insufficient`` (too little data to say; wait). ``rows``: logged predictions per arm
    (``champion``, ``canary``) it looked at. ``evaluation``: the canary analysis the
    transitions carry as evidence (None when the judge has none). ``run_id``: its recorded
    run (when asked to ``record``)."""

    verdict: Verdict
    reasons: list[str]
    rows: dict[str, int]
    evaluation: CanaryEvaluation | None = None
    evidence: dict[str, Any] = field(default_factory=dict)
    run_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return jsonable({"verdict": self.verdict, "reasons": self.reasons, "rows": self.rows,
                         "evidence": self.evidence or (self.evaluation.to_dict() if self.evaluation else {}),
                         "run_id": self.run_id})


#: ``judge(cfg, as_of, served_since, record)``: ``as_of`` decides which labels have matured,
#: ``served_since`` (wall clock) is when the step started; ``record`` = record the verdict as
#: the signed canary decision (only asked for before a promotion)
Judge = Callable[[ChurnConfig, datetime, datetime, bool], JudgeOutcome]

def canary_judge(cfg: ChurnConfig, as_of: datetime, served_since: datetime, record: bool) -> JudgeOutcome:
    """The canary judge (:mod:`mlflow_churn.serving.judge`, through
    :func:`~mlflow_churn.serving.canary.evaluate_canary` with ``use_judge=True``) on the rows
    served since ``served_since``: its pass | marginal | fail, or ``insufficient`` while the
    canary has fewer than ``serving.min_canary_samples`` logged predictions (no verdict yet).
    With ``record`` the evaluation is a run and its verdict (pass = promote) is signed on the
    canary version: the decision the guard and the promotion read."""
    ev = evaluate_canary(cfg, as_of, None, log_run=record, use_judge=True, served_since=served_since)
    rows = {r: st.rows for r, st in ev.routes.items()}
    judged = ev.judge or {}
    verdict: Verdict
    if ev.canary_version is None or rows.get("canary", 0) < cfg.serving.min_canary_samples or not judged:
        verdict = JudgeGrade.INSUFFICIENT
    else:
        verdict = JudgeGrade(judged["verdict"])
    return JudgeOutcome(verdict, list(ev.reasons), rows, ev, run_id=ev.run_id)


# --------------------------------------------------------------------------- the state
@dataclass
class RolloutState:
    """The rollout of one canary version, as stored in its tag ``churn.rollout.state``."""

    model_name: str
    version: str
    version_ref: str
    plan: list[dict[str, Any]]
    step: int
    step_started_at: datetime
    status: Status
    weight: float  # percent of customers routed to the canary now
    paused_reason: str | None = None
    updated_at: datetime | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    def steps(self) -> list[RolloutStep]:
        return [RolloutStep(**s) for s in self.plan]

    def to_dict(self) -> dict[str, Any]:
        return jsonable(asdict(self))

    @classmethod
    def from_tag(cls, text: str) -> RolloutState:
        data = json.loads(text)
        data["step_started_at"] = utc(datetime.fromisoformat(data["step_started_at"]), "step_started_at")
        if data.get("updated_at"):
            data["updated_at"] = utc(datetime.fromisoformat(data["updated_at"]), "updated_at")
        data["status"] = RolloutStatus(data["status"])
        return cls(**data)


@dataclass
class TickResult:
    """What one tick (or a resume) did.

    ``action``: ``idle`` (no canary), ``start``, ``wait``, ``paused`` (waiting for resume),
    ``done`` (rolled back / promoted already), ``advance``, ``pause``, ``resume``,
    ``rollback``, ``promote``, ``blocked`` (a promotion was refused: paused)."""

    action: str
    message: str
    model_name: str
    version: str | None = None
    state: RolloutState | None = None
    judge: JudgeOutcome | None = None
    run_id: str | None = None
    transition_run_id: str | None = None
    alarms: AlarmCheck | None = None  # the tick's alarm check (None when not checked)

    @property
    def changed(self) -> bool:
        """Whether this tick changed the rollout (a step change, recorded as a run)."""
        return self.action in ("start", "advance", "pause", "resume", "rollback", "promote", "blocked")

    def to_dict(self) -> dict[str, Any]:
        return jsonable({"action": self.action, "message": self.message, "model_name": self.model_name,
                         "version": self.version, "changed": self.changed,
                         "state": self.state.to_dict() if self.state else None,
                         "judge": self.judge.to_dict() if self.judge else None, "run_id": self.run_id,
                         "transition_run_id": self.transition_run_id,
                         "alarms": self.alarms.to_dict() if self.alarms else None})


@contextmanager
def rollout_lock(cfg: ChurnConfig, timeout_s: float = 600.0) -> Iterator[str]:
    """The lock one controller holds for a tick (not the transitions' own lock, which promote
    and rollback take inside it)."""
    with model_lock(cfg.mlflow_tracking_uri, cfg.training.model_name, cfg.workspace / "locks" / "rollout",
                    timeout_s, namespace="mlflow-churn-rollout") as held:
        yield held


def _canary(client: MlflowClient, name: str) -> ModelVersion | None:
    """The version behind ``canary``; None when the model or the alias does not exist. A
    registry outage raises (it is never 'no canary')."""
    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        if is_missing(exc):
            return None
        raise
    number = dict(model.aliases or {}).get(CANARY)
    return client.get_model_version(name, str(number)) if number is not None else None


def read_state(mv: ModelVersion) -> RolloutState | None:
    """The rollout state on version ``mv`` (None when it has none). ChurnError when the tag is
    unreadable or belongs to another version with that number (re-created since)."""
    text = (mv.tags or {}).get(STATE_TAG)
    if not text:
        return None
    try:
        state = RolloutState.from_tag(text)
    except (ValueError, TypeError, KeyError) as exc:
        raise ChurnError(f"tag {STATE_TAG} of version {mv.version} of '{mv.name}' is not a rollout state "
                         f"({first_line(exc)}); delete the tag to start its rollout again") from None
    if state.version_ref != version_ref(mv):
        return None  # another version that had this number: its rollout does not apply
    return state


def _write(cfg: ChurnConfig, client: MlflowClient, state: RolloutState, now: datetime) -> None:
    """Weight first (what the service routes with, signed), then the state, so an interrupted
    write leaves a weight the next tick puts right (:func:`_sync_weight`)."""
    state.updated_at = now
    state.history = state.history[-HISTORY_KEPT:]
    _set_weight(cfg, client, state, now)
    client.set_model_version_tag(state.model_name, state.version, STATE_TAG,
                                 json.dumps(state.to_dict(), sort_keys=True))


def _set_weight(cfg: ChurnConfig, client: MlflowClient, state: RolloutState, now: datetime) -> None:
    """The weight tag, then its signed ``rollout`` decision (the service routes with a weight
    only when that signature verifies for this version and this value: a user with write
    access to the registry and no key cannot route customers by setting the tag)."""
    text = f"{state.weight:g}"
    client.set_model_version_tag(state.model_name, state.version, WEIGHT_TAG, text)
    record_signed(client, cfg, state.model_name, state.version, SignedKind.ROLLOUT, "weight", champion=None,
                  run_id="", metrics={"weight": text}, reason=f"rollout weight {text} % at step {state.step}",
                  now=now)


def _sync_weight(cfg: ChurnConfig, client: MlflowClient, mv: ModelVersion, state: RolloutState,
                 now: datetime) -> None:
    """Put the weight tag and its signature right when they are not the state's (an
    interrupted write, or a tag changed by hand)."""
    text = f"{state.weight:g}"
    signed, _why = verified_decision(mv, state.model_name, SignedKind.ROLLOUT, verifier_for(cfg))
    if (mv.tags or {}).get(WEIGHT_TAG) != text or signed is None or \
            signed.metrics_sha256 != metrics_digest({"weight": text}):
        _set_weight(cfg, client, state, now)


def _record(cfg: ChurnConfig, state: RolloutState, action: str, reason: str, from_step: int,
            now: datetime, judge: JudgeOutcome | None = None, transition_run_id: str | None = None,
            alarms: AlarmCheck | None = None) -> str:
    """The MLflow run of one step change (kind ``canary-rollout``): tags, params, the judge's
    rows, ``decision.json`` with the state and the judge's evidence (and, for an alarm's
    rollback, the alarm check: metric, value, limit, rows per arm). Appends to the history."""
    with decision_run(cfg, f"rollout v{state.version}: {action} (step {from_step} -> {state.step})") as run:
        run_id = run.info.run_id
        mlflow.set_tags({"kind": "canary-rollout", "decision": action, "model_name": state.model_name,
                         "version": state.version, "rollout_status": state.status,
                         "judge_verdict": judge.verdict if judge else "none"})
        mlflow.log_params({"from_step": from_step, "to_step": state.step, "weight": state.weight,
                           "reason": reason[:500], "plan": json.dumps(state.plan)[:500]})
        if judge is not None:
            mlflow.log_metrics({f"{arm}_rows": float(n) for arm, n in judge.rows.items()})
        breached = [a.metric for a in alarms.breaches] if alarms is not None else []
        if alarms is not None:
            mlflow.log_metrics(alarms.metrics())
            mlflow.set_tags({"alarm": ",".join(breached) or "none", "alarm_window_start":
                             alarms.window_start.isoformat()})
        entry = {"at": now.isoformat(), "action": action, "from_step": from_step, "to_step": state.step,
                 "weight": state.weight, "status": state.status, "reason": reason[:300],
                 "verdict": judge.verdict if judge else None, "run_id": run_id,
                 "transition_run_id": transition_run_id}
        if breached:
            entry["alarm"] = ",".join(breached)
        state.history.append(entry)
        mlflow.log_figure(rollout_figure(state), "rollout.png")
        log_json({"action": action, "reason": reason, "state": state.to_dict(),
                  "judge": judge.to_dict() if judge else None, "transition_run_id": transition_run_id,
                  "alarms": alarms.to_dict() if alarms else None},
                 "decision.json")
    return run_id


_MARKS = {"start": ("o", "tab:blue"), "advance": ("^", "tab:green"), "pause": ("s", "tab:orange"),
          "blocked": ("s", "tab:red"), "resume": (">", "tab:blue"), "rollback": ("x", "tab:red"),
          "promote": ("*", "tab:green")}


def rollout_figure(state: RolloutState) -> Figure:
    """The canary's weight over the rollout's step changes (a step line), each change marked by
    its action and labelled with its step."""
    fig = Figure(figsize=(8, 3.6))
    ax = fig.add_subplot()
    points = [(datetime.fromisoformat(h["at"]), float(h["weight"]), h["action"], h["to_step"])
              for h in state.history]
    if points:
        ax.step([p[0] for p in points], [p[1] for p in points], where="post", color="tab:gray", linewidth=1)
        for i, (at, weight, action, step) in enumerate(points):
            marker, colour = _MARKS.get(action, ("o", "black"))
            ax.plot([at], [weight], marker=marker, color=colour, linestyle="none")
            ax.annotate(f"{action} -> step {step}", (at, weight), textcoords="offset points",
                        xytext=(4, 5 if i % 2 == 0 else -12), fontsize=7)  # neighbours apart
    ax.set_ylim(-5, 105)
    ax.set_ylabel("canary weight (% of customers)")
    ax.set_xlabel("time (UTC)")
    ax.set_title(f"rollout of v{state.version} of '{state.model_name}': {state.status} at step {state.step}")
    fig.autofmt_xdate()
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- the controller
def tick(cfg: ChurnConfig, now: datetime, judge: Judge = canary_judge, as_of: datetime | None = None,
         actor: str | None = None) -> TickResult:
    """One pass of the controller at wall-clock time ``now`` (tz-aware UTC): read the state
    of the canary's rollout under the rollout lock and act on it (see the module's text).
    ``as_of``: the business time the judge decides label maturity at (default
    :func:`~mlflow_churn.serving.canary.default_as_of`). ``actor`` signs the transitions
    (default: the OS user). A registry or prediction-log outage raises (nothing is decided)."""
    now = utc(now, "now")
    name = cfg.training.model_name
    client = registry_client(cfg)
    with rollout_lock(cfg):
        mv = _canary(client, name)
        if mv is None:
            return TickResult("idle", f"'{name}' has no canary: nothing to roll out", name)
        state = read_state(mv)
        if state is None:
            return _start(cfg, client, mv, now)
        _sync_weight(cfg, client, mv, state, now)
        check = None
        if state.status in (RolloutStatus.RUNNING, RolloutStatus.PAUSED) and cfg.canary.alarms.enabled:
            check = check_rollout(cfg, client, mv, now)  # one read of the prediction log
            if check.breaches:
                return _alarm_rollback(cfg, client, state, now, check, actor or default_actor())
        if state.status == RolloutStatus.PAUSED:
            return TickResult("paused", f"rollout of version {mv.version} is paused at step {state.step}: "
                              f"{state.paused_reason}; run `churn canary resume`", name, state.version, state,
                              alarms=check)
        if state.status != RolloutStatus.RUNNING:
            return TickResult("done", f"rollout of version {mv.version} is {state.status}", name,
                              state.version, state)
        res = _judge_step(cfg, client, state, now, judge, as_of, actor or default_actor())
        res.alarms = check
        return res


def _start(cfg: ChurnConfig, client: MlflowClient, mv: ModelVersion, now: datetime) -> TickResult:
    steps = cfg.canary.steps
    first = steps[0]
    assert first.weight is not None  # the config refuses a plan starting with a pause
    state = RolloutState(cfg.training.model_name, str(mv.version), version_ref(mv),
                         [s.model_dump() for s in steps], 0, now, RolloutStatus.RUNNING,
                         float(first.weight))
    if first.weight >= 100:  # a plan of one step {weight: 100}: judged at the config's canary_fraction
        state.weight = cfg.serving.canary_fraction * 100
    reason = f"rollout started: step 0 routes {state.weight:g} % of customers to the canary"
    run_id = _record(cfg, state, "start", reason, 0, now)
    _write(cfg, client, state, now)
    clear_alarm(cfg, state.model_name)  # the previous canary's alarm, if it fired
    return TickResult("start", reason, state.model_name, state.version, state, run_id=run_id)


def _judge_step(cfg: ChurnConfig, client: MlflowClient, state: RolloutState, now: datetime,
                judge: Judge, as_of: datetime | None, actor: str) -> TickResult:
    steps = state.steps()
    step = steps[state.step]
    name = state.model_name
    when = utc(as_of) if as_of is not None else default_as_of(cfg, now)
    outcome = judge(cfg, when, state.step_started_at, False)
    if outcome.verdict == JudgeGrade.FAIL:  # never waits for the bake
        return _rollback(cfg, client, state, now, outcome, actor)
    baked = now - state.step_started_at
    bake = timedelta(seconds=step.bake_seconds)
    if baked < bake:
        left = (bake - baked).total_seconds()
        return TickResult("wait", f"step {state.step} at {state.weight:g} %: baking, {left:.0f} s of "
                          f"{step.bake} left", name, state.version, state, outcome)
    need = cfg.canary.needed(cfg.serving)
    rows = {arm: outcome.rows.get(arm, 0) for arm in ("champion", "canary")}
    short = {arm: n for arm, n in rows.items() if n < need}
    if short or outcome.verdict == JudgeGrade.INSUFFICIENT:
        counts = ", ".join(f"{arm} {n}" for arm, n in rows.items())
        return TickResult("wait", f"step {state.step} at {state.weight:g} %: waiting for canary.min_requests="
                          f"{need} logged predictions per arm since the step started ({counts}); "
                          + "; ".join(outcome.reasons), name, state.version, state, outcome)
    if outcome.verdict == JudgeGrade.MARGINAL:
        return _pause(cfg, client, state, now, "judge: marginal: " + "; ".join(outcome.reasons), outcome)
    # pass: the next step, or the end of the plan
    nxt = state.step + 1
    if (step.weight or 0) >= 100 or nxt >= len(steps) or (steps[nxt].weight or 0) >= 100:
        return _promote(cfg, client, state, now, judge, when, actor)
    from_step = state.step
    state.step, state.step_started_at = nxt, now
    if steps[nxt].pause:
        state.status, state.paused_reason = RolloutStatus.PAUSED, f"plan pause at step {nxt}"
        reason = f"judge passed step {from_step}; plan pause at step {nxt} (weight stays {state.weight:g} %)"
        action = "pause"
    else:
        state.weight = float(steps[nxt].weight or 0)
        reason = f"judge passed step {from_step}; step {nxt} routes {state.weight:g} % of customers"
        action = "advance"
    run_id = _record(cfg, state, action, reason, from_step, now, outcome)
    _write(cfg, client, state, now)
    return TickResult(action, reason, name, state.version, state, outcome, run_id)


def _pause(cfg: ChurnConfig, client: MlflowClient, state: RolloutState, now: datetime, reason: str,
           outcome: JudgeOutcome | None, action: str = "pause") -> TickResult:
    state.status, state.paused_reason = RolloutStatus.PAUSED, reason[:500]
    run_id = _record(cfg, state, action, reason, state.step, now, outcome)
    _write(cfg, client, state, now)
    return TickResult(action, f"paused at step {state.step}: {reason}; run `churn canary resume`",
                      state.model_name, state.version, state, outcome, run_id)


def _rollback(cfg: ChurnConfig, client: MlflowClient, state: RolloutState, now: datetime,
              outcome: JudgeOutcome, actor: str) -> TickResult:
    reason = f"rollout step {state.step}: judge failed the canary: " + "; ".join(outcome.reasons)
    res = rollback(cfg, reason, version=state.version, evidence=outcome.evaluation, actor=actor)
    state.status, state.weight = RolloutStatus.ROLLED_BACK, 0.0
    run_id = _record(cfg, state, "rollback", reason, state.step, now, outcome, res.run_id)
    _write(cfg, client, state, now)
    return TickResult("rollback", res.message, state.model_name, state.version, state, outcome, run_id,
                      res.run_id)


def _alarm_rollback(cfg: ChurnConfig, client: MlflowClient, state: RolloutState, now: datetime,
                    check: AlarmCheck, actor: str) -> TickResult:
    """An alarm breached: roll back at once (the judge's rollback path, with the alarm check as
    the transition's evidence), record the step change with the alarm, raise the alert."""
    reason = f"rollout step {state.step}: alarm: {check.summary()}"
    res = rollback(cfg, reason, version=state.version, evidence=check.evidence(now), actor=actor)
    state.status, state.weight = RolloutStatus.ROLLED_BACK, 0.0
    run_id = _record(cfg, state, "rollback", reason, state.step, now, None, res.run_id, check)
    _write(cfg, client, state, now)
    raise_alarm(cfg, check, run_id, res.run_id)
    return TickResult("rollback", f"{res.message}: alarm: {check.summary()}", state.model_name, state.version,
                      state, None, run_id, res.run_id, check)


def _promote(cfg: ChurnConfig, client: MlflowClient, state: RolloutState, now: datetime, judge: Judge,
             when: datetime, actor: str) -> TickResult:
    """The end of the plan: the judge again, recorded (its verdict signed on the canary: the
    decision the guard and :func:`~mlflow_churn.serving.transitions.promote` require), then
    the promotion on that evidence. A refused promotion pauses the rollout with the reason."""
    recorded = judge(cfg, when, state.step_started_at, True)
    if recorded.verdict == JudgeGrade.FAIL:
        return _rollback(cfg, client, state, now, recorded, actor)
    if recorded.verdict == JudgeGrade.MARGINAL:
        return _pause(cfg, client, state, now, "judge: marginal: " + "; ".join(recorded.reasons), recorded)
    if recorded.verdict != JudgeGrade.PASS:
        return TickResult("wait", f"step {state.step}: the recorded judge says {recorded.verdict}: "
                          + "; ".join(recorded.reasons), state.model_name, state.version, state, recorded)
    reason = f"rollout finished at step {state.step}: judge passed: " + "; ".join(recorded.reasons)
    try:
        res = promote(cfg, reason, version=state.version, evidence=recorded.evaluation, actor=actor)
    except ChurnError as exc:
        return _pause(cfg, client, state, now, f"promotion refused: {exc}", recorded, "blocked")
    from_step = state.step
    state.step, state.status, state.weight = len(state.plan) - 1, RolloutStatus.PROMOTED, 100.0
    state.paused_reason = None
    run_id = _record(cfg, state, "promote", reason, from_step, now, recorded, res.run_id)
    _write(cfg, client, state, now)
    clear_alarm(cfg, state.model_name)
    return TickResult("promote", res.message, state.model_name, state.version, state, recorded, run_id,
                      res.run_id)


def resume(cfg: ChurnConfig, now: datetime, reason: str = "") -> TickResult:
    """Continue a paused rollout (``churn canary resume``): at a plan ``pause`` step, go on to
    the next step (its weight goes live; a ``weight: 100`` step waits for the judge's pass to
    promote); after a marginal verdict or a refused promotion, restart the same step (bake
    and counts from ``now``). ChurnError when there is no paused rollout."""
    now = utc(now, "now")
    name = cfg.training.model_name
    client = registry_client(cfg)
    with rollout_lock(cfg):
        mv = _canary(client, name)
        if mv is None:
            raise ChurnError(f"'{name}' has no canary, so no rollout to resume")
        state = read_state(mv)
        if state is None or state.status != RolloutStatus.PAUSED:
            what = "has not started" if state is None else f"is {state.status}"
            raise ChurnError(f"the rollout of canary version {mv.version} of '{name}' {what}; "
                             "only a paused rollout can be resumed (see `churn canary status`)")
        steps = state.steps()
        from_step = state.step
        if steps[state.step].pause:
            state.step += 1
            nxt = steps[state.step]
            if nxt.weight is not None and nxt.weight < 100:
                state.weight = float(nxt.weight)
        state.status, state.paused_reason, state.step_started_at = RolloutStatus.RUNNING, None, now
        why = f"resumed at step {state.step} ({state.weight:g} %)" + (f": {reason}" if reason else "")
        run_id = _record(cfg, state, "resume", why, from_step, now)
        _write(cfg, client, state, now)
        return TickResult("resume", why, name, state.version, state, run_id=run_id)


def rollout_state(cfg: ChurnConfig) -> tuple[str | None, RolloutState | None]:
    """The canary version of the configured model and its rollout state (either None)."""
    client = registry_client(cfg)
    mv = _canary(client, cfg.training.model_name)
    return (str(mv.version) if mv else None), (read_state(mv) if mv is not None else None)


__all__ = ["HISTORY_KEPT", "STATE_TAG", "Judge", "JudgeOutcome", "RolloutState", "TickResult",
           "canary_judge", "read_state", "resume", "rollout_figure", "rollout_lock", "rollout_state", "tick"]
