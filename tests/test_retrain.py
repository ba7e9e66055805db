"""retrain: act on the newest monitoring decision (train + gate a challenger) or record a no-op."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from mlflow_churn.config import ChurnConfig, load_config
from mlflow_churn.monitoring.retrain import NOOP, RETRAINED, champion_decision, retrain
from mlflow_churn.registry.aliases import CHALLENGER, CHAMPION, alias_version, move_alias

AS_OF = datetime(2026, 5, 1, tzinfo=UTC)


@pytest.fixture
def cfg(workspace: Path) -> ChurnConfig:
    """Two Optuna trials, small early-stopping budget: the loop, not the model, is under test."""
    return load_config(workspace=workspace, environ={},
                       overrides={"training.n_trials": 2, "training.max_estimators": 60,
                                  "training.early_stopping_rounds": 10})


def _decision_json(client: MlflowClient, run_id: str, tmp: Path) -> dict:
    return json.loads(Path(client.download_artifacts(run_id, "decision.json", str(tmp))).read_text())


def test_noop_without_champion_or_decision(cfg: ChurnConfig, register_version, small_data: Path,
                                          tmp_path: Path) -> None:
    os.symlink(small_data, cfg.data_dir)
    first = retrain(cfg, AS_OF)  # an empty MLflow store: no model at all
    assert first.action == NOOP and first.train is None and first.gate is None
    assert "no champion" in first.reason and "--force" in first.reason
    champ = register_version(cfg, alias=CHAMPION)
    second = retrain(cfg, AS_OF)
    assert second.action == NOOP and second.champion_version == str(champ.version)
    assert f"no monitoring decision for champion v{champ.version}" in second.reason
    client = MlflowClient(cfg.mlflow_tracking_uri)
    run = client.get_run(second.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "retrain 2026-05-01"
    assert run.data.tags["decision"] == NOOP and run.data.tags["retrain.action"] == NOOP
    assert run.data.metrics["retrained"] == 0.0
    assert run.data.params["force"] == "False" and run.data.params["window_days"] == "30"
    saved = _decision_json(client, second.run_id, tmp_path)
    assert saved["action"] == NOOP and saved["reason"] == second.reason and saved["train"] is None
    # no challenger was trained: the registry still holds the fixture's version only
    assert len(client.search_model_versions(f"name = '{cfg.training.model_name}'")) == 1


@pytest.mark.slow
def test_force_trains_and_gates_then_ok_decision_is_a_noop(cfg: ChurnConfig, register_version,
                                                          tmp_path: Path) -> None:
    from mlflow_churn.monitoring.monitor import monitor

    champ = register_version(cfg, alias=CHAMPION)
    client = MlflowClient(cfg.mlflow_tracking_uri)
    result = retrain(cfg, AS_OF, force=True)
    assert result.action == RETRAINED and result.forced
    assert result.reason.startswith("forced") and f"champion v{champ.version}" in result.reason
    new = result.train.version
    assert new is not None and str(new) != str(champ.version)
    # the challenger is registered with training's tags on the latest window, and gated
    mv = client.get_model_version(cfg.training.model_name, str(new))
    assert str(alias_version(client, cfg.training.model_name, CHALLENGER).version) == str(new)
    assert mv.tags["as_of"].startswith("2026-05-01") and mv.tags["window_end"].startswith("2026-03-25")
    assert result.gate is not None and str(result.gate.challenger_version) == str(new)
    assert str(result.gate.champion_version) == str(champ.version)
    assert mv.tags.get("gate") == ("passed" if result.gate.passed else "rejected")
    # one parent run, with the training run (and its trials) and the gate run nested in it
    parent = client.get_run(result.run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["retrain.action"] == RETRAINED
    assert parent.data.tags["retrain.challenger_version"] == str(new)
    assert parent.data.metrics["retrained"] == 1.0
    assert parent.data.metrics["gate_passed"] == float(result.gate.passed)
    assert parent.data.metrics["val_auc"] == pytest.approx(result.train.val_auc)
    train_run = client.get_run(result.train.run_id)
    assert train_run.data.tags[MLFLOW_PARENT_RUN_ID] == result.run_id
    trials = client.search_runs([train_run.info.experiment_id],
                                f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{train_run.info.run_id}'")
    assert len(trials) == 2
    assert client.get_run(result.gate.run_id).data.tags[MLFLOW_PARENT_RUN_ID] == result.run_id
    saved = _decision_json(client, result.run_id, tmp_path)
    assert saved["train"]["version"] == str(new) and saved["gate"]["run_id"] == result.gate.run_id

    # the trained version becomes champion; its monitoring window on stable data says ok
    move_alias(client, cfg.training.model_name, CHAMPION, str(new))
    mon = monitor(cfg, AS_OF, report=False)
    assert mon.decision.action == "ok", mon.decision.reasons
    found = champion_decision(client, cfg.training.model_name, str(new), AS_OF)
    assert found["action"] == "ok" and found["run_id"] == mon.run_id
    versions = len(client.search_model_versions(f"name = '{cfg.training.model_name}'"))
    noop = retrain(cfg, AS_OF)
    assert noop.action == NOOP and noop.train is None
    assert f"'ok' at {AS_OF.isoformat()}" in noop.reason and mon.run_id in noop.reason
    assert noop.monitor_decision["run_id"] == mon.run_id
    assert len(client.search_model_versions(f"name = '{cfg.training.model_name}'")) == versions
    assert client.get_run(noop.run_id).data.tags["retrain.decision_run_id"] == mon.run_id
    # a decision after as_of is not visible to a replay of an earlier day
    earlier = datetime(2026, 4, 30, tzinfo=UTC)
    assert champion_decision(client, cfg.training.model_name, str(new), earlier) is None


@pytest.mark.slow  # among the slowest of make test-fast (mlflow run and churn processes)
def test_cli_noop_into_the_project_run_and_bad_input(cfg: ChurnConfig, register_version,
                                                     tmp_path: Path) -> None:
    register_version(cfg, alias=CHAMPION)
    client = MlflowClient(cfg.mlflow_tracking_uri)
    exp = client.get_experiment_by_name(cfg.training.experiment)
    project = client.create_run(exp.experiment_id, run_name="project-run")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHURN_", "MLFLOW_"))}
    env.update({"MLFLOW_RUN_ID": project.info.run_id, "MLFLOW_TRACKING_URI": cfg.mlflow_tracking_uri,
                "COLUMNS": "200"})
    cmd = [sys.executable, "-m", "mlflow_churn.cli", "--workspace", str(cfg.workspace), "retrain"]
    res = subprocess.run([*cmd, "--as-of", "2026-05-01", "--force-value", "false", "--no-progress"],
                         env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "noop" in res.stdout and "no monitoring decision" in res.stdout
    run = client.get_run(project.info.run_id)
    assert run.data.tags["retrain.action"] == NOOP and run.data.params["as_of"].startswith("2026-05-01")
    env.pop("MLFLOW_RUN_ID")
    for args, needle in ((["--as-of", "yesterday"], "yesterday"), (["--force-value", "maybe"], "maybe"),
                         (["--n-trials", "0"], "--n-trials")):
        res = subprocess.run([*cmd, *args, "--no-progress"], env=env, capture_output=True, text=True,
                             timeout=300, cwd=tmp_path)
        assert res.returncode == 2 and needle in res.stderr and "Traceback" not in res.stderr, res.stderr
