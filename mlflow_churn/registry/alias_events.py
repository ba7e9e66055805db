"""What the webhook receiver does with alias events: history, unguarded moves, UI promotions.

Each ``model_version_alias.created`` / ``.deleted`` delivery for the configured model, and
one reconciliation at every start, runs :meth:`AliasWatcher.handle` on one background
thread (in order, never two at once):

1. The moves of the event, from the history's one writer (:func:`mlflow_churn.registry.history.writer_of`):

   - no guard in front (``receiver``): the receiver IS the writer of its model's history (it
     tags the model ``churn.history_writer=receiver``): each delivery is recorded once, by
     its id, in MLflow's event-time order (:func:`~mlflow_churn.registry.history.record_delivery`),
     with the actor, reason and evidence run the project claimed in the model tag
     ``churn.claim.<alias>`` (else ``unknown``); at start, moves made while it was down are
     reconciled under ``registry_lock`` (actor ``unknown (reconciled)``);
   - a churn-guard in front (``guard``): the guard has recorded the move; the receiver waits
     for that record and takes the guard's new moves (it records nothing);
   - the embedded store (``project``, tests): the moves the registry proves under the
     history lock (:func:`~mlflow_churn.registry.history.reconcile`).

2. Each new move of a protected alias (:func:`~mlflow_churn.registry.promotion.guarded_aliases`:
   ``champion``, ``previous-champion``, ``canary`` and ``registry.protected_aliases``) is
   checked with :func:`mlflow_churn.registry.promotion.check_promotion` on the signed
   decisions, as the guard would have checked it, on the aliases before the move (a
   deletion is checked as a deletion of the version the alias left). Not the guard's moves,
   which it checked, nor moves that carry the project's claim, which follow the lifecycle:
   neither is judged nor reverted here; a registry they leave failing still meets step 3,
   audited and alerted. For the others:

   - refused -> an ``unguarded_promotion`` audit run in ``registry.audit_experiment``
     (tags ``decision=unguarded_promotion``, ``rule``, ``alias``, ``from_version``,
     ``to_version``, ``history_run_id``; ``decision.json``), the counter
     ``churn_hooks_unguarded_promotions_total{alias}`` of ``GET /metrics``, an alert to
     ``hooks.alert_url`` when set, and with ``registry.revert_unguarded: true`` the alias
     moved back to the version it left (deleted when it had none);
   - ``champion`` allowed onto the version that is the current ``canary`` (its canary
     passed) -> ``promote_by_hand`` (wired by ``churn hooks serve`` to
     :func:`mlflow_churn.serving.transitions.adopt_promotion`): the same transition run,
     ``previous-champion``, ``canary`` dropped and stages as ``churn canary promote``.

3. Then, under the model's registry lock (so a promotion in flight is seen finished),
   :func:`mlflow_churn.registry.verify.verify_model` checks the whole current state:
   signatures, model-file digests and the lifecycle of every protected alias. Anything that
   does not verify is unguarded too (rule ``verify``): an allowed move of this event onto an
   alias that does not verify is audited, alerted and (``registry.revert_unguarded``)
   reverted as above; a failure no move of this event explains (model files replaced in the
   artifact store, a tag written past the guard) gets an audit run and an alert.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mlflow_churn.alerts import fire, resolve
from mlflow_churn.background import QueueWorker
from mlflow_churn.config import ChurnConfig
from mlflow_churn.errors import is_missing
from mlflow_churn.registry import history
from mlflow_churn.registry.aliases import CANARY, CHAMPION, aliases_of, move_alias, remove_alias
from mlflow_churn.registry.claims import read_tag
from mlflow_churn.registry.history import UNKNOWN, AliasMove, read_moves
from mlflow_churn.registry.lock import registry_lock
from mlflow_churn.registry.promotion import check_promotion, guarded_aliases
from mlflow_churn.registry.verify import VerifyReport, verify_model
from mlflow_churn.tracking import client_run, sqlite_store_ready
from mlflow_churn.web.metrics import Metrics

_log = logging.getLogger(__name__)
UNGUARDED = "unguarded_promotion"
UNGUARDED_METRIC = "churn_hooks_unguarded_promotions_total"
UNGUARDED_ALERT = "UnguardedPromotion"
#: seconds the receiver waits for the guard's record of a delivered move
GUARD_RECORD_WAIT_S = 60.0


def unguarded_alert_key(model: str, alias: str) -> str:
    """The alert condition of an unguarded move of ``alias`` of ``model``."""
    return f"unguarded:{model}:{alias}"

#: (version, previous champion, actor, reason, moved_at) -> transition run id
PromoteByHand = Callable[[str, "str | None", str, str, datetime], "str | None"]


@dataclass(frozen=True)
class AliasEvent:
    """One alias delivery (``action`` created | deleted) or a reconciliation (``reconcile``)."""

    model: str
    action: str
    alias: str | None = None
    version: str | None = None
    at: datetime | None = None  # when MLflow sent it (the payload's timestamp)
    delivery_id: str | None = None


@dataclass
class AliasOutcome:
    """What handling an event did (for ``GET /deliveries/{id}`` and the logs)."""

    moves: list[AliasMove]
    unguarded: list[str]  # audit run ids
    reverted: list[str]  # "alias -> version"
    promotions: list[str]  # transition run ids

    def summary(self) -> str:
        parts = [f"{len(self.moves)} move(s) recorded"]
        if self.unguarded:
            parts.append(f"unguarded: audit run(s) {', '.join(self.unguarded)}")
        if self.reverted:
            parts.append(f"reverted {', '.join(self.reverted)}")
        if self.promotions:
            parts.append(f"promotion completed: run(s) {', '.join(self.promotions)}")
        return "; ".join(parts)


#: the receiver's /metrics: counter name -> help text
METRICS = {UNGUARDED_METRIC: "protected-alias moves check_promotion refused (made without the guard)",
           "churn_hooks_alias_moves_recorded_total": "alias moves the receiver recorded in the history"}


class AliasWatcher(QueueWorker[AliasEvent]):
    """Handles alias events on one background thread (see module doc)."""

    def __init__(self, cfg: ChurnConfig, promote_by_hand: PromoteByHand | None = None,
                 on_done: Callable[[AliasEvent, str, str, str | None], None] | None = None,
                 clock: Callable[[], datetime] | None = None) -> None:
        self.cfg = cfg
        self.metrics = Metrics()
        for name, text in METRICS.items():
            self.metrics.describe(name, "counter", text)
        self._promote_by_hand = promote_by_hand
        self._on_done = on_done or (lambda *_: None)
        self._clock = clock or (lambda: datetime.now(UTC))
        uri = cfg.mlflow_tracking_uri
        sqlite_store_ready(uri)
        self.client = MlflowClient(uri, uri)
        self.last_synced: datetime | None = None
        self._guard_cursor: dict[str, int] = {}  # model -> seq of the last guard move taken
        self._tagged: set[str] = set()  # models tagged churn.history_writer=receiver
        self._claims_taken: set[str] = set()  # claims already matched to a delivery
        super().__init__("churn-alias-watcher", self._handle, self._failed)  # starts the thread

    # ------------------------------------------------------------------ queue (join, stop: QueueWorker)
    def submit(self, event: AliasEvent) -> None:
        self.put(event)

    def _handle(self, event: AliasEvent) -> None:
        outcome = self.handle(event)
        self._on_done(event, "done", outcome.summary(), (outcome.unguarded or [None])[0])

    def _failed(self, event: AliasEvent, exc: Exception) -> None:
        _log.error("alias event %s failed", event, exc_info=exc)
        self._on_done(event, "failed", f"{type(exc).__name__}: {exc}", None)

    # ------------------------------------------------------------------ handling
    def handle(self, event: AliasEvent) -> AliasOutcome:
        """Record (or, behind a guard, read) the moves behind ``event``, then check and act on
        each protected one (module doc)."""
        now = self._clock()
        mode = self.mode()
        if event.action == "reconcile":
            moves = self._reconciled(event.model, mode, now)
        elif mode == "guard":
            moves = self._guard_moves(event)
        elif mode == "receiver":
            moves = self._delivered(event, now)
        else:
            with history.history_lock(self.client, event.model):
                moves = history.reconcile(self.client, event.model, now=now, moved_after=self._known_until(
                    event.model), reason=f"model_version_alias.{event.action} (delivery {event.delivery_id})")
        self.last_synced = now
        outcome = AliasOutcome(moves, [], [], [])
        checked: list[tuple[AliasMove, bool]] = []  # (protected move, allowed)
        guarded = guarded_aliases(self.cfg)
        current = {a: str(v) for a, v in aliases_of(self.client, event.model).items()} if moves else {}
        start = dict(current)  # the aliases before this event's moves (all of them undone)
        for move in reversed(moves):
            if move.from_version is None:
                start.pop(move.alias, None)
            else:
                start[move.alias] = move.from_version
        for move in moves:
            if mode != "guard":
                self.metrics.inc("churn_hooks_alias_moves_recorded_total", {"alias": move.alias})
            if move.alias not in guarded:
                continue
            if move.source == "guard" or move.via:  # checked by the guard / the project's own move
                if move.source == "guard" and not move.via:
                    self._adopt(move, outcome, "allowed by churn-guard")
                continue  # not re-judged nor reverted here: step 3 still audits a state that fails
            checked.append((move, self._check(move, outcome, current, start)))
        if guarded and event.model == self.cfg.training.model_name:
            self._verify(event, checked, outcome)
        return outcome

    def _verify(self, event: AliasEvent, checked: list[tuple[AliasMove, bool]],
                outcome: AliasOutcome) -> None:
        """The current state must verify (module doc, step 3); what does not is unguarded: an
        allowed move of this event onto a failing alias like a refused one; a failure no move of
        this event touched on its own (a refused move was audited already)."""
        try:
            self.client.get_registered_model(event.model)
        except MlflowException as exc:
            if is_missing(exc):
                return  # no model (yet, or any more): no alias to verify
            raise
        with registry_lock(self.cfg):  # a promotion / rollback in flight finishes first
            report = verify_model(self.client, self.cfg, event.model)
        if report.ok:
            return
        failing = {f.alias for f in report.failed}
        message = "; ".join(f"{f.alias} v{f.version} {f.check}: {f.message}" for f in report.failed)
        for move, allowed in checked:
            if allowed and move.alias in failing:
                self._unguarded(move, "verify", f"{move.alias} of '{move.model}' moved to version "
                                f"{move.to_version or '(none)'}, and the registry does not verify: {message}",
                                {"verify": report.to_dict()}, outcome)
        uncovered = failing - {move.alias for move, _ in checked}
        if uncovered:
            first = next(f for f in report.failed if f.alias in uncovered)
            self._unverified(event, report, first.alias, first.version, message, outcome)

    def _unverified(self, event: AliasEvent, report: VerifyReport, alias: str, version: str | None,
                    message: str, outcome: AliasOutcome) -> None:
        """Audit run and alert of a state that does not verify with no move of this event to blame."""
        move = AliasMove(event.model, alias, version or None, version or None, event.at or self._clock(),
                         actor=UNKNOWN, reason=f"{event.action} event (delivery {event.delivery_id})",
                         evidence_run_id=None, source="verify", move_key="", run_id="")
        run_id = self._audit(move, "verify", f"the registry of '{event.model}' does not verify: {message}",
                             {"verify": report.to_dict()})
        outcome.unguarded.append(run_id)
        self.metrics.inc(UNGUARDED_METRIC, {"alias": alias})
        self._alert(move, f"the registry of '{event.model}' does not verify: {message}", run_id)

    # ------------------------------------------------------------------ the moves of an event
    def mode(self) -> str:
        """Who writes the history here: ``guard`` (a churn-guard server), ``receiver`` (this
        receiver, in front of a plain server) or ``project`` (an embedded store)."""
        uri = self.cfg.mlflow_tracking_uri
        if not uri.startswith(("http://", "https://")):
            return "project"
        return "guard" if history.is_guarded(self.client) else "receiver"

    def _reconciled(self, model: str, mode: str, now: datetime) -> list[AliasMove]:
        """At start: behind a guard, only where to take the guard's moves from; else the moves
        the registry proves were made while nobody recorded them (under the writers' lock)."""
        if mode == "guard":
            self._guard_cursor[model] = max((m.seq for m in read_moves(self.client, model)), default=0)
            return []
        reason = "noticed at the receiver's start (moved while it was down)"
        if mode == "receiver":
            self._claim_writer(model)
            lock = registry_lock(self.cfg)  # the project's transitions hold it across their moves
        else:
            lock = history.history_lock(self.client, model)
        with lock:
            return history.reconcile(self.client, model, now=now, reason=reason,
                                     moved_after=self._known_until(model))

    def _claim_writer(self, model: str) -> None:
        """Tag the model ``churn.history_writer=receiver`` (once): the project then leaves the
        recording of its moves to this receiver."""
        if model in self._tagged:
            return
        try:
            tags = self.client.get_registered_model(model).tags
        except MlflowException as exc:
            if is_missing(exc):
                return  # no model yet: tagged at its first delivery
            raise
        if tags.get(history.WRITER_TAG) != "receiver":
            self.client.set_registered_model_tag(model, history.WRITER_TAG, "receiver")
        self._tagged.add(model)

    def _delivered(self, event: AliasEvent, now: datetime) -> list[AliasMove]:
        """The receiver writer: the delivery's move, recorded once (none when it is recorded
        already or moved nothing)."""
        self._claim_writer(event.model)
        to = event.version if event.action == "created" else None
        at = event.at or now
        try:
            tags = self.client.get_registered_model(event.model).tags
        except MlflowException as exc:
            if not is_missing(exc):  # an outage is not "no claims"
                raise
            tags = {}
        claim = read_tag(tags, event.alias or "", to, at, self._claims_taken)
        what = f"model_version_alias.{event.action} (delivery {event.delivery_id})"
        move = history.record_delivery(
            self.client, event.model, event.alias or "", to, at, event.delivery_id or f"at-{at.isoformat()}",
            actor=f"{claim.actor} (claimed)" if claim and claim.actor else UNKNOWN, claimed=bool(claim),
            reason=(claim.reason if claim else "") or what,
            evidence_run_id=(claim.evidence_run_id if claim else "") or None,
            via="mlflow-churn" if claim else "")
        return [move] if move is not None else []

    def _guard_moves(self, event: AliasEvent) -> list[AliasMove]:
        """Behind a guard: every move the guard recorded since the last one taken. The guard
        announces a move (a RUNNING run) before MLflow makes it and sends the delivery, so a
        delivered move still RUNNING is waited for (up to :data:`GUARD_RECORD_WAIT_S`); a
        delivery with no record at all moved nothing (a set to the version already there)."""
        to = event.version if event.action == "created" else None
        cursor = self._guard_cursor.get(event.model)
        deadline = time.monotonic() + GUARD_RECORD_WAIT_S
        while True:
            moves = read_moves(self.client, event.model, include_running=True)
            pending = [m for m in moves if m.status == "RUNNING" and m.alias == event.alias
                       and m.to_version == to and (cursor is None or m.seq > cursor)]
            if not pending or time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        done = [m for m in moves if m.status == "FINISHED"]
        if cursor is None:  # no start seen (a direct call): only this delivery's move
            new = [m for m in done if m.alias == event.alias and m.to_version == to][-1:]
        else:
            new = [m for m in done if m.seq > cursor]
        if new:
            self._guard_cursor[event.model] = max(m.seq for m in new)
        return new

    def _known_until(self, model: str) -> datetime | None:
        """The last time the aliases were known: the newest recorded move (or this process's
        last event), so a reconciled move happened in ``(that, now]``."""
        moves = read_moves(self.client, model)
        times = [m.moved_at for m in moves] + ([self.last_synced] if self.last_synced else [])
        return max(times) if times else None

    def _check(self, move: AliasMove, outcome: AliasOutcome, current: dict[str, str],
               start: dict[str, str]) -> bool:
        """Check one protected move as the guard would have, on the aliases before it; act on a
        refusal. True when allowed. ``current``: the aliases now; ``start``: before every move
        of this event. The order of several moves noticed at once (a reconciliation) is not
        known: a move is allowed when it is allowed after the event's other moves, or before
        them (a rollback removes previous-champion, then moves champion: each is allowed in
        one of the two)."""
        name = move.model
        if move.to_version is None and move.from_version is None:
            return True
        after_others = {a: v for a, v in current.items() if a != move.alias}
        if move.from_version is not None:
            after_others[move.alias] = move.from_version
        check = check_promotion(_AliasesAsOf(self.client, name, after_others), name, move.to_version,
                                self.cfg, move.alias)
        if not check.allowed and start != after_others:
            first = check_promotion(_AliasesAsOf(self.client, name, start), name, move.to_version, self.cfg,
                                    move.alias)
            check = first if first.allowed else check
        if check.allowed:
            self._adopt(move, outcome, check.message)
            return True
        self._unguarded(move, check.rule, check.message, check.evidence, outcome)
        return False

    def _adopt(self, move: AliasMove, outcome: AliasOutcome, why: str) -> None:
        """``champion`` set by hand onto the current canary: complete the promotion
        (``promote_by_hand``)."""
        canary = aliases_of(self.client, move.model).get(CANARY)  # now (an earlier move may have acted)
        if move.alias == CHAMPION and canary == move.to_version and self._promote_by_hand is not None:
            run_id = self._promote_by_hand(move.to_version, move.from_version, move.actor,
                                           f"champion set by hand ({move.actor}); {why}", move.moved_at)
            if run_id:
                outcome.promotions.append(run_id)

    def _unguarded(self, move: AliasMove, rule: str, message: str, evidence: dict[str, Any],
                   outcome: AliasOutcome) -> None:
        """Audit run, counter, alert and (registry.revert_unguarded) revert of ``move``."""
        run_id = self._audit(move, rule, message, evidence)
        outcome.unguarded.append(run_id)
        self.metrics.inc(UNGUARDED_METRIC, {"alias": move.alias})
        self._alert(move, message, run_id)
        if self.cfg.registry.revert_unguarded:
            self._revert(move, run_id, outcome)

    def _alert(self, move: AliasMove, message: str, run_id: str) -> None:
        """Fire ``unguarded:<model>:<alias>`` through the alert path; :meth:`_revert` resolves it
        once the alias is moved back (without revert it fires until a person resolves it:
        ``churn alerts resolve``)."""
        fire(self.cfg, unguarded_alert_key(move.model, move.alias),
             {"alertname": UNGUARDED_ALERT, "severity": "critical", "model": move.model,
              "alias": move.alias, "version": move.to_version or ""},
             {"summary": message, "audit_run_id": run_id, "history_run_id": move.run_id,
              "reverted": str(self.cfg.registry.revert_unguarded).lower()}, starts_at=move.moved_at)

    def _revert(self, move: AliasMove, audit_run_id: str, outcome: AliasOutcome) -> None:
        name = move.model
        if aliases_of(self.client, name).get(move.alias) not in (move.to_version, None) and move.to_version:
            return  # moved on since: do not undo someone else's later move
        who = {"actor": "churn hooks (revert_unguarded)", "evidence_run_id": audit_run_id,
               "reason": f"registry.revert_unguarded: {move.alias} moved without the guard"}
        mirror = self.cfg.evaluation.mirror_stages
        if move.from_version is None:
            remove_alias(self.client, name, move.alias, mirror, **who)
        else:
            move_alias(self.client, name, move.alias, move.from_version, mirror, **who)
        outcome.reverted.append(f"{move.alias} -> {move.from_version or '(none)'}")
        self.client.set_tag(audit_run_id, "reverted_to", move.from_version or "(none)")
        resolve(self.cfg, unguarded_alert_key(name, move.alias))

    def _audit(self, move: AliasMove, rule: str, message: str, evidence: dict[str, Any]) -> str:
        """An ``unguarded_promotion`` run in ``registry.audit_experiment``; its id."""
        exp_name = self.cfg.registry.audit_experiment
        exp = self.client.get_experiment_by_name(exp_name)
        try:
            exp_id = exp.experiment_id if exp else self.client.create_experiment(exp_name)
        except MlflowException:  # created concurrently
            exp_id = self.client.get_experiment_by_name(exp_name).experiment_id
        tags = {"kind": UNGUARDED, "decision": UNGUARDED, "rule": rule, "model_name": move.model,
                "alias": move.alias, "from_version": move.from_version or "",
                "to_version": move.to_version or "",
                "version": move.to_version or move.from_version or "", "actor": move.actor,
                "moved_at": move.moved_at.isoformat(), "history_run_id": move.run_id,
                "revert": str(self.cfg.registry.revert_unguarded).lower()}
        run_name = f"unguarded {move.alias} v{move.from_version or '-'} -> v{move.to_version or '-'}"
        with client_run(self.client, self.cfg, run_name, experiment_id=exp_id, tags=tags) as run_id:
            self.client.log_param(run_id, "message", message[:5000])
            decision = {"decision": UNGUARDED, "rule": rule, "message": message, "move": move.to_dict(),
                        "evidence": evidence, "revert_unguarded": self.cfg.registry.revert_unguarded}
            try:
                self.client.log_text(run_id, json.dumps(decision, indent=2, sort_keys=True, default=str),
                                     "decision.json")
            except Exception as exc:  # an artifact store the receiver cannot reach: the tags still tell it
                _log.warning("unguarded_promotion run %s: decision.json not written (%s)", run_id, exc)
                self.client.set_tag(run_id, "decision_json_error", str(exc)[:500])
        _log.warning("unguarded promotion: %s (audit run %s)", message, run_id)
        return run_id


class _AliasesAsOf:
    """``client`` seen with model ``name``'s aliases replaced by ``aliases`` (everything else
    passes through): :func:`check_promotion` reads the registry as it was before a move."""

    def __init__(self, client: MlflowClient, name: str, aliases: dict[str, str]) -> None:
        self._client, self._name, self._aliases = client, name, aliases

    def get_registered_model(self, name: str) -> Any:
        model = self._client.get_registered_model(name)
        if name != self._name:
            return model
        return SimpleNamespace(name=model.name, aliases=dict(self._aliases), tags=model.tags)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._client, attr)
