"""The webhook receiver's alias handling (AliasWatcher.handle) on the embedded store: moves
made past the project (a person with a plain MLflow client) are checked with check_promotion
on signed decisions, deletions included, and the whole model is verified after every event."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
from guard_support import gate, new_version
from mlflow.tracking import MlflowClient

from mlflow_churn.config import ChurnConfig
from mlflow_churn.registry.alias_events import UNGUARDED, AliasEvent, AliasWatcher
from mlflow_churn.registry.aliases import CANARY, CHAMPION, PREVIOUS_CHAMPION, aliases_of
from mlflow_churn.serving.transitions import promote


@pytest.fixture
def watched(config: ChurnConfig):
    """A model with a signed first champion v1, a signed canary v2 and a never-gated v3, and
    an AliasWatcher on it with registry.revert_unguarded on."""
    cfg = config.model_copy(deep=True)
    cfg.registry.revert_unguarded = True
    client = MlflowClient(cfg.mlflow_tracking_uri, cfg.mlflow_tracking_uri)
    v1, v2, v3 = (new_version(client, cfg) for _ in range(3))
    gate(client, cfg, v1, passed=True)
    promote(cfg, "first model", version=v1)
    gate(client, cfg, v2, passed=True)
    watcher = AliasWatcher(cfg)
    try:
        yield cfg, client, watcher, (v1, v2, v3)
    finally:
        watcher.stop()


def _event(cfg: ChurnConfig, action: str, alias: str, version: str | None = None) -> AliasEvent:
    return AliasEvent(cfg.training.model_name, action, alias, version, datetime.now(UTC), "d-1")


def _rule(client: MlflowClient, run_id: str) -> str:
    return client.get_run(run_id).data.tags["rule"]


def test_deletions_are_checked_and_a_clean_model_raises_nothing(watched) -> None:
    cfg, client, watcher, (v1, v2, _v3) = watched
    name = cfg.training.model_name
    assert not watcher.handle(AliasEvent(name, "reconcile")).unguarded  # everything verifies
    # stopping a canary by hand is always allowed
    client.delete_registered_model_alias(name, CANARY)
    out = watcher.handle(_event(cfg, "deleted", CANARY))
    assert [m.alias for m in out.moves] == [CANARY] and out.unguarded == [] and out.reverted == []
    # deleting the champion by hand is not (no signed rollback): audited and put back
    client.delete_registered_model_alias(name, CHAMPION)
    out = watcher.handle(_event(cfg, "deleted", CHAMPION))
    (audit,) = out.unguarded
    assert _rule(client, audit) == "lifecycle" and out.reverted == [f"{CHAMPION} -> {v1}"]
    assert aliases_of(client, name) == {CHAMPION: v1}
    assert client.get_run(audit).data.tags["kind"] == UNGUARDED
    assert watcher.metrics.counter("churn_hooks_unguarded_promotions_total", {"alias": CHAMPION}) == 1.0


def test_an_ungated_champion_and_a_replaced_model_file_do_not_verify(watched) -> None:
    cfg, client, watcher, (v1, _v2, v3) = watched
    name = cfg.training.model_name
    client.set_registered_model_alias(name, CHAMPION, v3)  # past the project, never gated
    out = watcher.handle(_event(cfg, "created", CHAMPION, v3))
    (audit,) = out.unguarded  # refused by check_promotion; verify adds nothing on the same alias
    assert _rule(client, audit) == "not_gated" and aliases_of(client, name)[CHAMPION] == v1
    # a model file of the champion replaced in the artifact store: no move to blame, still raised
    root = Path(unquote(urlparse(client.get_model_version_download_uri(name, v1)).path))
    (file,) = [p for p in root.rglob("*") if p.is_file()]
    file.write_text("other weights")
    out = watcher.handle(AliasEvent(name, "reconcile"))
    (audit,) = out.unguarded
    run = client.get_run(audit)
    assert run.data.tags["rule"] == "verify" and run.data.tags["alias"] == CHAMPION
    assert "changed after the gate" in run.data.params["message"] and out.reverted == []
    # previous-champion set by hand onto a version no signed promotion left behind: reverted
    client.set_registered_model_alias(name, PREVIOUS_CHAMPION, v3)
    out = watcher.handle(_event(cfg, "created", PREVIOUS_CHAMPION, v3))
    assert _rule(client, out.unguarded[0]) == "lifecycle"
    assert PREVIOUS_CHAMPION not in aliases_of(client, name)
