"""``churn scheduler``: APScheduler with its SQLAlchemy job store (docs/scheduler.md).

State survives a restart: each enabled job of ``scheduler.<job>`` is a job in the store
(id = job name), kept as it is at start when its interval did not change, so a scheduler
restarted mid-interval neither runs a job early nor twice. A job whose time passed while no
scheduler ran runs once at start (``coalesce``: one run for any number of missed ones, unless
``scheduler.misfire_grace_seconds`` says it is too late), then on its original cadence. A job
never overlaps itself: ``max_instances=1`` in a process, the job's lock across processes
(:func:`mlflow_churn.scheduler.jobs.run_job`). A new job runs at once, then every interval.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.job import Job
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

from mlflow_churn.config import ChurnConfig
from mlflow_churn.errors import ChurnError, first_line
from mlflow_churn.scheduler.jobs import JOBS, run_job, running_jobs
from mlflow_churn.scheduler.runs import FAILED, RunRecord, engine, last_run

log = logging.getLogger("mlflow_churn.scheduler")

#: the textual reference APScheduler stores (no pickled function: a restart imports it anew)
JOB_FUNC = "mlflow_churn.scheduler.jobs:run_job"
JOBS_TABLE = "churn_scheduler_jobs"


@dataclass(frozen=True)
class JobStatus:
    """One job: its config, its next run (from the store) and its last outcome."""

    job: str
    enabled: bool
    every_seconds: float
    next_run_time: datetime | None
    last: RunRecord | None

    def to_dict(self) -> dict:
        return {"job": self.job, "enabled": self.enabled, "every_seconds": self.every_seconds,
                "next_run_time": self.next_run_time.isoformat() if self.next_run_time else None,
                "last": self.last.to_dict() if self.last else None}


def _scheduler(cfg: ChurnConfig) -> BackgroundScheduler:
    url = cfg.scheduler_store_url
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    try:
        store = SQLAlchemyJobStore(engine=engine(url), tablename=JOBS_TABLE)
    except Exception as exc:
        raise ChurnError(f"cannot open the scheduler's job store {url}: {first_line(exc)}") from None
    return BackgroundScheduler(
        jobstores={"default": store}, executors={"default": ThreadPoolExecutor(max_workers=len(JOBS))},
        job_defaults={"coalesce": True, "max_instances": 1,
                      "misfire_grace_time": cfg.scheduler.misfire_grace_seconds},
        timezone=UTC,
    )


def _start_paused(cfg: ChurnConfig) -> BackgroundScheduler:
    sched = _scheduler(cfg)
    try:
        sched.start(paused=True)
    except Exception as exc:
        url = cfg.scheduler_store_url
        raise ChurnError(f"cannot start the scheduler on {url}: {first_line(exc)}") from None
    return sched


def sync_jobs(sched: BackgroundScheduler, cfg: ChurnConfig, config_file: str | None = None,
              now: datetime | None = None) -> list[Job]:
    """Make the store hold exactly the enabled jobs of ``cfg``. A job already there with the
    same interval keeps its next run time (a restart changes nothing); a new one is due now;
    one whose interval changed is due at the sooner of its old next run and now + the new
    interval. Returns the enabled jobs."""
    now = now or datetime.now(UTC)
    args = [None, str(cfg.workspace.resolve()), str(config_file) if config_file else None]
    grace = cfg.scheduler.misfire_grace_seconds
    for job in sched.get_jobs():
        if job.id not in JOBS:
            sched.remove_job(job.id)
    kept = []
    for name in JOBS:
        jc = getattr(cfg.scheduler, name)
        job = sched.get_job(name)
        if not jc.enabled:
            if job is not None:
                sched.remove_job(name)
            continue
        every = jc.interval_seconds
        job_args = tuple([name, *args[1:]])
        same = (job is not None and isinstance(job.trigger, IntervalTrigger)
                and abs(job.trigger.interval.total_seconds() - every) < 1e-6)
        if same:
            job.modify(args=job_args, misfire_grace_time=grace, coalesce=True, max_instances=1)
            kept.append(sched.get_job(name))
            continue
        due = now
        if job is not None and job.next_run_time is not None:
            due = min(job.next_run_time, now + timedelta(seconds=every))
        kept.append(sched.add_job(
            JOB_FUNC, IntervalTrigger(seconds=every, start_date=due, timezone=UTC), args=job_args, id=name,
            name=name, replace_existing=True, next_run_time=due, coalesce=True, max_instances=1,
            misfire_grace_time=grace))
    return kept


def run_due(cfg: ChurnConfig, config_file: str | None = None) -> dict[str, str]:
    """``churn scheduler --once``: run each job whose next run time has come, once, then set its
    next run time on its cadence; job -> status."""
    sched = _start_paused(cfg)
    try:
        now = datetime.now(UTC)
        done = {}
        for job in sync_jobs(sched, cfg, config_file, now):
            if job.next_run_time is None or job.next_run_time > now:
                continue
            done[job.id] = run_job(*job.args)
            after = datetime.now(UTC)
            job.modify(next_run_time=job.trigger.get_next_fire_time(None, after + timedelta(microseconds=1)))
        return done
    finally:
        sched.shutdown(wait=False)


def serve(cfg: ChurnConfig, stop: threading.Event, config_file: str | None = None) -> list[str]:
    """Run the jobs on their intervals until ``stop`` is set (or KeyboardInterrupt), then wait up
    to ``scheduler.shutdown_wait_seconds`` for a running job; returns the jobs still running."""
    sched = _start_paused(cfg)
    try:
        jobs = sync_jobs(sched, cfg, config_file)
        for job in jobs:
            log.info("scheduler job %s: every %gs, next run %s", job.id, job.trigger.interval.total_seconds(),
                     job.next_run_time.isoformat() if job.next_run_time else "paused")
        sched.resume()
        try:
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
    finally:
        sched.shutdown(wait=False)
    deadline = time.monotonic() + cfg.scheduler.shutdown_wait_seconds
    while running_jobs() and time.monotonic() < deadline:
        time.sleep(0.1)
    return running_jobs()


def status(cfg: ChurnConfig) -> list[JobStatus]:
    """Every job: enabled, interval, next run time in the store, last recorded outcome."""
    sched = _start_paused(cfg)
    try:
        stored = {j.id: j for j in sched.get_jobs()}
    finally:
        sched.shutdown(wait=False)
    url = cfg.scheduler_store_url
    out = []
    for name in JOBS:
        jc = getattr(cfg.scheduler, name)
        job = stored.get(name)
        out.append(JobStatus(job=name, enabled=jc.enabled, every_seconds=jc.interval_seconds,
                             next_run_time=job.next_run_time if job is not None else None,
                             last=last_run(url, name)))
    return out


def any_failed(statuses: dict[str, str]) -> bool:
    return FAILED in statuses.values()


__all__ = ["JOBS_TABLE", "JOB_FUNC", "JobStatus", "any_failed", "run_due", "serve", "status", "sync_jobs"]
