"""Every test that needs PostgreSQL, Redis, Chromium or Spark carries its marker (so
``-m "not postgres"`` and the like select what a machine can run; docs/development.md): by a
fixture of ``conftest.SERVICE_FIXTURES`` (marked at collection) or by its own mark."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from conftest import SERVICE_FIXTURES

TESTS = Path(__file__).resolve().parent

#: what in a test's own source reaches a service without a fixture
REACHES = {
    "postgres": re.compile(r"\bpg_database\(|\bcreate_database\(|@127\.0\.0\.1:5432"),
    "redis": re.compile(r"\bredis\.(?:Redis|from_url)\(|127\.0\.0\.1:6379"),
    "chromium": re.compile(r"\bwebdriver\.|\bCHROMIUM\b"),
    "spark": re.compile(r"spark_master=\"local|SparkSession\.builder"),
}


def _marks(decorators: list[ast.expr]) -> set[str]:
    """Names of ``pytest.mark.<name>`` in ``decorators`` (or a ``pytestmark`` value)."""
    found = set()
    for node in decorators:
        for sub in ast.walk(node):
            if isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Attribute) \
                    and sub.value.attr == "mark":
                found.add(sub.attr)
    return found


def _unmarked(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    module_marks = set()
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "pytestmark" for t in node.targets):
            module_marks |= _marks([node.value])
    out = []
    for node in tree.body:
        if not (isinstance(node, ast.FunctionDef) and node.name.startswith("test_")):
            continue
        source = ast.get_source_segment(path.read_text(), node) or ""
        marks = module_marks | _marks(node.decorator_list)
        marks |= {SERVICE_FIXTURES[a.arg] for a in node.args.args if a.arg in SERVICE_FIXTURES}
        out += [f"{path.name}::{node.name} needs @pytest.mark.{service}"
                for service, pattern in REACHES.items() if pattern.search(source) and service not in marks]
    return out


def test_every_test_reaching_a_service_carries_its_marker() -> None:
    assert [m for f in sorted(TESTS.glob("test_*.py")) for m in _unmarked(f)] == []


def test_service_markers_are_registered() -> None:
    text = (TESTS.parent / "pyproject.toml").read_text()
    for marker in {*REACHES, "slow"}:
        assert f'"{marker}: ' in text, marker


@pytest.mark.parametrize("fixture", sorted(SERVICE_FIXTURES))
def test_service_fixtures_exist(fixture: str) -> None:
    """The fixtures the collection hook marks by are still conftest's (a renamed one would
    silently stop marking)."""
    import conftest

    assert getattr(conftest, fixture, None) is not None
