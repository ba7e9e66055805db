"""`mlflow run . -e evaluate --env-manager local` logs metrics, plots, the HTML drift report
and the decision, nested under the project run; `churn evaluate` errors are one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from mlflow_churn.registry.aliases import CANARY, alias_version

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _env(config) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHURN_", "MLFLOW_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["MLFLOW_TRACKING_URI"] = config.mlflow_tracking_uri
    return env


def test_mlflow_run_evaluate(config, register_version, tmp_path: Path) -> None:
    register_version(config, "bad", alias="champion")
    chal = register_version(config, "good", alias="challenger")
    res = subprocess.run(
        [sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", "evaluate", "--env-manager", "local",
         "--experiment-name", "churn-projects", "-P", f"workspace={config.workspace}",
         "-P", "as_of=2026-05-01"],
        cwd=tmp_path, env=_env(config), capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    client = MlflowClient(config.mlflow_tracking_uri)
    exp = client.get_experiment_by_name("churn-projects")
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if "gate_run_id" in r.data.tags)
    child = client.get_run(parent.data.tags["gate_run_id"])
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert child.info.status == "FINISHED" and parent.info.status == "FINISHED"
    assert parent.data.tags["gate"] == "passed" and parent.data.metrics["gate_passed"] == 1.0
    assert child.data.metrics["challenger_roc_auc"] > child.data.metrics["champion_roc_auc"]
    assert {"challenger_recall_at_k", "challenger_revenue_lift", "challenger_ece"} <= set(child.data.metrics)
    arts = {a.path for a in client.list_artifacts(child.info.run_id)}
    assert {"decision.json", "plots", "drift", "segments"} <= arts
    drift = {a.path for a in client.list_artifacts(child.info.run_id, "drift")}
    assert drift == {"drift/report.html", "drift/drift.json"}
    assert len(client.list_artifacts(child.info.run_id, "plots")) == 5
    assert alias_version(client, config.training.model_name, CANARY).version == chal.version
    assert "PASSED" in res.stdout


def test_cli_evaluate_errors_are_one_line(config, register_version) -> None:
    register_version(config, "good", alias=None)
    res = subprocess.run(
        [sys.executable, "-m", "mlflow_churn.cli", "--workspace", str(config.workspace), "evaluate",
         "--as-of", "2026-05-01"],
        env=_env(config), capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert lines[-1].startswith("error: model 'churn-model' has no version with alias 'challenger'")
    assert "Traceback" not in res.stderr
