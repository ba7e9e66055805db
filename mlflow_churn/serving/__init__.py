"""Serving: online scoring with canary routing, batch scoring, canary analysis."""

from mlflow_churn.lazy import lazy_exports

#: public name -> the module that defines it (imported on first use: `import mlflow_churn.X` stays light)
_EXPORTS = {
    "promote": "mlflow_churn.serving.transitions",
    "rollback": "mlflow_churn.serving.transitions",
    "evaluate_canary": "mlflow_churn.serving.canary",
    "canary_status": "mlflow_churn.serving.canary",
    "score_batch": "mlflow_churn.serving.batch",
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
