"""``churn registry history``: which version held an alias when, and every recorded move."""

from __future__ import annotations

import typer

from mlflow_churn.cli_common import console, get_config, opt_str, print_json

registry_app = typer.Typer(help="The model registry: alias history.", no_args_is_help=True)


@registry_app.command("history")
def history_cmd(
    ctx: typer.Context,
    alias: str = typer.Option(None, "--alias", help="Only this alias, e.g. champion (default: every alias)."),
    at: str = typer.Option(None, "--at", help="Which version held the alias at this time (ISO UTC, e.g. "
                           "2026-06-01T00:00Z); with --alias, else for every alias (default: list the "
                           "moves)."),
    model: str = typer.Option(None, "--model", help="Registered model (default: training.model_name)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Every recorded move of the model's aliases (who, when, why, evidence run), or with --at
    which version each alias pointed at, at that time."""

    from mlflow.tracking import MlflowClient
    from rich.table import Table

    from mlflow_churn.cli_common import parse_datetime
    from mlflow_churn.registry.history import read_moves, version_at
    from mlflow_churn.tracking import probe_server

    when = parse_datetime(at, "--at") if opt_str(at) else None  # bad input first
    cfg = get_config(ctx, {"training.model_name": opt_str(model)})
    uri = cfg.mlflow_tracking_uri
    probe_server(uri)
    client = MlflowClient(uri, uri)
    name = cfg.training.model_name
    moves = read_moves(client, name, opt_str(alias))
    if when is not None:
        aliases = [alias] if opt_str(alias) else sorted({m.alias for m in moves})
        answers = [version_at(moves, name, a, when) for a in aliases]
        if as_json:
            print_json({"model": name, "at": when.isoformat(),
                                   "aliases": [a.to_dict() for a in answers]})
            return
        if not answers:
            console.print(f"no recorded alias moves of '{name}'")
        for a in answers:
            since = f" (since {a.move.moved_at.isoformat()}, by {a.move.actor})" if a.move else ""
            note = " [uncertain: a move noticed later may already have happened]" if a.uncertain else ""
            console.print(f"{name}@{a.alias} at {when.isoformat()}: "
                          f"{'version ' + a.version if a.version else 'not set'}{since}{note}")
        return
    if as_json:
        print_json({"model": name, "moves": [m.to_dict() for m in moves]})
        return
    table = Table(title=f"alias history of '{name}'" + (f" ({alias})" if opt_str(alias) else ""))
    for col in ("moved at (UTC)", "alias", "from", "to", "actor", "reason", "evidence run", "source"):
        table.add_column(col)
    for m in moves:
        table.add_row(m.moved_at.strftime("%Y-%m-%d %H:%M:%S"), m.alias, m.from_version or "-",
                      m.to_version or "-", m.actor, m.reason[:60], m.evidence_run_id or "-", m.source)
    console.print(table)
    if not moves:
        console.print(f"no recorded alias moves of '{name}'")


def register(app: typer.Typer) -> None:
    """Add ``churn registry`` to the root command."""
    app.add_typer(registry_app, name="registry")
