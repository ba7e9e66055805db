"""``churn hooks serve|register|reconcile``: the registry webhook receiver, its registration and
its reconciliation pass run by hand."""

from __future__ import annotations

import logging
import time

import typer

from mlflow_churn.cli_common import JSON_OPTION, console, from_config, get_config, opt_str, print_json
from mlflow_churn.errors import ChurnError
from mlflow_churn.jsonable import dumps
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
    from mlflow_churn.hooks.app import create_app
    from mlflow_churn.web.limits import HttpLimits
    from mlflow_churn.web.limits import serve as serve_app

    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    cfg = get_config(ctx, {"hooks.host": opt_str(host), "hooks.port": port, "hooks.secret": opt_str(secret)})
    app = create_app(cfg, promote_by_hand=_promote_by_hand(cfg))
    console.print(f"churn hooks: http://{cfg.hooks.host}:{cfg.hooks.port}/webhook "
                  f"(model {cfg.training.model_name}, tracking {cfg.mlflow_tracking_uri})")
    serve_app(app, cfg.hooks.host, cfg.hooks.port, HttpLimits.of(cfg.hooks, "hooks"), log_level="info",
              access_log=True)


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


@hooks_app.command("reconcile")
def reconcile(
    ctx: typer.Context,
    once: bool = typer.Option(False, "--once", help="One pass, then exit. It also runs the gates that "
                              "back-off, a give-up or an earlier error hold back (a person asked for it "
                              "now); exit 1 when a gate it ran failed, 2 when the registry cannot be read."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Gate the versions the webhooks missed (at `challenger`, or newer than the champion, without a
    gate decision signed for their identity) and those whose last gate failed for an outage: the
    pass `churn hooks serve` makes at start and every hooks.reconcile_seconds. The gates run here,
    one after the other, and are listed in the receiver's GET /deliveries with source reconcile.
    Without --once: a pass every hooks.reconcile_seconds until Ctrl-C."""
    from mlflow_churn.hooks.reconcile import reconcile_once

    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    logging.getLogger("mlflow_churn.hooks.app").setLevel(logging.ERROR)  # the report tells each gate
    cfg = get_config(ctx)
    if once:
        report = reconcile_once(cfg, now=time.time(), clock=time.time, force=True)
        if as_json:
            print_json(report.to_dict())
        else:
            _show_report(report)
        if report.error:
            raise ChurnError(f"{report.error}; start the tracking server or fix MLFLOW_TRACKING_URI")
        if report.failed:
            raise typer.Exit(1)
        return
    if not as_json:
        console.print(f"reconciling '{cfg.training.model_name}' every {cfg.hooks.reconcile_seconds:g} s "
                      f"(tracking {cfg.mlflow_tracking_uri}); Ctrl-C stops")
    try:
        while True:
            report = reconcile_once(cfg, now=time.time(), clock=time.time)
            if as_json:  # one line a pass
                typer.echo(dumps(report.to_dict(), indent=None))
            else:
                _show_report(report)
            time.sleep(cfg.hooks.reconcile_seconds)
    except KeyboardInterrupt:
        if not as_json:
            console.print("stopped")


def _show_report(report) -> None:
    stamp = report.at[:19].replace("T", " ")
    if report.error:
        console.print(f"{stamp} {report.summary()}", markup=False)
    else:
        console.print(f"{stamp} {report.model}: {report.versions_checked} version(s) checked (champion "
                      f"{report.champion or 'none'}, canary {report.canary or 'none'}, challenger "
                      f"{report.challenger or 'none'}); {len(report.items)} without a gate decision")
    for item in report.items:
        line = f"  v{item.version} ({', '.join(item.reasons)}): "
        if item.action != "queued":
            line += f"skipped: {item.detail}"
        elif item.status == "done":
            line += f"gated (attempt {item.attempts}), decision run {item.run_id}"
        else:
            line += f"gate {item.status} (attempt {item.attempts}): {item.result}"
        console.print(line, markup=False)


def register(app: typer.Typer) -> None:
    """Add ``churn hooks`` to the root command."""
    app.add_typer(hooks_app, name="hooks")
