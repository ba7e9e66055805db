"""MLflow plugins: `mlflow run` in this project's directory uses the project's store and
experiment; the project's alias moves carry their claim (actor, reason, evidence run) to the server.

:class:`ChurnClaimHeaderProvider` is the ``mlflow.request_header_provider`` entry point
``churn``: while :func:`mlflow_churn.registry.claims.claiming` is active (a ``move_alias`` /
``remove_alias`` call), MLflow's HTTP client sends the claim as headers ``X-Churn-Actor``,
``X-Churn-Reason``, ``X-Churn-Evidence-Run``; a ``churn-guard`` server records them in the
alias history, marked as claimed. Every other request carries none of them.

:class:`ChurnProjectExperimentProvider` is registered as the
``mlflow.default_experiment_provider`` entry point ``churn`` (pyproject.toml).
MLflow asks it for an experiment only when none was given (no ``--experiment-name`` /
``--experiment-id``, no ``MLFLOW_EXPERIMENT_NAME`` / ``MLFLOW_EXPERIMENT_ID``), and it answers
only in a directory whose ``MLproject`` is this project (``name: mlflow-churn``). Then:

- tracking store: when no tracking URI is set (no ``MLFLOW_TRACKING_URI``), the one `churn`
  uses from the same directory (:attr:`ChurnConfig.mlflow_tracking_uri`, by default
  ``sqlite:///<workspace>/mlflow.db``), instead of MLflow's own default ``./mlflow.db``: so
  `mlflow run . -e train` and `churn evaluate` share ONE registry. `mlflow run` hands that URI
  to the entry point's process (``MLFLOW_TRACKING_URI``);
- experiment: ``training.experiment`` (``churn``), created with the
  ``mlflow.experimentKind=custom_model_development`` tag, instead of ``Default``.

Nothing here imports MLflow at module level: MLflow loads this while it is being imported.
"""

from __future__ import annotations

from pathlib import Path

PROJECT_NAME = "mlflow-churn"


def is_project_dir(path: Path | None = None) -> bool:
    """True when ``path`` (default: the working directory) holds this project's MLproject."""
    mlproject = (path or Path.cwd()) / "MLproject"
    try:
        text = mlproject.read_text()
    except OSError:
        return False
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return False
    return isinstance(data, dict) and data.get("name") == PROJECT_NAME


class ChurnProjectExperimentProvider:
    """MLflow's DefaultExperimentProvider interface (``in_context`` / ``get_experiment_id``)."""

    def in_context(self) -> bool:
        return is_project_dir()

    def get_experiment_id(self) -> str:
        import mlflow
        from mlflow.tracking import MlflowClient
        from mlflow.tracking._tracking_service.utils import is_tracking_uri_set

        from mlflow_churn.config import load_config
        from mlflow_churn.tracking import ensure_experiment, sqlite_store_ready

        cfg = load_config()
        if not is_tracking_uri_set():
            uri = cfg.mlflow_tracking_uri
            if uri.startswith("sqlite:///"):
                cfg.workspace.mkdir(parents=True, exist_ok=True)
            mlflow.set_tracking_uri(uri)
            mlflow.set_registry_uri(uri)
            sqlite_store_ready(uri)
        return ensure_experiment(MlflowClient(), cfg, cfg.training.experiment)


class ChurnClaimHeaderProvider:
    """MLflow's RequestHeaderProvider interface (``in_context`` / ``request_headers``): the
    claim of the alias move being made, as request headers (see module doc)."""

    def in_context(self) -> bool:
        from mlflow_churn.registry.claims import current

        return current() is not None

    def request_headers(self) -> dict[str, str]:
        from mlflow_churn.registry.claims import claim_headers, current

        return claim_headers(current())
