"""The Python API: the loop's verbs importable from ``mlflow_churn`` with typed signatures, a
docstring and a dataclass result; the same functions the ``churn`` commands call; the top
level stays light to import. (The whole loop through this API runs in
tests/test_notebook.py: notebooks/walkthrough.ipynb.)"""

from __future__ import annotations

import dataclasses
import inspect
import re
import subprocess
import sys
import typing
import warnings
from datetime import date
from pathlib import Path

import pytest

import mlflow_churn

ROOT = Path(__file__).resolve().parents[1]

#: verb -> (the module whose function it is, the name there, the command module calling it)
VERBS = {
    "simulate": ("mlflow_churn.data.simulator", "simulate", "mlflow_churn/cli.py"),
    "materialize": ("mlflow_churn.features.materialize", "materialize", "mlflow_churn/features/cli.py"),
    "train": ("mlflow_churn.training.train", "train", "mlflow_churn/training/cli.py"),
    "gate": ("mlflow_churn.evaluation.evaluate", "gate", "mlflow_churn/evaluation/cli.py"),
    "monitor": ("mlflow_churn.monitoring.monitor", "monitor", "mlflow_churn/monitoring/cli.py"),
    "retrain": ("mlflow_churn.monitoring.retrain", "retrain", "mlflow_churn/monitoring/retrain_cli.py"),
    "promote": ("mlflow_churn.serving.transitions", "promote", "mlflow_churn/serving/cli.py"),
    "rollback": ("mlflow_churn.serving.transitions", "rollback", "mlflow_churn/serving/cli.py"),
    "score": ("mlflow_churn.serving.batch", "score_batch", "mlflow_churn/serving/batch_cli.py"),
}


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_verb_is_the_core_function_the_command_calls(verb: str) -> None:
    import importlib

    module, name, command_module = VERBS[verb]
    fn = getattr(mlflow_churn, verb)
    assert verb in mlflow_churn.__all__
    assert fn is getattr(importlib.import_module(module), name)
    source = (ROOT / command_module).read_text()
    assert re.search(rf"from {re.escape(module)} import [^\n]*\b{name}\b", source), \
        f"{command_module} calls {module}.{name}"
    assert (inspect.getdoc(fn) or "").strip(), f"{verb} has a docstring"
    hints = typing.get_type_hints(fn)
    params = [p for p in inspect.signature(fn).parameters if p not in ("self",)]
    assert all(p in hints for p in params), f"{verb}: every argument is typed"
    result = hints["return"]
    assert dataclasses.is_dataclass(result), f"{verb} returns a dataclass, not {result}"
    assert getattr(mlflow_churn, result.__name__) is result, f"{result.__name__} is exported too"


def test_evaluate_is_the_deprecated_name_of_gate() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = mlflow_churn.evaluate
    assert old is mlflow_churn.gate
    assert [w for w in caught if issubclass(w.category, DeprecationWarning) and "gate" in str(w.message)]
    assert "evaluate" not in mlflow_churn.__all__ and "evaluate" not in dir(mlflow_churn)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = mlflow_churn.nope


def test_import_and_a_light_verb_load_no_mlflow(tmp_path: Path) -> None:
    """``import mlflow_churn`` and ``simulate`` (a data verb) do not pay for MLflow / xgboost."""
    code = ("import sys, mlflow_churn; assert 'mlflow_churn.data' not in sys.modules; "
            "mlflow_churn.simulate, mlflow_churn.SimulationSpec, mlflow_churn.latest_as_of; "
            "heavy = [m for m in ('mlflow', 'sklearn', 'xgboost', 'evidently') if m in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr


def test_simulate_from_the_config(tmp_path: Path) -> None:
    """The spec ``churn simulate`` runs is the configuration's ``simulation`` section."""
    cfg = mlflow_churn.load_config(workspace=tmp_path / "ws", overrides={
        "simulation.customers": 300, "simulation.days": 20, "simulation.start": date(2026, 2, 1)})
    spec = mlflow_churn.SimulationSpec.from_config(cfg.simulation)
    assert (spec.customers, spec.days, spec.seed, spec.scenario) == (300, 20, 42, "stable")
    result = mlflow_churn.simulate(spec, cfg.data_dir)
    assert isinstance(result, mlflow_churn.SimulationResult) and result.customers == 300
    assert mlflow_churn.latest_as_of(cfg.data_dir).date() == date(2026, 2, 21)  # the end of day 20
