"""``churn scheduler``: real processes on a real job store (issue 23 item 5).

The kill test runs the cheap ``freshness`` job every few seconds and reads what happened from
the runs table: a scheduler SIGKILLed and restarted mid-interval does not run the job again
early, and one that was down for more than two intervals runs the missed job once, then keeps
its cadence. Assertions are on the recorded start times relative to the job's grid (the
intervals since its first run), never on how long anything took.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from wait_support import wait_until

from mlflow_churn.alerts import Outbox, outbox_path
from mlflow_churn.config import load_config
from mlflow_churn.features.materialize import materialize
from mlflow_churn.scheduler import (
    OK,
    SKIPPED,
    RunRecord,
    freshness_key,
    job_freshness,
    list_runs,
    run_job,
    status,
)
from mlflow_churn.scheduler.runs import record_run

EVERY = 6.0  # seconds between two freshness runs in the kill test
ONLY_FRESHNESS = {f"CHURN_SCHEDULER__{j}__ENABLED": "false" for j in ("MATERIALIZE", "MONITOR", "RETRAIN")}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHURN_", "MLFLOW_"))}
    env.update(ONLY_FRESHNESS)
    env.update(extra)
    return env


def _start(ws: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "mlflow_churn.cli", "--workspace", str(ws), "scheduler"],
        env=_env(CHURN_SCHEDULER__FRESHNESS__EVERY_SECONDS=str(EVERY)),
        stdout=subprocess.DEVNULL, stderr=open(log, "ab"), start_new_session=True,
    )


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def _runs(url: str) -> list:
    return [r for r in list_runs(url, "freshness") if r.status == OK]


def _wait_runs(url: str, n: int, timeout: float = 60.0) -> list:
    return wait_until(lambda: runs if len(runs := _runs(url)) >= n else None, timeout,
                      f"{n} freshness runs recorded", detail=lambda: f"runs: {_runs(url)}")


def _next_run(ws: Path) -> datetime:
    cfg = load_config(workspace=ws, environ=_env(CHURN_SCHEDULER__FRESHNESS__EVERY_SECONDS=str(EVERY)))
    return next(s for s in status(cfg) if s.job == "freshness").next_run_time


@pytest.mark.slow  # among the slowest of make test-fast (scheduler processes killed and restarted)
def test_killed_and_restarted_mid_interval_no_double_run_missed_run_once(workspace: Path) -> None:
    url = load_config(workspace=workspace, environ={}).scheduler_store_url
    log = workspace.parent / "scheduler.log"
    # 1. first start: a new job runs at once (its grid starts there)
    proc = _start(workspace, log)
    try:
        first = _wait_runs(url, 1)[0]
    finally:
        _kill(proc)  # mid-interval: the next run is due at first + EVERY
    grid0 = _next_run(workspace) - timedelta(seconds=EVERY)  # the job's grid, as the store keeps it
    assert grid0 <= first.started_at

    def slot(t: datetime) -> float:  # how many intervals after the first run t lies
        return (t - grid0).total_seconds() / EVERY

    # 2. restart before the next due time: the store keeps it, nothing runs early or twice
    proc = _start(workspace, log)
    try:
        second = _wait_runs(url, 2)[1]
        assert slot(second.started_at) >= 1, "the restart ran the job before it was due"
        time.sleep(0.3)
    finally:
        _kill(proc)
    runs = _runs(url)
    assert len(runs) == 2, runs
    # 3. down for more than two intervals: the missed runs (two or three) make one catch-up run
    down_until = second.started_at + timedelta(seconds=2 * EVERY + 1)
    time.sleep(max(0.0, (down_until - datetime.now(UTC)).total_seconds()))
    restarted = datetime.now(UTC)
    proc = _start(workspace, log)
    try:
        runs = _wait_runs(url, 4)
    finally:
        proc.send_signal(signal.SIGTERM)  # a clean stop
        assert proc.wait(timeout=60) == 0, log.read_text()[-2000:]
    catch_up, after = runs[2], runs[3]
    assert catch_up.started_at >= restarted
    next_slot = int(slot(catch_up.started_at)) + 1  # the first grid point after the catch-up
    assert slot(after.started_at) >= next_slot, "the missed run ran more than once"
    assert [r.status for r in list_runs(url, "freshness")].count(OK) == len(_runs(url))
    assert "scheduler job freshness: ok" in log.read_text()
    # then the normal cadence: the store keeps the job on its grid, the next run is a grid point
    nxt = _next_run(workspace)
    assert abs(slot(nxt) - round(slot(nxt))) < 1e-3


def test_once_runs_what_is_due_and_status_lists_it(workspace: Path, churn_main,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    env = _env(CHURN_SCHEDULER__FRESHNESS__EVERY_MINUTES="60")
    cmd = [sys.executable, "-m", "mlflow_churn.cli", "--workspace", str(workspace), "scheduler"]
    first = subprocess.run([*cmd, "--once", "--json"], env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert '"freshness": "ok"' in first.stdout
    assert "scheduler job freshness: ok" in first.stderr  # the outcome line
    for name, value in env.items():
        if name.startswith("CHURN_"):
            monkeypatch.setenv(name, value)
    again = churn_main(["--workspace", str(workspace), "scheduler", "--once", "--json"])
    assert again.returncode == 0 and '"ran": {}' in again.stdout  # not due again for an hour
    shown = churn_main(["--workspace", str(workspace), "scheduler", "status", "--json", "--job", "freshness"])
    assert shown.returncode == 0, shown.stderr
    assert '"status": "ok"' in shown.stdout and "no online store" in shown.stdout
    assert '"every_seconds": 3600' in shown.stdout


def test_a_job_that_ran_meanwhile_in_another_process_is_skipped(workspace: Path) -> None:
    """Two schedulers on one store: the one that waited for the job's lock while the other ran
    the job does not run it again."""
    import threading

    from mlflow_churn.registry.lock import model_lock
    from mlflow_churn.scheduler.jobs import job_lock_dir

    cfg = load_config(workspace=workspace, environ={})
    url = cfg.scheduler_store_url
    result: list[str] = []
    with model_lock(url, "scheduler:freshness", job_lock_dir(cfg)):
        waiter = threading.Thread(target=lambda: result.append(run_job("freshness", str(workspace))))
        waiter.start()
        time.sleep(0.5)
        assert waiter.is_alive()  # it waits for the lock
        t = datetime.now(UTC)  # what the scheduler holding the lock records when its run ends
        record_run(url, RunRecord("freshness", t, t, OK, "by the other scheduler", pid=1))
    waiter.join(timeout=60)
    assert result == [SKIPPED]
    assert [r.status for r in list_runs(url, "freshness")] == [OK, SKIPPED]


def test_freshness_fires_and_resolves_its_alert(workspace: Path, small_data: Path) -> None:
    shutil.copytree(small_data, workspace / "data")
    cfg = load_config(workspace=workspace, environ={})
    from mlflow_churn.data.bounds import latest_as_of

    info = materialize(cfg, latest_as_of(cfg.data_dir))
    sla = timedelta(hours=cfg.features.freshness_sla_hours)
    stale = job_freshness(cfg, now=info.watermark + sla + timedelta(hours=1))
    assert stale.detail.startswith("stale: ")
    box = Outbox(outbox_path(cfg))
    [cond] = box.conditions(key=freshness_key("sqlite"))
    assert cond.status == "firing" and cond.labels["alertname"] == "ChurnFeaturesStale"
    fresh = job_freshness(cfg, now=info.watermark + timedelta(hours=1))
    assert fresh.detail.startswith("fresh: ")
    [cond] = box.conditions(key=freshness_key("sqlite"))
    assert cond.status == "resolved"


@pytest.mark.parametrize("args, needle", [
    (["scheduler", "--once-value", "maybe"], "--once-value must be true or false"),
    (["scheduler", "--json"], "--json goes with --once"),
])
def test_bad_input_is_one_line(churn_main, workspace: Path, args: list[str], needle: str) -> None:
    res = churn_main(["--workspace", str(workspace), *args])
    assert res.returncode == 2 and needle in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_bad_job_store_is_one_line(churn_main, workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHURN_SCHEDULER__JOB_STORE", "mysql://nowhere/db")
    res = churn_main(["--workspace", str(workspace), "scheduler", "status"])
    assert res.returncode == 2 and "job_store" in res.stderr and len(res.stderr.strip().splitlines()) == 1


@pytest.mark.slow  # trains a model (about half a minute)
def test_once_runs_the_due_monitor_job_on_a_trained_champion(workspace: Path, small_data: Path) -> None:
    """`churn scheduler --once` with the monitor job due: the same monitoring run `churn monitor`
    makes (an MLflow run with its decision), its id in the runs table, its decision an alert."""
    from mlflow import MlflowClient

    from mlflow_churn.data.bounds import latest_as_of
    from mlflow_churn.monitoring.alerting import alert_key
    from mlflow_churn.registry.aliases import move_alias
    from mlflow_churn.training.train import train

    (workspace / "data").symlink_to(small_data, target_is_directory=True)
    cfg = load_config(workspace=workspace, environ={})
    res = train(cfg, latest_as_of(cfg.data_dir), n_trials=1, progress=False)
    move_alias(MlflowClient(cfg.mlflow_tracking_uri, cfg.mlflow_tracking_uri), cfg.training.model_name,
               "champion", res.version)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHURN_", "MLFLOW_"))}
    env.update({f"CHURN_SCHEDULER__{j}__ENABLED": "false" for j in ("MATERIALIZE", "FRESHNESS", "RETRAIN")})
    cmd = [sys.executable, "-m", "mlflow_churn.cli", "--workspace", str(workspace), "scheduler", "--once",
           "--json"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert '"monitor": "ok"' in done.stdout
    [run] = list_runs(cfg.scheduler_store_url, "monitor")
    assert run.status == OK and run.run_id
    tags = MlflowClient(cfg.mlflow_tracking_uri).get_run(run.run_id).data.tags
    assert run.detail.endswith(tags["monitor.action"])
    [cond] = Outbox(outbox_path(cfg)).conditions(key=alert_key(cfg.training.model_name)) or [None]
    assert (cond is not None) == (tags["monitor.action"] != "ok")


@pytest.mark.postgres
def test_postgresql_job_store(workspace: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The job store, runs table and job locks (pg_advisory_lock) on PostgreSQL."""
    from mlflow_churn.scheduler import run_due

    for name, value in {**ONLY_FRESHNESS, "CHURN_SCHEDULER__JOB_STORE": postgres_url}.items():
        monkeypatch.setenv(name, value)
    cfg = load_config(workspace=workspace)
    assert run_due(cfg) == {"freshness": OK}
    assert run_due(cfg) == {}  # not due again for 15 minutes
    [row] = [s for s in status(cfg) if s.job == "freshness"]
    assert row.last is not None and row.last.status == OK and row.next_run_time is not None
    assert not (workspace / "scheduler.db").exists()
