"""Legacy stages mirror the aliases (evaluation.mirror_stages) through canary and promotion."""

from __future__ import annotations

import warnings

import mlflow
from mlflow.tracking import MlflowClient

from mlflow_churn.config import ChurnConfig
from mlflow_churn.serving.transitions import promote


def _stages(client: MlflowClient, name: str) -> dict[str, str]:
    return {v.version: v.current_stage for v in client.search_model_versions(f"name = '{name}'")}


def test_stages_follow_canary_promotion_and_replacement(config: ChurnConfig, register_version) -> None:
    cfg = config.model_copy(deep=True)
    cfg.evaluation.mirror_stages = True
    name = cfg.training.model_name
    v1 = register_version(cfg, "good", alias="champion", mirror_stages=True).version
    v2 = register_version(cfg, "good", alias="canary", mirror_stages=True, seed=1).version
    client = MlflowClient()
    assert _stages(client, name) == {v1: "Production", v2: "Staging"}
    # a newer canary replaces an unpromoted one: one version in Staging
    v3 = register_version(cfg, "good", alias="canary", mirror_stages=True, seed=2).version
    assert _stages(client, name) == {v1: "Production", v2: "None", v3: "Staging"}
    promote(cfg, reason="test", version=v3, force=True)
    assert _stages(client, name) == {v1: "Archived", v2: "None", v3: "Production"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        prod = mlflow.pyfunc.load_model(f"models:/{name}/Production")
    assert prod.metadata.run_id == client.get_model_version(name, v3).run_id
    # the next promotion archives v3 and keeps v1 archived
    v4 = register_version(cfg, "good", alias="canary", mirror_stages=True, seed=3).version
    promote(cfg, reason="test", version=v4, force=True)
    assert _stages(client, name) == {v1: "Archived", v2: "None", v3: "Archived", v4: "Production"}
