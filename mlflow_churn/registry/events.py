"""The MLflow registry webhook this project registers: its name and the events it subscribes
to (a light module: the ``churn hooks`` CLI reads these at import time)."""

WEBHOOK_NAME = "churn-gate"
#: the gate runs on a new `challenger`; every alias event feeds the alias history and the
#: unguarded-promotion check
EVENTS = ("model_version_alias.created", "model_version_alias.deleted")

__all__ = ["EVENTS", "WEBHOOK_NAME"]
