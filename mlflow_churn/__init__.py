"""mlflow-churn: guardrails for a customer-churn model in production, centred on MLflow.

The packages, bottom layer first (docs/architecture.md): :mod:`.stats`, :mod:`.data`,
:mod:`.features`, :mod:`.registry`, :mod:`.training`, :mod:`.evaluation`, :mod:`.serving`,
:mod:`.monitoring`; the shells on top (``churn`` CLI, MLproject entry points, HTTP apps,
:mod:`.hooks`). Each package's ``__all__`` is its public API; the most used entry points
are re-exported here, imported on first use so ``import mlflow_churn`` stays light.
"""

from mlflow_churn.lazy import lazy_exports

_EXPORTS = {
    "ChurnConfig": "mlflow_churn.config",
    "load_config": "mlflow_churn.config",
    "ChurnError": "mlflow_churn.errors",
    "train": "mlflow_churn.training.train",
    "evaluate": "mlflow_churn.evaluation.evaluate",
    "monitor": "mlflow_churn.monitoring.monitor",
    "retrain": "mlflow_churn.monitoring.retrain",
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
