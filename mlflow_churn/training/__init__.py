"""Training: Optuna-tuned XGBClassifier with nested MLflow runs, registered challenger."""

import importlib
from typing import Any

#: public name -> the module that defines it (imported on first use: `import mlflow_churn.X` stays light)
_EXPORTS = {
    "train": "mlflow_churn.training.train",
    "train_table": "mlflow_churn.training.train",
    "TrainResult": "mlflow_churn.training.train",
    "training_window": "mlflow_churn.training.window",
    "TrainingWindow": "mlflow_churn.training.window",
    "log_churn_model": "mlflow_churn.training.model",
    "load_scorer": "mlflow_churn.training.model",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
