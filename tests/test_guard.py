"""The guard plugin on a real ``mlflow server --app-name churn-guard``.

One server for the module (SQLite); every test uses its own registered model. Versions are
gated and canary-evaluated by the project's own recording code (tests/guard_support.py).
"""

from __future__ import annotations

import mlflow
import pytest
from guard_support import (
    aliases,
    canary_verdict,
    delete_alias,
    gate,
    guard_config,
    guard_server,
    new_version,
    rest,
    set_alias,
    to_stage,
)
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mlflow_churn.alerts.receiver import AlertReceiver
from mlflow_churn.registry.aliases import PREVIOUS_CHAMPION
from mlflow_churn.registry.promotion import OVERRIDE_TAG, check_promotion
from mlflow_churn.registry.signing import record_signed

pytestmark = pytest.mark.slow  # one server start for the module (~10-30 s)


@pytest.fixture(scope="module")
def sink():
    with AlertReceiver() as found:
        yield found


@pytest.fixture(scope="module")
def server(tmp_path_factory, sink):
    # the guard's alerts go through the project's alert path (a webhook outlet here)
    with guard_server(tmp_path_factory.mktemp("guard"), CHURN_ALERTS__WEBHOOK_URL=sink.url) as srv:
        yield srv


@pytest.fixture
def setup(server, workspace):
    """A model whose v1 is champion (first champion: gate only), plus v2 never gated, v3 rejected
    by the gate, v4 gated with its canary still waiting and v5 gated with its canary passed."""
    cfg = guard_config(workspace, server)
    client = MlflowClient(server.url, server.url)
    name = cfg.training.model_name
    v = {i: new_version(client, cfg) for i in range(1, 6)}
    gate(client, cfg, v[1], passed=True)
    res = set_alias(server, name, "champion", v[1])
    assert res.status_code == 200, res.text  # the first champion needs the gate only
    gate(client, cfg, v[3], passed=False)
    gate(client, cfg, v[4], passed=True)
    assert canary_verdict(cfg, v[4], rows=10) == "wait"
    gate(client, cfg, v[5], passed=True)
    assert canary_verdict(cfg, v[5]) == "promote"
    return cfg, client, name, v


def _refused(res, version: str, rule: str) -> None:
    assert res.status_code == 403, res.text
    body = res.json()
    assert body["error_code"] == "PERMISSION_DENIED"
    assert f"version {version} " in body["message"] and f"rule {rule}" in body["message"]
    assert "--force" in body["message"]  # how to pass it: a signed override


def _sign(client, cfg, name, version, kind, decision, champion, reason=""):
    champ = client.get_model_version(name, champion) if champion else None
    return record_signed(client, cfg, name, version, kind, decision, champion=champ, run_id="",
                         reason=reason, actor="test-operator")


def test_refused_on_every_route_then_allowed_after_gate_and_canary(server, setup) -> None:
    cfg, client, name, v = setup
    for version, rule in ((v[2], "not_gated"), (v[3], "gate_rejected"), (v[4], "canary_pending")):
        for ui in (False, True):
            _refused(set_alias(server, name, "champion", version, ui=ui), version, rule)
            _refused(to_stage(server, name, version, ui=ui), version, rule)
    with pytest.raises(MlflowException, match="rule not_gated"):  # MLflow's own client sees it too
        client.set_registered_model_alias(name, "champion", v[2])
    assert aliases(client, name)["champion"] == v[1]
    assert {client.get_model_version(name, v[i]).current_stage for i in (2, 3, 4)} == {"None"}

    # the canary-passed version: stage (legacy) then alias, from the UI's route
    res = to_stage(server, name, v[5], ui=True)
    assert res.status_code == 200, res.text
    res = set_alias(server, name, "champion", v[5], ui=True)
    assert res.status_code == 200, res.text
    assert aliases(client, name)["champion"] == v[5]
    tags = client.get_model_version(name, v[5]).tags
    assert tags["promotion_rule"] == "gate_and_canary" and tags["promotion_route"] == "ui:set_alias"
    assert tags["promoted_by"].startswith("anonymous@127.0.0.1")
    audit = client.get_run(tags["promotion_audit_run_id"])
    assert audit.data.tags["decision"] == "allowed" and audit.data.tags["rule"] == "gate_and_canary"
    assert "canary" in audit.data.params["reason"]
    # refusals are audited too, the actor named
    refused = mlflow.search_runs(experiment_names=["churn-registry-audit"], output_format="list",
                                 filter_string=f"tags.model_name = '{name}' and tags.decision = 'refused'")
    assert len(refused) == 13
    assert {r.data.tags["actor"] for r in refused} == {"anonymous@127.0.0.1"}


def test_a_refusal_and_an_override_are_alerts(server, setup, sink) -> None:
    cfg, client, name, v = setup
    _refused(set_alias(server, name, "champion", v[2]), v[2], "not_gated")
    _sign(client, cfg, name, v[3], "override", "override", v[1], "incident 43")
    assert set_alias(server, name, "champion", v[3]).status_code == 200

    def mine(receiver: AlertReceiver) -> dict[str, dict]:
        found = {a["labels"]["alertname"]: a for a in receiver.alerts
                 if a["labels"].get("model") == name and a["status"] == "firing"}
        return found if len(found) >= 2 else {}

    found = sink.wait_for(mine, 60)
    assert found and set(found) == {"PromotionRefused", "PromotionOverride"}, sink.messages
    refusal = found["PromotionRefused"]
    assert refusal["labels"]["version"] == v[2] and refusal["labels"]["rule"] == "not_gated"
    assert refusal["labels"]["actor"].startswith("anonymous@127.0.0.1")
    assert found["PromotionOverride"]["labels"]["version"] == v[3]


def test_champion_cannot_be_deleted_renamed_or_its_version_removed(server, setup) -> None:
    cfg, client, name, v = setup
    for ui in (False, True):
        res = delete_alias(server, name, "champion", ui=ui)
        assert res.status_code == 403 and "rule lifecycle" in res.json()["message"], res.text
    res = rest(server, "DELETE", "model-versions/delete", {"name": name, "version": v[1]})
    assert res.status_code == 403 and "protected alias champion" in res.json()["message"]
    res = rest(server, "DELETE", "registered-models/delete", {"name": name})
    assert res.status_code == 403 and "champion -> v" in res.json()["message"]
    res = rest(server, "POST", "registered-models/rename", {"name": name, "new_name": name + "-old"})
    assert res.status_code == 403 and "renamed" in res.json()["message"]
    with pytest.raises(MlflowException, match="copied"):
        client.copy_model_version(f"models:/{name}/{v[3]}", name)
    assert aliases(client, name)["champion"] == v[1]
    assert client.get_registered_model(name).name == name


def test_override_must_be_signed(server, setup) -> None:
    cfg, client, name, v = setup
    reason = "incident 42: v1 scores NaN for the new plans; v3 is the only one that handles them"
    client.set_model_version_tag(name, v[3], OVERRIDE_TAG, reason)  # typed in the UI: evidence only
    _refused(set_alias(server, name, "champion", v[3], ui=True), v[3], "gate_rejected")
    _sign(client, cfg, name, v[3], "override", "override", v[1], reason)  # churn canary promote --force
    res = set_alias(server, name, "champion", v[3], ui=True)
    assert res.status_code == 200, res.text
    tags = client.get_model_version(name, v[3]).tags
    assert tags["promotion_rule"] == "override" and reason in tags["promotion_reason"]
    assert OVERRIDE_TAG not in tags  # the override ended with the promotion it served
    audit = client.get_run(tags["promotion_audit_run_id"])
    assert audit.data.tags["rule"] == "override" and reason in audit.data.params["evidence"]


def test_rollback_only_to_what_a_signed_promotion_left_behind(server, setup) -> None:
    cfg, client, name, v = setup
    assert set_alias(server, name, "champion", v[5]).status_code == 200
    # previous-champion goes only onto the version v5's signed promotion replaced
    res = set_alias(server, name, PREVIOUS_CHAMPION, v[4])
    assert res.status_code == 403 and "rule lifecycle" in res.json()["message"]
    assert set_alias(server, name, PREVIOUS_CHAMPION, v[1]).status_code == 200
    # an unsigned "rollback": refused; v4's canary never passed
    _refused(set_alias(server, name, "champion", v[4]), v[4], "canary_pending")
    res = set_alias(server, name, "champion", v[1])
    assert res.status_code == 403, res.text
    # the signed rollback of v5 (churn canary rollback): previous-champion removed, v1 back
    _sign(client, cfg, name, v[5], "rollback", "rollback", v[1], "AUC fell on the new plans")
    assert delete_alias(server, name, PREVIOUS_CHAMPION).status_code == 200
    res = set_alias(server, name, "champion", v[1])
    assert res.status_code == 200, res.text
    assert client.get_model_version(name, v[1]).tags["promotion_rule"] == "rollback"
    # setting the alias to the version it already holds changes nothing and passes
    assert set_alias(server, name, "champion", v[1]).status_code == 200
    # v5 was rolled back after its canary verdict: that verdict no longer promotes it
    _refused(set_alias(server, name, "champion", v[5]), v[5], "canary_rollback")


def test_check_promotion_reads_signed_decisions_not_typed_tags(server, setup) -> None:
    cfg, client, name, v = setup
    client.set_model_version_tag(name, v[2], "gate", "passed")  # typed into the UI: not signed
    chk = check_promotion(client, name, v[2], cfg)
    assert (chk.allowed, chk.rule) == (False, "not_gated")
    chk = check_promotion(client, name, "999", cfg)
    assert (chk.allowed, chk.rule) == (False, "unknown_version")
    chk = check_promotion(client, name, v[5], cfg)
    assert (chk.allowed, chk.rule) == (True, "gate_and_canary")
    decisions = chk.evidence["target"]["decisions"]
    assert decisions["canary"]["decision"] == "promote" and decisions["gate"]["decision"] == "passed"


def test_every_other_call_passes_through(server, workspace, tmp_path) -> None:
    cfg = guard_config(workspace, server)
    name = cfg.training.model_name
    mlflow.set_tracking_uri(server.url)
    mlflow.set_registry_uri(server.url)
    exp_id = mlflow.create_experiment(f"guard-passthrough-{name}")
    (tmp_path / "notes.txt").write_text("hello")
    with mlflow.start_run(experiment_id=exp_id) as run:
        mlflow.log_params({"depth": 4, "eta": 0.1})
        mlflow.log_metric("auc", 0.71, step=1)
        mlflow.log_artifact(str(tmp_path / "notes.txt"))
        info = mlflow.pyfunc.log_model(name="model", python_model=_Const())
    mv = mlflow.register_model(info.model_uri, name)
    client = MlflowClient(server.url, server.url)
    client.set_registered_model_alias(name, "challenger", mv.version)  # not protected
    client.set_model_version_tag(name, mv.version, "note", "x")
    client.transition_model_version_stage(name, mv.version, "Staging")
    found = mlflow.search_runs([exp_id], filter_string="metrics.auc > 0.7", output_format="list")
    assert [r.info.run_id for r in found] == [run.info.run_id]
    (found_mv,) = client.search_model_versions(f"name = '{name}'")
    assert found_mv.version == mv.version and found_mv.current_stage == "Staging"
    assert client.get_registered_model(name).aliases == {"challenger": mv.version}
    assert client.get_model_version_by_alias(name, "challenger").tags["note"] == "x"
    path = client.download_artifacts(run.info.run_id, "notes.txt", str(tmp_path / "dl"))
    assert open(path).read() == "hello"
    model = mlflow.pyfunc.load_model(f"models:/{name}@challenger")
    assert list(model.predict([[1], [2]])) == [0.5, 0.5]
    client.delete_registered_model_alias(name, "challenger")
    client.delete_model_version(name, mv.version)
    client.delete_registered_model(name)


class _Const(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return [0.5] * len(model_input)
