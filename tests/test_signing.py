"""Signed decisions: keys (keygen, rotation, file mode), tampering with any signed field, the
private key never leaking, and the signed promotion path through the `churn` CLI on the
embedded store (gate, canary, promote, `churn registry verify`, approvals)."""

from __future__ import annotations

import base64
import getpass
import json
import os
from dataclasses import fields
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import unquote, urlparse

import mlflow
import pytest
from guard_support import gate, new_version
from mlflow.tracking import MlflowClient

from mlflow_churn.config import ChurnConfig, load_config
from mlflow_churn.errors import ChurnError
from mlflow_churn.registry.aliases import CANARY, CHAMPION, PREVIOUS_CHAMPION, aliases_of
from mlflow_churn.registry.promotion import read_evidence
from mlflow_churn.registry.signing import (
    Decision,
    SignatureError,
    Signer,
    Verifier,
    keygen,
    signer_for,
    signing_key_path,
    verifier_for,
    verify_key_path,
)
from mlflow_churn.serving.prediction_log import PredictionLog, PredictionRecord

#: the gate's holdout time for register_version's models (as tests/test_evaluation_gate.py)
AS_OF = datetime(2026, 5, 1, tzinfo=UTC)
#: business time of the logged canary traffic
TRAFFIC_AT = datetime(2026, 5, 1, tzinfo=UTC)


def _decision(**changes: str) -> Decision:
    base = {"kind": "gate", "model": "churn-model", "version": "3", "identity": "a" * 32,
            "decision": "passed", "champion": "2:" + "b" * 32, "run_id": "c" * 32,
            "metrics_sha256": "d" * 64, "files_sha256": "e" * 64, "issued_at": "2026-05-01T00:00:00+00:00",
            "actor": "gatekeeper", "reason": "all rules passed", "key_id": ""}
    return Decision(**{**base, **changes})


def _one_char(value: str) -> str:
    """``value`` with its last character replaced by another one (a one-character change)."""
    if not value:
        return "x"
    last = value[-1]
    return value[:-1] + ("1" if last == "0" else "0" if last.isdigit() else "b" if last != "b" else "c")


def _secrets(signing_file: Path) -> list[str]:
    """Every spelling of the private key a leak could use: the PEM body lines, the raw
    32-byte seed as hex and base64."""
    from cryptography.hazmat.primitives import serialization

    pem = signing_file.read_text()
    body = [line for line in pem.splitlines() if line and not line.startswith("-----")]
    key = serialization.load_pem_private_key(pem.encode(), password=None)
    raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                            serialization.NoEncryption())
    return [*body, "".join(body), raw.hex(), base64.b64encode(raw).decode(),
            base64.urlsafe_b64encode(raw).decode().rstrip("=")]


def _assert_no_secret(text: str, secrets: list[str], where: str) -> None:
    for secret in secrets:
        assert secret not in text, f"the private key appears in {where}"


# --------------------------------------------------------------------------- keys
def test_keygen_writes_0600_refuses_to_overwrite_and_rotates(churn_main, workspace: Path) -> None:
    ws = ["--workspace", str(workspace)]
    res = churn_main([*ws, "registry", "keygen", "--json"])
    assert res.returncode == 0, res.stderr
    first = json.loads(res.stdout)
    key = Path(first["signing_key_file"])
    assert key == workspace / "keys" / "signing.key" and key.stat().st_mode & 0o777 == 0o600
    assert first["verify_key_ids"] == [first["key_id"]] and first["rotated_from"] is None
    pem = key.read_bytes()
    again = churn_main([*ws, "registry", "keygen"])
    assert again.returncode == 2 and "--rotate" in again.stderr and first["key_id"] in again.stderr
    assert key.read_bytes() == pem  # untouched
    rotated = churn_main([*ws, "registry", "keygen", "--rotate", "--json"])
    assert rotated.returncode == 0, rotated.stderr
    second = json.loads(rotated.stdout)
    assert second["rotated_from"] == first["key_id"] and second["key_id"] != first["key_id"]
    assert set(second["verify_key_ids"]) == {first["key_id"], second["key_id"]}
    assert key.stat().st_mode & 0o777 == 0o600 and key.read_bytes() != pem
    table = churn_main([*ws, "registry", "keygen", "--rotate"])  # the table form names ids and paths
    assert table.returncode == 0 and str(key) in table.stdout and "verify key ids" in table.stdout


def test_rotation_keeps_old_signatures_verifying(tmp_path: Path) -> None:
    sign, verify = tmp_path / "signing.key", tmp_path / "verify.pub"
    keygen(sign, verify)
    old = Signer.load(sign)
    old_value = old.sign(_decision())
    keygen(sign, verify, rotate=True)
    new = Signer.load(sign)
    assert new.key_id != old.key_id
    new_value = new.sign(_decision(version="4"))
    verifier = Verifier.load([verify])
    assert verifier.verify(old_value).key_id == old.key_id
    assert verifier.verify(new_value).key_id == new.key_id
    # once the old key's line is removed from the verify file, its signatures stop verifying
    verify.write_text("".join(line + "\n" for line in verify.read_text().splitlines()
                              if old.key_id not in line))
    with pytest.raises(SignatureError, match="not a verify key"):
        Verifier.load([verify]).verify(old_value)
    assert Verifier.load([verify]).verify(new_value).version == "4"


def test_every_signed_field_changed_by_one_character_is_refused(tmp_path: Path) -> None:
    keygen(tmp_path / "signing.key", tmp_path / "verify.pub")
    value = Signer.load(tmp_path / "signing.key").sign(_decision())
    verifier = Verifier.load([tmp_path / "verify.pub"])
    assert verifier.verify(value).decision == "passed"
    names = [f.name for f in fields(Decision)]
    assert "key_id" in names and "files_sha256" in names and len(names) == 13
    for name in names:
        env = json.loads(value)
        env["payload"][name] = _one_char(env["payload"][name])
        with pytest.raises(SignatureError):
            verifier.verify(json.dumps(env))
    env = json.loads(value)  # the signature itself
    sig = base64.b64decode(env["sig"])
    env["sig"] = base64.b64encode(bytes([sig[0] ^ 1]) + sig[1:]).decode()
    with pytest.raises(SignatureError, match="does not verify"):
        verifier.verify(json.dumps(env))
    # a field added or removed is not a decision either
    for mutate in (lambda p: p.update(extra="x"), lambda p: p.pop("reason")):
        env = json.loads(value)
        mutate(env["payload"])
        with pytest.raises(SignatureError, match="malformed"):
            verifier.verify(json.dumps(env))


def test_a_signing_key_readable_by_the_group_is_refused(tmp_path: Path) -> None:
    sign, verify = tmp_path / "keys" / "signing.key", tmp_path / "keys" / "verify.pub"
    keygen(sign, verify)
    os.chmod(sign, 0o640)
    with pytest.raises(ChurnError, match=r"readable by others \(mode 0o640\).*chmod 600"):
        Signer.load(sign)
    cfg = load_config(workspace=tmp_path / "ws", environ={}, overrides={
        "registry.signing_key_file": str(sign), "registry.verify_key_file": str(verify)})
    with pytest.raises(ChurnError, match="readable by others"):
        signer_for(cfg)
    os.chmod(sign, 0o600)
    assert signer_for(cfg).key_id == Verifier.load([verify]).key_ids[0]


# --------------------------------------------------------------------------- secrecy
@pytest.mark.slow  # among the slowest of make test-fast (the CLI through a promotion)
def test_the_private_key_never_appears_in_output_logs_or_runs(churn_main, config: ChurnConfig,
                                                              register_version, caplog, capsys) -> None:
    import logging

    from mlflow_churn.evaluation.evaluate import evaluate

    ws = ["--workspace", str(config.workspace)]
    res = churn_main([*ws, "registry", "keygen", "--json"])
    assert res.returncode == 0, res.stderr
    secrets = _secrets(signing_key_path(config))
    _assert_no_secret(res.stdout + res.stderr, secrets, "`churn registry keygen --json`")
    table = churn_main([*ws, "registry", "keygen", "--rotate"])
    secrets += _secrets(signing_key_path(config))
    _assert_no_secret(table.stdout + table.stderr, secrets, "`churn registry keygen --rotate`")
    for args in (["config", "show"], ["config", "show", "--json"]):
        shown = churn_main([*ws, *args])
        assert shown.returncode == 0 and "signing_key_file" in shown.stdout
        _assert_no_secret(shown.stdout + shown.stderr, secrets, f"`churn {' '.join(args)}`")

    # a real gate, every logger at DEBUG
    register_version(config, "good", alias="challenger")
    caplog.set_level(logging.DEBUG)
    decision = evaluate(config, AS_OF, drift_sample_rows=2000)
    assert decision.passed
    out = capsys.readouterr()
    _assert_no_secret(caplog.text + out.out + out.err, secrets, "the logs of a gate")
    client = MlflowClient(config.mlflow_tracking_uri, config.mlflow_tracking_uri)
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert decision.run_id in {r.info.run_id for r in runs}
    for run in runs:
        text = json.dumps({"params": run.data.params, "tags": run.data.tags})
        _assert_no_secret(text, secrets, f"the params / tags of run {run.info.run_id}")
    (mv,) = client.search_model_versions(f"name = '{config.training.model_name}'")
    _assert_no_secret(json.dumps(mv.tags), secrets, "the version's tags")
    assert "churn.sig.gate" in mv.tags


# --------------------------------------------------------------------------- end to end
def _log_traffic(cfg: ChurnConfig, champion: str, canary: str, rows: int = 600) -> None:
    """``rows`` healthy predictions per route, at TRAFFIC_AT."""
    log = PredictionLog(cfg.prediction_log_url)
    try:
        log.write([PredictionRecord(f"{route}-{i}", 2 * i + k, version, route, (i % 100) / 100, 4.0, "ok",
                                    datetime.now(UTC), TRAFFIC_AT)
                   for i in range(rows)
                   for k, (route, version) in enumerate((("champion", champion), ("canary", canary)))])
    finally:
        log.close()


def _model_file(client: MlflowClient, name: str, version: str) -> Path:
    """A file of the version's model in the local artifact store."""
    uri = client.get_model_version_download_uri(name, version)
    root = Path(unquote(urlparse(uri).path))
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return next(p for p in files if p.name == "MLmodel")


@pytest.mark.slow  # among the slowest of make test-fast (churn CLI processes)
def test_promotion_through_the_cli_is_signed_and_verify_catches_a_replaced_file(
        churn_main, config: ChurnConfig, register_version) -> None:
    ws = ["--workspace", str(config.workspace)]
    name = config.training.model_name
    # the first champion: a weak model through the gate's recording, promoted with the CLI
    champ = str(register_version(config, "bad", alias=None).version)
    client = MlflowClient(config.mlflow_tracking_uri, config.mlflow_tracking_uri)
    gate(client, config, champ, passed=True)
    res = churn_main([*ws, "canary", "promote", "--reason", "first model", "--json"])
    assert res.returncode == 0, res.stderr
    assert aliases_of(client, name) == {CHAMPION: champ}
    # the challenger through the real gate, the canary through the real evaluation
    chal = str(register_version(config, "good", alias="challenger", seed=1).version)
    res = churn_main([*ws, "evaluate", "--as-of", AS_OF.isoformat(), "--no-progress"])
    assert res.returncode == 0, res.stderr
    assert aliases_of(client, name)[CANARY] == chal
    _log_traffic(config, champ, chal)
    res = churn_main([*ws, "canary", "evaluate", "--as-of", TRAFFIC_AT.isoformat(), "--json"])
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["evaluation"]["verdict"] == "promote"
    res = churn_main([*ws, "canary", "promote", "--reason", "canary healthy", "--as-of",
                      TRAFFIC_AT.isoformat(), "--json"])
    assert res.returncode == 0, res.stderr
    assert aliases_of(client, name) == {CHAMPION: chal, PREVIOUS_CHAMPION: champ, "challenger": chal}
    ev = read_evidence(client, name, chal, verifier_for(config))
    assert ev.problems == {} and ev.get("gate", "passed") and ev.get("canary", "promote")
    assert ev.get("canary").champion.startswith(f"{champ}:")
    tags = client.get_model_version(name, chal).tags
    assert {"churn.sig.gate", "churn.sig.canary"} <= set(tags)
    Verifier.load([verify_key_path(config)]).verify(tags["churn.sig.gate"])

    res = churn_main([*ws, "registry", "verify", "--json"])
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads(res.stdout)
    assert report["ok"] and {f["alias"] for f in report["findings"]} == {CHAMPION, PREVIOUS_CHAMPION}
    assert {(f["alias"], f["check"]) for f in report["findings"]} >= {
        (CHAMPION, "files"), (CHAMPION, "lifecycle"), (CHAMPION, "signatures"),
        (PREVIOUS_CHAMPION, "lifecycle"), (PREVIOUS_CHAMPION, "distinct")}
    table = churn_main([*ws, "registry", "verify"])
    assert table.returncode == 0 and "verified" in table.stdout

    # one model file replaced in the artifact store after the gate
    path = _model_file(client, name, chal)
    path.write_text(path.read_text() + "\n# replaced\n")
    res = churn_main([*ws, "registry", "verify", "--json"])
    assert res.returncode == 1, res.stdout + res.stderr
    report = json.loads(res.stdout)
    failed = [f for f in report["findings"] if not f["ok"]]
    assert [(f["alias"], f["version"], f["check"]) for f in failed] == [(CHAMPION, chal, "files")]
    assert "changed after the gate" in failed[0]["message"]
    table = churn_main([*ws, "registry", "verify"])
    assert table.returncode == 1 and "FAIL" in table.stdout


def test_verify_of_an_unreachable_server_is_an_error(churn_main, workspace: Path, monkeypatch) -> None:
    from ports import free_port

    res = churn_main(["--workspace", str(workspace), "registry", "verify", "--json"])
    assert res.returncode == 2 and "no registered model" in res.stderr  # nothing to verify is no pass
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")  # nobody listens
    res = churn_main(["--workspace", str(workspace), "registry", "verify", "--json"])
    assert res.returncode == 3 and "cannot reach" in res.stderr and res.stdout == ""  # an outage


def test_approve_then_promote_with_require_approval_and_self_approval_is_refused(
        churn_main, config: ChurnConfig, monkeypatch) -> None:
    from mlflow_churn.serving.transitions import promote

    ws = ["--workspace", str(config.workspace)]
    name = config.training.model_name
    client = MlflowClient(config.mlflow_tracking_uri, config.mlflow_tracking_uri)
    v1, v2 = new_version(client, config), new_version(client, config)
    gate(client, config, v1, passed=True)
    promote(config, "first model", version=v1)
    gate(client, config, v2, passed=True)
    monkeypatch.setenv("CHURN_REGISTRY__REQUIRE_APPROVAL", "true")
    promote_args = [*ws, "canary", "promote", "--force", "--reason", "hotfix", "--json"]
    res = churn_main(promote_args)
    assert res.returncode == 2 and "rule approval_missing" in res.stderr
    assert "churn registry approve" in res.stderr
    me = getpass.getuser()  # who `churn canary promote` signs as
    res = churn_main([*ws, "registry", "approve", "--version", v2, "--approver", me, "--json"])
    assert res.returncode == 0, res.stderr
    res = churn_main(promote_args)
    assert res.returncode == 2 and "rule self_approval" in res.stderr and "four eyes" in res.stderr
    assert aliases_of(client, name) == {CHAMPION: v1, CANARY: v2}
    res = churn_main([*ws, "registry", "approve", "--version", v2, "--approver", "alice", "--reason",
                      "reviewed the gate run", "--json"])
    assert res.returncode == 0, res.stderr
    approval = json.loads(res.stdout)
    assert approval["approver"] == "alice" and approval["champion"].startswith(f"{v1}:")
    audit = client.get_run(approval["run_id"])
    assert audit.data.tags["kind"] == "approval" and audit.data.tags["actor"] == "alice"
    assert client.get_experiment(audit.info.experiment_id).name == config.registry.audit_experiment
    res = churn_main(promote_args)
    assert res.returncode == 0, res.stderr
    assert aliases_of(client, name) == {CHAMPION: v2, PREVIOUS_CHAMPION: v1}
    ev = read_evidence(client, name, v2, verifier_for(config))
    assert ev.get("approval").actor == "alice" and ev.get("override").actor == me
    bad = churn_main([*ws, "registry", "approve", "--version", "99", "--approver", "alice"])
    assert bad.returncode == 2 and "does not exist" in bad.stderr


def test_a_canary_rollback_is_never_held_up_by_an_unusable_key(config: ChurnConfig) -> None:
    from mlflow_churn.serving.transitions import rollback

    name = config.training.model_name
    client = MlflowClient(config.mlflow_tracking_uri, config.mlflow_tracking_uri)
    v1 = new_version(client, config)
    gate(client, config, v1, passed=True)  # signed: canary v1
    os.chmod(signing_key_path(config), 0o644)  # now readable by others: refused for signing
    res = rollback(config, "incident: canary errors")
    assert CANARY not in aliases_of(client, name)
    run = client.get_run(res.run_id)
    assert "readable by others" in run.data.tags["rollback_unsigned"]
    assert "rollback" not in read_evidence(client, name, v1, verifier_for(config)).decisions


def test_files_digest_sees_every_model_file_but_mlflows_own_meta(tmp_path: Path) -> None:
    from mlflow_churn.registry.signing import files_digest

    (tmp_path / "sub").mkdir()
    (tmp_path / "MLmodel").write_text("flavors: {}")
    (tmp_path / "sub" / "booster.ubj").write_bytes(b"\x00\x01")
    before = files_digest(tmp_path)
    (tmp_path / "registered_model_meta").write_text("model_name: x")  # MLflow writes it on load
    assert files_digest(tmp_path) == before
    (tmp_path / "sub" / "registered_model_meta").write_text("x")  # only at the root
    assert files_digest(tmp_path) != before
    (tmp_path / "sub" / "registered_model_meta").unlink()
    (tmp_path / "sub" / "booster.ubj").write_bytes(b"\x00\x02")
    assert files_digest(tmp_path) != before
    (tmp_path / "sub" / "booster.ubj").rename(tmp_path / "sub" / "booster2.ubj")
    assert files_digest(tmp_path) != before
