"""Approvals: with ``registry.require_approval: true`` a promotion also needs
tag ``approved_by`` on the version; the guard plugin and ``churn canary promote`` enforce it.
One ``mlflow server --app-name churn-guard`` with CHURN_REGISTRY__REQUIRE_APPROVAL=true and
``registry.guard_auth: basic-auth`` (MLflow's basic-auth wrapped too: who promoted is known)."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest
from guard_support import aliases, canary_verdict, gate, guard_config, guard_server, new_version, set_alias
from mlflow.tracking import MlflowClient

from mlflow_churn.errors import ChurnError
from mlflow_churn.registry.aliases import PREVIOUS_CHAMPION
from mlflow_churn.registry.promotion import APPROVAL_TAG
from mlflow_churn.serving.transitions import promote

pytestmark = pytest.mark.slow  # one server start for the module (~10-30 s)

ADMIN = ("admin", secrets.token_urlsafe(18))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("guard-approval")
    import mlflow.server.auth as basic_auth

    ini = (Path(basic_auth.__file__).parent / "basic_auth.ini").read_text()
    ini = ini.replace("sqlite:///basic_auth.db", f"sqlite:///{root}/basic_auth.db")
    (root / "basic_auth.ini").write_text(ini + "\nauth_cache_ttl_seconds = 300\n")  # PBKDF2 once
    env = {"CHURN_REGISTRY__REQUIRE_APPROVAL": "true", "CHURN_REGISTRY__GUARD_AUTH": "basic-auth",
           "MLFLOW_AUTH_CONFIG_PATH": str(root / "basic_auth.ini"),
           "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN[1], "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)}
    with guard_server(root, **env) as srv:
        yield srv


@pytest.fixture
def admin(monkeypatch) -> tuple[str, str]:
    """MLflow's client (and so the project's code) logs in as the admin user."""
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN[1])
    return ADMIN


def test_promotion_needs_approved_by_in_the_guard_and_the_cli(server, workspace, admin) -> None:
    cfg = guard_config(workspace, server, **{"registry.require_approval": True})
    client = MlflowClient(server.url, server.url)
    name = cfg.training.model_name
    v1, v2 = new_version(client, cfg), new_version(client, cfg)

    # the first champion: gate passed, but nobody approved it yet
    gate(client, cfg, v1, passed=True)
    assert set_alias(server, name, "champion", v1).status_code == 401  # basic-auth first
    for ui in (False, True):
        res = set_alias(server, name, "champion", v1, ui=ui, auth=admin)
        assert res.status_code == 403, res.text
        message = res.json()["message"]
        assert f"version {v1} " in message and "rule approval_missing" in message and APPROVAL_TAG in message
    client.set_model_version_tag(name, v1, APPROVAL_TAG, "dana")  # a person, in the UI
    res = set_alias(server, name, "champion", v1, ui=True, auth=admin)
    assert res.status_code == 200, res.text
    tags = client.get_model_version(name, v1).tags
    assert (tags["promotion_rule"], tags["promoted_by"]) == ("first_champion", "admin")

    # `churn canary promote` (serving.transitions.promote) refuses a passed canary without approval ...
    gate(client, cfg, v2, passed=True)
    assert canary_verdict(cfg, v2) == "promote"
    with pytest.raises(ChurnError, match="rule approval_missing"):
        promote(cfg, "canary looks good")
    assert aliases(client, name)["champion"] == v1
    # ... and promotes it, through the guarded server, once it is approved
    client.set_model_version_tag(name, v2, APPROVAL_TAG, "dana")
    result = promote(cfg, "canary looks good")
    assert not result.noop and aliases(client, name)["champion"] == v2
    assert aliases(client, name)[PREVIOUS_CHAMPION] == v1
    tags = client.get_model_version(name, v2).tags
    assert (tags["promotion_rule"], tags["promoted_by"]) == ("gate_and_canary", "admin")
    assert "dana" in client.get_run(tags["promotion_audit_run_id"]).data.params["evidence"]

    # a rollback to the previous champion needs no approval: an incident does not wait
    client.delete_model_version_tag(name, v1, APPROVAL_TAG)
    res = set_alias(server, name, "champion", v1, auth=admin)
    assert res.status_code == 200, res.text
    assert client.get_model_version(name, v1).tags["promotion_rule"] == "rollback"
