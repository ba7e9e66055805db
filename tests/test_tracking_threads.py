"""No process-wide mutable state after start-up (tracking.py): the fail-fast record is per
thread, the clean-up client asks once without touching os.environ, and the webhook receiver's
two threads - the gate worker and the alias watcher - write each run's params and tags into
their own run when they run at the same time against a real `mlflow server`."""

from __future__ import annotations

import os
import threading
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from proxy_support import FlakyProxy

from mlflow_churn.config import ChurnConfig, load_config
from mlflow_churn.registry.aliases import CANARY, CHALLENGER, CHAMPION, aliases_of
from mlflow_churn.tracking import current_failure, fail_fast, one_attempt, server_failure

AS_OF = datetime(2026, 5, 1, tzinfo=UTC)


def _mlflow_environ() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}


def test_each_thread_has_its_own_fail_fast_record(config: ChurnConfig) -> None:
    inside, go_on = threading.Barrier(3), threading.Event()  # the two threads and this one
    seen: dict[str, Any] = {}

    def block(name: str) -> None:
        with fail_fast(config, name) as failure:
            inside.wait(30)  # both blocks are open now
            seen[name] = (failure, current_failure())
            go_on.wait(30)
        seen[f"{name}-after"] = current_failure()

    threads = [threading.Thread(target=block, args=(n,)) for n in ("gate", "watcher")]
    for t in threads:
        t.start()
    inside.wait(30)
    assert current_failure() is None  # the main thread is in no block
    go_on.set()
    for t in threads:
        t.join(30)
    assert seen["gate"][0] is seen["gate"][1] and seen["watcher"][0] is seen["watcher"][1]
    assert seen["gate"][0] is not seen["watcher"][0]
    assert seen["gate-after"] is None and seen["watcher-after"] is None


def test_one_attempt_client_asks_once_and_leaves_the_environment(mlflow_server) -> None:
    proxy = FlakyProxy(mlflow_server.url)
    try:
        client = MlflowClient(proxy.url, proxy.url)
        exp = client.create_experiment(f"once-{uuid.uuid4().hex[:8]}")
        run_id = client.create_run(exp).info.run_id
        before = _mlflow_environ()
        once = one_attempt(client, timeout_s=5)
        proxy.fail("runs/update")
        with pytest.raises(MlflowException) as err:
            once.set_terminated(run_id, "FAILED")
        assert proxy.seen == 1  # a 503 is not retried
        assert server_failure(err.value) is not None
        assert _mlflow_environ() == before
        proxy.fail(None)
        once.set_terminated(run_id, "FAILED")
        assert client.get_run(run_id).info.status == "FAILED"
        name = f"once-{uuid.uuid4().hex[:8]}"
        once.create_registered_model(name)  # the registry store asks once too
        assert client.get_registered_model(name).name == name
        assert _mlflow_environ() == before
    finally:
        proxy.close()


def _cfg(workspace: Path, url: str) -> ChurnConfig:
    name = f"churn-{uuid.uuid4().hex[:8]}"
    return load_config(workspace=workspace, environ={},
                       overrides={"tracking_uri": url, "training.model_name": name})


@pytest.mark.slow
def test_gate_worker_and_alias_watcher_write_their_own_runs(mlflow_server, workspace: Path,
                                                            register_version) -> None:
    from mlflow_churn.evaluation.evaluate import evaluate
    from mlflow_churn.serving.transitions import adopt_promotion

    url = mlflow_server.url
    client = MlflowClient(url, url)
    gated, adopted = _cfg(workspace, url), _cfg(workspace, url)
    register_version(gated, "bad", alias=CHAMPION)
    chal = register_version(gated, "good", alias=CHALLENGER)
    old = register_version(adopted, "bad", alias=CHAMPION)
    new = register_version(adopted, "good", alias=CANARY)
    client.set_registered_model_alias(adopted.training.model_name, CHAMPION, new.version)  # by hand
    before = _mlflow_environ()

    start = threading.Barrier(2)
    out: dict[str, Any] = {}

    def worker(name: str, call: Any) -> None:
        start.wait(60)
        try:
            out[name] = call()
        except BaseException as exc:  # reported by the assertion below
            out[name] = exc

    threads = [
        threading.Thread(target=worker, args=("gate", lambda: evaluate(gated, AS_OF))),
        threading.Thread(target=worker, args=("adopt", lambda: adopt_promotion(
            adopted, str(new.version), str(old.version), "tester", "moved in the UI"))),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not isinstance(out["gate"], BaseException), out["gate"]
    assert not isinstance(out["adopt"], BaseException), out["adopt"]
    decision, result = out["gate"], out["adopt"]

    gate_run = client.get_run(decision.run_id)
    assert gate_run.info.status == "FINISHED"
    assert gate_run.data.tags["gate"] == "passed"
    assert gate_run.data.tags["challenger_version"] == str(chal.version)
    assert not {"promoted_by", "decision", "model_name"} & gate_run.data.tags.keys()
    assert "reason" not in gate_run.data.params

    adopt_run = client.get_run(result.run_id)
    assert adopt_run.info.status == "FINISHED" and not result.noop
    assert adopt_run.data.tags["promoted_by"] == "tester"
    assert adopt_run.data.tags["decision"] == "promoted"
    assert adopt_run.data.tags["model_name"] == adopted.training.model_name
    assert adopt_run.data.params["version"] == str(new.version)
    assert "gate" not in adopt_run.data.tags and "challenger_version" not in adopt_run.data.tags
    assert "decision.json" in {a.path for a in client.list_artifacts(result.run_id)}
    assert client.get_experiment(adopt_run.info.experiment_id).name == adopted.training.experiment

    assert aliases_of(client, gated.training.model_name)[CANARY] == str(chal.version)
    assert CANARY not in aliases_of(client, adopted.training.model_name)
    assert _mlflow_environ() == before  # neither thread changed the process's MLflow variables
