"""What the scheduler runs: one function per job, calling the same core functions as the
commands (``churn features materialize``, ``churn monitor``, ``churn retrain``, ``churn canary
run --once``), plus the
freshness check, and :func:`run_job`, the one entry point APScheduler stores by textual
reference (``mlflow_churn.scheduler.jobs:run_job``) with picklable arguments (job name,
workspace, config file), so a restarted scheduler finds its jobs in the job store.

:func:`run_job` takes the job's cross-process lock (:func:`mlflow_churn.registry.lock.model_lock`
on the job store: ``pg_advisory_lock`` for PostgreSQL, ``fcntl`` beside a SQLite store), so two
schedulers on one job store never run a job at the same time; one that waited while the other
ran it skips. Every run logs one outcome line and appends a row to the runs table
(:mod:`mlflow_churn.scheduler.runs`); a failing job is logged and recorded, never raised.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from mlflow_churn.alerts import fire, resolve
from mlflow_churn.config import ChurnConfig, load_config
from mlflow_churn.data.bounds import latest_as_of
from mlflow_churn.errors import ChurnError, first_line
from mlflow_churn.features.materialize import materialize
from mlflow_churn.features.online import open_store
from mlflow_churn.monitoring.alerting import alert_decision
from mlflow_churn.monitoring.monitor import monitor
from mlflow_churn.monitoring.retrain import retrain
from mlflow_churn.registry.lock import model_lock
from mlflow_churn.scheduler.runs import FAILED, OK, SKIPPED, RunRecord, last_run, record_run
from mlflow_churn.serving.rollout import tick

log = logging.getLogger("mlflow_churn.scheduler")

#: the alert a stale (or missing) serving batch fires, per online backend
FRESHNESS_ALERT = "ChurnFeaturesStale"


@dataclass(frozen=True)
class JobOutcome:
    """What one job did: a one-line ``detail`` and the MLflow run it made (if any)."""

    detail: str
    run_id: str | None = None


def freshness_key(backend: str) -> str:
    return f"freshness:{backend}"


def job_materialize(cfg: ChurnConfig) -> JobOutcome:
    """Materialize at the newest event of the data, unless the serving batch already has it."""
    as_of = latest_as_of(cfg.data_dir)
    store = open_store(cfg, must_exist=False)
    try:
        cur = store.current_batch()
        if cur is not None and cur.as_of >= as_of:
            return JobOutcome(f"no data after {cur.as_of.isoformat()}; batch {cur.batch_id} serves")
        info = materialize(cfg, as_of, store=store)
    finally:
        store.close()
    return JobOutcome(f"batch {info.batch_id} as of {info.as_of.isoformat()}: {info.rows} rows ({info.mode})")


def job_freshness(cfg: ChurnConfig, now: datetime | None = None) -> JobOutcome:
    """Fire ``freshness:<backend>`` when the serving batch is older than
    ``features.freshness_sla_hours`` (or there is none); resolve it when it is fresh."""
    backend = cfg.features.online_backend
    sla = cfg.features.freshness_sla_hours * 3600.0
    now = now or datetime.now(UTC)
    try:
        store = open_store(cfg, must_exist=True)
    except ChurnError as exc:
        batch, problem = None, str(exc)
    else:
        try:
            batch = store.current_batch()
        finally:
            store.close()
        problem = None if batch is not None else "the online store has no batch"
    age = (now - batch.watermark).total_seconds() if batch is not None and batch.watermark else None
    if problem is None and age is None:
        problem = f"batch {batch.batch_id} is empty (no watermark)"
    if problem is None and age is not None and age <= sla:
        resolve(cfg, freshness_key(backend))
        return JobOutcome(f"fresh: batch {batch.batch_id} is {age / 3600:.1f} h old (SLA {sla / 3600:g} h)")
    if problem is None:
        problem = f"batch {batch.batch_id} is {age / 3600:.1f} h old, over the SLA of {sla / 3600:g} h"
    fire(cfg, freshness_key(backend),
         {"alertname": FRESHNESS_ALERT, "severity": "warning", "backend": backend},
         {"summary": f"online feature store ({backend}) is stale", "description": problem[:2000]})
    return JobOutcome(f"stale: {problem}")


def job_monitor(cfg: ChurnConfig) -> JobOutcome:
    """``churn monitor`` of the champion at the newest data; the decision alerts."""
    res = monitor(cfg, latest_as_of(cfg.data_dir), alias="champion",
                  on_decision=lambda r: alert_decision(cfg, r))
    return JobOutcome(f"v{res.model_version}: {res.decision.action}", res.run_id)


def job_retrain(cfg: ChurnConfig) -> JobOutcome:
    """``churn retrain`` at the newest data: acts on the newest monitoring decision."""
    res = retrain(cfg, latest_as_of(cfg.data_dir))
    done = ""
    if res.train is not None:
        done = f"version {res.train.version}"
        if res.gate is not None:
            verdict = "passed -> canary" if res.gate.passed else "rejected: " + "; ".join(res.gate.reasons)
            done += f", gate {verdict}"
        done += "; "
    return JobOutcome(f"{res.action}: {done}{res.reason}", res.run_id)


def job_canary(cfg: ChurnConfig) -> JobOutcome:
    """``churn canary run --once``: one tick of the rollout controller (idle without a canary)."""
    res = tick(cfg, datetime.now(UTC))
    return JobOutcome(f"{res.action}: {res.message}", res.run_id)


#: job name -> function; the names are the config keys under ``scheduler``
JOBS: dict[str, Callable[[ChurnConfig], JobOutcome]] = {
    "materialize": job_materialize,
    "freshness": job_freshness,
    "monitor": job_monitor,
    "retrain": job_retrain,
    "canary": job_canary,
}

_running: set[str] = set()
_running_lock = threading.Lock()


def running_jobs() -> list[str]:
    """Jobs this process runs right now."""
    with _running_lock:
        return sorted(_running)


def job_lock_dir(cfg: ChurnConfig) -> Path:
    """Where the ``fcntl`` locks of a SQLite job store live (beside its file)."""
    url = cfg.scheduler_store_url
    if url.startswith("sqlite:///"):
        return Path(url[len("sqlite:///"):]).parent / "scheduler-locks"
    return cfg.workspace / "locks" / "scheduler"


def run_job(name: str, workspace: str | None = None, config_file: str | None = None) -> str:
    """Run job ``name`` once under its cross-process lock, log and record its outcome; returns
    the status (``ok`` | ``failed`` | ``skipped``). What APScheduler calls."""
    if name not in JOBS:
        log.error("scheduler: unknown job %r (known: %s)", name, ", ".join(JOBS))
        return FAILED
    cfg = load_config(config_file, workspace)
    asked = datetime.now(UTC)
    url = cfg.scheduler_store_url
    with _running_lock:
        _running.add(name)
    try:
        with model_lock(url, f"scheduler:{name}", job_lock_dir(cfg), timeout_s=3600.0):
            prev = last_run(url, name)
            if prev is not None and prev.status != SKIPPED and prev.ended_at >= asked:
                detail = f"ran meanwhile in process {prev.pid} (ended {prev.ended_at.isoformat()})"
                return _finish(url, name, asked, SKIPPED, detail, None)
            started = datetime.now(UTC)
            try:
                outcome = JOBS[name](cfg)
            except Exception as exc:  # a failing job is one line; the scheduler goes on
                return _finish(url, name, started, FAILED, f"{type(exc).__name__}: {first_line(exc)}", None)
            return _finish(url, name, started, OK, outcome.detail, outcome.run_id)
    finally:
        with _running_lock:
            _running.discard(name)


def _finish(url: str, name: str, started: datetime, status: str, detail: str, run_id: str | None) -> str:
    rec = RunRecord(job=name, started_at=started, ended_at=datetime.now(UTC), status=status,
                    detail=detail[:2000], run_id=run_id, pid=os.getpid())
    line = (f"scheduler job {name}: {status} {rec.started_at.isoformat()} .. {rec.ended_at.isoformat()}"
            f"{f' run {run_id}' if run_id else ''}: {detail}")
    (log.error if status == FAILED else log.info)(line)
    try:
        record_run(url, rec)
    except Exception as exc:  # the line above is the record then
        log.error("scheduler job %s: outcome not recorded in the runs table: %s", name, first_line(exc))
    return status


__all__ = ["FRESHNESS_ALERT", "JOBS", "JobOutcome", "freshness_key", "job_canary", "job_freshness",
           "job_lock_dir", "job_materialize", "job_monitor", "job_retrain", "run_job", "running_jobs"]
