"""``churn hooks serve|register``: the registry webhook receiver and its registration."""

from __future__ import annotations

import logging

import typer

from mlflow_churn.cli_common import console, get_config, opt_str
from mlflow_churn.errors import ChurnError

hooks_app = typer.Typer(help="MLflow registry webhooks: run the gate when a challenger is aliased.",
                        no_args_is_help=True)
WEBHOOK_NAME = "churn-gate"
EVENTS = ("model_version_alias.created",)


@hooks_app.command("serve")
def serve(
    ctx: typer.Context,
    host: str = typer.Option(None, "--host", help="Bind address [config hooks.host]."),
    port: int = typer.Option(None, "--port", help="Port [config hooks.port]."),
    secret: str = typer.Option(None, "--secret", help="HMAC secret of the webhook [hooks.secret, "
                               "env CHURN_HOOKS__SECRET]."),
) -> None:
    """Receive webhooks on POST /webhook; gate each new `challenger` in the background."""
    import uvicorn

    from mlflow_churn.hooks.app import create_app

    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    cfg = get_config(ctx, {"hooks.host": opt_str(host), "hooks.port": port, "hooks.secret": opt_str(secret)})
    app = create_app(cfg)
    console.print(f"churn hooks: http://{cfg.hooks.host}:{cfg.hooks.port}/webhook "
                  f"(model {cfg.training.model_name}, tracking {cfg.mlflow_tracking_uri})")
    uvicorn.run(app, host=cfg.hooks.host, port=cfg.hooks.port, log_level="info")


@hooks_app.command("register")
def register_webhook(
    ctx: typer.Context,
    url: str = typer.Option(..., "--url", help="Receiver URL, e.g. http://127.0.0.1:8090/webhook."),
    secret: str = typer.Option(None, "--secret", help="HMAC secret [hooks.secret]."),
    name: str = typer.Option(WEBHOOK_NAME, "--name", help="Webhook name (an existing one is updated)."),
) -> None:
    """Create (or update) the MLflow webhook that calls the receiver on model_version_alias.created."""
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


def register(app: typer.Typer) -> None:
    """Add ``churn hooks`` to the root command."""
    app.add_typer(hooks_app, name="hooks")
