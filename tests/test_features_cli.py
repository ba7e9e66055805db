"""`churn features ...`: in process through main() (fast), over real subprocesses (exit codes),
the docs' newcomer steps verbatim, and `mlflow run -e materialize`."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pandas as pd
import pytest
from ports import free_port

ROOT = Path(__file__).resolve().parents[1]
CHURN = [sys.executable, "-m", "mlflow_churn.cli"]


def _env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHURN_", "MLFLOW_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["COLUMNS"] = "250"
    env.update(extra or {})
    return env


def run(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(CHURN + args, cwd=cwd, env=_env(env), capture_output=True, text=True,
                          timeout=180)


@pytest.fixture
def ws(tmp_path: Path, small_data: Path) -> Path:
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "data").symlink_to(small_data, target_is_directory=True)
    return ws


@pytest.fixture
def churn(churn_main):
    """Run the console script's main() in this process: ``churn(args) -> CompletedProcess``."""
    return churn_main


def _one_line_error(res: subprocess.CompletedProcess, needle: str) -> None:
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], res.stderr
    assert "Traceback" not in res.stderr


def test_list_and_describe(ws: Path, churn) -> None:
    res = churn(["--workspace", str(ws), "features", "list"])
    assert res.returncode == 0, res.stderr
    assert "monthly_usage_v2" in res.stdout and "churn_default" in res.stdout and "churn_v2" in res.stdout
    res = churn(["--workspace", str(ws), "features", "describe", "monthly_usage_v2"])
    assert res.returncode == 0, res.stderr
    assert "version 1" in res.stdout and "version 2" in res.stdout
    assert "sum(minutes_used) * 30.0 / count(*)" in res.stdout
    res = churn(["--workspace", str(ws), "features", "describe", "churn_v2"])
    from mlflow_churn.features.registry import load_registry

    assert load_registry().feature_set("churn_v2").hash in res.stdout


def test_materialize_incremental_history_and_skew(ws: Path, churn) -> None:
    base = ["--workspace", str(ws), "features"]
    res = churn(base + ["materialize", "--as-of", "2026-03-20", "--no-progress"])
    assert res.returncode == 0, res.stderr
    first = re.search(r"serving batch (\S+)", res.stdout).group(1)
    res = churn(base + ["materialize", "--as-of", "2026-03-22T00:00Z", "--incremental", "--no-progress"])
    assert res.returncode == 0, res.stderr
    second = re.search(r"serving batch (\S+)", res.stdout).group(1)
    res = churn(base + ["history"])
    assert res.returncode == 0, res.stderr
    assert res.stdout.index(second) < res.stdout.index(first)
    assert "incremental" in res.stdout and "full" in res.stdout
    res = churn(base + ["materialize", "--no-progress"])  # default as_of: newest data
    assert res.returncode == 0 and "2026-05-01T00:00:00+00:00" in res.stdout, res.stderr
    res = churn(base + ["check-skew", "--sample", "100"])
    assert res.returncode == 0, res.stderr
    assert "no skew" in res.stdout and "100 of 100" in res.stdout


def test_check_skew_exits_1_on_rewritten_data(tmp_path: Path, small_data: Path, churn) -> None:
    ws = tmp_path / "ws"
    shutil.copytree(small_data, ws / "data")
    base = ["--workspace", str(ws), "features"]
    assert churn(base + ["materialize", "--as-of", "2026-03-20", "--no-progress"]).returncode == 0
    part = ws / "data" / "activity" / "date=2026-03-19" / "part-0.parquet"
    frame = pd.read_parquet(part)
    frame["support_calls"] = frame["support_calls"] + 3
    frame.to_parquet(part, index=False)
    res = run(base + ["check-skew", "--sample", "50"], ws)
    assert res.returncode == 1, res.stderr
    assert "support_calls_7d" in res.stdout and "support_calls_30d" in res.stdout
    assert "monthly_usage" not in res.stdout


def test_every_runs_on_a_schedule(ws: Path, churn) -> None:
    res = churn(["--workspace", str(ws), "features", "materialize", "--every", "1s", "--max-runs", "2",
                 "--incremental", "--no-progress"])
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("full") == 1
    assert "no batch: no data after 2026-05-01T00:00:00+00:00" in res.stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["materialize", "--as-of", "yesterday"], "yesterday"),
        (["materialize", "--as-of", "2026-01-10"], "less than 60 days"),
        (["materialize", "--as-of", "2027-01-01"], "after the newest data"),
        (["materialize", "--every", "5x"], "5x"),
        (["materialize", "--every", "1h", "--as-of", "2026-03-20"], "exclude each other"),
        (["history"], "churn features materialize"),
        (["check-skew"], "churn features materialize"),
        (["describe", "monthly_usage_v9"], "monthly_usage_v2"),
        (["materialize", "--max-runs", "2"], "--max-runs 2 needs --every"),
        (["materialize", "--every", "1h", "--force"], "exclude each other"),
        (["materialize", "--max-runs", "abc"], "Invalid value for '--max-runs'"),
        (["materialize", "--bogus"], "No such option: --bogus"),
        (["nosuch"], "No such command 'nosuch'"),
    ],
)
def test_bad_input_is_one_line_exit_2(ws: Path, args: list[str], needle: str, churn) -> None:
    extra = ["--no-progress"] if args[0] == "materialize" else []
    _one_line_error(churn(["--workspace", str(ws), "features", *args, *extra]), needle)


def test_older_as_of_needs_force(ws: Path, churn) -> None:
    base = ["--workspace", str(ws), "features", "materialize", "--no-progress"]
    assert churn(base + ["--as-of", "2026-03-27"]).returncode == 0
    _one_line_error(churn(base + ["--as-of", "2026-03-20"]), "--force")
    res = churn(base + ["--as-of", "2026-03-20", "--force"])
    assert res.returncode == 0 and "2026-03-20T00:00:00+00:00" in res.stdout, res.stderr


def _definitions(ws: Path, text: str) -> list[str]:
    """Root options of a config whose features.definitions_file holds ``text``."""
    (ws / "features.yaml").write_text(text)
    (ws / "churn.yaml").write_text(f"features:\n  definitions_file: {ws / 'features.yaml'}\n")
    return ["--config", str(ws / "churn.yaml"), "--workspace", str(ws)]


@pytest.mark.parametrize(
    ("definitions", "needle"),
    [
        ("features:\n  - {name: broken, version: 1, dtype: float64, source: activity, window_days: 7,"
         " expression: 'sum(nonexistent_col)', description: d}\n",
         "feature 'broken' (v1, source activity)"),
        ("features:\n  - {name: broken, version: 1, dtype: float64, source: activity, window_days: 7,"
         " expression: 'sum(', description: d}\n", "expression 'sum(' does not run"),
        ("feature_sets:\n  - {name: churn_default, features: [plan]}\n",
         "would redefine the built-in set"),
    ],
)
def test_bad_definitions_file_is_one_line_exit_2(ws: Path, definitions: str, needle: str) -> None:
    """Over the real console script: no DuckDB traceback, exit 2, for every command that loads them."""
    root = _definitions(ws, definitions)
    for args in (["features", "materialize", "--no-progress"], ["features", "list"]):
        res = run(root + args, ws)
        _one_line_error(res, needle)
        assert "features.yaml" in res.stderr


@pytest.mark.slow
def test_readme_newcomer_steps(tmp_path: Path) -> None:
    """docs/feature-store.md's 'define a new feature version, materialize it, read it' block,
    verbatim except for a free port and waiting on /health instead of a fixed sleep."""
    section = (ROOT / "docs" / "feature-store.md").read_text()
    script = section.split("```bash\n", 1)[1].split("\n```", 1)[0]
    for _ in range(3):  # `features serve` binds the port itself: again on another if it was taken
        port = str(free_port())
        wait = (f"until curl -s -o /dev/null http://127.0.0.1:{port}/health; do kill -0 %1 || exit 98; "
                "sleep 0.2; done")
        run = script.replace("8081", port).replace("sleep 3", wait)
        res = subprocess.run(["bash", "-e", "-c", run], cwd=tmp_path, env=_env(), capture_output=True,
                             text=True, timeout=300)
        if not (res.returncode == 98 and "address already in use" in res.stderr.lower()):
            break
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    assert "monthly_usage_v3 (feature monthly_usage, version 3)" in out
    assert '"features":["monthly_usage","monthly_usage_v3"]' in out
    assert '"monthly_usage_v3":3' in out and '"feature_set":"churn_v3"' in out
    assert re.search(r'"customer_id":1,"status":"(stale|found)"', out)
    assert "HTTP/1.1 503" in out and '"sla_seconds":93600.0' in out


@pytest.mark.slow
def test_mlflow_run_materialize_logs_into_the_project_run(tmp_path: Path, small_data: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "data").symlink_to(small_data, target_is_directory=True)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    res = subprocess.run(
        [sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", "materialize", "--env-manager", "local",
         "-P", f"workspace={ws}"],
        cwd=tmp_path, env=_env({"MLFLOW_TRACKING_URI": uri}), capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    run_ = runs[0]
    assert run_.data.params["batch_as_of"] == "2026-05-01T00:00:00+00:00"
    assert run_.data.params["batch_mode"] == "full"
    assert run_.data.metrics["rows"] > 2000
    assert [a.path for a in client.list_artifacts(run_.info.run_id)] == ["batch.json"]
    assert timedelta(0) <= timedelta(seconds=run_.data.metrics["duration_s"])
