"""Retrain on demand of the monitoring policy: monitor -> retrain -> gate, unattended.

:func:`retrain` reads the newest monitoring decision about the current champion (runs
tagged ``monitor.model_name`` / ``monitor.model_version`` / ``monitor.as_of`` /
``monitor.action`` by :mod:`mlflow_churn.monitoring.monitor`, as of at most ``as_of``) and

- trains a challenger (:func:`mlflow_churn.training.train.train`: the last
  ``training.window_days`` days plus the optional ``training.history_days`` of history,
  labels matured by ``as_of``) and gates it against the champion
  (:func:`mlflow_churn.evaluation.evaluate.evaluate`) when that decision is ``retrain``,
  it has not been acted on yet and the last model was trained at least
  ``monitoring.policy.cooldown_days`` before ``as_of``;
- otherwise records a no-op with the reason (no champion, no decision yet, the decision is
  ``ok`` / ``investigate`` / ``blocked``, already acted on, or in cooldown).

``force=True`` retrains whatever the decision and the cooldown (the reason says what they
were). A challenger trained because performance dropped (a performance trigger among the
decision's ``fired``) gets the version tag ``refresh_due`` (``policy.refresh_after_drift``):
the drop was seen at the decision's ``as_of``, and only a model trained
``label_horizon_days + holdout_days + training.window_days`` later learns from labels that
all follow it; monitoring then asks for that one more retrain (a pending ``refresh_due`` of
the champion carries over, the earlier one wins; the refresh itself sets none).

**Targeted retrain.** When the decision acted on names segments (its ``segments``,
``column=value``) and ``training.segment_weight`` is not 1, the challenger is trained with
those segments' production-window and validation rows weighted by it
(:mod:`mlflow_churn.training.targeting`); the training run and the version record the targets
(``churn.target_segments``, ``churn.segment_weight``) and the gate then requires each named
segment to improve on the champion beyond noise while no other segment degrades beyond
``evaluation.segment_tolerance`` (:mod:`mlflow_churn.evaluation.evaluate`).

Either way the outcome is one MLflow run named ``retrain <date>`` (in
``training.experiment``; inside ``mlflow run`` the project run itself) with params, the
metrics ``retrained``, ``val_auc`` and ``gate_passed``, tags ``retrain.*`` and ``decision``,
and ``decision.json``. The training run (with its nested Optuna trials) and the gate run
are nested under it.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from mlflow_churn.config import ChurnConfig
from mlflow_churn.evaluation.evaluate import GateDecision, evaluate
from mlflow_churn.monitoring.monitor import TAG_PREFIX as MON
from mlflow_churn.monitoring.policy import (
    PERFORMANCE_METRICS,
    REFRESH,
    PolicyAction,
    decision_from_dict,
)
from mlflow_churn.progress import ProgressArg
from mlflow_churn.registry.aliases import CHAMPION, alias_version
from mlflow_churn.tags import DECISION_KIND_TAG, REFRESH_TAG
from mlflow_churn.tags import RETRAIN_PREFIX as TAG_PREFIX
from mlflow_churn.times import utc
from mlflow_churn.tracking import client_run, download_if_present, fail_fast, project_run_id, setup_mlflow
from mlflow_churn.training.targeting import segment_targets
from mlflow_churn.training.train import TrainResult, train

RETRAINED = "retrained"
NOOP = "noop"
DECISION_FILE = "decision.json"


@dataclass
class RetrainResult:
    """What :func:`retrain` did: ``action`` is ``retrained`` or ``noop``.

    ``train`` / ``gate`` are set when a challenger was trained and gated; ``run_id`` is the
    retrain run; ``monitor_decision`` the monitoring decision it read (None when none).
    """

    action: str
    reason: str
    train: TrainResult | None
    gate: GateDecision | None
    run_id: str
    as_of: datetime | None = None
    forced: bool = False
    champion_version: str | None = None
    monitor_decision: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (what ``decision.json`` holds)."""
        train = None
        if self.train is not None:
            t = self.train
            train = {"run_id": t.run_id, "model_uri": t.model_uri,
                     "version": str(t.version) if t.version is not None else None,
                     "val_auc": t.val_auc, "window_start": t.window_start, "window_end": t.window_end,
                     "feature_set_hash": t.feature_set_hash, "best_params": t.best_params,
                     "target_segments": list(t.targets.segments) if t.targets else [],
                     "segment_weight": t.targets.weight if t.targets else None}
        gate = None
        if self.gate is not None:
            g = self.gate
            gate = {"run_id": g.run_id, "passed": g.passed, "decision": g.decision, "reasons": g.reasons,
                    "challenger_version": str(g.challenger_version),
                    "champion_version": str(g.champion_version) if g.champion_version is not None else None,
                    "holdout_start": g.holdout_start, "holdout_end": g.holdout_end,
                    "holdout_rows": g.holdout_rows, "reused": g.reused}
        return {
            "action": self.action, "reason": self.reason, "run_id": self.run_id,
            "as_of": self.as_of.isoformat() if self.as_of else None, "forced": self.forced,
            "champion_version": self.champion_version, "monitor_decision": self.monitor_decision,
            "train": train, "gate": gate,
        }



def _quote(value: str) -> str:
    return value.replace("'", "\\'")


def champion_decision(client: Any, model_name: str, version: str, as_of: datetime) -> dict[str, Any] | None:
    """The newest finished monitoring decision about ``model_name`` v``version`` whose window
    ends at or before ``as_of``: ``{action, reasons, features, segments, fired, as_of,
    run_id, model_version}``; None when there is none."""

    exps = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(
        exps, filter_string=(f"tags.`{MON}model_name` = '{_quote(model_name)}' and "
                             f"tags.`{MON}model_version` = '{_quote(version)}'"),
        max_results=5000,
    )
    found = []
    for r in runs:
        ts = r.data.tags.get(f"{MON}as_of")
        if r.info.status == "FINISHED" and ts and datetime.fromisoformat(ts) <= as_of:
            found.append((datetime.fromisoformat(ts), r.info.start_time or 0, r))
    if not found:
        return None
    _, _, run = max(found, key=lambda item: (item[0], item[1]))
    tags = run.data.tags
    out: dict[str, Any] = {
        "action": tags.get(f"{MON}action"), "reasons": [], "features": [], "segments": [], "fired": [],
        "as_of": tags[f"{MON}as_of"], "run_id": run.info.run_id, "model_version": version,
    }
    with tempfile.TemporaryDirectory() as tmp:
        local = download_if_present(client, run.info.run_id, DECISION_FILE, tmp)
        # a decision run without its artifact: the tags still hold the action
        data = json.loads(Path(local).read_text()) if local is not None else {}
    if data.get("decision"):  # read through the policy's one reader (its schema version checked)
        parsed = decision_from_dict(data["decision"])
        out.update(action=parsed.action, reasons=parsed.reasons, features=parsed.features,
                   segments=parsed.segments, fired=parsed.fired)
    return out


def _retrain_runs(client: Any, model_name: str, **tags: str) -> list[Any]:
    exps = [e.experiment_id for e in client.search_experiments()]
    flt = " and ".join([f"tags.`{TAG_PREFIX}model_name` = '{_quote(model_name)}'",
                        f"tags.`{TAG_PREFIX}action` = '{RETRAINED}'"]
                       + [f"tags.`{TAG_PREFIX}{k}` = '{_quote(v)}'" for k, v in tags.items()])
    return client.search_runs(exps, filter_string=flt, max_results=5000)


def _last_training(client: Any, model_name: str, champion_tags: dict[str, str],
                  as_of: datetime) -> datetime | None:
    """When the newest model was trained, as of ``as_of``: the latest of the champion's
    ``as_of`` tag and the ``as_of`` of earlier retrain runs (gated or rejected)."""
    times = []
    if champion_tags.get("as_of"):
        times.append(datetime.fromisoformat(champion_tags["as_of"]))
    for r in _retrain_runs(client, model_name):
        ts = r.data.tags.get(f"{TAG_PREFIX}as_of")
        if ts:
            times.append(datetime.fromisoformat(ts))
    times = [t for t in times if t <= as_of]
    return max(times) if times else None


def plan(cfg: ChurnConfig, client: Any, as_of: datetime, force: bool) -> tuple[bool, str, str | None,
                                                                               dict[str, Any] | None]:
    """``(train?, reason, champion version, monitoring decision)`` without side effects."""

    name = cfg.training.model_name
    champ = alias_version(client, name, CHAMPION)
    if champ is None:
        if force:
            return True, f"forced: model '{name}' has no champion yet (gate: floors)", None, None
        return False, (f"model '{name}' has no champion, so there is no monitoring decision to act on; "
                       "train one (churn train, churn evaluate, promote) or pass --force"), None, None
    version = str(champ.version)
    decision = champion_decision(client, name, version, as_of)
    cooldown = cfg.monitoring.policy.cooldown_days
    last = _last_training(client, name, champ.tags or {}, as_of)
    in_cooldown = last is not None and as_of < last + timedelta(days=cooldown)
    what = (f"latest decision for champion v{version}: '{decision['action']}' at {decision['as_of']} "
            f"(run {decision['run_id']})" if decision else f"no monitoring decision for champion v{version}")
    if force:
        until = (last + timedelta(days=cooldown)).isoformat() if in_cooldown and last else ""
        extra = f"; cooldown until {until} ignored" if until else ""
        return True, f"forced; {what}{extra}", version, decision
    if decision is None:
        return False, f"{what} as of {as_of.isoformat()}; run churn monitor first", version, None
    if decision["action"] != PolicyAction.RETRAIN:
        why = "; ".join(decision.get("reasons") or [])
        return False, f"{what}{': ' + why if why else ''}", version, decision
    acted = _retrain_runs(client, name, decision_run_id=decision["run_id"])
    if acted:
        return False, f"{what} was already acted on by retrain run {acted[0].info.run_id}", version, decision
    if in_cooldown:
        return False, (f"{what}, but in cooldown: the last model was trained at {last.isoformat()} and "
                       f"monitoring.policy.cooldown_days = {cooldown} allows the next one from "
                       f"{(last + timedelta(days=cooldown)).isoformat()}"), version, decision
    why = "; ".join(decision.get("reasons") or [])
    return True, f"{what}{': ' + why if why else ''}", version, decision


def refresh_due(cfg: ChurnConfig, decision: dict[str, Any] | None,
                champion_tags: dict[str, str]) -> str | None:
    """The ``refresh_due`` tag (ISO time) of a challenger trained on ``decision``; None for none."""

    if not cfg.monitoring.policy.refresh_after_drift:
        return None
    fired = list((decision or {}).get("fired") or [])
    if REFRESH in fired:
        return None  # this is the refresh
    pending = champion_tags.get(REFRESH_TAG)
    due = [datetime.fromisoformat(pending)] if pending else []
    if decision and any(f.split(" ")[0].split("[")[0] in PERFORMANCE_METRICS for f in fired):
        lag = cfg.features.label_horizon_days + cfg.evaluation.holdout_days + cfg.training.window_days
        due.append(datetime.fromisoformat(str(decision["as_of"])) + timedelta(days=lag))
    return min(due).isoformat() if due else None


def retrain(cfg: ChurnConfig, as_of: datetime, force: bool = False, progress: ProgressArg = None,
            decision: dict[str, Any] | None = None, gate: bool = True) -> RetrainResult:
    """:func:`_retrain`; a tracking server that fails mid-way ends it with one ChurnError
    naming the server (runs marked FAILED or journalled, see :mod:`mlflow_churn.tracking`)."""

    with fail_fast(cfg, f"retraining '{cfg.training.model_name}'"):
        return _retrain(cfg, as_of, force, progress, decision, gate)


def _retrain(cfg: ChurnConfig, as_of: datetime, force: bool = False, progress: ProgressArg = None,
             decision: dict[str, Any] | None = None, gate: bool = True) -> RetrainResult:
    """Act on the newest monitoring decision at ``as_of`` (tz-aware UTC); see the module doc.

    ``decision``: the monitoring decision to act on when it was not logged (a fast replay);
    None reads the newest one from MLflow. ``gate=False`` trains only: the gate is left to the
    registry webhook that the new ``challenger`` alias fires (`churn hooks serve`).

    Training uses ``cfg.training`` (window, history, trials); the gate ``cfg.evaluation``.
    Returns the :class:`RetrainResult`. Raises ChurnError for bad input (e.g. an ``as_of``
    whose window is outside the data) after recording the failed run.
    """
    from mlflow.tracking import MlflowClient

    as_of = utc(as_of)
    exp_id = setup_mlflow(cfg)
    client = MlflowClient()
    name = cfg.training.model_name
    run_name = f"retrain {as_of:%Y-%m-%d}"
    project = project_run_id()  # inside `mlflow run`: the retrain run is the project run itself
    # what to do is read before any run is opened: an outage here fails with nothing recorded
    do_train, reason, champ_version, found = plan(cfg, client, as_of, force)
    with client_run(client, cfg, run_name, experiment_id=exp_id, parent_run_id=project,
                    resume=True) as parent_id:
        result = RetrainResult(action=NOOP, reason="", train=None, gate=None, run_id=parent_id, as_of=as_of,
                               forced=force)
        decision = decision or found
        result.reason, result.champion_version, result.monitor_decision = reason, champ_version, decision
        t, pol = cfg.training, cfg.monitoring.policy
        for key, value in {"as_of": as_of.isoformat(), "force": force, "model_name": name,
                           "champion_version": champ_version or "none", "window_days": t.window_days,
                           "history_days": t.history_days, "n_trials": t.n_trials,
                           "cooldown_days": pol.cooldown_days}.items():
            client.log_param(parent_id, key, value)
        client.set_tag(parent_id, f"{TAG_PREFIX}model_name", name)
        client.set_tag(parent_id, f"{TAG_PREFIX}as_of", as_of.isoformat())
        client.set_tag(parent_id, f"{TAG_PREFIX}decision_run_id", (decision or {}).get("run_id", "none"))
        client.set_tag(parent_id, DECISION_KIND_TAG, "retrain")
        if do_train:
            targets = segment_targets((decision or {}).get("segments"), t.segment_weight)
            client.log_param(parent_id, "segment_weight", t.segment_weight)
            client.set_tag(parent_id, f"{TAG_PREFIX}target_segments",
                           ",".join(targets.segments) if targets else "none")
            with client_run(client, cfg, f"train {as_of:%Y-%m-%d}", parent_run_id=parent_id) as child:
                result.train = train(cfg, as_of, progress=progress, parent_run_id=child, targets=targets)
            result.action = RETRAINED
            champ_tags = client.get_model_version(name, champ_version).tags if champ_version else {}
            due = refresh_due(cfg, decision, champ_tags or {})
            if due:
                client.set_model_version_tag(name, str(result.train.version), REFRESH_TAG, due)
            if gate:
                result.gate = evaluate(cfg, as_of, str(result.train.version), CHAMPION,
                                       parent_run_id=parent_id)
        _record(client, result)
    return result


def _record(client: Any, result: RetrainResult) -> None:
    """Log the outcome into the retrain run (its opener ends it)."""
    from mlflow.entities import Metric, RunTag

    tags = {f"{TAG_PREFIX}action": result.action, f"{TAG_PREFIX}reason": result.reason[:4000],
            "decision": result.action}
    metrics = {"retrained": float(result.action == RETRAINED)}
    if result.train is not None:
        tags[f"{TAG_PREFIX}challenger_version"] = str(result.train.version)
        tags[f"{TAG_PREFIX}train_run_id"] = result.train.run_id
        metrics["val_auc"] = float(result.train.val_auc)
    if result.gate is not None:
        tags[f"{TAG_PREFIX}gate"] = result.gate.decision
        tags[f"{TAG_PREFIX}gate_run_id"] = result.gate.run_id
        metrics["gate_passed"] = float(result.gate.passed)
    now_ms = int(time.time() * 1000)
    client.log_batch(result.run_id, metrics=[Metric(k, v, now_ms, 0) for k, v in metrics.items()],
                     tags=[RunTag(k, v) for k, v in tags.items()])
    client.log_dict(result.run_id, result.to_dict(), DECISION_FILE)
