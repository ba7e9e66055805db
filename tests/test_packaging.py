"""Packaging: dependency lists agree, the MLproject is complete and `mlflow run` works."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _pyproject_deps() -> list[str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def test_conda_and_python_env_agree_with_pyproject() -> None:
    deps = sorted(_pyproject_deps())
    python_env = yaml.safe_load((ROOT / "python_env.yaml").read_text())
    assert sorted(python_env["dependencies"]) == deps
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())
    pip_deps = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    assert sorted(pip_deps) == deps
    assert any(d.startswith("mlflow>=3.17,<4") for d in deps)
    assert any(d.startswith("pandas") and "<3" in d for d in deps)


def test_every_entry_point_takes_a_workspace() -> None:
    project = yaml.safe_load((ROOT / "MLproject").read_text())
    assert project["name"] == "mlflow-churn"
    assert "simulate" in project["entry_points"]
    for name, entry in project["entry_points"].items():
        assert entry["parameters"]["workspace"]["default"] == "", name
        assert "--workspace {workspace}" in entry["command"], name


def test_readme_keeps_the_contract() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    commands = (ROOT / "docs" / "commands.md").read_text()  # the manual's command reference
    project = yaml.safe_load((ROOT / "MLproject").read_text())
    for name in project["entry_points"]:
        assert f"`{name}`" in commands, f"entry point {name} missing from the table in docs/commands.md"


def _files(data: Path) -> dict[str, str]:
    return {str(p.relative_to(data)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(data.rglob("*")) if p.is_file()}


@pytest.mark.slow  # among the slowest of make test-fast (mlflow run in a subprocess)
def test_mlflow_run_simulate(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHURN_", "MLFLOW_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    digests = []
    for ws in ("ws1", "ws2"):
        res = subprocess.run(
            [sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", "simulate", "--env-manager",
             "local", "-P", "customers=2000", "-P", "days=30", "-P", f"workspace={tmp_path / ws}"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
        )
        assert res.returncode == 0, res.stderr[-2000:]
        data = tmp_path / ws / "data"
        for table in ("customers.parquet", "churn_events.parquet", "manifest.json"):
            assert (data / table).is_file()
        assert len(list((data / "activity").glob("date=*/part-0.parquet"))) == 30
        digests.append(_files(data))
    assert digests[0] == digests[1]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp_ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(exp_ids)
    assert len(runs) == 2
    assert {r.data.params["customers"] for r in runs} == {"2000"}
    assert all(r.data.metrics["activity_rows"] > 0 for r in runs)
    assert all(r.info.status == "FINISHED" for r in runs)
