"""The smaller items of issue 25 ("the rest of the list"): each refused in one line or made
safe. Real subprocesses, real MLflow stores in the test workspace."""

from __future__ import annotations

import os
import signal
import sqlite3
import stat
import subprocess
from pathlib import Path

import pytest
from serving_support import CHURN, cli_env, run_cli
from wait_support import wait_until

from mlflow_churn.config import ChurnConfig
from mlflow_churn.errors import ChurnError
from mlflow_churn.web.auth import token_file


def _one_line_exit_2(res: subprocess.CompletedProcess, *needles: str) -> str:
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2, (res.returncode, res.stdout[-1000:], res.stderr[-2000:])
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------------- the token file
def test_token_file_refuses_a_planted_symlink_and_keeps_its_directory_private(tmp_path: Path) -> None:
    secrets_dir = tmp_path / "ws" / "secrets"
    secrets_dir.mkdir(parents=True, mode=0o755)
    target = tmp_path / "elsewhere"
    target.write_text("attacker's file\n")
    (secrets_dir / "admin_token").symlink_to(target)
    with pytest.raises(ChurnError, match="symbolic link"):
        token_file(secrets_dir / "admin_token")
    assert target.read_text() == "attacker's file\n"  # neither read as the token nor written
    (secrets_dir / "admin_token").unlink()
    dangling = secrets_dir / "admin_token"
    dangling.symlink_to(tmp_path / "not-there")  # a dangling link is not created through either
    with pytest.raises(ChurnError, match="symbolic link"):
        token_file(dangling)
    assert not (tmp_path / "not-there").exists()
    dangling.unlink()
    token = token_file(secrets_dir / "admin_token")
    assert stat.S_IMODE(secrets_dir.stat().st_mode) == 0o700
    secrets_dir.chmod(0o755)
    assert token_file(secrets_dir / "admin_token") == token
    assert stat.S_IMODE(secrets_dir.stat().st_mode) == 0o700


def test_churn_serve_refuses_a_planted_token_symlink(config: ChurnConfig, tmp_path: Path) -> None:
    secrets_dir = config.workspace / "secrets"
    secrets_dir.mkdir(parents=True)
    (secrets_dir / "admin_token").symlink_to(tmp_path / "planted")
    res = run_cli(config, ["serve", "--port", "1"], timeout=120)
    _one_line_exit_2(res, "symbolic link", "admin_token")
    assert not (tmp_path / "planted").exists()


# ------------------------------------------------------------------------- kill -9 of evaluate
def _gate_runs(db: Path) -> dict[str, str]:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            return dict(con.execute("SELECT run_uuid, status FROM runs WHERE name LIKE 'gate v%'").fetchall())
    except sqlite3.Error:
        return {}


@pytest.mark.slow  # two trained versions and two gate subprocesses: 30-60 s
def test_evaluate_killed_in_its_decision_run_leaves_no_running_run(config: ChurnConfig,
                                                                    register_version) -> None:
    register_version(config, "bad", alias="champion")
    register_version(config, "good", alias="challenger")
    db = config.workspace / "mlflow.db"
    args = ["evaluate", "--as-of", "2026-05-01", "--no-progress"]
    proc = subprocess.Popen(CHURN + args, env=cli_env(config), cwd=config.workspace,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def running_runs() -> list[str] | bool:  # the RUNNING decision run, or True once evaluate ended
            runs = [r for r, status in _gate_runs(db).items() if status == "RUNNING"]
            return runs or proc.poll() is not None

        running = wait_until(running_runs, 300, "the gate's decision run RUNNING", interval=0.01)
        assert running is not True, "evaluate ended before its decision run was seen RUNNING"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert _gate_runs(db)[running[0]] == "RUNNING"  # what a kill -9 leaves
    assert (config.workspace / "mlflow-pending.jsonl").is_file()
    res = run_cli(config, args, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    runs = _gate_runs(db)
    assert runs[running[0]] == "FAILED"
    assert "RUNNING" not in runs.values()
    assert not (config.workspace / "mlflow-pending.jsonl").exists()


# ------------------------------------------------------------------------- one line, exit 2
@pytest.mark.parametrize(("args", "needles"), [
    (["traffic", "--customers", "5", "--seed", "-1"], ("--seed", "-1")),
    (["traffic", "--customers", "5", "--wait-seconds", "nan"], ("--wait-seconds", "nan")),
    (["traffic", "--customers", "5", "--max-seconds", "inf"], ("--max-seconds", "inf")),
    (["simulate", "--start", "0001-01-01", "--overwrite"], ("simulation.start",)),
    (["canary", "evaluate", "--since", "3000-01-01"], ("--since", "3000-01-01")),
    (["canary", "evaluate", "--as-of", "2026-05-01", "--since", "3000-01-01"], ("--since", "--as-of")),
])
def test_nonsense_options_are_one_line_exit_2(churn_main, workspace: Path, args: list[str],
                                              needles: tuple[str, ...]) -> None:
    res = churn_main(["--workspace", str(workspace), *args])
    _one_line_exit_2(res, *needles)
    db = workspace / "mlflow.db"
    if db.exists():  # nothing was recorded (canary evaluate logs its decision as a run)
        with sqlite3.connect(db) as con:
            assert con.execute("SELECT count(*) FROM runs").fetchone()[0] == 0


@pytest.mark.parametrize(("text", "key"), [
    ("features:\n  redis_timeout_ms: 1e-300\n", "features.redis_timeout_ms"),
    ("features:\n  sqlite_timeout_ms: 1e300\n", "features.sqlite_timeout_ms"),
    ("serving:\n  max_body_bytes: 1e23\n", "serving.max_body_bytes"),
    ("hooks:\n  max_body_bytes: 100000000000000000000000\n", "hooks.max_body_bytes"),
    ("features:\n  max_header_bytes: 10\n", "features.max_header_bytes"),
    ("serving:\n  read_timeout_seconds: .nan\n", "serving.read_timeout_seconds"),
    ("simulation:\n  start: 0001-01-01\n", "simulation.start"),
])
def test_config_values_outside_sense_are_refused_naming_the_key(churn_main, workspace: Path, text: str,
                                                                key: str) -> None:
    path = workspace / "churn.yaml"
    path.write_text(text)
    res = churn_main(["--config", str(path), "--workspace", str(workspace), "config", "show"])
    _one_line_exit_2(res, key)


def test_yaml_alias_bomb_is_refused_at_once(workspace: Path) -> None:
    """A "billion laughs" config (9 levels of 9 aliases) in CHURN_CONFIG: refused while parsing,
    in a subprocess that would otherwise hang expanding it."""
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{name}: &{name} [{', '.join(['*' + prev] * 9)}]")
    bomb = workspace / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    res = subprocess.run(CHURN + ["config", "show"], capture_output=True, text=True, timeout=120,
                         cwd=workspace, env={**cli_env_plain(), "CHURN_CONFIG": str(bomb)})
    _one_line_exit_2(res, "alias", "bomb.yaml")


def cli_env_plain() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("CHURN_", "MLFLOW_"))}


def test_a_run_journalled_before_it_is_made_is_failed_on_replay_or_dropped(config: ChurnConfig) -> None:
    """The pending-run journal's entry is written before the run exists (a kill -9 between the
    run's creation and a later entry left a RUNNING run nothing covered; seen once under load).
    A process that died after making the run: the next setup_mlflow finds the run by its entry
    tag and marks it FAILED. One that died before: the entry is dropped, no run is touched."""
    import sys

    from mlflow import MlflowClient

    from mlflow_churn.tags import FAILED_TAG, JOURNAL_ENTRY_TAG
    from mlflow_churn.tracking import PENDING_FILE, _pending_run, setup_mlflow

    exp_id = setup_mlflow(config)
    client = MlflowClient(config.mlflow_tracking_uri, config.mlflow_tracking_uri)
    bystander = client.create_run(exp_id, run_name="another process's run").info.run_id
    # two entries as a process killed at each point would leave them (its pid, then ended)
    dead = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        made, unmade = _pending_run(config, exp_id), _pending_run(config, exp_id)
        journal = config.workspace / PENDING_FILE
        text = journal.read_text().replace(f'"pid": {os.getpid()}', f'"pid": {dead.pid}')
        journal.write_text(text)
        run_id = client.create_run(exp_id, run_name="gate v1", tags={JOURNAL_ENTRY_TAG: made}).info.run_id
    finally:
        dead.kill()
        dead.wait(30)
    assert unmade and client.get_run(run_id).info.status == "RUNNING"
    setup_mlflow(config)  # the next command replays the journal
    run = client.get_run(run_id)
    assert run.info.status == "FAILED" and f"pid {dead.pid}" in run.data.tags[FAILED_TAG]
    assert client.get_run(bystander).info.status == "RUNNING"
    assert not journal.exists()
