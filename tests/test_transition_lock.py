"""A transition holds the model's registry lock across its requests to a guarded server; the
guard locks each request too. On one workspace (the demo's `mlflow server` on SQLite) the two
must be different locks, or the guard waits forever for the transition that waits for it."""

from __future__ import annotations

import pytest
from guard_support import aliases, gate, guard_config, guard_server, new_version, set_alias
from mlflow.tracking import MlflowClient

from mlflow_churn.registry.lock import registry_lock

pytestmark = pytest.mark.slow  # one server start (~10-30 s)


def test_a_transition_holding_the_lock_is_answered_by_a_guard_on_its_workspace(tmp_path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    with guard_server(tmp_path / "server", CHURN_WORKSPACE=str(ws)) as server:
        cfg = guard_config(ws, server)
        client = MlflowClient(server.url, server.url)
        version = new_version(client, cfg)
        gate(client, cfg, version, passed=True)
        with registry_lock(cfg):
            res = set_alias(server, cfg.training.model_name, "champion", version)  # 30 s timeout
        assert res.status_code == 200, res.text
        assert aliases(client, cfg.training.model_name)["champion"] == version
