"""The `churn` console script over real subprocesses: help, one-line errors, exit codes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

CHURN = [sys.executable, "-m", "mlflow_churn.cli"]


def run(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("CHURN_")}
    full_env.update(env or {})
    full_env["COLUMNS"] = "200"
    return subprocess.run(CHURN + args, cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=120)


def test_help_lists_commands(tmp_path: Path) -> None:
    res = run(["--help"], tmp_path)
    assert res.returncode == 0
    for command in ("simulate", "config"):
        assert command in res.stdout
    res = run(["simulate", "--help"], tmp_path)
    assert res.returncode == 0 and "--scenario" in res.stdout


def test_simulate_writes_and_reports(tmp_path: Path) -> None:
    res = run(["--workspace", str(tmp_path / "ws"), "simulate", "--customers", "300", "--days", "5",
               "--no-progress"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert "customers.parquet" in res.stdout and "churn_events" in res.stdout
    assert (tmp_path / "ws" / "data" / "manifest.json").is_file()
    res = run(["simulate", "--customers", "300", "--days", "5", "--no-progress"], tmp_path,
              env={"CHURN_WORKSPACE": str(tmp_path / "ws2")})
    assert res.returncode == 0 and (tmp_path / "ws2" / "data" / "manifest.json").is_file()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["simulate", "--customers", "-3"], "-3"),
        (["simulate", "--scenario", "chaos"], "chaos"),
        (["simulate", "--start", "2026-13-45"], "2026-13-45"),
        (["simulate", "--segment", "region"], "COLUMN=VALUE"),
        (["--config", "missing.yaml", "simulate"], "missing.yaml"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path: Path, args: list[str], needle: str) -> None:
    res = run(["--workspace", str(tmp_path / "ws"), *args, "--no-progress"], tmp_path)
    assert res.returncode == 2, res
    lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    assert needle in lines[0]
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["simulate", "--customers", "abc"], "Invalid value for '--customers'"),
        (["simulate", "--days", "1.5"], "'1.5'"),
        (["simulate", "--bogus"], "No such option: --bogus"),
        (["simulate", "--seed"], "'--seed' requires an argument"),
        (["nosuch"], "No such command 'nosuch'"),
        (["config", "nosuch"], "No such command 'nosuch'"),
    ],
)
def test_usage_errors_are_one_line_exit_2(tmp_path: Path, args: list[str], needle: str) -> None:
    """Click's own errors (types, unknown options and commands): no boxed usage, one line."""
    res = run(args, tmp_path)
    assert res.returncode == 2, res
    assert res.stderr.startswith("error: ") and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert needle in res.stderr and "--help" in res.stderr
    assert "╭" not in res.stderr and "Usage:" not in res.stderr and res.stdout == ""


def test_no_command_shows_the_help(tmp_path: Path) -> None:
    res = run([], tmp_path)
    assert res.returncode == 2 and "simulate" in res.stdout and "Traceback" not in res.stderr


def test_unwritable_output_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    res = run(["--workspace", str(blocker / "ws"), "simulate", "--customers", "10", "--days", "2",
               "--no-progress"], tmp_path)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert str(blocker) in res.stderr


def test_existing_dataset_needs_overwrite(tmp_path: Path) -> None:
    args = ["--workspace", str(tmp_path / "ws"), "simulate", "--customers", "20", "--days", "2",
            "--no-progress"]
    assert run(args, tmp_path).returncode == 0
    res = run(args, tmp_path)
    assert res.returncode == 2 and "--overwrite" in res.stderr
    assert run([*args, "--overwrite"], tmp_path).returncode == 0


def test_config_show_resolves_tracking_uri(tmp_path: Path) -> None:
    res = run(["--workspace", str(tmp_path / "ws"), "config", "show"], tmp_path)
    assert res.returncode == 0
    assert f"sqlite:///{tmp_path / 'ws' / 'mlflow.db'}" in res.stdout
    res = run(["config", "show"], tmp_path, env={"CHURN_TRAINING__WINDOW_DAYS": "oops"})
    assert res.returncode == 2 and "training.window_days" in res.stderr


def test_help_does_not_import_heavy_modules(tmp_path: Path) -> None:
    """`churn --help` (and every command's parsing) must not pay for MLflow / sklearn imports."""
    code = (
        "import sys, mlflow_churn.cli; "  # importing it registers every command
        "heavy = [m for m in ('mlflow', 'sklearn', 'xgboost', 'evidently', 'duckdb') if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_config_show_masks_secrets_and_offers_json(tmp_path: Path) -> None:
    import json

    env = {"CHURN_SERVING__ADMIN_TOKEN": "adm1n-t0ken", "CHURN_HOOKS__SECRET": "h00k-s3cret",
           "CHURN_SERVING__PREDICTION_LOG": "postgresql://churn:pg-passw0rd@db:5432/churn",
           "CHURN_FEATURES__REDIS_URL": "redis://:r3dis-pw@cache:6379/0"}
    res = run(["config", "show", "--json"], tmp_path, env=env)
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["serving"]["admin_token"] == "***" and data["hooks"]["secret"] == "***"
    assert data["serving"]["prediction_log"] == "postgresql://churn:***@db:5432/churn"
    assert data["features"]["redis_url"] == "redis://:***@cache:6379/0"
    res = run(["config", "show"], tmp_path, env=env)
    assert res.returncode == 0, res.stderr
    for secret in env.values():
        assert secret not in res.stdout
    for secret in ("adm1n-t0ken", "h00k-s3cret", "pg-passw0rd", "r3dis-pw"):
        assert secret not in res.stdout
    assert "admin_token: '***'" in res.stdout and "training:" in res.stdout
