"""Distributed tuning on the machine's PostgreSQL (a leader + two real `churn train --worker`
processes) and `mlflow run . -e train` registering a challenger with nested trial runs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from mlflow_churn.training.tuning import study_storage

ROOT = Path(__file__).resolve().parents[1]
CHURN = [sys.executable, "-m", "mlflow_churn.cli"]
FAST_ENV = {"CHURN_TRAINING__WINDOW_DAYS": "21", "CHURN_TRAINING__MAX_ESTIMATORS": "40",
            "CHURN_TRAINING__EARLY_STOPPING_ROUNDS": "10", "CHURN_TRAINING__NTHREAD": "1"}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHURN_", "MLFLOW_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(FAST_ENV)
    env.update(extra)
    return env


def _workspace(tmp_path: Path, small_data: Path) -> Path:
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "data").symlink_to(small_data, target_is_directory=True)
    return ws


@pytest.mark.slow
@pytest.mark.postgres
def test_two_workers_share_one_study_and_one_parent_run(tmp_path: Path, small_data: Path,
                                                         postgres_url: str) -> None:
    ws = _workspace(tmp_path, small_data)
    env = _env(COLUMNS="200")
    study_name = "churn-two-workers"
    common = ["--storage", postgres_url, "--study", study_name, "--n-trials", "2", "--no-progress"]
    leader = subprocess.Popen(CHURN + ["--workspace", str(ws), "train", *common, "--wait", "240"],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    workers: list[subprocess.Popen] = []
    try:
        deadline = time.monotonic() + 180
        while True:  # the leader creates the study and publishes its parent run
            try:
                found = optuna.load_study(study_name=study_name, storage=study_storage(postgres_url))
                if "parent_run_id" in found.user_attrs:
                    break
            except KeyError:
                pass
            assert leader.poll() is None, leader.communicate()
            assert time.monotonic() < deadline, "the leader never created the study"
            time.sleep(0.5)
        workers = [subprocess.Popen(CHURN + ["--workspace", str(ws), "train", "--worker", *common,
                                             "--wait", "120"],
                                    cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True) for _ in range(2)]
        outputs = [p.communicate(timeout=400) for p in (leader, *workers)]
    finally:
        for p in (leader, *workers):
            if p.poll() is None:
                p.kill()
    for proc, (_out, err) in zip((leader, *workers), outputs, strict=True):
        assert proc.returncode == 0, err[-3000:]
    assert "registered churn-model version 1" in outputs[0][0]
    assert all("worker done" in out for out, _ in outputs[1:])

    study = optuna.load_study(study_name=study_name, storage=study_storage(postgres_url))
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 6
    assert all(t.state.is_finished() for t in trials)
    by_worker = {t.user_attrs["worker"] for t in trials}
    assert len(by_worker) == 3  # the leader's trials and each worker's

    parent_id = study.user_attrs["parent_run_id"]
    client = MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    parent = client.get_run(parent_id)
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    assert len(children) == 6
    assert {c.data.tags["worker"] for c in children} == by_worker
    assert {c.data.tags["optuna.trial"] for c in children} == {str(t.number) for t in trials}
    assert {c.data.tags["optuna.study"] for c in children} == {study_name}
    mv = client.get_model_version_by_alias("churn-model", "challenger")
    assert mv.tags["train_run_id"] == parent_id


@pytest.mark.slow  # among the slowest of make test-fast (a churn train process)
def test_worker_without_study_is_one_line_error(tmp_path: Path, small_data: Path) -> None:
    ws = _workspace(tmp_path, small_data)
    res = subprocess.run(CHURN + ["--workspace", str(ws), "train", "--worker", "--no-progress"],
                         cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "--storage" in lines[0]


def test_a_worker_waits_for_a_missing_study_not_for_a_broken_storage(tmp_path: Path) -> None:
    """Waiting for the leader is decided by the error's type: a study not created yet
    (NotFound) is waited for until the deadline; a storage that cannot be opened fails at once."""
    from mlflow_churn.errors import ChurnError, NotFound
    from mlflow_churn.training.tuning import make_study, wait_for_study

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    make_study("other", url, seed=0)  # the storage exists, the study asked for does not
    with pytest.raises(NotFound, match="no Optuna study 'leaderless'"):
        wait_for_study("leaderless", url, wait_seconds=0.0, poll=0.01)
    broken = f"sqlite:///{tmp_path / 'missing-dir' / 'optuna.db'}"
    with pytest.raises(ChurnError, match="cannot open Optuna storage") as caught:
        wait_for_study("leaderless", broken, wait_seconds=3600.0, poll=0.01)
    assert not isinstance(caught.value, NotFound)


@pytest.mark.slow
def test_mlflow_run_train_registers_challenger_with_5_nested_runs(tmp_path: Path) -> None:
    from datetime import date

    from mlflow_churn.data.simulator import SimulationSpec, simulate

    ws = tmp_path / "ws"
    simulate(SimulationSpec(customers=2000, days=110, start=date(2026, 1, 1), seed=3), ws / "data")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    res = subprocess.run(
        [sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", "train", "--env-manager", "local",
         "-P", "n_trials=5", "-P", f"workspace={ws}"],
        cwd=tmp_path, env=_env(MLFLOW_TRACKING_URI=uri), capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    client = MlflowClient(uri)
    mv = client.get_model_version_by_alias("churn-model", "challenger")
    parent = client.get_run(mv.tags["train_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags.get("mlflow.project.entryPoint") == "train"  # the project run is the parent
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 5
    assert parent.data.params["n_trials"] == "5"
    assert parent.data.tags["as_of"] == mv.tags["as_of"] == "2026-04-21T00:00:00+00:00"  # newest event
    assert "val_auc" in parent.data.metrics
