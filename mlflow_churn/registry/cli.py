"""``churn hooks serve|register``: the registry webhook receiver and its registration."""

from __future__ import annotations

import logging

import typer

from mlflow_churn.cli_common import console, get_config, opt_str
from mlflow_churn.errors import ChurnError

hooks_app = typer.Typer(help="MLflow registry webhooks: run the gate when a challenger is aliased; record "
                        "every alias move; catch unguarded promotions.",
                        no_args_is_help=True)
WEBHOOK_NAME = "churn-gate"
#: the gate runs on a new `challenger`; every alias event feeds the alias history and the
#: unguarded-promotion check
EVENTS = ("model_version_alias.created", "model_version_alias.deleted")
registry_app = typer.Typer(help="The model registry: alias history.", no_args_is_help=True)


@hooks_app.command("serve")
def serve(
    ctx: typer.Context,
    host: str = typer.Option(None, "--host", help="Bind address [config hooks.host]."),
    port: int = typer.Option(None, "--port", help="Port [config hooks.port]."),
    secret: str = typer.Option(None, "--secret", help="HMAC secret of the webhook [hooks.secret, "
                               "env CHURN_HOOKS__SECRET]."),
) -> None:
    """Receive webhooks on POST /webhook: gate each new `challenger`; record every alias move in the
    alias history; audit (and with registry.revert_unguarded, revert) protected-alias moves the
    promotion rules refuse; complete promotions made in the UI. GET /metrics counts them."""
    import uvicorn

    from mlflow_churn.registry.hooks import create_app

    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    cfg = get_config(ctx, {"hooks.host": opt_str(host), "hooks.port": port, "hooks.secret": opt_str(secret)})
    app = create_app(cfg, promote_by_hand=_promote_by_hand(cfg))
    console.print(f"churn hooks: http://{cfg.hooks.host}:{cfg.hooks.port}/webhook "
                  f"(model {cfg.training.model_name}, tracking {cfg.mlflow_tracking_uri})")
    uvicorn.run(app, host=cfg.hooks.host, port=cfg.hooks.port, log_level="info")


def _promote_by_hand(cfg):
    """Completes a promotion made in the UI as `churn canary promote` does (serving layer)."""
    from mlflow_churn.serving.canary import adopt_promotion

    def promote(version, previous, actor, reason, moved_at):
        return adopt_promotion(cfg, version, previous, actor, reason, moved_at).run_id

    return promote


@hooks_app.command("register")
def register_webhook(
    ctx: typer.Context,
    url: str = typer.Option(..., "--url", help="Receiver URL, e.g. http://127.0.0.1:8090/webhook."),
    secret: str = typer.Option(None, "--secret", help="HMAC secret [hooks.secret]."),
    name: str = typer.Option(WEBHOOK_NAME, "--name", help="Webhook name (an existing one is updated)."),
) -> None:
    """Create (or update) the MLflow webhook that calls the receiver on alias events (created, deleted)."""
    from mlflow.tracking import MlflowClient

    from mlflow_churn.tracking import setup_mlflow

    cfg = get_config(ctx, {"hooks.secret": opt_str(secret)})
    if not cfg.hooks.secret:
        raise ChurnError("no webhook secret: pass --secret or set CHURN_HOOKS__SECRET (the receiver needs "
                         "the same one)")
    if not url.startswith(("http://", "https://")):
        raise ChurnError(f"--url must be an http(s) URL of the receiver's /webhook, got '{url}'")
    setup_mlflow(cfg)
    client = MlflowClient()
    try:
        existing = [w for w in client.list_webhooks() if w.name == name]
        if existing:
            hook = client.update_webhook(existing[0].webhook_id, url=url, events=list(EVENTS),
                                         secret=cfg.hooks.secret, status="ACTIVE")
            verb = "updated"
        else:
            hook = client.create_webhook(name=name, url=url, events=list(EVENTS), secret=cfg.hooks.secret,
                                         description="mlflow-churn registry gate")
            verb = "created"
    except Exception as exc:  # MLflow raises MlflowException / RestException with the server's reason
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ChurnError(
            f"cannot create webhook at {cfg.mlflow_tracking_uri}: {first[:300]} (webhooks need `mlflow "
            "server` with a SQL backend and MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY; for a loopback receiver "
            "MLFLOW_WEBHOOK_ALLOWED_SCHEMES=http,https and MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true)"
        ) from None
    console.print(f"webhook {hook.name} ({hook.webhook_id}) {verb}: {url} on {', '.join(EVENTS)}")


@registry_app.command("history")
def history_cmd(
    ctx: typer.Context,
    alias: str = typer.Option(None, "--alias", help="Only this alias (e.g. champion)."),
    at: str = typer.Option(None, "--at", help="Which version held the alias at this time (ISO UTC, e.g. "
                           "2026-06-01T00:00Z); with --alias, else for every alias."),
    model: str = typer.Option(None, "--model", help="Registered model (default: training.model_name)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Every recorded move of the model's aliases (who, when, why, evidence run), or with --at
    which version each alias pointed at, at that time."""
    import json

    from mlflow.tracking import MlflowClient
    from rich.table import Table

    from mlflow_churn.cli_common import parse_datetime
    from mlflow_churn.registry.history import read_moves, version_at
    from mlflow_churn.tracking import probe_server

    cfg = get_config(ctx, {"training.model_name": opt_str(model)})
    uri = cfg.mlflow_tracking_uri
    probe_server(uri)
    client = MlflowClient(uri, uri)
    name = cfg.training.model_name
    moves = read_moves(client, name, opt_str(alias))
    if opt_str(at):
        when = parse_datetime(at, "--at")
        aliases = [alias] if opt_str(alias) else sorted({m.alias for m in moves})
        answers = [version_at(moves, name, a, when) for a in aliases]
        if as_json:
            typer.echo(json.dumps({"model": name, "at": when.isoformat(),
                                   "aliases": [a.to_dict() for a in answers]}, indent=2))
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
        typer.echo(json.dumps({"model": name, "moves": [m.to_dict() for m in moves]}, indent=2))
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
    """Add ``churn hooks`` and ``churn registry`` to the root command."""
    app.add_typer(hooks_app, name="hooks")
    app.add_typer(registry_app, name="registry")
