"""The benchmarks (`make bench`) import against the current package: a renamed module or
function fails here, not only at the next `make bench`."""

from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.parametrize("script", sorted(p.stem for p in BENCH.glob("bench_*.py")))
def test_bench_imports_resolve(script: str) -> None:
    module = importlib.import_module(f"bench.{script}")
    for node in ast.walk(ast.parse((BENCH / f"{script}.py").read_text())):  # imports inside functions too
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mlflow_churn"):
            target = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(target, alias.name) or importlib.util.find_spec(
                    f"{node.module}.{alias.name}"), f"{module.__name__}: {node.module}.{alias.name}"
