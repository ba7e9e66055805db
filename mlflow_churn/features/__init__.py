"""Feature store: versioned definitions, offline frames, online stores, API."""

import importlib
from typing import Any

#: public name -> the module that defines it (imported on first use: `import mlflow_churn.X` stays light)
_EXPORTS = {
    "FeatureDefinition": "mlflow_churn.features.definitions",
    "FeatureSet": "mlflow_churn.features.definitions",
    "FeatureRegistry": "mlflow_churn.features.registry",
    "load_registry": "mlflow_churn.features.registry",
    "registry_for": "mlflow_churn.features.registry",
    "build_training_frame": "mlflow_churn.features.offline",
    "data_bounds": "mlflow_churn.features.offline",
    "materialize": "mlflow_churn.features.materialize",
    "OnlineStore": "mlflow_churn.features.online",
    "BatchInfo": "mlflow_churn.features.online",
    "open_store": "mlflow_churn.features.online",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
