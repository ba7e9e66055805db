"""Create or update the MLflow webhook that calls the receiver (`churn hooks register`, the demo)."""

from __future__ import annotations

from dataclasses import dataclass

from mlflow_churn.config import ChurnConfig
from mlflow_churn.errors import ChurnError, first_line
from mlflow_churn.registry.events import EVENTS, WEBHOOK_NAME
from mlflow_churn.tracking import setup_mlflow


@dataclass(frozen=True)
class WebhookResult:
    """The webhook as registered: its id, name, URL and whether it was created or updated."""

    webhook_id: str
    name: str
    url: str
    verb: str


def register_webhook(cfg: ChurnConfig, url: str, name: str = WEBHOOK_NAME) -> WebhookResult:
    """Create (or update, by ``name``) the webhook on ``cfg``'s tracking server that POSTs
    ``model_version_alias.created`` to the receiver at ``url`` signed with ``hooks.secret``.
    Raises ChurnError without a secret, for a non-http(s) ``url``, or when the server refuses
    (webhooks need `mlflow server` with a SQL backend)."""
    from mlflow.tracking import MlflowClient

    if not cfg.hooks.secret:
        raise ChurnError("no webhook secret: pass --secret or set CHURN_HOOKS__SECRET (the receiver needs "
                         "the same one)")
    if not url.startswith(("http://", "https://")):
        raise ChurnError(f"--url must be an http(s) URL of the receiver's /webhook, got '{url}'")
    setup_mlflow(cfg)
    client = MlflowClient(cfg.mlflow_tracking_uri)
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
        first = first_line(exc)
        raise ChurnError(
            f"cannot create webhook at {cfg.mlflow_tracking_uri}: {first[:300]} (webhooks need `mlflow "
            "server` with a SQL backend and MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY; for a loopback receiver "
            "MLFLOW_WEBHOOK_ALLOWED_SCHEMES=http,https and MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true)"
        ) from None
    return WebhookResult(hook.webhook_id, hook.name, url, verb)
