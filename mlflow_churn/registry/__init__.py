"""Model registry primitives: alias names and moves (challenger -> canary -> champion ->
previous-champion), optionally mirrored onto legacy stages.

The gate lives in :mod:`mlflow_churn.evaluation`, canary transitions in
:mod:`mlflow_churn.serving.canary`, the webhook receiver in :mod:`mlflow_churn.hooks`.
"""

from mlflow_churn.lazy import lazy_exports

#: public name -> the module that defines it (imported on first use: `import mlflow_churn.X` stays light)
_EXPORTS = {
    "move_alias": "mlflow_churn.registry.aliases",
    "remove_alias": "mlflow_churn.registry.aliases",
    "alias_version": "mlflow_churn.registry.aliases",
    "aliases_of": "mlflow_churn.registry.aliases",
    "model_uri": "mlflow_churn.registry.aliases",
    "CHALLENGER": "mlflow_churn.registry.aliases",
    "CANARY": "mlflow_churn.registry.aliases",
    "CHAMPION": "mlflow_churn.registry.aliases",
    "PREVIOUS_CHAMPION": "mlflow_churn.registry.aliases",
    "check_promotion": "mlflow_churn.registry.promotion",
    "PromotionCheck": "mlflow_churn.registry.promotion",
    "read_moves": "mlflow_churn.registry.history",
    "version_at": "mlflow_churn.registry.history",
    "registered_version": "mlflow_churn.registry.versions",
    "registry_lock": "mlflow_churn.registry.lock",
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
