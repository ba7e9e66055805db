"""Registry webhook receiver: signature, staleness, duplicates over the ASGI app, and an
end-to-end run against a real `mlflow server` firing a real webhook at `churn hooks serve`."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import uuid

import pytest
from fastapi.testclient import TestClient
from wait_support import wait_until

from mlflow_churn.config import ChurnConfig
from mlflow_churn.errors import ChurnError
from mlflow_churn.hooks.app import (
    DELIVERY_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    GateJob,
    create_app,
    sign,
)

SECRET = "s3cret-for-tests"
NOW = 1_790_000_000.0


def _cfg(config: ChurnConfig) -> ChurnConfig:
    cfg = config.model_copy(deep=True)
    cfg.hooks.secret = SECRET
    return cfg


def _delivery(alias: str = "challenger", name: str = "churn-model", version: str = "3",
              delivery_id: str | None = None, ts: float = NOW, secret: str = SECRET) -> tuple[bytes, dict]:
    body = json.dumps({"entity": "model_version_alias", "action": "created",
                       "timestamp": "2026-11-25T00:00:00+00:00",
                       "data": {"name": name, "alias": alias, "version": version}})
    did = delivery_id or str(uuid.uuid4())
    stamp = str(int(ts))
    return body.encode(), {DELIVERY_HEADER: did, TIMESTAMP_HEADER: stamp,
                           SIGNATURE_HEADER: sign(secret, did, stamp, body),
                           "Content-Type": "application/json"}


class _Recorder:
    """The gate as a plain function that records its jobs (the real gate runs in the e2e test)."""

    def __init__(self) -> None:
        self.jobs: list[GateJob] = []

    def __call__(self, job: GateJob) -> str:
        self.jobs.append(job)
        return f"run-{job.version}"


def test_signature_matches_mlflow_sender() -> None:
    from mlflow.webhooks.delivery import _generate_hmac_signature

    assert sign("k", "d1", "123", '{"a": 1}') == _generate_hmac_signature("k", "d1", "123", '{"a": 1}')


def test_missing_bad_signature_and_stale_are_401(config) -> None:
    cfg = _cfg(config)
    gate = _Recorder()
    with TestClient(create_app(cfg, clock=lambda: NOW, gate=gate)) as client:
        body, headers = _delivery()
        no_sig = {k: v for k, v in headers.items() if k != SIGNATURE_HEADER}
        assert client.post("/webhook", content=body, headers=no_sig).status_code == 401
        _, wrong = _delivery(secret="other-secret", delivery_id=headers[DELIVERY_HEADER])
        res = client.post("/webhook", content=body, headers=wrong)
        assert res.status_code == 401 and SIGNATURE_HEADER in res.json()["detail"]
        tampered = body.replace(b'"3"', b'"4"')
        assert client.post("/webhook", content=tampered, headers=headers).status_code == 401
        old_body, old = _delivery(ts=NOW - cfg.hooks.max_age_seconds - 1)
        res = client.post("/webhook", content=old_body, headers=old)
        assert res.status_code == 401 and "stale" in res.json()["detail"]
        future_body, future = _delivery(ts=NOW + cfg.hooks.max_age_seconds + 5)
        assert client.post("/webhook", content=future_body, headers=future).status_code == 401
        ok_body, ok = _delivery(ts=NOW - cfg.hooks.max_age_seconds + 5)
        assert client.post("/webhook", content=ok_body, headers=ok).status_code == 202
        client.app.state.worker.join()
    assert [j.version for j in gate.jobs] == ["3"]


def test_duplicates_ignored_across_restarts_and_other_events_ignored(config) -> None:
    cfg = _cfg(config)
    gate = _Recorder()
    body, headers = _delivery(version="7")
    with TestClient(create_app(cfg, clock=lambda: NOW, gate=gate)) as client:
        first = client.post("/webhook", content=body, headers=headers)
        assert first.status_code == 202 and first.json()["status"] == "queued"
        second = client.post("/webhook", content=body, headers=headers)
        assert second.status_code == 200 and second.json()["status"] == "duplicate"
        client.app.state.worker.join()
        done = client.get(f"/deliveries/{headers[DELIVERY_HEADER]}").json()
        assert done["status"] == "done" and done["run_id"] == "run-7"
        b, h = _delivery(name="another-model")
        res = client.post("/webhook", content=b, headers=h)
        assert res.status_code == 200 and res.json()["status"] == "ignored"
        b, h = _delivery(alias="canary")  # every alias of the model goes to the alias watcher
        res = client.post("/webhook", content=b, headers=h)
        assert res.status_code == 202 and res.json()["status"] == "queued"
        bad = b"not json"
        did, stamp = str(uuid.uuid4()), str(int(NOW))
        res = client.post("/webhook", content=bad, headers={
            DELIVERY_HEADER: did, TIMESTAMP_HEADER: stamp, SIGNATURE_HEADER: sign(SECRET, did, stamp, bad)})
        assert res.status_code == 400 and "detail" in res.json()
        assert client.get("/deliveries/unknown").status_code == 404
    # a restarted receiver (same workspace) still knows the delivery
    with TestClient(create_app(cfg, clock=lambda: NOW, gate=gate)) as client:
        assert client.post("/webhook", content=body, headers=headers).json()["status"] == "duplicate"
        client.app.state.worker.join()
    assert [j.version for j in gate.jobs] == ["7"]


def test_accepted_gate_interrupted_by_a_stop_runs_after_restart(config) -> None:
    cfg = _cfg(config)
    started, release = threading.Event(), threading.Event()

    def slow(job: GateJob) -> str:  # the receiver stops while this gate runs
        started.set()
        release.wait(5)
        raise SystemExit  # the process dies mid-gate: nothing is recorded as done

    body, headers = _delivery(version="5")
    with TestClient(create_app(cfg, clock=lambda: NOW, gate=slow)) as client:
        assert client.post("/webhook", content=body, headers=headers).status_code == 202
        assert started.wait(10)
        assert client.get(f"/deliveries/{headers[DELIVERY_HEADER]}").json()["status"] == "running"
        release.set()
    gate = _Recorder()
    with TestClient(create_app(cfg, clock=lambda: NOW, gate=gate)) as client:
        client.app.state.worker.join()
        done = client.get(f"/deliveries/{headers[DELIVERY_HEADER]}").json()
        # MLflow would not redeliver it (answered 202), so the new receiver resumes it
        assert done["status"] == "done" and done["run_id"] == "run-5"
        assert client.post("/webhook", content=body, headers=headers).json()["status"] == "duplicate"
    assert [j.version for j in gate.jobs] == ["5"]


def test_failed_gate_is_recorded_and_no_secret_refused(config) -> None:
    cfg = _cfg(config)

    def failing(job: GateJob) -> str:
        raise ChurnError(f"model has no version {job.version}")

    with TestClient(create_app(cfg, clock=lambda: NOW, gate=failing)) as client:
        body, headers = _delivery(version="9")
        assert client.post("/webhook", content=body, headers=headers).status_code == 202
        client.app.state.worker.join()
        row = client.get(f"/deliveries/{headers[DELIVERY_HEADER]}").json()
        assert row["status"] == "failed" and "no version 9" in row["detail"]
    with pytest.raises(ChurnError, match="hooks.secret"):
        create_app(config)


# ------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_end_to_end_real_mlflow_server_fires_the_gate(config, register_version, mlflow_server, tmp_path,
                                                       monkeypatch) -> None:
    from hooks_support import Receiver
    from mlflow.tracking import MlflowClient

    from mlflow_churn.registry.aliases import CANARY, alias_version

    server_url = mlflow_server.url
    cfg = config.model_copy(deep=True)
    cfg.training.model_name = f"churn-{uuid.uuid4().hex[:8]}"  # the session's server is shared
    name = cfg.training.model_name
    client = MlflowClient(server_url, server_url)
    hook_name = f"churn-gate-{name}"
    with Receiver(cfg, server_url, tmp_path / "hooks.log") as receiver:
        reg = subprocess.run(
            [sys.executable, "-m", "mlflow_churn.cli", "--workspace", str(cfg.workspace), "hooks",
             "register", "--url", f"{receiver.url}/webhook", "--name", hook_name],
            env=receiver.env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert reg.returncode == 0, reg.stderr[-2000:]
        assert "created" in reg.stdout and "model_version_alias.deleted" in reg.stdout
        try:
            monkeypatch.setenv("MLFLOW_TRACKING_URI", server_url)
            register_version(cfg, "bad", alias="champion")
            chal = register_version(cfg, "good", alias=None)
            client.set_registered_model_alias(name, "challenger", chal.version)

            def ended_gate_run():  # the gate tags the version from inside its run: wait for it to end too
                run_id = client.get_model_version(name, chal.version).tags.get("gate_run_id")
                run = client.get_run(run_id) if run_id else None
                return run if run is not None and run.info.status != "RUNNING" else None

            run = wait_until(ended_gate_run, 120, "the gate's decision run to end", interval=1,
                             detail=lambda: f"receiver log: {receiver.log()}")
            assert run.info.status == "FINISHED" and run.data.tags["gate"] == "passed"
            assert run.data.tags["challenger_version"] == chal.version
            assert alias_version(client, name, CANARY).version == chal.version
            assert "decision.json" in {a.path for a in client.list_artifacts(run.info.run_id)}
        finally:
            for hook in client.list_webhooks():
                if hook.name == hook_name:
                    client.delete_webhook(hook.webhook_id)
