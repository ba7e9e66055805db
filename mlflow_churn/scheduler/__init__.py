"""``churn scheduler``: materialize, freshness, monitor and retrain on intervals from config,
with APScheduler's SQLAlchemy job store (docs/scheduler.md). A shell above the packages whose
functions it calls: the same ones the commands call."""

from mlflow_churn.scheduler.jobs import JOBS, JobOutcome, freshness_key, job_freshness, run_job
from mlflow_churn.scheduler.runs import FAILED, OK, SKIPPED, RunRecord, list_runs
from mlflow_churn.scheduler.service import JobStatus, run_due, serve, status, sync_jobs

__all__ = ["FAILED", "JOBS", "OK", "SKIPPED", "JobOutcome", "JobStatus", "RunRecord", "freshness_key",
           "job_freshness", "list_runs", "run_due", "run_job", "serve", "status", "sync_jobs"]
