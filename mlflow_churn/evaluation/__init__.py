"""Evaluation: metrics, plots and the evaluate entry point."""

from mlflow_churn.lazy import lazy_exports

#: public name -> the module that defines it (imported on first use: `import mlflow_churn.X` stays light)
_EXPORTS = {
    "evaluate": "mlflow_churn.evaluation.evaluate",
    "GateDecision": "mlflow_churn.evaluation.evaluate",
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
