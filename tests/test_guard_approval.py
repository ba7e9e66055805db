"""Approvals: with ``registry.require_approval: true`` a promotion also needs an approval by
someone other than the promoter; the guard plugin and ``churn canary promote`` enforce it.
One ``mlflow server --app-name churn-guard`` with CHURN_REGISTRY__REQUIRE_APPROVAL=true,
``registry.guard_auth: basic-auth`` (who promoted and who approved are known) and approver
``dana``. (Attacks on approvals and overrides: tests/test_guard_attacks.py.)"""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest
import requests
from guard_support import (
    aliases,
    canary_verdict,
    gate,
    guard_config,
    guard_server,
    new_version,
    rest,
    set_alias,
)
from mlflow.tracking import MlflowClient

from mlflow_churn.errors import ChurnError
from mlflow_churn.registry.aliases import PREVIOUS_CHAMPION
from mlflow_churn.registry.promotion import APPROVAL_TAG
from mlflow_churn.serving.transitions import promote, rollback

pytestmark = pytest.mark.slow  # one server start for the module (~10-30 s)

ADMIN = ("admin", secrets.token_urlsafe(18))


DANA = ("dana", secrets.token_urlsafe(18))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("guard-approval")
    import mlflow.server.auth as basic_auth

    ini = (Path(basic_auth.__file__).parent / "basic_auth.ini").read_text()
    ini = ini.replace("sqlite:///basic_auth.db", f"sqlite:///{root}/basic_auth.db")
    ini = ini.replace("default_permission = READ", "default_permission = EDIT")
    (root / "basic_auth.ini").write_text(ini + "\nauth_cache_ttl_seconds = 300\n")  # PBKDF2 once
    env = {"CHURN_REGISTRY__REQUIRE_APPROVAL": "true", "CHURN_REGISTRY__GUARD_AUTH": "basic-auth",
           "CHURN_REGISTRY__APPROVERS": '["dana"]',
           "MLFLOW_AUTH_CONFIG_PATH": str(root / "basic_auth.ini"),
           "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN[1], "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)}
    with guard_server(root, **env) as srv:
        res = requests.post(f"{srv.url}/api/2.0/mlflow/users/create", auth=ADMIN, timeout=30,
                            json={"username": DANA[0], "password": DANA[1]})
        assert res.status_code == 200, res.text
        yield srv


@pytest.fixture
def admin(monkeypatch) -> tuple[str, str]:
    """MLflow's client (and so the project's code) logs in as the admin user."""
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN[1])
    return ADMIN


def _approve(server, name: str, version: str, user: tuple[str, str], value: str | None = None):
    return rest(server, "POST", "model-versions/set-tag",
                {"name": name, "version": version, "key": APPROVAL_TAG, "value": value or user[0]}, auth=user)


def test_promotion_needs_another_persons_approval(server, workspace, admin) -> None:
    cfg = guard_config(workspace, server, **{"registry.require_approval": True,
                                             "registry.guard_auth": "basic-auth"})
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
    # an approval names the approver: dana may not write someone else's name, admin is no approver
    assert _approve(server, name, v1, DANA, value="erin").status_code == 403
    res = _approve(server, name, v1, DANA)
    assert res.status_code == 200, res.text
    # dana may not promote what dana approved (four eyes) ...
    res = set_alias(server, name, "champion", v1, auth=DANA)
    assert res.status_code == 403 and "rule self_approval" in res.json()["message"], res.text
    # ... admin may
    res = set_alias(server, name, "champion", v1, ui=True, auth=admin)
    assert res.status_code == 200, res.text
    tags = client.get_model_version(name, v1).tags
    assert (tags["promotion_rule"], tags["promoted_by"]) == ("first_champion", "admin")
    assert APPROVAL_TAG not in tags  # the approval ended with the promotion it served

    # `churn canary promote` (serving.transitions.promote) refuses a passed canary without approval ...
    gate(client, cfg, v2, passed=True)
    assert canary_verdict(cfg, v2) == "promote"
    with pytest.raises(ChurnError, match="rule approval_missing"):
        promote(cfg, "canary looks good")
    assert aliases(client, name)["champion"] == v1
    # ... and promotes it, through the guarded server, once dana approved it
    assert _approve(server, name, v2, DANA).status_code == 200
    result = promote(cfg, "canary looks good")
    assert not result.noop and aliases(client, name)["champion"] == v2
    assert aliases(client, name)[PREVIOUS_CHAMPION] == v1
    tags = client.get_model_version(name, v2).tags
    assert (tags["promotion_rule"], tags["promoted_by"]) == ("gate_and_canary", "admin")
    assert "dana" in client.get_run(tags["promotion_audit_run_id"]).data.params["evidence"]

    # a rollback to the previous champion needs no approval: an incident does not wait
    result = rollback(cfg, "AUC fell on the new plans")
    assert aliases(client, name)["champion"] == v1 and PREVIOUS_CHAMPION not in aliases(client, name)
    assert client.get_model_version(name, v1).tags["promotion_rule"] == "rollback"
