"""The demo's server mode (real `mlflow server` + `churn hooks serve`
children, the gate started by the registry's webhook), children stopped on SIGINT / SIGTERM,
PostgreSQL URLs as users type them, per-segment gate metrics, the experiment kind tag, and
one tracking store for `mlflow run` and `churn` from the same directory."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from wait_support import wait_until

from mlflow_churn.config import load_config
from mlflow_churn.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, setup_mlflow

ROOT = Path(__file__).resolve().parents[1]
PG = "postgres@127.0.0.1:5432/test"


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHURN_", "MLFLOW_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _gone(pid: int) -> bool:
    """True when no process of ``pid``'s process group is left (children start their own)."""
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _assert_all_gone(pids: list[int], context: str = "", wait_s: float = 15.0) -> None:
    """Every process of these groups ends within ``wait_s`` (a stopped leader's workers are
    reaped a moment after it)."""
    def left() -> str:
        return subprocess.run(["ps", "-o", "pid,pgid,stat,cmd", "-g", ",".join(map(str, pids))],
                              capture_output=True, text=True).stdout

    wait_until(lambda: all(_gone(pid) for pid in pids), wait_s, "every process of the groups to end",
               interval=0.2, detail=lambda: f"left running:\n{left()}\n{context}")


# ------------------------------------------------------------------ fast, embedded store
def test_config_backend_uri_from_env_and_yaml(tmp_path: Path) -> None:
    assert load_config(workspace=tmp_path, environ={}).mlflow.server_backend_uri is None
    cfg = load_config(workspace=tmp_path, environ={"CHURN_MLFLOW_BACKEND_URI": f"postgresql://{PG}"})
    assert cfg.mlflow.server_backend_uri == f"postgresql://{PG}"
    cfg = load_config(workspace=tmp_path, environ={"CHURN_MLFLOW__SERVER_BACKEND_URI": "sqlite:///x.db"})
    assert cfg.mlflow.server_backend_uri == "sqlite:///x.db"


def test_backend_store_rejects_other_schemes(config) -> None:
    from mlflow_churn.demo_server import backend_store
    from mlflow_churn.errors import ChurnError

    cfg = config.model_copy(deep=True)
    cfg.mlflow.server_backend_uri = "mysql://root@localhost/db"
    with pytest.raises(ChurnError, match="mysql://root@localhost/db"):
        backend_store(cfg)
    cfg.mlflow.server_backend_uri = None
    assert backend_store(cfg) == f"sqlite:///{cfg.workspace.resolve() / 'mlflow-server.db'}"


def test_experiments_carry_the_model_training_kind_tag(config) -> None:
    exp_id = setup_mlflow(config)
    client = MlflowClient(config.mlflow_tracking_uri)
    assert client.get_experiment(exp_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    # an existing experiment lacking the tag gets it
    other = client.create_experiment("made-elsewhere")
    assert EXPERIMENT_KIND_TAG not in client.get_experiment(other).tags
    setup_mlflow(config, "made-elsewhere")
    assert client.get_experiment(other).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND


def test_segment_metric_names_are_sanitized() -> None:
    import pandas as pd

    from mlflow_churn.stats.metrics import segment_metric_values

    table = pd.DataFrame([
        {"segment": "region", "value": "pacific", "roc_auc": 0.7, "recall_at_k": 0.3},
        {"segment": "plan", "value": "pro+ (annual)", "roc_auc": float("nan"), "recall_at_k": 0.1},
    ])
    out = segment_metric_values(table, "champion_")
    assert out == {"champion_segment_auc.region.pacific": 0.7,
                   "champion_segment_recall_at_k.region.pacific": 0.3,
                   "champion_segment_recall_at_k.plan.pro_ _annual_": 0.1}


@pytest.mark.slow
def test_gate_run_logs_segment_metrics(config, register_version) -> None:
    from datetime import UTC, datetime

    from mlflow_churn.evaluation.evaluate import evaluate

    register_version(config, "bad", alias="champion")
    register_version(config, "good", alias="challenger")
    decision = evaluate(config, datetime(2026, 5, 1, tzinfo=UTC))
    run = MlflowClient(config.mlflow_tracking_uri).get_run(decision.run_id)
    names = set(run.data.metrics)
    for column in config.evaluation.segments:
        assert any(n.startswith(f"segment_auc.{column}.") for n in names), column
        assert any(n.startswith(f"segment_recall_at_k.{column}.") for n in names), column
        assert any(n.startswith(f"champion_segment_auc.{column}.") for n in names), column
    assert 0 < run.data.metrics["segment_auc.region.pacific"] <= 1


# ------------------------------------------------------------------ mlflow run + churn: one store
@pytest.mark.slow
def test_mlflow_run_and_churn_share_one_store(small_data: Path, tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    for name in ("MLproject", "python_env.yaml"):
        shutil.copy(ROOT / name, project / name)
    workspace = project / "churn-workspace"
    workspace.mkdir()
    os.symlink(small_data, workspace / "data")
    env = _clean_env()
    run = subprocess.run(
        [sys.executable, "-m", "mlflow", "run", ".", "-e", "train", "--env-manager", "local",
         "-P", "n_trials=1"],
        cwd=project, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert not (project / "mlflow.db").exists(), "mlflow run wrote MLflow's own ./mlflow.db"
    # a churn command from the same directory, no variable set, sees that version
    status = subprocess.run([sys.executable, "-m", "mlflow_churn.cli", "canary", "status", "--json"],
                            cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert status.returncode == 0, status.stderr[-2000:]
    assert json.loads(status.stdout)["aliases"] == {"challenger": "1"}
    uri = f"sqlite:///{workspace.resolve() / 'mlflow.db'}"
    client = MlflowClient(uri, uri)
    versions = client.search_model_versions("name = 'churn-model'")
    assert [str(v.version) for v in versions] == ["1"]
    assert str(client.get_model_version_by_alias("churn-model", "challenger").version) == "1"
    exp = client.get_experiment_by_name("churn")
    assert exp.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    project_runs = client.search_runs([exp.experiment_id], "tags.`mlflow.project.entryPoint` = 'train'")
    assert len(project_runs) == 1 and project_runs[0].info.status == "FINISHED"
    assert client.get_experiment_by_name("Default") is None or not client.search_runs(["0"])


# ------------------------------------------------------------------ real servers
@pytest.mark.postgres
@pytest.mark.slow
def test_server_mode_children_and_webhook_gate(config, register_version, monkeypatch) -> None:
    """start_stack on a plain postgresql:// URL (psycopg 3): both children up, the webhook
    registered; a new challenger is gated by the receiver; the demo reads the delivery's
    outcome; the decision run has segment metrics; stop() leaves no process behind."""
    from mlflow_churn.demo_server import await_webhook_gate, start_stack
    from mlflow_churn.registry.aliases import CANARY, alias_version
    from mlflow_churn.tracking_server import drop_database

    cfg = config.model_copy(deep=True)
    cfg.mlflow.server_backend_uri = f"postgresql://{PG}"
    lines: list[str] = []
    stack = start_stack(cfg, say=lines.append)
    try:
        assert stack.backend_uri.startswith("postgresql+psycopg://") and "/churn_" in stack.backend_uri
        assert stack.tracking.alive() and stack.receiver.poll() is None
        client = MlflowClient(stack.url, stack.url)
        assert [w.name for w in client.list_webhooks()] == ["churn-gate"]
        monkeypatch.setenv("MLFLOW_TRACKING_URI", stack.url)
        chal = register_version(cfg, "good", alias="challenger")  # the alias move fires the webhook
        outcome = await_webhook_gate(stack, cfg, chal.version, say=lines.append)
        assert outcome.passed, outcome.reasons
        assert outcome.evidence.startswith("webhook delivery ")
        assert any("webhook delivery" in line and "done" in line for line in lines)
        run = client.get_run(outcome.run_id)
        assert run.data.tags["challenger_version"] == chal.version
        assert any(k.startswith("segment_auc.region.") for k in run.data.metrics)
        assert any(k.startswith("segment_recall_at_k.plan.") for k in run.data.metrics)
        assert alias_version(client, cfg.training.model_name, CANARY).version == chal.version
        exp = client.get_experiment(run.info.experiment_id)
        assert exp.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    finally:
        pids = stack.pids()
        stack.stop()
        drop_database(stack.backend_uri)
    _assert_all_gone(pids)


@pytest.mark.postgres
@pytest.mark.slow
def test_plain_postgres_url_runs_a_real_server_on_psycopg3(mlflow_server) -> None:
    """The fixture passes a plain postgresql:// URL: the server is started on psycopg 3."""
    assert mlflow_server.backend_uri.startswith("postgresql+psycopg://")
    client = MlflowClient(mlflow_server.url, mlflow_server.url)
    exp = client.create_experiment(f"psycopg-{os.getpid()}-{time.time_ns()}")
    assert client.get_experiment(exp).experiment_id == exp


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_demo_server_stops_its_children_on_signal(tmp_path: Path, sig: int) -> None:
    """`churn demo --server` (SQLite fallback) is interrupted once both children are up:
    it exits and leaves neither `mlflow server` nor the receiver behind."""
    log = tmp_path / "demo.log"
    with log.open("w") as out:
        demo = subprocess.Popen(
            [sys.executable, "-m", "mlflow_churn.cli", "--workspace", str(tmp_path / "ws"), "demo",
             "--server", "--customers", "2000", "--n-trials", "1"],
            cwd=tmp_path, env=_clean_env(), stdout=out, stderr=subprocess.STDOUT)
    try:
        def announced() -> re.Match | bool:  # the children's line, or True once the demo ended
            m = re.search(r"mlflow server http://\S+ \(pid (\d+)\); webhook receiver "
                          r"http://\S+ \(pid (\d+)\)", " ".join(log.read_text().split()))
            return m or demo.poll() is not None

        m = wait_until(announced, 300, "the demo to start its two children", interval=0.5)
        pids = [int(m.group(1)), int(m.group(2))] if isinstance(m, re.Match) else []
        assert pids, log.read_text()[-3000:]
        assert not any(_gone(pid) for pid in pids)
        assert (tmp_path / "ws" / "mlflow-server.db").exists()
        demo.send_signal(sig)
        code = demo.wait(120)
        assert code != 0
        _assert_all_gone(pids, log.read_text()[-3000:])
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait(30)


# ------------------------------------------------------------------ ports, prompt stops (issue 22)
def _demo_cmd(ws: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mlflow_churn.cli", "--workspace", str(ws), "demo", "--server",
            "--customers", "2000", *extra]


@pytest.mark.parametrize(("args", "needle"), [
    (["--mlflow-port", "70000"], "--mlflow-port"), (["--hooks-port", "eighty"], "--hooks-port"),
    (["--mlflow-port", "0"], "--mlflow-port"),
    (["--mlflow-port", "5555", "--hooks-port", "5555"], "both 5555"),
])
def test_demo_server_bad_ports_are_one_line_errors(tmp_path: Path, args: list[str], needle: str) -> None:
    res = subprocess.run(_demo_cmd(tmp_path / "ws", *args), env=_clean_env(), capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and needle in res.stderr, res.stderr
    assert not (tmp_path / "ws" / "mlflow-server.db").exists()  # refused before anything started


@pytest.mark.parametrize("option", ["--mlflow-port", "--hooks-port"])
def test_demo_server_port_in_use_names_the_port(tmp_path: Path, option: str) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        res = subprocess.run(_demo_cmd(tmp_path / "ws", option, str(port)), env=_clean_env(),
                             capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    line = res.stderr.strip()
    assert len(line.splitlines()) == 1 and f"{option} {port}" in line and "already in use" in line, line


def test_port_options_need_server(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "mlflow_churn.cli", "--workspace", str(tmp_path / "ws"), "demo",
           "--hooks-port", "5000"]
    res = subprocess.run(cmd, env=_clean_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "--hooks-port needs --server" in res.stderr, res.stderr


def _training_running(url: str) -> bool:
    """True once a tuning trial run of the demo's first training is RUNNING on the server."""
    try:
        client = MlflowClient(url)
        exp = client.get_experiment_by_name("churn")
        if exp is None:
            return False
        runs = client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'", max_results=50)
    except Exception:  # the server is busy starting: ask again
        return False
    return any((r.info.run_name or "").startswith("trial-") for r in runs)


@pytest.mark.slow
def test_demo_server_on_given_ports_stops_during_training(tmp_path: Path) -> None:
    """`churn demo --server --mlflow-port P --hooks-port Q`: the children listen on P and Q;
    SIGINT once a tuning trial is running (xgboost fitting) ends the demo (exit 130,
    "interrupted") with both children's process groups gone, within the wait's generous
    deadline (the demo's own bound is 9 s: demo_server.EXIT_DEADLINE_S)."""
    from ports import ADDRESS_IN_USE, free_port

    log = tmp_path / "demo.log"
    ready = re.compile(r"mlflow server (http://\S+) \(pid (\d+)\); "
                       r"webhook receiver (http://\S+) \(pid (\d+)\)")
    for _attempt in range(3):  # a port another process takes between free_port() and the bind: again
        mlflow_port, hooks_port = free_port(), free_port()
        with log.open("w") as out:
            cmd = _demo_cmd(tmp_path / "ws", "--n-trials", "50", "--mlflow-port", str(mlflow_port),
                            "--hooks-port", str(hooks_port))
            demo = subprocess.Popen(cmd, cwd=tmp_path, env=_clean_env(), stdout=out, stderr=subprocess.STDOUT)
        pids: list[int] = []
        m = wait_until(lambda: ready.search(" ".join(log.read_text().split())) or demo.poll() is not None,  # noqa: B023 (this attempt's demo)
                       300, "the demo to start its children on the given ports", interval=0.3)
        if isinstance(m, re.Match):
            urls, pids = (m.group(1), m.group(3)), [int(m.group(2)), int(m.group(4))]
        if pids or not any(s in log.read_text().lower() for s in ADDRESS_IN_USE):
            break
        demo.wait(60)
    try:
        assert pids, log.read_text()[-3000:]
        assert urls == (f"http://127.0.0.1:{mlflow_port}", f"http://127.0.0.1:{hooks_port}")
        wait_until(lambda: demo.poll() is not None or _training_running(urls[0]), 600,
                   "a tuning trial to run", interval=0.5, detail=lambda: log.read_text()[-3000:])
        assert demo.poll() is None, log.read_text()[-3000:]
        demo.send_signal(signal.SIGINT)
        code = demo.wait(60)
        text = log.read_text()
        assert code == 130, text[-3000:]
        assert "interrupted" in text.splitlines()[-1], text[-3000:]
        _assert_all_gone(pids, text[-3000:])
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait(30)


_FIT_UNDER_SIGINT = textwrap.dedent("""
    import os, random, signal, sys, threading
    import numpy as np, xgboost as xgb
    from mlflow_churn.demo_server import PromptStop
    X = np.random.default_rng(0).random((20000, 20)); y = (X[:, 0] > 0.5).astype(int)
    rng = random.Random(int(sys.argv[1]))
    for i in range(int(sys.argv[2])):
        with PromptStop(unwind_s=600, deadline_s=900, exit_at_once=False):
            started = threading.Event()
            def fire():
                started.wait(); threading.Event().wait(rng.uniform(0.0, 0.4))
                os.kill(os.getpid(), signal.SIGINT)
            threading.Thread(target=fire, daemon=True).start()
            try:
                while True:
                    started.set()
                    xgb.XGBClassifier(n_estimators=20, tree_method="hist", n_jobs=1).fit(X, y)
            except KeyboardInterrupt:
                print("interrupted cleanly", i, flush=True)
""")


@pytest.mark.slow
def test_sigint_inside_xgboost_fit_is_raised_outside_its_ctypes_callbacks(tmp_path: Path) -> None:
    """Python's own SIGINT handler raises KeyboardInterrupt inside xgboost's ctypes callbacks
    (building the QuantileDMatrix), which crashes or hangs the process (measured: 24 of 30);
    PromptStop raises it a moment later, outside: every interrupt ends the fit cleanly."""
    n = 8
    res = subprocess.run([sys.executable, "-c", _FIT_UNDER_SIGINT, "7", str(n)], env=_clean_env(),
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, (res.returncode, res.stderr[-3000:])
    assert res.stdout.count("interrupted cleanly") == n, res.stdout + res.stderr[-3000:]
