"""Feature store: versioned definitions, offline frames, online stores, API."""

from mlflow_churn.lazy import lazy_exports

#: public name -> the module that defines it (imported on first use: `import mlflow_churn.X` stays light)
_EXPORTS = {
    "FeatureDefinition": "mlflow_churn.features.definitions",
    "FeatureSet": "mlflow_churn.features.definitions",
    "FeatureRegistry": "mlflow_churn.features.registry",
    "load_registry": "mlflow_churn.features.registry",
    "registry_for": "mlflow_churn.features.registry",
    "build_training_frame": "mlflow_churn.features.offline",
    "materialize": "mlflow_churn.features.materialize",
    "OnlineStore": "mlflow_churn.features.online",
    "BatchInfo": "mlflow_churn.features.online",
    "open_store": "mlflow_churn.features.online",
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
