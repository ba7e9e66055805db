"""The registry webhook receiver (a shell on top of the loop): ``churn hooks serve|register|reconcile``.

:mod:`.app` is the FastAPI receiver of MLflow's registry webhooks (it starts the gate of
:mod:`mlflow_churn.evaluation` when a version is aliased ``challenger``); :mod:`.deliveries`
its log of gates and the gate worker; :mod:`.reconcile` the pass that gates what the
deliveries missed; :mod:`.cli` its commands. It lives above the core packages because it
calls into them; the registry primitives it uses are in :mod:`mlflow_churn.registry`.
"""

from mlflow_churn.lazy import lazy_exports

_EXPORTS = {
    "create_app": "mlflow_churn.hooks.app",
    "DeliveryLog": "mlflow_churn.hooks.deliveries",
    "GateJob": "mlflow_churn.hooks.deliveries",
    "GateWorker": "mlflow_churn.hooks.deliveries",
    "run_gate": "mlflow_churn.hooks.deliveries",
    "reconcile_gates": "mlflow_churn.hooks.reconcile",
    "reconcile_once": "mlflow_churn.hooks.reconcile",
    "ReconcileReport": "mlflow_churn.hooks.reconcile",
    "sign": "mlflow_churn.hooks.app",
    "verify_signature": "mlflow_churn.hooks.app",
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
