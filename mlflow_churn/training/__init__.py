"""Training: Optuna-tuned XGBClassifier with nested MLflow runs, registered challenger."""

from mlflow_churn.lazy import lazy_exports

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
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
