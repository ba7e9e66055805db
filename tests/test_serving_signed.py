"""`churn serve` loads a champion / canary only from files whose SHA-256 its signed gate
decision names (registry.require_signed_models): an unsigned version and a version whose
files were replaced after the gate are refused, the reason named in the model pair."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse

from mlflow.tracking import MlflowClient
from serving_support import signed_gate

from mlflow_churn.registry.aliases import CHAMPION
from mlflow_churn.serving.models import ModelManager
from mlflow_churn.web.metrics import Metrics


def _manager(config) -> ModelManager:
    return ModelManager(config, Metrics())


def test_serve_loads_only_files_that_match_their_signed_digest(config, register_version) -> None:
    client = MlflowClient(config.mlflow_tracking_uri, config.mlflow_tracking_uri)
    name = config.training.model_name
    mv = register_version(config, "good", alias=CHAMPION)

    pair = _manager(config).reload()  # registered and aliased, never gated: not served
    assert pair.champion is None
    assert "no signed gate decision" in pair.refused[CHAMPION]

    signed_gate(config, mv)
    pair = _manager(config).reload()
    assert pair.champion is not None and pair.champion.version == str(mv.version)
    assert pair.refused == {}

    # one model file changed in the artifact store after the gate
    root = Path(unquote(urlparse(client.get_model_version_download_uri(name, mv.version)).path))
    mlmodel = next(p for p in root.rglob("MLmodel") if p.is_file())
    mlmodel.write_text(mlmodel.read_text() + "\n# replaced\n")
    pair = _manager(config).reload()
    assert pair.champion is None
    assert "not the files its signed gate decision names" in pair.refused[CHAMPION]

    # with the check off (a deployment that does not sign), it is served as before
    off = config.model_copy(update={"registry": config.registry.model_copy(
        update={"require_signed_models": False})})
    assert _manager(off).reload().champion is not None


def test_one_service_notices_a_signed_gate_and_a_recreated_model(config, register_version) -> None:
    """The service's cache is keyed by the version's identity and its signed gate decision,
    not its number: a version refused before its gate signed it is served once it has (no
    restart), and after the model is deleted and re-created the new v1 (another model) is
    loaded, not the old v1 still in memory."""
    client = MlflowClient(config.mlflow_tracking_uri, config.mlflow_tracking_uri)
    name = config.training.model_name
    manager = _manager(config)
    old = register_version(config, "good", alias=CHAMPION)
    assert manager.reload().champion is None  # not gated yet
    signed_gate(config, old)
    pair = manager.reload()
    assert pair.champion is not None and pair.refused == {}
    old_scorer = pair.champion.scorer

    client.delete_registered_model(name)
    new = register_version(config, "bad", alias=CHAMPION, seed=3)
    assert str(new.version) == str(old.version)
    pair = manager.reload()  # the same number, another model, not gated: refused
    assert pair.champion is None and "no signed gate decision" in pair.refused[CHAMPION]
    signed_gate(config, new)
    pair = manager.reload()
    assert pair.champion is not None and pair.champion.version == str(new.version)
    assert pair.champion.scorer is not old_scorer
