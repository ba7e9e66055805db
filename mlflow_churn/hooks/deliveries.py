"""The receiver's record of gates: the delivery log (SQLite ``<workspace>/hooks.db``), the gate
job and the one worker thread that runs gates in order.

A row of the log is one gate request: a webhook delivery (``source`` ``webhook``, keyed by
MLflow's ``X-MLflow-Delivery-Id``) or a gate the reconciliation started (``source``
``reconcile``, keyed ``reconcile:<model>:<version>:<identity[:16]>``, see
:mod:`mlflow_churn.hooks.reconcile`). Its ``status`` goes ``received`` -> ``queued`` ->
``running`` -> ``done`` (with the decision run) or ``failed``; a failed gate says why in
``detail`` and what kind of failure it was in ``failure_kind``: ``outage`` when a dependency
did not answer (an :class:`~mlflow_churn.errors.Unavailable` such as the tracking server's,
or an error that :func:`~mlflow_churn.tracking.server_failure` recognises: worth running
again), ``error``
otherwise (bad input, a missing tag: running it again changes nothing). A gate that ran and
rejected the version is ``done``: a rejection is a decision, not a failure. ``attempts``
counts the times the gate started; ``next_attempt_at`` (Unix seconds) is when the
reconciliation may run a failed one again; ``alerted_at`` when its give-up alert fired (until
the version is gated); ``seq`` orders the rows by their last change.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from mlflow_churn.background import QueueWorker
from mlflow_churn.config import ChurnConfig
from mlflow_churn.errors import ChurnError, outage
from mlflow_churn.registry.aliases import CHAMPION
from mlflow_churn.tracking import server_failure

_log = logging.getLogger("mlflow_churn.hooks.app")

WEBHOOK, RECONCILE = "webhook", "reconcile"  # sources of a row
OUTAGE, ERROR = "outage", "error"  # failure kinds
#: statuses of a gate that is waiting for or on the worker
IN_PROGRESS = ("queued", "running")
#: columns added after the first release, with their SQL type (older logs get them at open)
_ADDED = {"model": "TEXT", "version": "TEXT", "source": f"TEXT NOT NULL DEFAULT '{WEBHOOK}'",
          "attempts": "INTEGER NOT NULL DEFAULT 0", "next_attempt_at": "REAL", "failure_kind": "TEXT",
          "identity": "TEXT", "updated_at": "REAL", "seq": "INTEGER NOT NULL DEFAULT 0", "alerted_at": "REAL"}


def failure_kind(exc: BaseException) -> str:
    """:data:`OUTAGE` when ``exc`` says a dependency (the tracking server, PostgreSQL, Redis, ...)
    did not answer, else :data:`ERROR`. Decided by kind (:class:`~mlflow_churn.errors.Unavailable`,
    :func:`~mlflow_churn.errors.outage`) or by :func:`~mlflow_churn.tracking.server_failure` on
    the exception chain, never by its text."""
    down = outage(exc) is not None or server_failure(exc) is not None
    return OUTAGE if down else ERROR


class DeliveryLog:
    """Gate requests and their outcome, in SQLite (one connection per call). ``clock`` (Unix
    seconds) stamps ``updated_at``."""

    _KEYS = ("delivery_id", "received_at", "event", "status", "detail", "run_id", "model", "version",
             "source", "attempts", "next_attempt_at", "failure_kind", "identity", "updated_at", "seq",
             "alerted_at")

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.clock = clock
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as con:
            con.execute("""CREATE TABLE IF NOT EXISTS deliveries (
                delivery_id TEXT PRIMARY KEY, received_at REAL NOT NULL, event TEXT NOT NULL,
                status TEXT NOT NULL, detail TEXT NOT NULL DEFAULT '', run_id TEXT)""")
            have = {row[1] for row in con.execute("PRAGMA table_info(deliveries)")}
            for column, kind in _ADDED.items():  # added later: older logs lack them
                if column not in have:
                    con.execute(f"ALTER TABLE deliveries ADD COLUMN {column} {kind}")
            con.execute("CREATE INDEX IF NOT EXISTS deliveries_version ON deliveries (model, version)")

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=30)
        con.execute("PRAGMA journal_mode=WAL")
        return con

    _TOUCH = "updated_at = ?, seq = (SELECT COALESCE(MAX(seq), 0) + 1 FROM deliveries)"

    def claim(self, delivery_id: str, event: str, received_at: float, *, source: str = WEBHOOK,
              model: str | None = None, version: str | None = None, identity: str | None = None) -> bool:
        """Record ``delivery_id``; False when it was already there (a duplicate)."""
        with self._connect() as con:
            cur = con.execute(
                "INSERT OR IGNORE INTO deliveries (delivery_id, received_at, event, status, source, model, "
                "version, identity, updated_at, seq) VALUES (?, ?, ?, 'received', ?, ?, ?, ?, ?, "
                "(SELECT COALESCE(MAX(seq), 0) + 1 FROM deliveries))",
                (delivery_id, received_at, event, source, model, version, identity, received_at),
            )
            return cur.rowcount == 1

    def update(self, delivery_id: str, status: str, detail: str = "", run_id: str | None = None, *,
               failure_kind: str | None = None, next_attempt_at: float | None = None) -> None:
        """Set the outcome (``failure_kind`` / ``next_attempt_at`` only for a failed gate)."""
        with self._connect() as con:
            con.execute(f"UPDATE deliveries SET status = ?, detail = ?, run_id = ?, failure_kind = ?, "
                        f"next_attempt_at = ?, {self._TOUCH} WHERE delivery_id = ?",
                        (status, detail[:2000], run_id, failure_kind, next_attempt_at, self.clock(),
                         delivery_id))

    def start(self, delivery_id: str) -> int:
        """Mark the gate running and count the attempt; returns the attempts so far."""
        with self._connect() as con:
            con.execute(f"UPDATE deliveries SET status = 'running', detail = '', failure_kind = NULL, "
                        f"next_attempt_at = NULL, attempts = attempts + 1, {self._TOUCH} "
                        "WHERE delivery_id = ?", (self.clock(), delivery_id))
            row = con.execute("SELECT attempts FROM deliveries WHERE delivery_id = ?",
                              (delivery_id,)).fetchone()
        return int(row[0]) if row else 0

    def retry_at(self, delivery_id: str, when: float | None) -> None:
        """When a failed gate may run again (None: not by itself)."""
        with self._connect() as con:
            con.execute("UPDATE deliveries SET next_attempt_at = ? WHERE delivery_id = ?",
                        (when, delivery_id))

    def reset_attempts(self, delivery_id: str) -> None:
        """Start counting attempts again (a new delivery of the version failed too)."""
        with self._connect() as con:
            con.execute("UPDATE deliveries SET attempts = 0, next_attempt_at = NULL WHERE delivery_id = ?",
                        (delivery_id,))

    def set_job(self, job: GateJob) -> None:
        """Remember which version a delivery gates, so a restart can run it again."""
        with self._connect() as con:
            con.execute("UPDATE deliveries SET model = ?, version = ? WHERE delivery_id = ?",
                        (job.model, job.version, job.delivery_id))

    def unfinished(self) -> list[GateJob]:
        """Jobs accepted (202) but not finished when the receiver stopped, oldest first."""
        with self._connect() as con:
            rows = con.execute(
                "SELECT delivery_id, model, version, source, identity FROM deliveries "
                "WHERE status IN ('queued', 'running') AND version IS NOT NULL "
                "ORDER BY received_at").fetchall()
        return [GateJob(*row) for row in rows]

    def _rows(self, where: str, args: tuple[Any, ...], tail: str = "") -> list[dict[str, Any]]:
        with self._connect() as con:
            rows = con.execute(f"SELECT {', '.join(self._KEYS)} FROM deliveries WHERE {where} {tail}",
                               args).fetchall()
        return [dict(zip(self._KEYS, row, strict=True)) for row in rows]

    def get(self, delivery_id: str) -> dict[str, Any] | None:
        rows = self._rows("delivery_id = ?", (delivery_id,))
        return rows[0] if rows else None

    def find(self, model: str | None = None, version: str | None = None, limit: int = 100,
             source: str | None = None) -> list[dict[str, Any]]:
        """Deliveries that queued a gate, newest first, optionally of one model / version / source."""
        where, args = "version IS NOT NULL", []
        for column, value in (("model", model), ("version", version), ("source", source)):
            if value is not None:
                where += f" AND {column} = ?"
                args.append(value)
        return self._rows(where, (*args, limit), "ORDER BY received_at DESC, seq DESC LIMIT ?")

    def of_model(self, model: str) -> dict[str, list[dict[str, Any]]]:
        """Every gate row of ``model`` by version, each list last-changed first."""
        out: dict[str, list[dict[str, Any]]] = {}
        for row in self._rows("model = ? AND version IS NOT NULL", (model,), "ORDER BY seq DESC"):
            out.setdefault(str(row["version"]), []).append(row)
        return out

    def set_alerted(self, delivery_id: str, when: float | None) -> None:
        """Record (``when``) or clear (None) that the row's give-up alert is firing."""
        with self._connect() as con:
            con.execute("UPDATE deliveries SET alerted_at = ? WHERE delivery_id = ?", (when, delivery_id))

    def alerted(self, model: str, version: str) -> list[str]:
        """Rows of ``version`` whose give-up alert is firing."""
        return [r["delivery_id"] for r in self._rows("model = ? AND version = ? AND alerted_at IS NOT NULL",
                                                      (model, version))]

    def due(self, model: str, now: float) -> list[dict[str, Any]]:
        """Reconcile gates of ``model`` that failed for an outage and may run again at ``now``."""
        return self._rows("model = ? AND source = ? AND status = 'failed' AND failure_kind = ? "
                          "AND next_attempt_at IS NOT NULL AND next_attempt_at <= ?",
                          (model, RECONCILE, OUTAGE, now), "ORDER BY CAST(version AS INTEGER)")


@dataclass(frozen=True)
class GateJob:
    """One gate to run: the row it reports to, the version, where it came from and (for a
    reconcile gate) the identity of the version it was found for."""

    delivery_id: str
    model: str
    version: str
    source: str = WEBHOOK
    identity: str | None = None


#: ``on_outcome(job, status, failure_kind, detail)``: told after each gate, once its row says
#: how it ended (status ``done`` | ``failed``; ``failure_kind`` None when done)
OnOutcome = Callable[[GateJob, str, str | None, str], None]


def run_job(job: GateJob, run: Callable[[GateJob], str], log: DeliveryLog,
            on_outcome: OnOutcome | None = None) -> str:
    """Run one gate and record it in ``log`` (running, attempts + 1, then done with the
    decision run or failed with its kind, see the module doc); returns the final status.
    A SystemExit / KeyboardInterrupt (the process stopping mid-gate) leaves the row running
    and goes on: the next receiver start runs it again."""
    log.start(job.delivery_id)
    try:
        run_id = run(job)
    except (SystemExit, KeyboardInterrupt):  # shutting down mid-gate: not a failure; the
        _log.warning("gate of delivery %s interrupted; it runs again at the next start",
                     job.delivery_id)  # log still says running -> resume()
        raise
    except Exception as exc:  # recorded as the delivery's failure (outage -> retried), not lost
        kind = failure_kind(exc)
        if isinstance(exc, ChurnError):
            detail = str(exc)
            _log.warning("gate of delivery %s (version %s) failed (%s): %s", job.delivery_id, job.version,
                         kind, detail)
        else:
            detail = f"{type(exc).__name__}: {exc}"
            _log.error("gate for delivery %s failed (%s)", job.delivery_id, kind, exc_info=exc)
        log.update(job.delivery_id, "failed", detail, failure_kind=kind)
        _tell(on_outcome, job, "failed", kind, detail)
        return "failed"
    log.update(job.delivery_id, "done", f"gate on version {job.version}", run_id)
    _tell(on_outcome, job, "done", None, run_id)
    return "done"


def _tell(on_outcome: OnOutcome | None, job: GateJob, status: str, kind: str | None, detail: str) -> None:
    if on_outcome is None:
        return
    try:
        on_outcome(job, status, kind, detail)
    except Exception:  # retry bookkeeping / alerting: never changes what the row says
        _log.exception("after the gate of delivery %s", job.delivery_id)


def default_as_of(cfg: ChurnConfig) -> datetime:
    """The gate's as_of for a hook: the newest event of the workspace data (as the CLI)."""
    from mlflow_churn.data.bounds import latest_as_of

    return latest_as_of(cfg.data_dir)


def run_gate(cfg: ChurnConfig, job: GateJob, as_of: Callable[[ChurnConfig], datetime] = default_as_of) -> str:
    """Gate ``job.version`` against the champion; returns the decision run id."""
    from mlflow_churn.evaluation.evaluate import evaluate

    decision = evaluate(cfg, as_of(cfg), challenger_alias=job.version, champion_alias=CHAMPION)
    _log.info("gate on version %s (%s): %s (run %s)", job.version, job.source, decision.decision,
              decision.run_id)
    return decision.run_id


class GateWorker(QueueWorker[GateJob]):
    """One background thread running queued gates in order (join, stop: QueueWorker); webhook
    deliveries and the reconciliation submit to the same one, so gates never overlap."""

    def __init__(self, run: Callable[[GateJob], str], log: DeliveryLog,
                 on_outcome: OnOutcome | None = None) -> None:
        self._run, self._log, self._on_outcome = run, log, on_outcome
        super().__init__("churn-gate-worker", self._gate, self._failed)  # starts the thread

    def submit(self, job: GateJob) -> None:
        self._log.update(job.delivery_id, "queued")
        self._log.set_job(job)
        self.put(job)

    def resume(self) -> int:
        """Queue again the jobs a previous receiver accepted but did not finish (MLflow does
        not redeliver an answered delivery); returns how many."""
        jobs = self._log.unfinished()
        for job in jobs:
            _log.info("resuming the gate of delivery %s (version %s)", job.delivery_id, job.version)
            self.put(job)
        return len(jobs)

    def _gate(self, job: GateJob) -> None:
        run_job(job, self._run, self._log, self._on_outcome)

    def _failed(self, job: GateJob, exc: Exception) -> None:  # the bookkeeping itself failed
        _log.error("gate for delivery %s failed", job.delivery_id, exc_info=exc)
        self._log.update(job.delivery_id, "failed", f"{type(exc).__name__}: {exc}", failure_kind=ERROR)


__all__ = ["ERROR", "IN_PROGRESS", "OUTAGE", "RECONCILE", "WEBHOOK", "DeliveryLog", "GateJob", "GateWorker",
           "default_as_of", "failure_kind", "run_gate", "run_job"]
