"""The registry webhook receiver (a shell on top of the loop): ``churn hooks serve|register``.

:mod:`.app` is the FastAPI receiver of MLflow's registry webhooks (it starts the gate of
:mod:`mlflow_churn.evaluation` when a version is aliased ``challenger``); :mod:`.cli` its
commands. It lives above the core packages because it calls into them; the registry
primitives it uses are in :mod:`mlflow_churn.registry`.
"""
