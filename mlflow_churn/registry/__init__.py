"""Model registry primitives: alias names and moves (challenger -> canary -> champion ->
previous-champion), optionally mirrored onto legacy stages.

The gate lives in :mod:`mlflow_churn.evaluation`, canary transitions in
:mod:`mlflow_churn.serving.canary`, the webhook receiver in :mod:`mlflow_churn.hooks`.
"""
