"""End to end on real simulated data: a data outage blocks, the CBPE estimate tracks the
realised AUC, training records the baselines, `mlflow run . -e monitor` works.

One stable dataset and one ``data_outage`` dataset from the same seed (identical before the
onset), one model trained on the stable data before the onset, one MLflow store.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, date, datetime
from pathlib import Path

import pytest
from mlflow import MlflowClient

from mlflow_churn.config import load_config
from mlflow_churn.data.simulator import SimulationSpec, simulate
from mlflow_churn.monitoring.monitor import monitor
from mlflow_churn.registry.aliases import move_alias
from mlflow_churn.training.train import train

ROOT = Path(__file__).resolve().parents[1]
START = date(2026, 1, 1)
TRAIN_AS_OF = datetime(2026, 4, 20, tzinfo=UTC)  # day 109: two weekly cutoffs with 60 days of history
ONSET = 116  # 2026-04-27
OVERRIDES = {"training.n_trials": 1, "monitoring.min_segment_size": 100, "monitoring.early_min_churners": 5}


def _spec(scenario: str) -> SimulationSpec:
    return SimulationSpec(customers=2000, days=150, start=START, seed=5, scenario=scenario, onset_day=ONSET)


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory):
    """(stable config, outage config): same MLflow store, champion trained on the stable data."""
    root = tmp_path_factory.mktemp("integrity")
    simulate(_spec("stable"), root / "stable" / "data")
    simulate(_spec("data_outage"), root / "outage" / "data")
    stable = load_config(workspace=root / "stable", environ={}, overrides=OVERRIDES)
    outage = load_config(workspace=root / "outage", environ={},
                         overrides={**OVERRIDES, "tracking_uri": stable.mlflow_tracking_uri})
    res = train(stable, TRAIN_AS_OF, n_trials=1, progress=False)
    move_alias(MlflowClient(stable.mlflow_tracking_uri), stable.training.model_name, "champion", res.version)
    return stable, outage, res


def test_training_records_the_monitoring_baselines(stores) -> None:
    stable, _, res = stores
    client = MlflowClient(stable.mlflow_tracking_uri)
    mv = client.get_model_version(stable.training.model_name, res.version)
    metrics = client.get_run(res.run_id).data.metrics
    for key in ("val_auc_unselected", "val_auc_7d"):
        assert float(mv.tags[key]) == pytest.approx(metrics[key], abs=1e-6)
        assert 0.5 < metrics[key] < 1 and 0 < metrics[f"{key}_se"] < 0.2
    assert metrics["val_churners_7d"] >= 5 and metrics["val_auc_se"] > 0
    from mlflow_churn.training.profile import profile_for_version

    profile = profile_for_version(client, stable.training.model_name, res.version)
    assert profile["calibration"]["method"] == "platt" and profile["calibration"]["positives"] > 0
    assert profile["sources"]["activity.data_used_mb"] == {"null_rate": 0.0, "rows": pytest.approx(
        profile["sources"]["activity.minutes_used"]["rows"])}


def test_data_outage_blocks_a_few_days_after_onset(stores) -> None:
    stable, outage, _ = stores
    as_of = datetime(2026, 4, 30, tzinfo=UTC)  # 3 outage days in the 7-day window
    broken = monitor(outage, as_of, report=False, log=False)
    assert broken.decision.action == "blocked", broken.decision.reasons
    assert "data_used_mb" in broken.decision.features
    assert any("source column 'activity.data_used_mb'" in r for r in broken.decision.reasons)
    # the feature alone would not have told: data_mb_30d only shrank
    assert broken.stats.null_rate["data_mb_30d"] < 0.05
    assert broken.stats.source_null_rate["activity.data_used_mb"] == pytest.approx(0.3, abs=0.05)
    healthy = monitor(stable, as_of, report=False, log=False)
    assert healthy.decision.action != "blocked", healthy.decision.reasons
    assert healthy.stats.source_null_rate["activity.data_used_mb"] == 0.0


def test_estimated_auc_tracks_the_realised_on_stable_data(stores) -> None:
    stable, _, res = stores
    as_of = datetime(2026, 5, 30, tzinfo=UTC)  # the matured cutoffs (Apr 24-30) follow training
    result = monitor(stable, as_of, report=False, log=False)
    s, perf = result.stats, result.performance
    assert s.realised_auc is not None and perf.matured_rows > 0
    # measured here: estimate 0.698, realised 0.710 (0.734 on customers never trained on)
    assert perf.estimated_auc == pytest.approx(s.realised_auc, abs=0.05)
    # the estimate of the raw scores is logged beside it (the Platt map's effect)
    assert 0.5 <= perf.uncalibrated_estimated_auc <= 1
    # baselines: the unselected validation AUC and the short-horizon one
    assert s.auc_baseline == pytest.approx(float(MlflowClient(stable.mlflow_tracking_uri).get_model_version(
        stable.training.model_name, res.version).tags["val_auc_unselected"]), abs=1e-6)
    assert s.auc_drop is not None and s.auc_drop_threshold > 0
    assert s.early_auc is not None and s.early_auc_drop_threshold > 0
    assert result.decision.action in ("ok", "investigate")


@pytest.mark.slow
def test_mlflow_run_monitor_entry_point(stores, tmp_path: Path) -> None:
    stable, _, res = stores
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHURN_", "MLFLOW_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["MLFLOW_TRACKING_URI"] = stable.mlflow_tracking_uri
    env["CHURN_MONITORING__MIN_SEGMENT_SIZE"] = "100"
    out = subprocess.run(
        [sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", "monitor", "--env-manager", "local",
         "--experiment-name", "churn-projects", "-P", f"workspace={stable.workspace}",
         "-P", "as_of=2026-04-30", "-P", "report=false"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    client = MlflowClient(stable.mlflow_tracking_uri)
    exp = client.get_experiment_by_name("churn-projects")
    runs = client.search_runs([exp.experiment_id])
    child = next(r for r in runs if r.data.tags.get("monitor.as_of", "").startswith("2026-04-30"))
    parent = client.get_run(child.data.tags["mlflow.parentRunId"])
    assert parent.info.status == "FINISHED" and child.data.tags["monitor.model_version"] == res.version
    assert {"decision.json", "psi_timeline.png"} <= {a.path for a in client.list_artifacts(child.info.run_id)}
    assert "decision:" in out.stdout
    # bad input: one line, exit 2
    bad = subprocess.run([sys.executable, "-m", "mlflow_churn.cli", "--workspace", str(stable.workspace),
                          "monitor", "--as-of", "2026-13-01", "--no-progress"],
                         env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert bad.returncode == 2 and "2026-13-01" in bad.stderr and "Traceback" not in bad.stderr
