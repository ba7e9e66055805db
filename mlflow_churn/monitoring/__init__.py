"""Monitoring: drift engine, performance tracking, retraining policy."""

import importlib
from typing import Any

#: public name -> the module that defines it (imported on first use: `import mlflow_churn.X` stays light)
_EXPORTS = {
    "monitor": "mlflow_churn.monitoring.monitor",
    "MonitorResult": "mlflow_churn.monitoring.runs",
    "retrain": "mlflow_churn.monitoring.retrain",
    "RetrainResult": "mlflow_churn.monitoring.retrain",
    "backtest": "mlflow_churn.monitoring.backtest",
    "decide": "mlflow_churn.monitoring.policy",
    "PolicyDecision": "mlflow_churn.monitoring.policy",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
