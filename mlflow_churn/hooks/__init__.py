"""The registry webhook receiver (a shell on top of the loop): ``churn hooks serve|register``.

:mod:`.app` is the FastAPI receiver of MLflow's registry webhooks (it starts the gate of
:mod:`mlflow_churn.evaluation` when a version is aliased ``challenger``); :mod:`.cli` its
commands. It lives above the core packages because it calls into them; the registry
primitives it uses are in :mod:`mlflow_churn.registry`.
"""

from mlflow_churn.lazy import lazy_exports

_EXPORTS = {
    "create_app": "mlflow_churn.hooks.app",
    "DeliveryLog": "mlflow_churn.hooks.app",
    "GateJob": "mlflow_churn.hooks.app",
    "GateWorker": "mlflow_churn.hooks.app",
    "run_gate": "mlflow_churn.hooks.app",
    "sign": "mlflow_churn.hooks.app",
    "verify_signature": "mlflow_churn.hooks.app",
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
