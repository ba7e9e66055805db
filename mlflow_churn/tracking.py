"""Point MLflow at the configured store and make sure our experiment exists there."""

from __future__ import annotations

import urllib.error
import urllib.request

import mlflow
from mlflow.tracking import MlflowClient

from mlflow_churn.config import ChurnConfig
from mlflow_churn.errors import ChurnError

PROBE_TIMEOUT_S = 5.0


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
        exp = client.get_experiment_by_name(name)
        if exp is None:
            location = None
            if uri == f"sqlite:///{cfg.workspace.resolve() / 'mlflow.db'}":
                location = cfg.artifact_root.as_uri()
            exp_id = client.create_experiment(name, artifact_location=location)
        else:
            exp_id = exp.experiment_id
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
