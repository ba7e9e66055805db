"""Reconciliation: gate the versions the webhooks missed, and the gates an outage stopped.

MLflow delivers a webhook once (three quick retries): a receiver that was down, or a gate
that failed because the tracking server went away, would leave a version ungated for good.
:func:`reconcile_gates` is one pass over the registry of ``training.model_name``; it gates

- the version at alias ``challenger``, and every version newer than both the champion and
  the canary (all versions while there is neither), that carries no gate decision signed for
  its identity (``churn.sig.gate`` verified with the verify keys for exactly that model,
  version number and :func:`~mlflow_churn.registry.signing.version_identity`; a forged,
  unverifiable or other-identity tag counts as none) - a version the canary already
  superseded is left alone, so an old version never takes ``canary`` back;
- every version whose last gate (webhook or reconcile) failed for an outage
  (``failure_kind`` ``outage`` in the delivery log, :mod:`.deliveries`), unless the champion
  or the canary has moved past it, whatever its tags say (an outage may have cut the gate
  between its signed decision and the ``canary`` move, or before its run was marked finished).

Each such gate is a row of the delivery log with ``source`` ``reconcile`` and the
deterministic id ``reconcile:<model>:<version>:<identity[:16]>`` (``GET /deliveries`` lists
it), submitted to the same gate worker as the webhooks, so gates never overlap and passes
are idempotent with the deliveries and with each other:

- a version with a gate queued or running (any source) is not queued again;
- a reconcile row that is ``done`` is not run again (the gate is idempotent anyway: a
  decision already made is reused);
- a reconcile gate that failed for an outage runs again after ``hooks.reconcile_backoff_seconds``,
  doubled after each further failure (at most ``hooks.reconcile_backoff_max_seconds``); after
  ``hooks.max_gate_attempts`` failures it raises ONE alert (:class:`FollowUp`: the log,
  ``churn_hooks_gate_gave_up_total`` on ``/metrics`` and ``ChurnGateGaveUp`` through the
  project's alert outbox, :func:`mlflow_churn.alerts.fire`, resolved once the version is
  gated) and is not retried until a new delivery of the version fails for an outage too (its
  attempts start again) or a person runs ``churn hooks reconcile --once``;
- one that failed with an error (bad input, a missing tag) is not retried by itself.

``force`` (``churn hooks reconcile --once``: a person asked for it now) runs them all
regardless of back-off, give-up and earlier errors. While the registry cannot be read at
all (an outage), a pass runs only the reconcile gates already due for another attempt, so a
long outage still ends in the alert; it finds new ones once the server answers.

The receiver runs a pass at start and every ``hooks.reconcile_seconds`` on its own thread
(:class:`ReconcileLoop`); :func:`reconcile_once` is the same pass with the gates run in
the calling process (``churn hooks reconcile``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mlflow_churn.alerts import fire, resolve
from mlflow_churn.config import ChurnConfig
from mlflow_churn.errors import first_line, is_missing
from mlflow_churn.hooks.deliveries import (
    IN_PROGRESS,
    OUTAGE,
    RECONCILE,
    DeliveryLog,
    GateJob,
    failure_kind,
    run_gate,
    run_job,
)
from mlflow_churn.registry.aliases import CANARY, CHALLENGER, CHAMPION
from mlflow_churn.registry.promotion import verified_decision
from mlflow_churn.registry.signing import Decision, Verifier, verifier_for, version_identity
from mlflow_churn.registry.vocab import SignedKind
from mlflow_churn.tracking import export_http_limits, probe_server, sqlite_store_ready

_log = logging.getLogger(__name__)

EVENT = "reconcile"  # the ``event`` of a reconcile row
#: why a version is gated by a pass
AT_CHALLENGER, NEWER, AFTER_OUTAGE = "challenger", "newer_than_champion", "outage"
GAVE_UP_METRIC = "churn_hooks_gate_gave_up_total"
ALERT_NAME = "ChurnGateGaveUp"
QUEUED_METRIC = "churn_hooks_reconcile_gates_total"
#: the receiver's /metrics for the gates: counter name -> help text
METRICS = {GAVE_UP_METRIC: "reconcile gates given up after hooks.max_gate_attempts failures for an outage",
           QUEUED_METRIC: "gates started by the reconciliation (missed deliveries, outages)"}


def reconcile_id(model: str, version: str, identity: str) -> str:
    """The delivery-log id of the reconcile gate of one version identity."""
    return f"{RECONCILE}:{model}:{version}:{identity[:16]}"


def alert_key(model: str, version: str) -> str:
    """The dedup key of the give-up alert of one version (:func:`mlflow_churn.alerts.fire`)."""
    return f"churn-gate-gave-up:{model}:{version}"


@dataclass(frozen=True)
class RetryPolicy:
    """When a reconcile gate that failed for an outage runs again, and when it stops."""

    backoff_seconds: float
    backoff_max_seconds: float
    max_attempts: int

    @classmethod
    def of(cls, cfg: ChurnConfig) -> RetryPolicy:
        hooks = cfg.hooks
        return cls(hooks.reconcile_backoff_seconds, hooks.reconcile_backoff_max_seconds,
                   hooks.max_gate_attempts)

    def delay(self, attempts: int) -> float:
        """Seconds to wait after the ``attempts``-th failure (1, 2, ...)."""
        exponent = min(max(attempts - 1, 0), 60)
        return min(self.backoff_max_seconds, self.backoff_seconds * 2.0 ** exponent)


@dataclass
class ReconcileItem:
    """One version a pass found without a usable gate, and what it did about it."""

    version: str
    identity: str
    reasons: list[str]  # AT_CHALLENGER, NEWER, AFTER_OUTAGE
    action: str  # queued | skipped
    detail: str
    delivery_id: str
    status: str | None = None  # the row's status when the report was made
    attempts: int = 0
    run_id: str | None = None
    result: str = ""  # the row's detail then: the decision's version, or why the gate failed

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ReconcileReport:
    """What one pass found (``versions_checked`` of ``model``) and did."""

    model: str
    at: str  # ISO 8601 UTC
    champion: str | None = None
    canary: str | None = None
    challenger: str | None = None
    versions_checked: int = 0
    items: list[ReconcileItem] = field(default_factory=list)
    error: str | None = None  # the registry could not be read: only due retries ran

    @property
    def queued(self) -> list[ReconcileItem]:
        return [i for i in self.items if i.action == "queued"]

    @property
    def failed(self) -> list[ReconcileItem]:
        """Gates this pass started that failed (known once they ran: :func:`reconcile_once`)."""
        return [i for i in self.queued if i.status == "failed"]

    def refresh(self, log: DeliveryLog) -> ReconcileReport:
        """Each item's status, attempts and run id as the log says now."""
        for item in self.items:
            row = log.get(item.delivery_id)
            if row is not None:
                item.status, item.attempts, item.run_id = row["status"], int(row["attempts"]), row["run_id"]
                item.result = row["detail"] if item.action == "queued" else ""
        return self

    def summary(self) -> str:
        if self.error:
            return f"{self.error}; {len(self.queued)} due gate(s) retried"
        queued = ", ".join(f"v{i.version}" for i in self.queued) or "none"
        return (f"{self.model}: {self.versions_checked} version(s) checked, {len(self.items)} without a "
                f"gate, queued {queued}")

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "at": self.at, "champion": self.champion, "canary": self.canary,
                "challenger": self.challenger, "versions_checked": self.versions_checked,
                "items": [i.to_dict() for i in self.items], "error": self.error}


# --------------------------------------------------------------------------- finding
def gate_decision(mv: Any, name: str, verifier: Verifier) -> Decision | None:
    """``mv``'s gate decision when its ``churn.sig.gate`` tag verifies and names exactly this
    model, version number and identity (:func:`~mlflow_churn.registry.promotion.verified_decision`);
    else None."""
    return verified_decision(mv, name, SignedKind.GATE, verifier)[0]


def _number(version: str | None) -> int | None:
    return int(version) if version is not None and str(version).isdigit() else None


def _registry(client: MlflowClient, name: str) -> tuple[dict[str, str], list[Any]]:
    """The model's aliases and versions ({}, [] when the model does not exist). Any other
    error, an outage first of all, propagates: it must never read as "nothing to gate"."""
    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        if is_missing(exc):
            return {}, []
        raise
    aliases = {a: str(v) for a, v in (model.aliases or {}).items()}
    quote = '"' if "'" in name else "'"
    versions: list[Any] = []
    token = None
    while True:
        page = client.search_model_versions(f"name = {quote}{name}{quote}", page_token=token)
        versions.extend(page)
        token = getattr(page, "token", None)
        if not token:
            return aliases, versions


def _candidates(name: str, aliases: dict[str, str], versions: list[Any],
                rows: dict[str, list[dict[str, Any]]], verifier: Verifier) -> list[tuple[Any, list[str]]]:
    """(version, reasons) of every version to gate, oldest first (see the module doc)."""
    champion, canary = _number(aliases.get(CHAMPION)), _number(aliases.get(CANARY))
    floor = max((n for n in (champion, canary) if n is not None), default=0)
    out = []
    for mv in sorted(versions, key=lambda m: _number(str(m.version)) or 0):
        number = _number(str(mv.version))
        if number is None or str(getattr(mv, "status", "READY") or "READY") != "READY":
            continue  # still being registered, or its registration failed
        if number == champion:
            continue
        reasons = []
        if aliases.get(CHALLENGER) == str(mv.version):
            reasons.append(AT_CHALLENGER)
        if number > floor:
            reasons.append(NEWER)
        if reasons and gate_decision(mv, name, verifier) is not None:
            reasons = []
        last = (rows.get(str(mv.version)) or [None])[0]
        if (last is not None and last["status"] == "failed" and last["failure_kind"] == OUTAGE
                and (champion is None or number > champion) and (canary is None or number >= canary)):
            reasons.append(AFTER_OUTAGE)
        if reasons:
            out.append((mv, reasons))
    return out


# --------------------------------------------------------------------------- the pass
def reconcile_gates(cfg: ChurnConfig, client: MlflowClient, log: DeliveryLog,
                    submit: Callable[[GateJob], None], *, now: float, verifier: Verifier | None = None,
                    policy: RetryPolicy | None = None, force: bool = False) -> ReconcileReport:
    """One reconciliation pass over ``cfg.training.model_name`` at ``now`` (Unix seconds):
    every gate it starts is recorded in ``log`` (source ``reconcile``) and handed to
    ``submit`` (the receiver's gate worker, or a call that runs it at once). ``verifier``
    defaults to :func:`~mlflow_churn.registry.signing.verifier_for`, ``policy`` to
    :meth:`RetryPolicy.of`; ``force`` runs what back-off, give-up or an earlier error hold
    back. Returns what it found and did; an outage reading the registry is reported in
    ``error`` (see the module doc), other errors propagate."""
    name = cfg.training.model_name
    policy = policy or RetryPolicy.of(cfg)
    report = ReconcileReport(name, datetime.fromtimestamp(now, UTC).isoformat())
    try:
        probe_server(client.tracking_uri)  # seconds, not MLflow's minutes of retries, when it is down
        aliases, versions = _registry(client, name)
        verifier = verifier or verifier_for(cfg)
    except Exception as exc:
        if failure_kind(exc) != OUTAGE:
            raise
        report.error = f"the registry of '{name}' could not be read ({first_line(exc, 300)})"
        for row in log.due(name, now):
            if int(row["attempts"]) >= policy.max_attempts:
                continue
            job = GateJob(row["delivery_id"], name, str(row["version"]), RECONCILE, row["identity"])
            submit(job)
            report.items.append(ReconcileItem(job.version, row["identity"] or "", [AFTER_OUTAGE], "queued",
                                              "retried while the registry cannot be read", job.delivery_id))
        return report
    report.champion, report.canary = aliases.get(CHAMPION), aliases.get(CANARY)
    report.challenger, report.versions_checked = aliases.get(CHALLENGER), len(versions)
    rows = log.of_model(name)
    for mv, reasons in _candidates(name, aliases, versions, rows, verifier):
        rows_of = rows.get(str(mv.version), [])
        report.items.append(_reconcile_one(log, submit, name, mv, reasons, rows_of, now, policy, force))
    return report.refresh(log)


def _reconcile_one(log: DeliveryLog, submit: Callable[[GateJob], None], name: str, mv: Any,
                   reasons: list[str], rows: list[dict[str, Any]], now: float, policy: RetryPolicy,
                   force: bool) -> ReconcileItem:
    """Queue the reconcile gate of one version unless something holds it back (module doc)."""
    version, identity = str(mv.version), version_identity(mv)
    rid = reconcile_id(name, version, identity)
    item = ReconcileItem(version, identity, reasons, "skipped", "", rid)
    busy = next((r for r in rows if r["status"] in IN_PROGRESS), None)
    if busy is not None:
        item.detail = f"a gate is {busy['status']} already (delivery {busy['delivery_id']})"
        return item
    row = log.get(rid)
    if row is None:
        log.claim(rid, EVENT, now, source=RECONCILE, model=name, version=version, identity=identity)
    elif not force:
        last = rows[0] if rows else None
        newer_failure = (last is not None and last["delivery_id"] != rid and last["seq"] > row["seq"]
                         and last["status"] == "failed" and last["failure_kind"] == OUTAGE)
        attempts = int(row["attempts"])
        if newer_failure:
            log.reset_attempts(rid)  # a new delivery of the version failed too: count again
        elif row["status"] == "done":
            item.detail = f"gated by reconciliation already (run {row['run_id']})"
            return item
        elif row["status"] == "failed" and row["failure_kind"] != OUTAGE:
            why = first_line(row["detail"], 200)
            item.detail = (f"its gate failed with an error, not an outage ({why}); fix it, then run "
                           "`churn hooks reconcile --once`")
            return item
        elif row["status"] == "failed" and attempts >= policy.max_attempts:
            item.detail = (f"given up after {attempts} attempts (alert raised); a new delivery or "
                           "`churn hooks reconcile --once` runs it again")
            return item
        elif row["status"] == "failed" and (row["next_attempt_at"] or now) > now:
            item.detail = (f"attempt {attempts + 1} in {row['next_attempt_at'] - now:.0f} s "
                           f"(back-off after {attempts} failure(s) for an outage)")
            return item
    job = GateJob(rid, name, version, RECONCILE, identity)
    submit(job)
    item.action, item.detail = "queued", f"gate queued ({', '.join(reasons)})"
    return item


# --------------------------------------------------------------------------- after a failure
class FollowUp:
    """``on_outcome`` of the gate worker. A reconcile gate that failed for an outage gets its
    next attempt scheduled (:class:`RetryPolicy`); when it has failed
    ``hooks.max_gate_attempts`` times, ONE alert: an error in the log, ``+1`` on
    ``churn_hooks_gate_gave_up_total`` of ``metrics`` and :data:`ALERT_NAME` fired through the
    alert outbox (key :func:`alert_key`; delivered to ``alerts.alertmanager_url`` /
    ``alerts.webhook_url``, or the older ``hooks.alert_url``). A later gate of that version
    that is done (any source) resolves the alert. Webhook rows and errors other than outages
    are left as the log says."""

    def __init__(self, cfg: ChurnConfig, log: DeliveryLog, clock: Callable[[], float],
                 metrics: Any | None = None) -> None:
        self.cfg, self.log, self.clock, self.metrics = cfg, log, clock, metrics
        self.policy = RetryPolicy.of(cfg)

    def __call__(self, job: GateJob, status: str, kind: str | None, detail: str) -> None:
        if status == "done":
            alerted = self.log.alerted(job.model, job.version)
            if alerted:
                resolve(self.cfg, alert_key(job.model, job.version), now=self.clock())
                for delivery_id in alerted:
                    self.log.set_alerted(delivery_id, None)
            return
        if job.source != RECONCILE or kind != OUTAGE:
            return
        row = self.log.get(job.delivery_id)
        attempts = int(row["attempts"]) if row else 1
        if attempts < self.policy.max_attempts:
            self.log.retry_at(job.delivery_id, self.clock() + self.policy.delay(attempts))
            return
        self.log.retry_at(job.delivery_id, None)
        if attempts == self.policy.max_attempts:
            self.alert(job, attempts, detail)

    def alert(self, job: GateJob, attempts: int, detail: str) -> None:
        message = (f"the gate of {job.model} version {job.version} could not run after {attempts} attempts "
                   f"(tracking server outage); it is not retried until a new delivery or `churn hooks "
                   f"reconcile --once`. Last error: {first_line(detail, 500)}")
        _log.error("%s", message)
        if self.metrics is not None:
            self.metrics.inc(GAVE_UP_METRIC, {})
        now = self.clock()
        fire(self.cfg, alert_key(job.model, job.version),
             {"alertname": ALERT_NAME, "severity": "critical", "model": job.model, "version": job.version},
             {"summary": message, "delivery_id": job.delivery_id, "attempts": str(attempts),
              "identity": job.identity or ""}, starts_at=now, now=now)
        self.log.set_alerted(job.delivery_id, now)


# --------------------------------------------------------------------------- running passes
def tracking_client(cfg: ChurnConfig) -> MlflowClient:
    """A client of ``cfg``'s tracking store with MLflow's HTTP waits bounded (``mlflow.http_*``)."""
    uri = cfg.mlflow_tracking_uri
    export_http_limits(cfg)
    sqlite_store_ready(uri)
    return MlflowClient(uri, uri)


def reconcile_once(cfg: ChurnConfig, *, now: float, clock: Callable[[], float], force: bool = False,
                   gate: Callable[[GateJob], str] | None = None, log: DeliveryLog | None = None,
                   metrics: Any | None = None) -> ReconcileReport:
    """One pass whose gates run here, one after the other, before it returns (``churn hooks
    reconcile``). ``gate`` defaults to :func:`~mlflow_churn.hooks.deliveries.run_gate` (the gate
    of :mod:`mlflow_churn.evaluation`); the log is ``<workspace>/hooks.db`` unless given.
    Returns the report with each row's final status."""
    log = log or DeliveryLog(cfg.workspace / "hooks.db", clock)
    run = gate or (lambda job: run_gate(cfg, job))
    follow_up = FollowUp(cfg, log, clock, metrics)
    report = reconcile_gates(cfg, tracking_client(cfg), log, lambda job: _run_now(log, job, run, follow_up),
                             now=now, force=force)
    return report.refresh(log)


def _run_now(log: DeliveryLog, job: GateJob, run: Callable[[GateJob], str], follow_up: FollowUp) -> None:
    log.update(job.delivery_id, "queued")
    log.set_job(job)
    run_job(job, run, log, follow_up)


class ReconcileLoop:
    """Calls ``run_pass`` at once and then every ``every`` seconds on a daemon thread, until
    :meth:`stop` (an event: a stop never waits for the interval). A pass that raises is logged
    and the loop goes on."""

    def __init__(self, every: float, run_pass: Callable[[], object], name: str = "churn-reconcile") -> None:
        self.every = every
        self._run_pass = run_pass
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._run_pass()
            except Exception:  # a background loop: logged; the next pass (every N s) tries again
                _log.exception("reconciliation pass failed")
            self._stop.wait(self.every)

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the loop to end and wait up to ``timeout`` s for a pass under way (its HTTP
        calls are bounded by ``mlflow.http_*``); the thread is a daemon either way."""
        self._stop.set()
        self._thread.join(timeout)


__all__ = ["AFTER_OUTAGE", "ALERT_NAME", "AT_CHALLENGER", "GAVE_UP_METRIC", "METRICS", "NEWER",
           "QUEUED_METRIC", "FollowUp", "ReconcileItem", "ReconcileLoop", "ReconcileReport", "RetryPolicy",
           "alert_key", "gate_decision", "reconcile_gates", "reconcile_id", "reconcile_once",
           "tracking_client"]
