"""Legacy stages mirror the aliases (evaluation.mirror_stages) through canary and promotion."""

from __future__ import annotations

import warnings

import mlflow
import pytest
from guard_support import gate
from mlflow.tracking import MlflowClient

from mlflow_churn.config import ChurnConfig
from mlflow_churn.serving.transitions import promote


def _stages(client: MlflowClient, name: str) -> dict[str, str]:
    return {v.version: v.current_stage for v in client.search_model_versions(f"name = '{name}'")}


@pytest.mark.slow  # among the slowest of make test-fast (trained versions moved through)
def test_stages_follow_canary_promotion_and_replacement(config: ChurnConfig, register_version) -> None:
    cfg = config.model_copy(deep=True)
    cfg.evaluation.mirror_stages = True
    name = cfg.training.model_name

    def gated(seed: int) -> str:  # registered, then passed through the gate's own recording: canary
        version = register_version(cfg, "good", alias=None, seed=seed).version
        gate(client, cfg, version, passed=True)
        return version

    client = MlflowClient(cfg.mlflow_tracking_uri, cfg.mlflow_tracking_uri)
    v1 = gated(0)
    promote(cfg, reason="first model", version=v1)  # signed gate, no champion: the first champion
    v2 = gated(1)
    assert _stages(client, name) == {v1: "Production", v2: "Staging"}
    # a newer canary replaces an unpromoted one: one version in Staging
    v3 = gated(2)
    assert _stages(client, name) == {v1: "Production", v2: "None", v3: "Staging"}
    promote(cfg, reason="test", version=v3, force=True)
    assert _stages(client, name) == {v1: "Archived", v2: "None", v3: "Production"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        prod = mlflow.pyfunc.load_model(f"models:/{name}/Production")
    assert prod.metadata.run_id == client.get_model_version(name, v3).run_id
    # the next promotion archives v3 and keeps v1 archived
    v4 = gated(3)
    promote(cfg, reason="test", version=v4, force=True)
    assert _stages(client, name) == {v1: "Archived", v2: "None", v3: "Archived", v4: "Production"}
