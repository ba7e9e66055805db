"""`churn retrain`: act on the newest monitoring decision (train + gate a challenger, or no-op)."""

from __future__ import annotations

import typer
from rich.table import Table

from mlflow_churn.cli_common import (
    as_of_or_latest,
    console,
    get_config,
    progress_arg,
)
from mlflow_churn.errors import ChurnError

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off", "")


def parse_bool(value: str, option: str) -> bool:
    """``true``/``false`` (also 1/0, yes/no, on/off; empty = false) -> bool; ChurnError otherwise."""
    low = value.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ChurnError(f"{option} must be true or false, got '{value}'")


def retrain(
    ctx: typer.Context,
    as_of: str = typer.Option(
        None,
        "--as-of",
        help="Decide and train as of this instant, ISO date/time UTC (default: the newest data).",
    ),
    force: bool = typer.Option(False, "--force", help="Retrain whatever the decision and the cooldown."),
    force_value: str = typer.Option(
        None, "--force-value", hidden=True, help="true/false form of --force (MLproject parameter)."
    ),
    n_trials: int = typer.Option(
        None, "--n-trials", help="Optuna trials (default: config training.n_trials)."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Retrain when the newest monitoring decision says so (or --force), then gate.

    Trains a challenger on the latest window and gates it against the champion; otherwise
    records a no-op with the reason. A decision naming segments gives a targeted retrain:
    those segments' recent rows weigh training.segment_weight, and the gate requires them to
    improve."""
    from mlflow_churn.monitoring.retrain import RETRAINED
    from mlflow_churn.monitoring.retrain import retrain as run_retrain

    if n_trials is not None and n_trials < 1:
        raise ChurnError(f"--n-trials must be >= 1, got {n_trials}")
    cfg = get_config(ctx, {"training.n_trials": n_trials})
    forced = force or (parse_bool(force_value, "--force-value") if force_value is not None else False)
    when = as_of_or_latest(cfg, as_of)
    result = run_retrain(cfg, when, force=forced, progress=progress_arg(progress))
    table = Table(title=f"churn retrain as of {when.isoformat()}: {result.action}")
    table.add_column("step")
    table.add_column("outcome")
    table.add_row("decision", result.reason)
    if result.action == RETRAINED and result.train is not None:
        t = result.train
        table.add_row(
            "train",
            f"challenger v{t.version}, val_auc {t.val_auc:.4f}, window "
            f"{t.window_start[:10]} .. {t.window_end[:10]} (run {t.run_id})",
        )
        if t.targets is not None:
            table.add_row("targeted", f"{', '.join(t.targets.segments)}: recent rows weighted "
                                      f"{t.targets.weight:g} (training.segment_weight)")
    if result.gate is not None:
        g = result.gate
        verdict = "passed -> canary" if g.passed else "rejected: " + "; ".join(g.reasons)
        against = f"v{g.champion_version}" if g.champion_version else "floors"
        table.add_row("gate", f"v{g.challenger_version} vs {against}: {verdict}")
    table.add_row("run", result.run_id)
    console.print(table)


def register(app: typer.Typer) -> None:
    """Add ``churn retrain`` to ``app``."""
    app.command("retrain")(retrain)
