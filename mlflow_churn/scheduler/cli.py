"""``churn scheduler [--once] [--json]`` and ``churn scheduler status [--json]``."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

import typer
from rich.table import Table

from mlflow_churn.cli_common import JSON_OPTION, console, get_config, print_json

scheduler_app = typer.Typer(
    help="Run materialize, freshness, monitor and retrain on intervals from config (scheduler.*).",
    invoke_without_command=True,
)


def _config_file(ctx: typer.Context) -> str | None:
    return (ctx.find_root().obj or {}).get("config")


def _log_to_stderr() -> None:
    logger = logging.getLogger("mlflow_churn.scheduler")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


@scheduler_app.callback()
def scheduler_cmd(
    ctx: typer.Context,
    once: bool = typer.Option(False, "--once", help="Run the jobs that are due now, once each, and exit "
                              "(exit 1 when one failed)."),
    once_value: str = typer.Option(None, "--once-value", hidden=True,
                                   help="true/false form of --once (MLproject parameter)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Run the scheduled jobs until Ctrl-C / SIGTERM (state in scheduler.job_store, kept across
    restarts), or with --once what is due now. Each run logs one outcome line."""
    if ctx.invoked_subcommand is not None:
        return
    from mlflow_churn.monitoring.retrain_cli import parse_bool
    from mlflow_churn.scheduler.service import any_failed, run_due, serve

    if once_value is not None:
        once = once or parse_bool(once_value, "--once-value")
    cfg = get_config(ctx)
    _log_to_stderr()
    if once:
        done = run_due(cfg, _config_file(ctx))
        if as_json:
            print_json({"ran": done})
        else:
            console.print("due jobs run: " + (", ".join(f"{k} {v}" for k, v in done.items()) or "none"))
        raise typer.Exit(1 if any_failed(done) else 0)
    if as_json:
        from mlflow_churn.errors import ChurnError

        raise ChurnError("--json goes with --once or `churn scheduler status`")
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        left = serve(cfg, stop, _config_file(ctx))
    finally:
        signal.signal(signal.SIGTERM, previous)
    if left:  # a job past scheduler.shutdown_wait_seconds: abandoned (its lock goes with the process)
        wait = cfg.scheduler.shutdown_wait_seconds
        typer.echo(f"error: stopped with job(s) still running after {wait:g} s: {', '.join(left)}", err=True)
        sys.stderr.flush()
        os._exit(1)
    console.print("scheduler stopped")


@scheduler_app.command("status")
def status_cmd(ctx: typer.Context,
               job: str = typer.Option(None, "--job", help="Only this job (materialize, freshness, monitor, "
                                       "retrain; default: all)."),
               as_json: bool = JSON_OPTION) -> None:
    """Every job: enabled, interval, next run time, last outcome."""
    from mlflow_churn.errors import ChurnError
    from mlflow_churn.scheduler.jobs import JOBS
    from mlflow_churn.scheduler.service import status

    if job is not None and job not in JOBS:
        raise ChurnError(f"--job must be one of {', '.join(JOBS)}, got '{job}'")
    cfg = get_config(ctx)
    rows = [r for r in status(cfg) if job is None or r.job == job]
    if as_json:
        print_json({"job_store": cfg.scheduler_store_url, "jobs": [r.to_dict() for r in rows]})
        return
    table = Table(title=f"churn scheduler: {cfg.scheduler_store_url}")
    for col in ("job", "enabled", "every", "next run", "last run", "status", "detail"):
        table.add_column(col)
    for r in rows:
        last = r.last
        table.add_row(r.job, "yes" if r.enabled else "no", f"{r.every_seconds:g} s",
                      r.next_run_time.isoformat() if r.next_run_time else "-",
                      last.started_at.isoformat() if last else "-", last.status if last else "-",
                      (last.detail + (f" (run {last.run_id})" if last.run_id else "")) if last else "-")
    console.print(table)


def register(app: typer.Typer) -> None:
    """Add ``churn scheduler`` (and ``churn scheduler status``) to ``app``."""
    app.add_typer(scheduler_app, name="scheduler")
