"""Evaluation: the holdout, plots and the registry gate (:func:`~.evaluate.gate`)."""

from mlflow_churn.lazy import lazy_exports

#: public name -> the module that defines it (imported on first use: `import mlflow_churn.X` stays light)
_EXPORTS = {
    "gate": "mlflow_churn.evaluation.evaluate",
    "evaluate": "mlflow_churn.evaluation.evaluate",  # gate's old name
    "GateDecision": "mlflow_churn.evaluation.evaluate",
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
