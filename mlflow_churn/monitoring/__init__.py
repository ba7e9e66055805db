"""Monitoring: drift engine, performance tracking, retraining policy."""

from mlflow_churn.lazy import lazy_exports

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
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
