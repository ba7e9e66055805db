"""``churn evaluate``: gate the challenger against the champion on the holdout."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from mlflow_churn.cli_common import (
    as_of_or_latest,
    console,
    get_config,
    opt_str,
    progress_arg,
)

if TYPE_CHECKING:  # importing the gate pulls in MLflow and sklearn: keep `churn --help` fast
    from mlflow_churn.evaluation.evaluate import GateDecision


def summary_table(decision: GateDecision) -> Table:
    """The rules with both values, what was required and the verdict."""
    champ = f"v{decision.champion_version}" if decision.champion_version else "none (floors)"
    table = Table(title=f"gate: challenger v{decision.challenger_version} vs champion {champ} -> "
                        f"{'PASSED' if decision.passed else 'REJECTED'}"
                        f"{' (earlier decision reused)' if decision.reused else ''}")
    for col in ("rule", "metric", "challenger", "champion", "required", "ok"):
        table.add_column(col, justify="right" if col in ("challenger", "champion", "required") else "left")
    for r in decision.rules:
        table.add_row(r.rule, r.metric, f"{r.candidate:.4f}",
                      "" if r.baseline is None else f"{r.baseline:.4f}", f"{r.required:.4f}",
                      "yes" if r.passed else "NO")
    if decision.target_segments:
        table.caption = (f"targeted challenger (segment weight {decision.segment_weight:g}): "
                         f"{', '.join(decision.target_segments)} must improve on the champion beyond noise")
    return table


def evaluate_command(
    ctx: typer.Context,
    as_of: str = typer.Option(None, "--as-of", help="Evaluation time (ISO, UTC); default: the newest event "
                              "of the data. Holdout labels must have matured by then."),
    challenger: str = typer.Option("challenger", "--challenger",
                                   help="Alias or version number of the challenger."),
    champion: str = typer.Option("champion", "--champion", help="Alias or version number of the champion. "
                                 "Only 'champion' may be unset (first model: absolute floors); any other "
                                 "alias must exist."),
    progress: bool = typer.Option(True, "--progress/--no-progress",
                                  help="Show a progress bar over the stages."),
) -> None:
    """Score challenger and champion on the holdout; pass -> alias canary, fail -> tag gate=rejected."""
    cfg = get_config(ctx)
    when = as_of_or_latest(cfg, as_of)  # bad input first, then the heavy imports
    from mlflow_churn.evaluation.evaluate import gate
    from mlflow_churn.tracking import without_project_run

    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    # inside `mlflow run` the project run is the parent of the decision run
    with without_project_run() as parent:
        decision = gate(cfg, when, opt_str(challenger) or "challenger", opt_str(champion) or "champion",
                        parent_run_id=parent, progress=progress_arg(progress))
    console.print(summary_table(decision))
    for reason in decision.reasons:
        console.print(f"[red]rejected:[/red] {reason}")
    console.print(f"holdout {decision.holdout_start[:10]} .. {decision.holdout_end[:10]} "
                  f"({decision.holdout_rows:,} rows); decision run {decision.run_id}")


def register(app: typer.Typer) -> None:
    """Add ``churn evaluate`` to the root command."""
    app.command("evaluate")(evaluate_command)
