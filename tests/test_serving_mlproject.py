"""The serving entry points of the MLproject: every `canary` action's command line (as
MLflow renders it) parses, and `mlflow run . -e canary` (status, promote) and `-e score`
run for real, with the decision run and its evidence nested under the project run."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from mlflow.projects import _project_spec
from mlflow.tracking import MlflowClient
from serving_support import BATCH_AS_OF, signed_gate
from typer.testing import CliRunner

from mlflow_churn.cli import app
from mlflow_churn.serving.batch import read_scores
from mlflow_churn.serving.prediction_log import PredictionLog, PredictionRecord

ROOT = Path(__file__).resolve().parents[1]
PREFIX = ["python", "-m", "mlflow_churn.cli"]


@pytest.mark.parametrize("entry, params", [
    *[("canary", {"action": a}) for a in ("status", "evaluate", "auto", "promote", "rollback")],
    ("canary", {"action": "promote", "as_of": "2026-04-30", "since": "2026-03-01", "reason": "ok"}),
    ("score", {}), ("score", {"engine": "spark", "staging": "/tmp/x", "spark_master": "local[2]"}),
    ("compress", {"version": "3"}), ("compress", {"version": "3", "budget": "0.001"}),
])
def test_mlproject_command_lines_parse(entry: str, params: dict[str, str]) -> None:
    """What `mlflow run -e ENTRY` would execute is a valid `churn` command line (`--help`
    after it: click rejects an unknown option before the eager --help runs)."""
    command = _project_spec.load_project(str(ROOT)).get_entry_point(entry).compute_command(params, None)
    argv = shlex.split(command)
    assert argv[:3] == PREFIX
    res = CliRunner().invoke(app, [*argv[3:], "--help"])
    assert res.exit_code == 0, f"{command}\n{res.output}"


def _mlflow_run(config, tmp_path: Path, entry: str, env_extra: dict[str, str] | None = None,
                **params: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHURN_", "MLFLOW_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update({"MLFLOW_TRACKING_URI": config.mlflow_tracking_uri, "COLUMNS": "200", **(env_extra or {})})
    args = [sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", entry, "--env-manager", "local",
            "--experiment-name", "churn-projects", "-P", f"workspace={config.workspace}"]
    for key, value in params.items():
        args += ["-P", f"{key}={value}"]
    return subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_mlflow_run_canary_status_promote_and_score(config, register_version, tmp_path: Path) -> None:
    champ = signed_gate(config, register_version(config, alias="champion", seed=0))
    canary = signed_gate(config, register_version(config, alias="canary", seed=1))  # as the gate signs it
    log = PredictionLog(config.prediction_log_url)
    now = datetime.now(UTC)
    log.write([PredictionRecord(f"r{i}", i, canary if i % 2 else champ, "canary" if i % 2 else "champion",
                                0.1 + i / 1000, 2.0, "ok", now, BATCH_AS_OF) for i in range(1, 61)])
    log.close()

    res = _mlflow_run(config, tmp_path, "canary", action="status")
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"canary=v{canary}" in res.stdout and f"canary/v{canary}: 30" in res.stdout

    # promote needs a `promote` verdict: 30 canary predictions within every limit suffice here
    res = _mlflow_run(config, tmp_path, "canary", env_extra={"CHURN_SERVING__MIN_CANARY_SAMPLES": "20"},
                      action="promote", reason="through mlflow run")
    assert res.returncode == 0, res.stderr[-3000:]
    client = MlflowClient(config.mlflow_tracking_uri)
    aliases = client.get_registered_model(config.training.model_name).aliases
    assert {a: str(v) for a, v in aliases.items()} == {"champion": canary, "previous-champion": champ}
    exp = client.get_experiment_by_name("churn-projects")
    (promote,) = client.search_runs([exp.experiment_id], "tags.kind = 'canary-promote'")
    project = client.get_run(promote.data.tags["mlflow.parentRunId"])
    assert project.data.tags["mlflow.project.entryPoint"] == "canary"
    assert promote.data.metrics["canary_rows"] == 30 and promote.data.metrics["champion_rows"] == 30
    assert "score_psi" in promote.data.metrics and promote.data.tags["evidence"] == "promote"
    decision = json.loads(Path(client.download_artifacts(promote.info.run_id, "decision.json",
                                                         str(tmp_path))).read_text())
    assert decision["evidence"]["routes"]["canary"]["version"] == canary
    assert decision["evidence_error"] is None

    out = tmp_path / "scores"
    res = _mlflow_run(config, tmp_path, "score", as_of="2026-04-20", out=str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    scores = read_scores(out, BATCH_AS_OF.replace(month=4, day=20))
    assert len(scores) > 2000 and set(scores["model_version"]) == {canary}  # the new champion
    (score_run,) = client.search_runs([exp.experiment_id], "params.engine = 'local'")
    assert score_run.data.metrics["rows"] == len(scores)
