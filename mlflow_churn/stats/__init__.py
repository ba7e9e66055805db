"""stats."""

from mlflow_churn.lazy import lazy_exports

#: public name -> the module that defines it (imported on first use: `import mlflow_churn.X` stays light)
_EXPORTS = {
    "psi": "mlflow_churn.stats.drift",
    "ks": "mlflow_churn.stats.drift",
    "ks_many": "mlflow_churn.stats.drift",
    "chi2": "mlflow_churn.stats.drift",
    "js": "mlflow_churn.stats.drift",
    "categorical_psi": "mlflow_churn.stats.drift",
    "classification_metrics": "mlflow_churn.stats.metrics",
    "segment_metrics": "mlflow_churn.stats.metrics",
    "expected_auc": "mlflow_churn.stats.performance",
    "auc_standard_error": "mlflow_churn.stats.performance",
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
