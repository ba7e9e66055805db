"""Point MLflow at the configured store and make sure our experiment exists there."""

from __future__ import annotations

import urllib.error
import urllib.request

import mlflow
from mlflow.tracking import MlflowClient

from mlflow_churn.config import ChurnConfig
from mlflow_churn.errors import ChurnError

PROBE_TIMEOUT_S = 5.0
#: The MLflow 3 UI opens an experiment with this tag as model training (runs, metrics,
#: models), not in GenAI mode (traces, "evaluation runs").
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def probe_server(uri: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """For an ``http(s)://`` tracking URI, GET ``<uri>/health`` once (``timeout`` seconds, no
    retries) so an unreachable server fails in seconds, not after MLflow's minutes of
    retries. ChurnError naming the URI when it does not answer; other schemes: no-op."""
    if not uri.startswith(("http://", "https://")):
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout):  # noqa: S310 (the configured server)
            return
    except urllib.error.HTTPError:
        return  # it answers (a proxy or an auth layer may refuse /health): let MLflow talk to it
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ChurnError(f"cannot reach the MLflow tracking server at {uri} ({reason}); start it or fix "
                         "MLFLOW_TRACKING_URI / tracking_uri") from None


def setup_mlflow(cfg: ChurnConfig, experiment: str | None = None) -> str:
    """Set the tracking/registry URI from ``cfg`` and return the experiment id.

    In the default workspace store (``sqlite:///<workspace>/mlflow.db``) the experiment's
    artifacts go to ``<workspace>/mlartifacts``; elsewhere the server decides.
    Raises ChurnError when the tracking store cannot be reached.
    """
    uri = cfg.mlflow_tracking_uri
    if uri.startswith("sqlite:///"):
        cfg.workspace.mkdir(parents=True, exist_ok=True)
    probe_server(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    name = experiment or cfg.training.experiment
    client = MlflowClient(uri, uri)
    try:
        exp_id = ensure_experiment(client, cfg, name)
    except ChurnError:
        raise
    except Exception as exc:  # MLflow raises many types for an unreachable store
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ChurnError(
            f"cannot reach the MLflow tracking store at {uri} ({first[:200]}); "
            "check MLFLOW_TRACKING_URI / tracking_uri"
        ) from None
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def ensure_experiment(client: MlflowClient, cfg: ChurnConfig, name: str) -> str:
    """The id of experiment ``name`` in ``client``'s store, created when missing (artifacts in
    ``<workspace>/mlartifacts`` for the workspace's own store) and tagged
    ``mlflow.experimentKind=custom_model_development`` (an existing one lacking the tag gets it)."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        location = None
        if client.tracking_uri == f"sqlite:///{cfg.workspace.resolve() / 'mlflow.db'}":
            location = cfg.artifact_root.as_uri()
        return client.create_experiment(name, artifact_location=location,
                                        tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    if exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp.experiment_id
