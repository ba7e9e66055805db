"""Serving: online scoring with canary routing, batch scoring, canary analysis."""

import importlib
from typing import Any

#: public name -> the module that defines it (imported on first use: `import mlflow_churn.X` stays light)
_EXPORTS = {
    "promote": "mlflow_churn.serving.canary",
    "rollback": "mlflow_churn.serving.canary",
    "evaluate_canary": "mlflow_churn.serving.canary",
    "canary_status": "mlflow_churn.serving.canary",
    "score_batch": "mlflow_churn.serving.batch",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
