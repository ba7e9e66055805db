"""Alerts that reach a person: the project's one alert path (docs/alerts.md).

Producers call :func:`fire` when a condition starts (a monitoring decision ``investigate`` /
``retrain`` / ``blocked``, a freshness breach, a canary verdict, an unguarded promotion) and
:func:`resolve` when it clears; both write the SQLite :class:`Outbox` and return at once. A
:class:`Sender` delivers it to the configured outlets (a real Alertmanager's
``/api/v2/alerts``, and a plain webhook taking Alertmanager's webhook payload), with retries
and exponential back-off, one firing and one resolved message per condition episode, and
every attempt recorded. ``churn alerts list|test|flush|resolve`` are its commands.

A low layer: it imports only errors, times and config.
"""

from mlflow_churn.alerts.outbox import (
    FIRING,
    REPEAT,
    RESOLVED,
    Attempt,
    Condition,
    Delivery,
    Fired,
    Outbox,
    Timing,
    fingerprint,
)
from mlflow_churn.alerts.outlets import ALERTMANAGER, WEBHOOK, Message, alertmanager_api
from mlflow_churn.alerts.sender import (
    Sender,
    fire,
    flush,
    outbox_path,
    outlets,
    resolve,
    sender,
    start_sender,
    stop_sender,
    timing,
)

__all__ = [
    "ALERTMANAGER", "FIRING", "REPEAT", "RESOLVED", "WEBHOOK", "Attempt", "Condition", "Delivery",
    "Fired", "Message", "Outbox", "Sender", "Timing", "alertmanager_api", "fingerprint", "fire", "flush",
    "outbox_path", "outlets", "resolve", "sender", "start_sender", "stop_sender", "timing",
]
