"""train(): nested trial runs, what the parent logs, registration with tags and alias,
reproducibility, and bad input (one line, exit 2, no version left behind)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from ports import free_port
from wait_support import wait_until

from mlflow_churn.config import ChurnConfig, load_config
from mlflow_churn.errors import ChurnError
from mlflow_churn.features.registry import registry_for
from mlflow_churn.tracking import setup_mlflow
from mlflow_churn.training.model import load_scorer, to_model_input
from mlflow_churn.training.train import prepare_window, registered_version, train

AS_OF = datetime(2026, 5, 1, tzinfo=UTC)
FAST = {"training.window_days": 21, "training.max_estimators": 40, "training.early_stopping_rounds": 10,
        "training.nthread": 1}
CHURN = [sys.executable, "-m", "mlflow_churn.cli"]


def _cfg(workspace: Path, small_data: Path, **extra: object) -> ChurnConfig:
    data = workspace / "data"
    if not data.exists():
        data.symlink_to(small_data, target_is_directory=True)
    return load_config(workspace=workspace, environ={}, overrides=FAST | extra)


@pytest.mark.slow  # among the slowest of make test-fast (a training)
def test_train_registers_a_tagged_challenger(workspace: Path, small_data: Path, register_version,
                                            capfd: pytest.CaptureFixture[str]) -> None:
    cfg = _cfg(workspace, small_data)
    result = train(cfg, AS_OF, n_trials=3, progress=False)
    # our log_model call filters MLflow's CloudPickle notice (training/model.py); nothing else does
    assert "CloudPickle" not in capfd.readouterr().err
    client = MlflowClient(cfg.mlflow_tracking_uri)
    fs = registry_for(cfg).feature_set("churn_default")

    mv = client.get_model_version_by_alias("churn-model", "challenger")
    assert str(mv.version) == result.version == "1"
    tags = mv.tags
    assert tags["feature_set"] == "churn_default" and tags["feature_set_hash"] == fs.hash
    assert tags["window_start"] == "2026-03-11T00:00:00+00:00" == result.window_start
    assert tags["window_end"] == "2026-03-25T00:00:00+00:00" == result.window_end
    assert tags["as_of"] == AS_OF.isoformat() and tags["horizon_days"] == "30"
    assert tags["train_run_id"] == result.run_id and tags["source"] == "simulator"
    assert tags["data_hash"] == result.data_hash and len(result.data_hash) == 64
    assert float(tags["val_auc"]) == pytest.approx(result.val_auc, abs=1e-6)
    assert 0.6 < result.val_auc <= 1.0

    parent = client.get_run(result.run_id)
    p = parent.data.params
    assert p["window_start"] == result.window_start and p["feature_set_hash"] == fs.hash
    assert p["as_of"] == AS_OF.isoformat() and p["data_hash"] == result.data_hash
    assert {f"best_{k}" for k in result.best_params} <= set(p)
    m = parent.data.metrics
    assert m["val_auc"] == pytest.approx(result.val_auc)
    assert 0 < m["val_pr_auc"] <= 1 and m["val_log_loss"] > 0
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{result.run_id}'")
    assert len(children) == 3
    assert all("val_auc" in c.data.metrics and "learning_rate" in c.data.params for c in children)
    assert {c.data.tags["optuna.trial"] for c in children} == {"0", "1", "2"}
    best_child = max(children, key=lambda c: c.data.metrics["val_auc"])
    assert best_child.data.params["max_depth"] == str(result.best_params["max_depth"])

    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"plots", "reference", "feature_set.json"} <= artifacts
    assert [a.path for a in client.list_artifacts(result.run_id, "plots")] == ["plots/feature_importance.png"]
    assert result.profile_logged
    from mlflow_churn.training.profile import profile_for_version

    profile = profile_for_version(client, "churn-model", result.version)
    assert json.dumps(profile)
    inputs = parent.inputs.dataset_inputs
    assert len(inputs) == 1 and inputs[0].dataset.name == f"churn_default-{result.data_hash[:12]}"

    # the logged model: pyfunc returns P(churn); the fast scorer agrees
    prep = prepare_window(cfg, AS_OF)
    model = mlflow.pyfunc.load_model("models:/churn-model@challenger")
    probs = model.predict(to_model_input(fs, prep.valid.head(200)))
    assert probs.shape == (200,) and ((probs >= 0) & (probs <= 1)).all() and probs.std() > 0
    scorer = load_scorer("models:/churn-model@challenger")
    np.testing.assert_allclose(scorer.predict_proba(prep.valid.head(200)), probs, rtol=1e-6)

    # a second training moves the alias to version 2
    again = train(cfg, AS_OF, n_trials=3, progress=False)
    assert again.version == "2"
    assert str(client.get_model_version_by_alias("churn-model", "challenger").version) == "2"

    # the register_version fixture (conftest.py) stands in for train() in many tests: the tags it
    # writes must be tags train() writes, in the same formats (test_quality is its own marker)
    fake = register_version(cfg, alias=None)
    fake_tags = {k: v for k, v in fake.tags.items() if k != "test_quality"}
    assert set(fake_tags) <= set(tags), sorted(set(fake_tags) - set(tags))
    for key in ("window_start", "window_end", "as_of"):
        assert datetime.fromisoformat(fake_tags[key]).tzinfo is not None
        assert datetime.fromisoformat(tags[key]).tzinfo is not None
    assert fake_tags["source"] == tags["source"] and fake_tags["horizon_days"] == tags["horizon_days"]
    assert fake_tags["feature_set_hash"] == tags["feature_set_hash"]


def test_same_seed_same_best_params_and_auc(tmp_path: Path, small_data: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    results = []
    for name in ("a", "b"):
        ws = tmp_path / name
        ws.mkdir()
        results.append(train(_cfg(ws, small_data), AS_OF, n_trials=3, progress=False))
    a, b = results
    assert a.best_params == b.best_params
    assert a.val_auc == b.val_auc and a.data_hash == b.data_hash
    assert [t.val_auc for t in a.trials] == [t.val_auc for t in b.trials]
    assert len({t.params["learning_rate"] for t in a.trials}) == 3  # the trials did explore


def test_failure_after_registration_deletes_the_version(config: ChurnConfig) -> None:
    setup_mlflow(config)
    client = MlflowClient(config.mlflow_tracking_uri)
    with mlflow.start_run() as run:
        mlflow.log_dict({"x": 1}, "model/MLmodel")
        source = f"runs:/{run.info.run_id}/model"
    with pytest.raises(ChurnError, match="alias step failed"):
        with registered_version(client, "churn-model", source, run.info.run_id, {"val_auc": "0.9"}) as mv:
            assert client.get_model_version("churn-model", mv.version).tags["val_auc"] == "0.9"
            raise ChurnError("alias step failed")
    assert client.search_model_versions("name = 'churn-model'") == []
    assert client.search_registered_models() == []


def _bad_table(tmp: Path, kind: str) -> Path:
    rng = np.random.default_rng(0)
    n = 60
    frame = pd.DataFrame({"id": range(n), "plan": rng.choice(["a", "b"], n),
                          "charges": rng.uniform(1, 9, n).round(2).astype(str),
                          "Churn": rng.choice(["Yes", "No"], n)})
    if kind == "single":
        frame["Churn"] = "No"
    if kind == "garbage":
        frame.loc[17, "charges"] = "n/a?"
    path = tmp / f"{kind}.csv"
    frame.to_csv(path, index=False)
    return path


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("missing_label", "label column 'Exited' is not in"),
        ("single_class", "single class"),
        ("garbage_numeric", "'n/a?'"),
        ("empty_window", "holds no cutoff"),
        ("as_of_after_data", "after the newest data"),
        ("unreachable_tracking", "cannot reach the MLflow tracking server"),
        ("as_of_with_table", "--as-of applies to the feature-store window"),
    ],
)
def test_bad_input_one_line_exit_2_no_version(tmp_path: Path, small_data: Path, case: str,
                                              needle: str) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "data").symlink_to(small_data, target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHURN_", "MLFLOW_"))}
    env.update({"COLUMNS": "200", "CHURN_TRAINING__MAX_ESTIMATORS": "20",
                "CHURN_TRAINING__WINDOW_DAYS": "21", "CHURN_TRAINING__NTHREAD": "1"})
    args = ["--workspace", str(ws), "train", "--n-trials", "2", "--no-progress"]
    if case == "missing_label":
        args += ["--table", str(_bad_table(tmp_path, "ok")), "--label", "Exited", "--id", "id"]
    elif case == "single_class":
        args += ["--table", str(_bad_table(tmp_path, "single")), "--label", "Churn", "--id", "id"]
    elif case == "garbage_numeric":
        args += ["--table", str(_bad_table(tmp_path, "garbage")), "--label", "Churn", "--id", "id"]
    elif case == "as_of_with_table":
        args += ["--table", str(_bad_table(tmp_path, "ok")), "--label", "Churn", "--as-of", "2026-04-01"]
    elif case == "empty_window":
        args += ["--as-of", "2026-03-20"]
    elif case == "as_of_after_data":
        args += ["--as-of", "2026-09-01"]
    else:
        # MLflow's own defaults (7 retries, 120 s timeout) would take minutes: the probe does not
        env["MLFLOW_TRACKING_URI"] = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    res = subprocess.run(CHURN + args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    # bad input exits 2; the tracking server not answering is an outage: 3
    assert res.returncode == (3 if case == "unreachable_tracking" else 2), res.stderr[-2000:]
    lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    assert needle in lines[0] and "Traceback" not in res.stderr
    db = ws / "mlflow.db"
    if db.exists():
        client = MlflowClient(f"sqlite:///{db}")
        assert client.search_model_versions() == []


@pytest.mark.slow
def test_sigint_during_training_ends_it_promptly_and_cleanly(tmp_path: Path, small_data: Path) -> None:
    """Ctrl-C while Optuna's trials fit XGBoost: `churn train` ends with "interrupted" and exit
    130 (Typer used to turn it into a silent 130), leaves no run RUNNING and registers no
    version. Three signals at random moments of the tuning. (The crash Python's own handler
    causes inside xgboost's ctypes callbacks is reproduced in test_demo_server.)"""
    import random
    import signal
    import time

    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "data").symlink_to(small_data, target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHURN_", "MLFLOW_"))}
    env.update({"CHURN_TRAINING__WINDOW_DAYS": "21", "CHURN_TRAINING__NTHREAD": "1"})
    db = ws / "mlflow.db"
    rng = random.Random(11)
    for attempt in range(3):
        args = ["--workspace", str(ws), "train", "--n-trials", "500", "--no-progress"]
        proc = subprocess.Popen(CHURN + args, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            wait_until(lambda: proc.poll() is not None or (db.exists() and any(  # noqa: B023 (this attempt's)
                (r.info.run_name or "").startswith("trial-") for r in _running_runs(db))), 600,
                "a tuning trial to run", interval=0.5)
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            time.sleep(rng.uniform(0.0, 2.0))
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
        assert proc.returncode == 130, (attempt, err[-3000:])
        # "interrupted" ends the command's own output; xgboost may still print an ignored
        # exception from DataIter.__del__ at interpreter exit (seen with two suites at once)
        assert "interrupted" in err.strip().splitlines(), err[-3000:]
        assert "Fatal Python error" not in err and "Segmentation fault" not in err, err[-3000:]
        assert _running_runs(db) == [], attempt
        assert MlflowClient(f"sqlite:///{db}").search_model_versions() == []


def _running_runs(db: Path) -> list:
    from mlflow_churn.tracking import sqlite_store_ready

    sqlite_store_ready(f"sqlite:///{db}")  # under the lock the command takes to create it
    client = MlflowClient(f"sqlite:///{db}")
    try:
        exps = [e.experiment_id for e in client.search_experiments()]
        if not exps:
            return []
        return list(client.search_runs(exps, "attributes.status = 'RUNNING'", max_results=100))
    except Exception:  # the store is being created by the command: ask again
        return []


def test_an_interrupt_is_not_replaced_by_a_failing_cleanup(config: ChurnConfig, monkeypatch) -> None:
    """Ctrl-C inside a run's block: ending the run FAILED may itself fail while the store settles
    what the signal cut short (seen as an SQLAlchemy autoflush error: exit 2 instead of 130).
    The cleanup is tried again, and the KeyboardInterrupt goes on either way; an ordinary
    error's failing cleanup still raises."""
    from mlflow.exceptions import MlflowException

    from mlflow_churn.tracking import client_run

    exp_id = setup_mlflow(config)
    client = MlflowClient(config.mlflow_tracking_uri)
    real = client.set_terminated
    failures = {"left": 1}

    def flaky(run_id, status=None, *args, **kwargs):
        if status == "FAILED" and failures["left"] > 0:
            failures["left"] -= 1
            raise MlflowException("(raised as a result of Query-invoked autoflush)")
        return real(run_id, status, *args, **kwargs)

    monkeypatch.setattr(client, "set_terminated", flaky)
    with pytest.raises(KeyboardInterrupt):
        with client_run(client, config, "interrupted", experiment_id=exp_id) as run_id:
            raise KeyboardInterrupt
    assert client.get_run(run_id).info.status == "FAILED"  # the second attempt ended it
    failures["left"] = 5
    with pytest.raises(KeyboardInterrupt):  # both attempts fail: still the interrupt
        with client_run(client, config, "interrupted twice", experiment_id=exp_id):
            raise KeyboardInterrupt
    failures["left"] = 1
    with pytest.raises(MlflowException, match="autoflush"):  # an ordinary error: as before
        with client_run(client, config, "failed", experiment_id=exp_id):
            raise ValueError("boom")
