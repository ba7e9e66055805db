"""``churn train``: tune, register a challenger; or join a distributed study as a worker."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from mlflow_churn.cli_common import (
    as_of_or_latest,
    check_number,
    console,
    get_config,
    opt_str,
    progress_arg,
)
from mlflow_churn.errors import ChurnError

if TYPE_CHECKING:
    from mlflow_churn.training.train import TrainResult


def train_command(
    ctx: typer.Context,
    as_of: str = typer.Option(
        None, "--as-of", help="Training time (ISO, UTC); default: the newest event of the data."),
    n_trials: int = typer.Option(
        None, "--n-trials", help="Optuna trials in this process (default and 0: config training.n_trials)."),
    timeout: float = typer.Option(
        None, "--timeout", help="Stop tuning after this many seconds; 0 = no limit "
        "(default: config training.timeout_seconds)."),
    storage: str = typer.Option(
        None, "--storage", help="Optuna RDB URL shared with workers, e.g. postgresql://user@host/db "
        "(config training.storage); default in memory."),
    worker: bool = typer.Option(
        False, "--worker", help="Join the study --study of a running leader; registers nothing."),
    study: str = typer.Option(
        None, "--study", help="Study name (leader: default churn-<parent run id>; worker: required)."),
    wait: float = typer.Option(
        600.0, "--wait", help="Seconds a worker waits for the study / the leader for running worker trials."),
    table: str = typer.Option(
        None, "--table", help="Train on a flat CSV or Parquet table instead of the workspace data "
        "(default: the workspace data)."),
    label: str = typer.Option(None, "--label", help="With --table: the 0/1 or Yes/No churn column "
                              "(required with --table; no default)."),
    id_column: str = typer.Option(
        None, "--id", help="With --table: the id column, kept out of the features (default: none)."),
    model_name: str = typer.Option(
        None, "--model-name", help="With --table: registered model to train into (default "
        "<training.model_name>-table-<file stem>, never the production model)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar over trials."),
) -> None:
    """Tune XGBoost with Optuna (each trial a nested MLflow run), register a version with alias challenger."""
    from mlflow_churn.training.train import train, train_table  # heavy: imported when run

    # "Creating initial MLflow database tables..." is noise on stderr, where errors are one line
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)

    if n_trials is not None and n_trials < 0:
        raise ChurnError(f"--n-trials must be >= 0 (0 = config training.n_trials), got {n_trials}")
    check_number(timeout, "--timeout", 0)
    check_number(wait, "--wait", 0)
    cfg = get_config(ctx, {"training.n_trials": n_trials or None,
                           "training.storage": opt_str(storage)})
    timeout_s = None if not timeout else float(timeout)
    table, label, id_column, study = opt_str(table), opt_str(label), opt_str(id_column), opt_str(study)
    model_name = opt_str(model_name)
    if model_name and not table:
        raise ChurnError("--model-name applies to --table only (the workspace model is "
                         "training.model_name); add --table PATH or set training.model_name")
    common = {"n_trials": n_trials or None, "timeout": timeout_s, "storage": opt_str(storage),
              "progress": progress_arg(progress), "study_name": study, "wait_seconds": wait}
    if worker:
        result = train(cfg, None, worker=True, **common)
    elif table:
        if not label:
            raise ChurnError("--table needs --label COL: the column that says who churned (Yes/No, 1/0)")
        if opt_str(as_of):
            raise ChurnError("--as-of applies to the feature-store window, not to --table (a flat table "
                             "has no time axis); drop one of them")
        result = train_table(cfg, table, label, id_column, model_name=model_name, **common)
    else:
        if label or id_column:
            raise ChurnError("--label/--id apply to --table only; add --table PATH")
        when = as_of_or_latest(cfg, as_of)
        result = train(cfg, when, **common)
    console.print(summary_table(result))
    if result.version:
        registered = result.model_uri.split("/")[1] if result.model_uri else cfg.training.model_name
        console.print(f"registered {registered} version {result.version} "
                      f"(alias challenger), run {result.run_id}, val AUC {result.val_auc:.4f}")
    else:
        console.print(f"worker done: {len(result.trials)} trials in study {result.study_name}, "
                      f"parent run {result.run_id}")



def summary_table(result: TrainResult, top: int = 10) -> Table:
    """A rich table: the best trials, then the registered version and validation metrics."""
    from mlflow_churn.registry.aliases import CHALLENGER

    title = (f"churn train: {result.source}, feature set {result.feature_set}, study {result.study_name}")
    table = Table(title=title)
    for col, justify in (("trial", "right"), ("state", "left"), ("val AUC", "right"),
                         ("trees", "right"), ("learning_rate", "right"), ("max_depth", "right"),
                         ("worker", "left")):
        table.add_column(col, justify=justify)
    ranked = sorted(result.trials, key=lambda r: -(r.val_auc if r.val_auc is not None else -1))
    for rec in ranked[:top]:
        table.add_row(str(rec.number), rec.state,
                      f"{rec.val_auc:.4f}" if rec.val_auc is not None else "-",
                      str(rec.n_trees or "-"),
                      f"{rec.params.get('learning_rate', float('nan')):.3f}",
                      str(rec.params.get("max_depth", "-")), rec.worker)
    table.caption = (
        f"{result.n_complete} complete, {result.n_pruned} pruned; rows train {result.rows_train:,} / "
        f"valid {result.rows_valid:,}; val AUC {result.val_auc:.4f}"
        + (f", PR-AUC {result.val_pr_auc:.4f}, log loss {result.val_log_loss:.4f}"
           if result.val_pr_auc is not None else "")
        + (f"; registered {result.model_uri} (@{CHALLENGER})" if result.version
           else "; worker: nothing registered")
        + (f"; window {result.window_start[:10]} .. {result.window_end[:10]}" if result.window_start else "")
    )
    return table

def register(app: typer.Typer) -> None:
    """Add ``churn train`` to the root command."""
    app.command("train")(train_command)
