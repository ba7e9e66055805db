"""Reconciliation of the receiver (issue 22, item 1): versions the webhooks missed and gates an
outage stopped are gated later, idempotently, with back-off and one alert when it gives up.

The pass itself on the embedded SQLite registry (which versions it finds, what holds a gate
back, outage vs error, back-off, the alert to a real HTTP sink, `churn hooks reconcile
--once --json` running the real gate); end to end with real processes: a real `mlflow server`
fires a webhook at a receiver that is down, the receiver started later gates the version
itself; a server SIGKILLed in the middle of a gate, then restarted on the same backend and
port, gets the version gated after it returns.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from hooks_support import Receiver, register_webhook
from mlflow.tracking import MlflowClient
from proxy_support import TripwireProxy
from wait_support import wait_until

from mlflow_churn.alerts import stop_sender
from mlflow_churn.alerts.receiver import AlertReceiver
from mlflow_churn.config import ChurnConfig
from mlflow_churn.hooks.deliveries import (
    ERROR,
    OUTAGE,
    RECONCILE,
    WEBHOOK,
    DeliveryLog,
    GateJob,
    run_gate,
    run_job,
)
from mlflow_churn.hooks.reconcile import (
    AFTER_OUTAGE,
    ALERT_NAME,
    AT_CHALLENGER,
    GAVE_UP_METRIC,
    NEWER,
    FollowUp,
    RetryPolicy,
    reconcile_id,
    reconcile_once,
)
from mlflow_churn.registry.aliases import CANARY, CHALLENGER, CHAMPION
from mlflow_churn.registry.promotion import read_evidence
from mlflow_churn.registry.signing import (
    Decision,
    Signer,
    keygen,
    now_iso,
    record_signed,
    sig_tag,
    signer_for,
    verifier_for,
    version_identity,
)
from mlflow_churn.tracking import sqlite_store_ready
from mlflow_churn.tracking_server import free_port
from mlflow_churn.web.metrics import Metrics

T0 = 1_790_000_000.0


class Clock:
    """The time the receiver's code is told (Unix seconds), moved by the test."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _registry(cfg: ChurnConfig) -> MlflowClient:
    uri = cfg.mlflow_tracking_uri
    sqlite_store_ready(uri)
    return MlflowClient(uri, uri)


def _model(cfg: ChurnConfig, tmp_path: Path, n: int) -> tuple[MlflowClient, list]:
    """Model ``training.model_name`` with ``n`` versions (files of no model: the pass reads tags
    and aliases only)."""
    client = _registry(cfg)
    src = tmp_path / "model-files"
    src.mkdir(exist_ok=True)
    client.create_registered_model(cfg.training.model_name)
    return client, [client.create_model_version(cfg.training.model_name, str(src)) for _ in range(n)]


def _sign_gate(client: MlflowClient, cfg: ChurnConfig, version: str) -> None:
    """A real signed gate decision (the project's key) for ``version``'s identity."""
    record_signed(client, cfg, cfg.training.model_name, version, "gate", "passed", champion=None,
                  run_id="gate-run", files_sha256="0" * 64)


def test_pass_gates_missed_versions_once_and_leaves_decided_busy_and_superseded_ones(
        config: ChurnConfig, tmp_path: Path) -> None:
    cfg = config
    name = cfg.training.model_name
    client, mvs = _model(cfg, tmp_path, 7)
    v = [str(mv.version) for mv in mvs]  # "1".."7"
    client.set_registered_model_alias(name, CHAMPION, v[1])  # v1 is older than the champion: left
    _sign_gate(client, cfg, v[2])  # v3: decided
    # v4 at challenger with a decision signed by another key (forged): no decision
    other = tmp_path / "other-key"
    keygen(other / "signing.key", other / "verify.pub")
    mv4 = client.get_model_version(name, v[3])
    forged = Decision("gate", name, v[3], version_identity(mv4), "passed", "", "r", "0" * 64, "0" * 64,
                      now_iso(), "mallory")
    client.set_model_version_tag(name, v[3], sig_tag("gate"), Signer.load(other / "signing.key").sign(forged))
    client.set_registered_model_alias(name, CHALLENGER, v[3])
    # v5: the project's signature, but for another identity (as a version re-created with the
    # same number after a delete would carry)
    stale = Decision("gate", name, v[4], "f" * 32, "passed", "", "r", "0" * 64, "0" * 64, now_iso(), "gate")
    client.set_model_version_tag(name, v[4], sig_tag("gate"), signer_for(cfg).sign(stale))
    # v6: a webhook delivery has its gate queued already; v7: nothing at all
    log = DeliveryLog(cfg.workspace / "hooks.db", Clock())
    assert log.claim("mlflow-delivery-6", "model_version_alias.created", T0)
    log.update("mlflow-delivery-6", "queued")
    log.set_job(GateJob("mlflow-delivery-6", name, v[5]))

    gated: list[GateJob] = []

    def gate(job: GateJob) -> str:  # records the job; the real gate runs in the tests below
        gated.append(job)
        return f"run-{job.version}"

    report = reconcile_once(cfg, now=T0, clock=Clock(), gate=gate, log=log)
    assert report.error is None and report.champion == v[1] and report.challenger == v[3]
    assert [j.version for j in gated] == [v[3], v[4], v[6]]
    assert all(j.source == RECONCILE for j in gated)
    items = {i.version: i for i in report.items}
    assert items[v[3]].reasons == [AT_CHALLENGER, NEWER] and items[v[6]].reasons == [NEWER]
    assert items[v[5]].action == "skipped" and "mlflow-delivery-6" in items[v[5]].detail
    assert items[v[4]].reasons == [NEWER]
    assert set(items) == {v[3], v[4], v[5], v[6]}  # v1 (superseded) and v3 (decided): not found
    row = log.get(reconcile_id(name, v[3], version_identity(mv4)))
    assert row["source"] == RECONCILE and row["status"] == "done" and row["attempts"] == 1
    assert row["run_id"] == f"run-{v[3]}" and row["identity"] == version_identity(mv4)
    assert items[v[3]].delivery_id == row["delivery_id"] and items[v[3]].status == "done"

    # a second pass: the same rows, nothing gated again (the webhook's gate is still queued)
    again = reconcile_once(cfg, now=T0 + 60, clock=Clock(T0 + 60), gate=gate, log=log)
    assert len(gated) == 3 and not again.queued
    assert "already" in {i.version: i for i in again.items}[v[3]].detail
    assert len(log.find(name, source=RECONCILE)) == 3

    # a canary newer than the open versions supersedes them: only the challenger is still found
    client.set_registered_model_alias(name, CANARY, v[6])
    third = reconcile_once(cfg, now=T0 + 120, clock=Clock(T0 + 120), gate=gate, log=log)
    assert {i.version for i in third.items} == {v[3]}


def test_outage_is_retried_with_back_off_then_one_alert_error_is_not(config: ChurnConfig,
                                                                      tmp_path: Path) -> None:
    """The real gate against a tracking server that does not answer (a closed port) fails for an
    outage: retried after the back-off, given up after max_gate_attempts with ONE alert through
    the alert outbox to a real HTTP sink; a gate failing on bad input (no data in the
    workspace) is an error: not retried. A new delivery failing too starts the count again;
    --once (force) runs both; the version gated at last resolves the alert."""
    cfg = config.model_copy(deep=True)
    name = cfg.training.model_name
    client, (mv1, mv2) = _model(cfg, tmp_path, 2)
    v1, v2 = str(mv1.version), str(mv2.version)
    client.set_registered_model_alias(name, CHALLENGER, v1)
    dead = cfg.model_copy(deep=True)
    dead.tracking_uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there

    def as_of(_cfg: ChurnConfig) -> datetime:
        return datetime(2026, 4, 1, tzinfo=UTC)

    server_back = False

    def gate(job: GateJob) -> str:  # v1: the tracking server is down; v2: the workspace has no data
        if job.version == v1:
            return "gate-run-v1" if server_back else run_gate(dead, job, as_of)
        return run_gate(cfg, job)

    clock, metrics = Clock(), Metrics()
    with AlertReceiver() as sink:
        cfg.alerts.webhook_url = sink.url  # Alertmanager's webhook payload: one firing, one resolved
        cfg.hooks.max_gate_attempts, cfg.hooks.reconcile_backoff_seconds = 3, 10
        log = DeliveryLog(cfg.workspace / "hooks.db", clock)

        def run(now: float, force: bool = False):
            clock.now = now
            return reconcile_once(cfg, now=now, clock=clock, gate=gate, log=log, metrics=metrics, force=force)

        rid1 = reconcile_id(name, v1, version_identity(mv1))
        rid2 = reconcile_id(name, v2, version_identity(mv2))
        run(T0)
        row1, row2 = log.get(rid1), log.get(rid2)
        assert (row1["status"], row1["failure_kind"], row1["attempts"]) == ("failed", OUTAGE, 1)
        assert "tracking server" in row1["detail"] and row1["next_attempt_at"] == T0 + 10
        assert (row2["status"], row2["failure_kind"], row2["next_attempt_at"]) == ("failed", ERROR, None)

        early = run(T0 + 5)  # inside the back-off: nothing runs
        assert not early.queued and log.get(rid1)["attempts"] == 1
        assert "back-off" in {i.version: i for i in early.items}[v1].detail
        run(T0 + 10)  # attempt 2, then 20 s of back-off
        assert log.get(rid1)["attempts"] == 2 and log.get(rid1)["next_attempt_at"] == T0 + 30
        assert not sink.messages
        run(T0 + 30)  # attempt 3 = max_gate_attempts: given up, one alert
        assert sink.received.wait(30)
        for later in (T0 + 1_000, T0 + 100_000):  # no more attempts, no more alerts
            report = run(later)
            assert not report.queued
            assert "given up" in {i.version: i for i in report.items}[v1].detail
        row1 = log.get(rid1)
        assert (row1["status"], row1["attempts"], row1["next_attempt_at"]) == ("failed", 3, None)
        assert log.get(rid2)["attempts"] == 1  # the error was never retried
        (message,) = sink.messages
        (alert,) = message["alerts"]
        assert message["status"] == "firing"
        assert alert["labels"] == {"alertname": ALERT_NAME, "severity": "critical", "model": name,
                                   "version": v1}
        assert alert["annotations"]["delivery_id"] == rid1 and alert["annotations"]["attempts"] == "3"
        assert metrics.counter(GAVE_UP_METRIC) == 1.0

        # a new delivery of v1 fails for an outage too: the reconcile gate counts from 0 again
        log.claim("mlflow-delivery-1", "model_version_alias.created", T0 + 100_001)
        webhook = GateJob("mlflow-delivery-1", name, v1)
        log.update(webhook.delivery_id, "queued")
        log.set_job(webhook)
        clock.now = T0 + 100_001
        run_job(webhook, gate, log, FollowUp(cfg, log, clock, metrics))
        assert log.get("mlflow-delivery-1")["failure_kind"] == OUTAGE  # no back-off of its own
        report = run(T0 + 100_002)
        assert [i.reasons for i in report.queued] == [[AT_CHALLENGER, NEWER, AFTER_OUTAGE]]
        assert log.get(rid1)["attempts"] == 1

        # `churn hooks reconcile --once` (force): back-off and errors hold nothing back
        forced = run(T0 + 100_003, force=True)
        assert {i.version for i in forced.queued} == {v1, v2}
        assert log.get(rid1)["attempts"] == 2 and log.get(rid2)["attempts"] == 2
        assert len(sink.messages) == 1

        # the server is back: the next attempt gates v1 and the alert resolves
        server_back = True
        run(T0 + 100_100)
        assert log.get(rid1)["status"] == "done"
        _wait("the resolved alert", lambda: len(sink.messages) == 2, 60)
        assert sink.messages[1]["status"] == "resolved"
        assert sink.messages[1]["alerts"][0]["labels"]["version"] == v1
    stop_sender(cfg, wait=10)


def test_retry_policy_doubles_up_to_the_cap(config: ChurnConfig) -> None:
    cfg = config.model_copy(deep=True)
    cfg.hooks.reconcile_backoff_seconds, cfg.hooks.reconcile_backoff_max_seconds = 60, 300
    policy = RetryPolicy.of(cfg)
    assert [policy.delay(n) for n in (1, 2, 3, 4, 5, 500)] == [60, 120, 240, 300, 300, 300]


def test_delivery_log_of_an_older_receiver_is_migrated(config: ChurnConfig) -> None:
    path = config.workspace / "hooks.db"
    with sqlite3.connect(path) as con:  # the log as the previous receiver left it
        con.execute("""CREATE TABLE deliveries (
            delivery_id TEXT PRIMARY KEY, received_at REAL NOT NULL, event TEXT NOT NULL,
            status TEXT NOT NULL, detail TEXT NOT NULL DEFAULT '', run_id TEXT, model TEXT, version TEXT)""")
        con.execute("INSERT INTO deliveries VALUES ('d1', 1.0, 'model_version_alias.created', 'failed', "
                    "'boom', NULL, 'churn-model', '3')")
    log = DeliveryLog(path)
    (row,) = log.find("churn-model", "3")
    assert row["source"] == WEBHOOK and row["attempts"] == 0 and row["failure_kind"] is None
    assert log.claim("d2", "reconcile", 2.0, source=RECONCILE, model="churn-model", version="3")
    assert [r["delivery_id"] for r in log.find("churn-model", source=RECONCILE)] == ["d2"]


@pytest.mark.slow  # among the slowest of make test-fast (the real gate)
def test_cli_reconcile_once_json_runs_the_real_gate(config: ChurnConfig, register_version, churn_main,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config
    name = cfg.training.model_name
    version = str(register_version(cfg, "good", alias=CHALLENGER).version)  # no champion: the floors
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the workspace store, as the CLI finds it
    res = churn_main(["--workspace", str(cfg.workspace), "hooks", "reconcile", "--once", "--json"])
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout)
    (item,) = report["items"]
    assert item["version"] == version and item["reasons"] == [AT_CHALLENGER, NEWER]
    assert item["action"] == "queued" and item["status"] == "done" and item["run_id"]
    client = _registry(cfg)
    gate = read_evidence(client, name, version, verifier_for(cfg)).get("gate")
    assert gate is not None and gate.run_id == item["run_id"] and gate.identity == item["identity"]
    # the version is decided now: the next pass finds nothing
    res = churn_main(["--workspace", str(cfg.workspace), "hooks", "reconcile", "--once", "--json"])
    assert res.returncode == 0 and json.loads(res.stdout)["items"] == []
    # a setting that can never work, and a tracking server that does not answer: one line, exit 2
    monkeypatch.setenv("CHURN_HOOKS__RECONCILE_SECONDS", "0")
    res = churn_main(["--workspace", str(cfg.workspace), "hooks", "reconcile"])
    assert res.returncode == 2 and res.stderr.startswith("error: ")
    assert "hooks.reconcile_seconds" in res.stderr
    monkeypatch.delenv("CHURN_HOOKS__RECONCILE_SECONDS")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    res = churn_main(["--workspace", str(cfg.workspace), "hooks", "reconcile", "--once"])
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
    assert res.stderr.startswith("error: the registry of") and "tracking server" in res.stderr


# ------------------------------------------------------------------------- real processes
def _wait(what: str, check, deadline_s: float, log=lambda: "") -> object:
    """Poll ``check()`` until it returns something truthy; fail naming ``what`` after the deadline."""
    return wait_until(check, deadline_s, what, interval=0.5, detail=lambda: f"receiver log: {log()}")


def _rows(receiver: Receiver, name: str, version: str) -> list[dict]:
    try:
        res = httpx.get(f"{receiver.url}/deliveries", params={"model": name, "version": version}, timeout=10)
    except httpx.HTTPError:
        return []
    return res.json()["deliveries"] if res.status_code == 200 else []


def _reconciled(receiver: Receiver, name: str, version: str) -> dict | None:
    rows = _rows(receiver, name, version)
    return next((r for r in rows if r["source"] == RECONCILE and r["status"] == "done"), None)


def _assert_gated(client: MlflowClient, cfg: ChurnConfig, version: str, row: dict) -> None:
    """The version carries a gate decision signed for its identity, made by the row's run."""
    name = cfg.training.model_name
    evidence = read_evidence(client, name, version, verifier_for(cfg))
    gate = evidence.get("gate")
    assert gate is not None, evidence.problems
    assert gate.identity == version_identity(client.get_model_version(name, version)) == row["identity"]
    assert gate.run_id == row["run_id"] and client.get_run(row["run_id"]).info.status == "FINISHED"


@pytest.mark.slow
def test_receiver_down_when_the_webhook_fires_gates_the_version_once_up(
        config: ChurnConfig, register_version, mlflow_server, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    url = mlflow_server.url
    cfg = config.model_copy(deep=True)
    cfg.training.model_name = f"churn-rec-{uuid.uuid4().hex[:8]}"  # the session's server is shared
    name = cfg.training.model_name
    client = MlflowClient(url, url)
    receiver = Receiver(cfg, url, tmp_path / "hooks.log", CHURN_HOOKS__RECONCILE_SECONDS="5")
    hook_url = f"{receiver.url}/webhook"
    hook_id = register_webhook(client, hook_url, events=("model_version_alias.created",))
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        register_version(cfg, "bad", alias=CHAMPION)
        version = str(register_version(cfg, "good", alias=None).version)
        client.set_registered_model_alias(name, CHALLENGER, version)
        # MLflow gives up on both deliveries (champion, challenger): nobody listens at the receiver's port
        failed = f"Failed to send webhook to {hook_url}"
        _wait("MLflow giving up on the deliveries",
              lambda: mlflow_server.log_path.read_text(errors="replace").count(failed) >= 2, 180,
              lambda: mlflow_server.log_tail())
        assert not client.get_model_version(name, version).tags.get(sig_tag("gate"))
        with receiver:  # up again: the pass at start finds the challenger without a decision
            row = _wait("the reconcile gate", lambda: _reconciled(receiver, name, version), 240,
                        receiver.log)
            assert row["delivery_id"] == reconcile_id(name, version, row["identity"])
            assert row["attempts"] == 1 and row["event"] == "reconcile"
            # no delivery ever came
            assert [r["source"] for r in _rows(receiver, name, version)] == [RECONCILE]
            _assert_gated(client, cfg, version, row)
            assert client.get_model_version_by_alias(name, CANARY).version == version
            metrics = receiver.metrics()
            assert "churn_hooks_reconcile_gates_total 1.0" in metrics
            assert f"{GAVE_UP_METRIC} 0.0" in metrics
    finally:
        client.delete_webhook(hook_id)


@pytest.mark.slow
def test_server_killed_mid_gate_then_restarted_gets_the_version_gated(
        config: ChurnConfig, register_version, postgres_url: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow_churn.tracking_server import start_tracking_server, stop_process

    backend = postgres_url.replace("postgresql://", "postgresql+psycopg://", 1)
    artifacts = tmp_path / "mlartifacts"
    servers = [start_tracking_server(backend, artifacts, log_path=tmp_path / "server1.log", cwd=tmp_path)]
    url, port = servers[0].url, servers[0].port
    cfg = config
    name = cfg.training.model_name

    def kill() -> None:  # as a crash would: SIGKILL, no clean-up
        os.killpg(servers[-1].process.pid, signal.SIGKILL)
        servers[-1].process.wait(30)

    def decision_metrics(method: str, path: str, body: bytes) -> bool:
        # the gate's first write into its decision run (run created, nothing logged yet): mid-gate
        return method == "POST" and path.endswith("/runs/log-batch") and b"gate_passed" in body

    proxy = TripwireProxy(url, decision_metrics, kill)  # the receiver reaches the server through it
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        register_version(cfg, "bad", alias=CHAMPION)
        # no webhook: the pass finds it
        version = str(register_version(cfg, "good", alias=CHALLENGER).version)
        receiver = Receiver(cfg, proxy.url, tmp_path / "hooks.log", CHURN_HOOKS__RECONCILE_SECONDS="3",
                            CHURN_HOOKS__RECONCILE_BACKOFF_SECONDS="1",
                            CHURN_HOOKS__RECONCILE_BACKOFF_MAX_SECONDS="5",
                            CHURN_HOOKS__MAX_GATE_ATTEMPTS="1000", CHURN_MLFLOW__HTTP_MAX_RETRIES="1")
        with receiver:
            assert proxy.tripped.wait(240), f"the gate never reached its decision run: {receiver.log()}"
            assert not servers[-1].alive()

            def failed_for_outage() -> dict | None:
                return next((r for r in _rows(receiver, name, version) if r["source"] == RECONCILE
                             and r["status"] == "failed" and r["failure_kind"] == OUTAGE), None)

            row = _wait("the gate failed for the outage", failed_for_outage, 120, receiver.log)
            assert "tracking server" in row["detail"]
            servers.append(start_tracking_server(backend, artifacts, port=port,  # same backend and port
                                                 log_path=tmp_path / "server2.log", cwd=tmp_path))
            row = _wait("the gate after the server returned",
                        lambda: _reconciled(receiver, name, version), 240, receiver.log)
            assert row["attempts"] >= 2
            assert row["delivery_id"] == reconcile_id(name, version, row["identity"])
            client = MlflowClient(url, url)
            _assert_gated(client, cfg, version, row)
            assert client.get_model_version_by_alias(name, CANARY).version == version
            # the gate cut by the kill left its decision run, marked FAILED on replay; one FINISHED
            exps = [e.experiment_id for e in client.search_experiments()]
            runs = client.search_runs(exps, f"tags.challenger_version = '{version}'")
            assert sorted(r.info.status for r in runs) == ["FAILED", "FINISHED"], [r.info for r in runs]
    finally:
        proxy.close()
        for server in servers:
            stop_process(server.process, 5)
