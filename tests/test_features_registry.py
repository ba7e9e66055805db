"""The feature registry: definitions compiled at load, refused redefinitions, definition hashes,
and DuckDB errors on the data turned into one-line ChurnErrors naming the feature."""

from __future__ import annotations

import shutil
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from mlflow_churn.errors import ChurnError
from mlflow_churn.features.offline import compute_latest, validate_definitions
from mlflow_churn.features.registry import BUILTIN_FEATURES, load_registry

T1 = datetime(2026, 3, 20, tzinfo=UTC)


def _yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "features.yaml"
    path.write_text(text)
    return path


def _feature(expression: str, source: str = "activity") -> str:
    window = "window_days: 7, " if source == "activity" else ""
    return (f"features:\n  - {{name: x, version: 1, dtype: float64, source: {source}, {window}"
            f"expression: \"{expression}\", description: d}}\n")


def test_builtin_definitions_compile() -> None:
    validate_definitions(BUILTIN_FEATURES, "the built-in registry")


@pytest.mark.parametrize(
    ("expression", "source", "needle"),
    [
        ("sum(nonexistent_col)", "activity", 'column "nonexistent_col" not found'),
        ("sum(", "activity", "Parser Error"),
        ("minutes_used", "activity", "GROUP BY"),  # an activity feature must aggregate
        ("nope * 2", "customers", 'column "nope" not found'),
    ],
)
def test_bad_expression_fails_at_load_naming_the_feature(tmp_path: Path, expression: str, source: str,
                                                         needle: str) -> None:
    path = _yaml(tmp_path, _feature(expression, source))
    with pytest.raises(ChurnError) as err:
        load_registry(path)
    msg = str(err.value)
    assert "\n" not in msg
    assert f"feature 'x' (v1, source {source}) in {path}" in msg
    assert f"expression '{expression}'" in msg and needle in msg
    usable = "minutes_used" if source == "activity" else "monthly_charge"
    assert "fix the expression" in msg and usable in msg  # the columns it could use


def test_good_user_definition_loads(tmp_path: Path) -> None:
    reg = load_registry(_yaml(tmp_path, _feature("avg(minutes_used) FILTER (WHERE age_days < 3)")))
    assert reg.get("x").expression.startswith("avg(")


@pytest.mark.parametrize("name", ["churn_default", "churn_v2"])
def test_yaml_cannot_redefine_a_builtin_feature_set(tmp_path: Path, name: str) -> None:
    path = _yaml(tmp_path, f"feature_sets:\n  - {{name: {name}, features: [plan, region]}}\n")
    with pytest.raises(ChurnError, match=f"feature set '{name}' .* would redefine the built-in set"):
        load_registry(path)


def test_yaml_set_errors_are_one_line(tmp_path: Path) -> None:
    dup = "feature_sets:\n  - {name: s, features: [plan]}\n  - {name: s, features: [region]}\n"
    with pytest.raises(ChurnError, match="feature set 's' is defined twice"):
        load_registry(_yaml(tmp_path, dup))
    with pytest.raises(ChurnError, match="has no 'name'"):
        load_registry(_yaml(tmp_path, "feature_sets:\n  - {features: [plan]}\n"))
    with pytest.raises(ChurnError, match="must be a list of mappings"):
        load_registry(_yaml(tmp_path, "features: [monthly_usage]\n"))
    with pytest.raises(ChurnError, match="defined twice; bump its version"):
        load_registry(_yaml(tmp_path, "features:\n  - {name: plan, version: 1, dtype: float64, "
                                      "source: customers, expression: age, description: d}\n"))


def test_definition_hash_follows_the_value_not_the_prose() -> None:
    f = load_registry().get("monthly_usage")
    assert replace(f, description="other words", owner="someone", tags=("x",)).hash == f.hash
    assert replace(f, expression="sum(minutes_used) + 1").hash != f.hash
    assert replace(f, window_days=28).hash != f.hash
    assert len({d.hash for d in BUILTIN_FEATURES}) == len(BUILTIN_FEATURES)


def test_duckdb_error_on_the_data_names_the_feature(tmp_path: Path, small_data: Path) -> None:
    """Data whose activity lacks a column the definitions use: a ChurnError, not a traceback."""
    data = tmp_path / "data"
    shutil.copytree(small_data, data)
    for part in (data / "activity").glob("date=*/part-0.parquet"):
        table = pq.read_table(part)
        pq.write_table(table.drop_columns(["support_calls"]), part)
    reg = load_registry()
    with pytest.raises(ChurnError) as err:
        compute_latest(data, reg.definitions(), T1)
    msg = str(err.value)
    assert "\n" not in msg and "feature 'support_calls_" in msg and f"the data at {data}" in msg
    assert 'column "support_calls" not found' in msg
