"""Canary analysis on real logged traffic, and promote / rollback through the `churn` CLI."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import mlflow
import pytest
from mlflow.tracking import MlflowClient
from serving_support import (
    BATCH_AS_OF,
    LABELS_AS_OF,
    ServerThread,
    run_cli,
    serving_config,
    two_versions,
    wait_ready,
)

from mlflow_churn.features.online import open_store
from mlflow_churn.registry.signing import version_ref
from mlflow_churn.serving.app import create_app
from mlflow_churn.serving.canary import evaluate_canary
from mlflow_churn.serving.prediction_log import PredictionLog, PredictionRecord


def _traffic(cfg) -> int:
    """Score every customer of the online batch through the service; rows logged."""
    store = open_store(cfg)
    ids = store.customer_ids()
    store.close()
    with ServerThread(create_app(cfg)) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        wait_ready(client)
        for start in range(0, len(ids), 50):  # small requests, like a CRM asking per page
            res = client.post("/predict", json={"customer_ids": ids[start:start + 50]})
            assert res.status_code == 200, res.text
    return len(ids)


def _aliases(cfg) -> dict[str, str]:
    client = MlflowClient(cfg.mlflow_tracking_uri)
    return {a: str(v) for a, v in client.get_registered_model(cfg.training.model_name).aliases.items()}


def _runs(cfg, kind: str) -> list:
    mlflow.set_tracking_uri(cfg.mlflow_tracking_uri)
    return mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.kind = '{kind}'",
                              output_format="list")


def _decision(cfg, run) -> dict:
    client = MlflowClient(cfg.mlflow_tracking_uri)
    path = client.download_artifacts(run.info.run_id, "decision.json")
    return json.loads(Path(path).read_text())


@pytest.mark.slow
def test_wait_then_promote_through_cli(config, register_version) -> None:
    champ, canary = two_versions(config, register_version)
    # latency limits are checked below with a limit no real request meets; here they are wide
    # so that a loaded test machine does not decide the verdict
    cfg = serving_config(config, canary_fraction=0.5, min_canary_samples=300, max_p99_ms=60_000)
    ev = evaluate_canary(cfg, LABELS_AS_OF)
    assert ev.verdict == "wait" and "min_canary_samples" in ev.reasons[0] and ev.run_id
    n = _traffic(cfg)
    early = evaluate_canary(cfg, BATCH_AS_OF + timedelta(days=1))  # labels not matured yet
    assert early.verdict == "promote", (early.reasons, early.routes)
    assert early.routes["canary"].rows + early.routes["champion"].rows == n
    assert early.routes["canary"].labelled == 0 and any("not compared" in r for r in early.reasons)
    assert 0.0 <= early.score_psi < cfg.serving.max_score_psi
    late = evaluate_canary(cfg, LABELS_AS_OF, log_run=False)
    for st in late.routes.values():
        assert st.labelled == st.rows and st.positives > 0 and 0.7 < st.auc < 1.0 and st.errors == 0
        assert 0 < st.p50_latency_ms <= st.p99_latency_ms
    # the score-PSI limit adds what the gate measured between the same two versions offline
    tight = serving_config(cfg, canary_fraction=0.5, min_canary_samples=300, max_p99_ms=60_000,
                           max_score_psi=1e-9)
    assert any("score PSI" in r for r in evaluate_canary(tight, LABELS_AS_OF, log_run=False).reasons)
    registry = MlflowClient(cfg.mlflow_tracking_uri)
    champ_ref = version_ref(registry.get_model_version(cfg.training.model_name, champ))
    gate_tags = {"gate_score_psi": f"{late.score_psi + 0.05:.6f}", "gate_champion_ref": champ_ref}
    for key, value in gate_tags.items():
        registry.set_model_version_tag(cfg.training.model_name, canary, key, value)
    assert not any("score PSI" in r for r in evaluate_canary(tight, LABELS_AS_OF, log_run=False).reasons)
    # gated against another model that had the champion's number (deleted and re-created)
    other = f"{champ}:{'0' * 64}"
    registry.set_model_version_tag(cfg.training.model_name, canary, "gate_champion_ref", other)
    assert any("score PSI" in r for r in evaluate_canary(tight, LABELS_AS_OF, log_run=False).reasons)
    slow = evaluate_canary(serving_config(cfg, min_canary_samples=300, max_p99_ms=1e-6, max_p99_ratio=1e-6),
                           LABELS_AS_OF, log_run=False)
    assert slow.verdict == "rollback" and "p99 latency" in slow.reasons[0]
    env = {"CHURN_SERVING__MIN_CANARY_SAMPLES": "300", "CHURN_SERVING__CANARY_FRACTION": "0.5",
           "CHURN_SERVING__MAX_P99_MS": "60000"}
    res = run_cli(cfg, ["canary", "evaluate", "--as-of", LABELS_AS_OF.isoformat(), "--json"], **env)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["evaluation"]["verdict"] == "promote", out["evaluation"]
    assert out["transition"] is None
    res = run_cli(cfg, ["canary", "promote", "--as-of", LABELS_AS_OF.isoformat()], **env)
    assert res.returncode == 2 and "--reason" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    res = run_cli(cfg, ["canary", "promote", "--reason", "canary healthy for a week",
                        "--as-of", LABELS_AS_OF.isoformat()], **env)
    assert res.returncode == 0, res.stderr
    assert f"version {canary} is now champion" in res.stdout
    assert _aliases(cfg) == {"champion": canary, "previous-champion": champ}
    (run,) = [r for r in _runs(cfg, "canary-promote")]
    assert run.data.tags["decision"] == "promoted" and run.data.params["champion_before"] == champ
    assert run.data.metrics["canary_auc"] > 0.7  # the evidence rode along
    decision = _decision(cfg, run)
    assert decision["before"]["canary"] == canary and decision["after"]["champion"] == canary
    assert decision["evidence"]["verdict"] == "promote"
    tags = MlflowClient(cfg.mlflow_tracking_uri).get_model_version(cfg.training.model_name, canary).tags
    assert tags["promote_reason"] == "canary healthy for a week" and tags["promote_run_id"] == run.info.run_id
    res = run_cli(cfg, ["canary", "status", "--json"])
    assert res.returncode == 0 and json.loads(res.stdout)["aliases"]["champion"] == canary


@pytest.mark.slow
def test_bad_canary_rolls_back_automatically(config, register_version) -> None:
    champ, canary = two_versions(config, register_version, canary_quality="bad")
    cfg = serving_config(config, canary_fraction=0.5, min_canary_samples=300, max_p99_ms=60_000)
    _traffic(cfg)
    from test_alerts import Receiver

    rx = Receiver(fail_first=1)  # the alert reaches a person through a receiver that fails once
    env = {"CHURN_SERVING__MIN_CANARY_SAMPLES": "300", "CHURN_SERVING__CANARY_FRACTION": "0.5",
           "CHURN_SERVING__MAX_P99_MS": "60000", "CHURN_ALERTS__WEBHOOK_URL": rx.url("/hook"),
           "CHURN_ALERTS__RETRY_INITIAL_SECONDS": "0.2"}
    try:
        res = run_cli(cfg, ["canary", "evaluate", "--auto", "--as-of", LABELS_AS_OF.isoformat(), "--json"],
                      **env)
    finally:
        rx.stop()
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["evaluation"]["verdict"] == "rollback"
    (alert,) = [body for _, body in rx.messages("/hook")]  # delivered before the command ended
    assert alert["status"] == "firing" and alert["alerts"][0]["labels"]["alertname"] == "ChurnCanaryVerdict"
    assert f"canary v{canary} was rolled back" in alert["alerts"][0]["annotations"]["summary"]
    assert any("AUC" in r for r in out["evaluation"]["reasons"]), out["evaluation"]["reasons"]
    routes = out["evaluation"]["routes"]
    assert routes["canary"]["auc"] < routes["champion"]["auc"] - cfg.serving.max_auc_drop
    assert out["transition"]["action"] == "rollback" and not out["transition"]["noop"]
    assert _aliases(cfg) == {"champion": champ}
    tags = MlflowClient(cfg.mlflow_tracking_uri).get_model_version(cfg.training.model_name, canary).tags
    assert tags["rolled_back"] == "true" and "AUC" in tags["rollback_reason"]
    (run,) = _runs(cfg, "canary-rollback")
    assert run.data.tags["decision"] == "rolled_back"
    assert _decision(cfg, run)["evidence"]["verdict"] == "rollback"
    assert [r.data.tags["decision"] for r in _runs(cfg, "canary-evaluate")] == ["rollback"]
    # nothing left to roll back: one line, exit 2; the same version again: a recorded no-op
    res = run_cli(cfg, ["canary", "rollback", "--reason", "again"])
    assert res.returncode == 2 and "no canary" in res.stderr and "Traceback" not in res.stderr
    res = run_cli(cfg, ["canary", "rollback", "--reason", "again", "--version", canary])
    assert res.returncode == 0 and "already rolled back" in res.stdout


@pytest.mark.slow  # among the slowest of make test-fast (churn CLI processes)
def test_manual_rollback_through_cli(config, register_version) -> None:
    champ, canary = two_versions(config, register_version)
    log = PredictionLog(config.prediction_log_url)  # traffic the canary served before the spike
    log.write([PredictionRecord(f"r{i}", i, canary, "canary", 0.2, 80.0 if i % 2 else 3.0, "ok",
                                datetime.now(UTC), BATCH_AS_OF) for i in range(1, 41)])
    log.close()
    res = run_cli(config, ["canary", "rollback", "--reason", "latency spike after deploy"])
    assert res.returncode == 0, res.stderr
    assert _aliases(config) == {"champion": champ}
    tags = MlflowClient(config.mlflow_tracking_uri).get_model_version(config.training.model_name, canary).tags
    assert tags["rollback_reason"] == "latency spike after deploy"
    # no --as-of: the run still carries the canary evidence logged so far
    (run,) = _runs(config, "canary-rollback")
    assert run.data.metrics["canary_rows"] == 40 and run.data.metrics["canary_p99_latency_ms"] > 70
    assert run.data.tags["evidence"] == "wait"  # 40 < serving.min_canary_samples
    assert run.data.params["evidence_as_of"].startswith("2026-05-01")  # the data's newest day
    evidence = _decision(config, run)["evidence"]
    assert evidence["canary_version"] == canary and evidence["routes"]["canary"]["rows"] == 40
    res = run_cli(config, ["canary", "promote", "--reason", "x"])
    assert res.returncode == 2 and "no canary" in res.stderr


def test_rows_of_a_deleted_models_version_do_not_count_for_the_new_one(config, register_version) -> None:
    """Verdicts by identity, not number: the model deleted and re-created, its new v1 at
    `canary` starts with no logged traffic, although the log holds rows of the old v1."""
    import time

    cfg = serving_config(config)
    name = cfg.training.model_name
    old = register_version(cfg, alias="canary")
    log = PredictionLog(cfg.prediction_log_url)
    log.write([PredictionRecord(f"old-{i}", i, str(old.version), "canary", 0.2, 3.0, "ok",
                                datetime.now(UTC), BATCH_AS_OF) for i in range(1, 41)])
    log.close()
    ev = evaluate_canary(cfg, BATCH_AS_OF + timedelta(seconds=1), log_run=False)
    assert (ev.canary_version, ev.routes["canary"].rows) == (str(old.version), 40), ev
    MlflowClient(cfg.mlflow_tracking_uri).delete_registered_model(name)
    time.sleep(0.01)  # the new version is created after the old rows were served
    new = register_version(cfg, alias="canary")
    assert str(new.version) == str(old.version)
    ev = evaluate_canary(cfg, BATCH_AS_OF + timedelta(seconds=1), log_run=False)
    assert (ev.canary_version, ev.routes["canary"].rows) == (str(new.version), 0), ev
    assert ev.verdict == "wait", ev.reasons
