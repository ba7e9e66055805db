"""Registry writes against a real `mlflow server`.

Against the session's server on PostgreSQL (fixture ``mlflow_server``): `churn train` and
`mlflow run . -e train` register a version with alias challenger (the server needs the
LoggedModel's ``model_id``), the gate moves `canary`, `churn canary promote` / `rollback`
move aliases, `churn compress` registers. Against a private server that is killed (SIGKILL)
once tuning is done: `churn train` fails within 60 s with one line naming the server, and
after a restart on the same backend and port the next command leaves no version behind and
no run RUNNING. Every model name is unique (the registry is shared by the session).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from proxy_support import FlakyProxy
from wait_support import wait_until

from mlflow_churn.config import ChurnConfig, load_config
from mlflow_churn.errors import ChurnError
from mlflow_churn.registry.aliases import CANARY, CHALLENGER, CHAMPION, PREVIOUS_CHAMPION, aliases_of
from mlflow_churn.registry.versions import model_id_of, register_model_version
from mlflow_churn.tracking import (
    HTTP_ENV,
    PENDING_FILE,
    export_http_limits,
    fail_fast,
    server_failure,
    setup_mlflow,
)

ROOT = Path(__file__).resolve().parents[1]
AS_OF = "2026-05-01"
#: small training settings (as tests/test_training_train.py), as CHURN_* variables for subprocesses
FAST_ENV = {"CHURN_TRAINING__WINDOW_DAYS": "21", "CHURN_TRAINING__MAX_ESTIMATORS": "40",
            "CHURN_TRAINING__EARLY_STOPPING_ROUNDS": "10", "CHURN_TRAINING__NTHREAD": "1"}
CHURN = [sys.executable, "-m", "mlflow_churn.cli"]


def _name() -> str:
    return f"churn-{uuid.uuid4().hex[:8]}"


def _workspace(workspace: Path, small_data: Path) -> Path:
    data = workspace / "data"
    if not data.exists():
        data.symlink_to(small_data, target_is_directory=True)
    return workspace


def _env(url: str, model: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHURN_", "MLFLOW_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(FAST_ENV)
    env.update({"MLFLOW_TRACKING_URI": url, "CHURN_TRAINING__MODEL_NAME": model,
                "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"})
    env.update(extra)
    return env


def _cfg(workspace: Path, url: str, model: str) -> ChurnConfig:
    return load_config(workspace=workspace, environ={},
                       overrides={"tracking_uri": url, "training.model_name": model})


def _churn(ws: Path, env: dict[str, str], *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*CHURN, "--workspace", str(ws), *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=ws)


# ----------------------------------------------------------------------------- fast pieces
_LIMITS_TWICE = """
import json, os
from mlflow_churn.config import load_config
from mlflow_churn.tracking import export_http_limits
cfg = load_config(environ={}, overrides={"mlflow.http_max_retries": 1, "mlflow.http_timeout_seconds": 7})
first = export_http_limits(cfg)
cfg.mlflow.http_max_retries = 2
second = export_http_limits(cfg)
print(json.dumps([first, second, {var: os.environ.get(var) for var in first}]))
"""


def test_http_limits_are_set_once_from_config_unless_the_user_set_them(tmp_path: Path) -> None:
    """A real process: the first call exports the config's limits (a variable the user set
    wins); a later call with another config changes nothing (no process-wide change once
    threads may run)."""
    env = {k: v for k, v in os.environ.items() if k not in HTTP_ENV and not k.startswith("CHURN_")}
    env["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = "0"
    out = subprocess.run([sys.executable, "-c", _LIMITS_TWICE], env=env, capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    first, second, environ = json.loads(out.stdout)
    assert first == {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "7",
                     "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0"}
    assert second == first and environ == first


def test_bad_http_limit_names_the_key(workspace: Path) -> None:
    with pytest.raises(ChurnError, match="mlflow.http_timeout_seconds"):
        load_config(workspace=workspace, environ={"CHURN_MLFLOW__HTTP_TIMEOUT_SECONDS": "0"})


def test_a_refusing_server_is_one_line_in_seconds(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that stops answering mid-way (here: a port nobody listens on, after setup):
    the block's MLflow call fails after the bounded retries, as one ChurnError naming it."""
    from mlflow_churn.tracking_server import free_port

    url = f"http://127.0.0.1:{free_port()}"
    cfg = load_config(workspace=workspace, environ={}, overrides={"tracking_uri": url})
    export_http_limits(cfg)
    t0 = time.monotonic()
    with pytest.raises(ChurnError) as err, fail_fast(cfg, "testing"):
        MlflowClient(url, url).get_registered_model("x")
    assert time.monotonic() - t0 < 30
    msg = str(err.value)
    assert msg.startswith(f"the MLflow tracking server at {url} failed while testing (")
    assert "connection refused" in msg and "\n" not in msg
    assert server_failure(ValueError("bad input")) is None


# ----------------------------------------------------------------------------- against the server
@pytest.mark.slow
def test_churn_train_registers_on_the_server(mlflow_server, workspace: Path, small_data: Path) -> None:
    ws, name = _workspace(workspace, small_data), _name()
    res = _churn(ws, _env(mlflow_server.url, name), "train", "--as-of", AS_OF, "--n-trials", "2",
                 "--no-progress")
    assert res.returncode == 0, res.stderr[-3000:]
    client = MlflowClient(mlflow_server.url)
    mv = client.get_model_version_by_alias(name, CHALLENGER)
    assert mv.version == "1" and mv.source.startswith(("mlflow-artifacts:", "models:/"))
    assert mv.tags["source"] == "simulator" and mv.tags["feature_set"] == "churn_default"
    assert mv.description.startswith("Trained on churn_default")
    run = client.get_run(mv.tags["train_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["registered_version"] == "1"
    logged = [m for m in client.search_logged_models([run.info.experiment_id])
              if m.source_run_id == run.info.run_id]
    links = [json.loads(m.tags["mlflow.modelVersions"]) for m in logged]
    assert len(links) == 1 and [(x["name"], str(x["version"])) for x in links[0]] == [(name, "1")]
    # the registered model loads through the server (proxied artifacts)
    mlflow.set_tracking_uri(mlflow_server.url)
    mlflow.set_registry_uri(mlflow_server.url)
    model = mlflow.pyfunc.load_model(f"models:/{name}@{CHALLENGER}")
    assert model.metadata.signature is not None


@pytest.mark.slow
def test_mlflow_run_train_registers_on_the_server(mlflow_server, workspace: Path, small_data: Path,
                                                  tmp_path: Path) -> None:
    ws, name = _workspace(workspace, small_data), _name()
    res = subprocess.run(
        [sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", "train", "--env-manager", "local",
         "--experiment-name", f"{name}-project", "-P", f"workspace={ws}", "-P", f"as_of={AS_OF}",
         "-P", "n_trials=2"],
        cwd=tmp_path, env=_env(mlflow_server.url, name), capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    client = MlflowClient(mlflow_server.url)
    mv = client.get_model_version_by_alias(name, CHALLENGER)
    project_run = client.get_run(mv.tags["train_run_id"])
    assert project_run.info.status == "FINISHED"
    assert client.get_experiment(project_run.info.experiment_id).name == f"{name}-project"


@pytest.mark.slow
def test_gate_canary_promote_rollback_compress_on_the_server(mlflow_server, workspace: Path,
                                                              register_version) -> None:
    from mlflow_churn.evaluation.evaluate import evaluate
    from mlflow_churn.registry.aliases import move_alias

    name = _name()
    cfg = _cfg(workspace, mlflow_server.url, name)
    champ = register_version(cfg, "bad", alias=CHAMPION)
    chal = register_version(cfg, "good", alias=CHALLENGER)
    decision = evaluate(cfg, datetime(2026, 5, 1, tzinfo=UTC))
    client = MlflowClient(mlflow_server.url)
    assert decision.passed and aliases_of(client, name)[CANARY] == chal.version
    assert client.get_model_version(name, chal.version).tags["gate"] == "passed"
    assert client.get_run(decision.run_id).info.status == "FINISHED"

    env = _env(mlflow_server.url, name)
    # no canary traffic in this test: an explicit, recorded override
    res = _churn(workspace, env, "canary", "promote", "--reason", "server test", "--force", "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    aliases = aliases_of(client, name)
    assert aliases[CHAMPION] == chal.version and aliases[PREVIOUS_CHAMPION] == champ.version
    assert CANARY not in aliases
    assert client.get_model_version(name, chal.version).tags["promote_reason"] == "server test"

    res = _churn(workspace, env, "compress", "--version", chal.version, "--as-of", AS_OF)
    assert res.returncode == 0, res.stderr[-3000:]
    small = client.search_model_versions(f"name = '{name}' and tag.parent_version = '{chal.version}'")
    assert len(small) == 1 and small[0].tags["compressed"] == "true"

    move_alias(client, name, CANARY, small[0].version)
    res = _churn(workspace, env, "canary", "rollback", "--reason", "server test rollback")
    assert res.returncode == 0, res.stderr[-3000:]
    assert CANARY not in aliases_of(client, name)
    assert client.get_model_version(name, small[0].version).tags["rolled_back"] == "true"


@pytest.mark.slow
def test_registration_helper_undoes_a_failed_alias_move(mlflow_server, workspace: Path,
                                                        small_data: Path) -> None:
    """The version exists complete or not at all: an alias move the server refuses deletes it."""
    import xgboost as xgb

    from mlflow_churn.features.offline import build_training_frame
    from mlflow_churn.features.registry import registry_for
    from mlflow_churn.training.model import log_churn_model

    name = _name()
    cfg = _cfg(_workspace(workspace, small_data), mlflow_server.url, name)
    setup_mlflow(cfg)
    fs = registry_for(cfg).feature_set(cfg.features.feature_set)
    frame = build_training_frame(cfg.data_dir, fs, [datetime(2026, 3, 10, tzinfo=UTC)], 30).head(300)
    booster = xgb.train({"objective": "binary:logistic", "nthread": 1}, xgb.DMatrix(
        fs.coerce(frame), label=frame["label"].to_numpy(), enable_categorical=True), 2)
    client = MlflowClient(mlflow_server.url)
    with mlflow.start_run() as run:
        info = log_churn_model(booster, fs, frame)
    assert model_id_of(info) and model_id_of(info.model_uri) == info.model_id
    mv = register_model_version(client, name, info, run_id=run.info.run_id, tags={"a": "1"}, alias=CHALLENGER)
    assert mv.tags["a"] == "1" and mv.aliases == [CHALLENGER]
    with pytest.raises(Exception, match="(?i)alias"):  # the server refuses an alias shaped like a version
        register_model_version(client, name, info, run_id=run.info.run_id, alias="v9")
    versions = client.search_model_versions(f"name = '{name}'")
    assert [v.version for v in versions] == [mv.version]  # the refused one was deleted again
    assert aliases_of(client, name) == {CHALLENGER: mv.version}


# ----------------------------------------------------------------------------- a server that dies
def _runs(client: MlflowClient) -> list:
    exps = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(exps, max_results=500) if exps else []


@pytest.mark.slow
def test_server_killed_after_tuning_fails_fast_and_leaves_nothing(workspace: Path, small_data: Path,
                                                                   tmp_path: Path) -> None:
    from mlflow_churn.tracking_server import start_tracking_server, stop_process

    ws, name = _workspace(workspace, small_data), _name()
    backend = f"sqlite:///{tmp_path / 'server.db'}"
    server = start_tracking_server(backend, tmp_path / "artifacts", log_path=tmp_path / "server.log",
                                   cwd=tmp_path)
    url, port = server.url, server.port
    client = MlflowClient(url)
    n_trials = 3
    proc = subprocess.Popen([*CHURN, "--workspace", str(ws), "train", "--as-of", AS_OF, "--n-trials",
                             str(n_trials), "--no-progress"], env=_env(url, name), cwd=ws,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def tuned() -> bool:  # tuning done: registration is next
            return len([r for r in _runs(client) if "mlflow.parentRunId" in r.data.tags
                        and r.info.status == "FINISHED"]) >= n_trials

        wait_until(lambda: proc.poll() is not None or tuned(), 300, "the tuning to finish", interval=0.2)
        os.killpg(server.process.pid, signal.SIGKILL)
        killed = time.monotonic()
        out, err = proc.communicate(timeout=120)
        took = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            proc.kill()
        stop_process(server.process, 5)
    assert proc.returncode == 3, err[-3000:]  # an outage (bad input would be 2)
    assert took < 60, f"took {took:.0f} s"
    assert "Traceback" not in err
    errors = err.strip().splitlines()
    assert len(errors) == 1, err[-3000:]  # one line, nothing else on stderr
    assert errors[0].startswith(f"error: the MLflow tracking server at {url} failed while training")
    assert (ws / PENDING_FILE).is_file()  # the parent run could not be ended: journalled

    # the server comes back on the same backend and port: the next command settles the journal
    with start_tracking_server(backend, tmp_path / "artifacts", port=port, log_path=tmp_path / "server2.log",
                               cwd=tmp_path) as again:
        assert again.url == url
        res = _churn(ws, _env(url, name), "canary", "status", "--json", timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        assert not (ws / PENDING_FILE).exists()
        runs = _runs(MlflowClient(url))
        assert runs and not [r for r in runs if r.info.status == "RUNNING"]
        parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
        assert parent.info.status == "FAILED" and "churn.failed" in parent.data.tags
        assert MlflowClient(url).search_model_versions(f"name = '{name}'") == []


# ----------------------------------------------------------------------------- a server answering 5xx
@pytest.mark.slow
def test_5xx_mid_gate_and_mid_promotion_leave_a_consistent_registry(mlflow_server, workspace: Path,
                                                                    register_version) -> None:
    from mlflow_churn.evaluation.evaluate import evaluate
    from mlflow_churn.serving.transitions import promote

    name = _name()
    proxy = FlakyProxy(mlflow_server.url)
    try:
        cfg = load_config(workspace=workspace, environ={}, overrides={
            "tracking_uri": proxy.url, "training.model_name": name, "mlflow.http_max_retries": 1,
            "mlflow.http_backoff_factor": 0})
        champ = register_version(cfg, "bad", alias=CHAMPION)
        chal = register_version(cfg, "good", alias=CHALLENGER)
        client = MlflowClient(mlflow_server.url)

        # the gate: the server fails as it starts tagging the version -> no verdict, no canary
        proxy.fail("/model-versions/set-tag")
        with pytest.raises(ChurnError) as err:
            evaluate(cfg, datetime(2026, 5, 1, tzinfo=UTC))
        msg = str(err.value)
        assert msg.startswith(f"the MLflow tracking server at {proxy.url} failed while gating '{name}' (")
        assert "HTTP 503" in msg and "\n" not in msg
        assert CANARY not in aliases_of(client, name)
        assert "gate" not in client.get_model_version(name, chal.version).tags
        runs = _runs(client)  # this test is alone on the session's server while it runs
        assert not [r for r in runs if r.info.status == "RUNNING"]
        assert [r for r in runs if r.data.tags.get("churn.decision") == "gate" and r.info.status == "FAILED"
                and r.data.tags.get("challenger_version") == chal.version]

        proxy.fail(None)
        decision = evaluate(cfg, datetime(2026, 5, 1, tzinfo=UTC))
        assert decision.passed and aliases_of(client, name)[CANARY] == chal.version

        # promotion: the server fails on the second alias move -> a consistent prefix (champion first,
        # as the lifecycle orders it), completed by a retry that reads the old champion from the
        # signed override
        proxy.fail("/registered-models/alias", from_nth=2)
        with pytest.raises(ChurnError, match=f"failed while promoting v{chal.version} of '{name}'"):
            promote(cfg, "5xx test", force=True)  # no canary traffic here: a signed override
        aliases = aliases_of(client, name)
        assert aliases == {CHAMPION: chal.version, CANARY: chal.version, CHALLENGER: chal.version}
        proxy.fail(None)
        done = promote(cfg, "5xx test, again", force=True)
        assert not done.noop
        assert aliases_of(client, name) == {CHAMPION: chal.version, PREVIOUS_CHAMPION: champ.version,
                                            CHALLENGER: chal.version}
        assert not [r for r in _runs(client) if r.info.status == "RUNNING"]
    finally:
        proxy.close()
