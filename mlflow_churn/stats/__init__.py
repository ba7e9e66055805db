"""stats."""

import importlib
from typing import Any

#: public name -> the module that defines it (imported on first use: `import mlflow_churn.X` stays light)
_EXPORTS = {
    "psi": "mlflow_churn.stats.drift",
    "ks": "mlflow_churn.stats.drift",
    "chi2": "mlflow_churn.stats.drift",
    "js": "mlflow_churn.stats.drift",
    "categorical_psi": "mlflow_churn.stats.drift",
    "classification_metrics": "mlflow_churn.stats.metrics",
    "segment_metrics": "mlflow_churn.stats.metrics",
    "expected_auc": "mlflow_churn.stats.performance",
    "auc_standard_error": "mlflow_churn.stats.performance",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
