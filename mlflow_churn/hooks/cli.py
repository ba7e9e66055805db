"""``churn hooks serve|register``: the registry webhook receiver and its registration."""

from __future__ import annotations

import logging

import typer

from mlflow_churn.cli_common import console, from_config, get_config, opt_str
from mlflow_churn.registry.events import EVENTS, WEBHOOK_NAME

hooks_app = typer.Typer(help="MLflow registry webhooks: run the gate when a challenger is aliased; record "
                        "every alias move; catch unguarded promotions.",
                        no_args_is_help=True)


@hooks_app.command("serve")
def serve(
    ctx: typer.Context,
    host: str = typer.Option(None, "--host", help=from_config("Bind address.", "hooks.host")),
    port: int = typer.Option(None, "--port", help=from_config("Port.", "hooks.port")),
    secret: str = typer.Option(None, "--secret", help=from_config(
        "HMAC secret of the webhook (or env CHURN_HOOKS__SECRET).", "hooks.secret", secret=True)),
) -> None:
    """Receive webhooks on POST /webhook: gate each new `challenger`; record every alias move in the
    alias history; audit (and with registry.revert_unguarded, revert) protected-alias moves the
    promotion rules refuse; complete promotions made in the UI. GET /metrics counts them."""
    import uvicorn

    from mlflow_churn.hooks.app import create_app

    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    cfg = get_config(ctx, {"hooks.host": opt_str(host), "hooks.port": port, "hooks.secret": opt_str(secret)})
    app = create_app(cfg, promote_by_hand=_promote_by_hand(cfg))
    console.print(f"churn hooks: http://{cfg.hooks.host}:{cfg.hooks.port}/webhook "
                  f"(model {cfg.training.model_name}, tracking {cfg.mlflow_tracking_uri})")
    uvicorn.run(app, host=cfg.hooks.host, port=cfg.hooks.port, log_level="info")


def _promote_by_hand(cfg):
    """Completes a promotion made in the UI as `churn canary promote` does (serving layer)."""
    from mlflow_churn.serving.transitions import adopt_promotion

    def promote(version, previous, actor, reason, moved_at):
        return adopt_promotion(cfg, version, previous, actor, reason, moved_at).run_id

    return promote


@hooks_app.command("register")
def register_webhook(
    ctx: typer.Context,
    url: str = typer.Option(..., "--url", help="Receiver URL, e.g. http://127.0.0.1:8090/webhook."),
    secret: str = typer.Option(None, "--secret",
                               help=from_config("HMAC secret.", "hooks.secret", secret=True)),
    name: str = typer.Option(WEBHOOK_NAME, "--name", help="Webhook name (an existing one is updated)."),
) -> None:
    """Create (or update) the MLflow webhook that calls the receiver on alias events (created, deleted)."""
    from mlflow_churn.registry.webhooks import register_webhook as ensure_webhook

    cfg = get_config(ctx, {"hooks.secret": opt_str(secret)})
    hook = ensure_webhook(cfg, url, name)
    console.print(f"webhook {hook.name} ({hook.webhook_id}) {hook.verb}: {url} on {', '.join(EVENTS)}")


def register(app: typer.Typer) -> None:
    """Add ``churn hooks`` to the root command."""
    app.add_typer(hooks_app, name="hooks")
