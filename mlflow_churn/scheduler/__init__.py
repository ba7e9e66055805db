"""``churn scheduler``: materialize, freshness, monitor and retrain on intervals from config,
with APScheduler's SQLAlchemy job store (docs/scheduler.md). A shell above the packages whose
functions it calls: the same ones the commands call."""

from mlflow_churn.lazy import lazy_exports

#: public name -> the module that defines it (imported on first use: `import mlflow_churn.X` stays light)
_EXPORTS = {
    **{name: "mlflow_churn.scheduler.jobs"
       for name in ("JOBS", "JobOutcome", "freshness_key", "job_freshness", "run_job")},
    **{name: "mlflow_churn.scheduler.runs" for name in ("FAILED", "OK", "SKIPPED", "RunRecord", "list_runs")},
    **{name: "mlflow_churn.scheduler.service" for name in ("JobStatus", "run_due", "serve", "status",
                                                            "sync_jobs")},
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
