"""Feature SQL on Spark: the definitions' DuckDB SQL transpiled (sqlglot) and run on Spark
local[2] gives the same values, online batches and scores as the DuckDB engine."""

from __future__ import annotations

import math
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from mlflow_churn.errors import ChurnError
from mlflow_churn.features.definitions import FeatureDefinition
from mlflow_churn.features.offline import validate_definitions
from mlflow_churn.features.sandbox import ALLOWED_FUNCTIONS
from mlflow_churn.features.spark_sql import (
    SPARK_FUNCTIONS,
    SPARK_REFUSED,
    spark_problem,
    to_spark,
    unmapped_functions,
)

AS_OF = datetime(2026, 4, 20, tzinfo=UTC)
_AGGREGATES = {"sum", "avg", "mean", "count", "count_star", "min", "max", "stddev", "stddev_samp",
               "stddev_pop", "variance", "var_samp", "var_pop", "count_if", "bool_and", "bool_or",
               "corr", "covar_pop", "covar_samp", "arg_max", "arg_min", "max_by", "min_by",
               "regr_slope", "regr_intercept", "regr_r2", "regr_count"}


def _plain(v):
    """A comparable Python value of a cell from either engine."""
    if v is None or v is pd.NA or v is pd.NaT or (isinstance(v, float) and math.isnan(v)):
        return None
    if isinstance(v, date) and not isinstance(v, datetime):
        return pd.Timestamp(v).tz_localize("UTC")
    if isinstance(v, Decimal | np.floating | float):
        return float(v)
    if isinstance(v, np.integer | np.bool_):
        return v.item()
    if isinstance(v, pd.Timestamp):
        return v.tz_localize("UTC") if v.tzinfo is None else v.tz_convert("UTC")
    if isinstance(v, datetime):
        return pd.Timestamp(v).tz_localize("UTC") if v.tzinfo is None else pd.Timestamp(v)
    return v


def _same(a, b) -> bool:
    a, b = _plain(a), _plain(b)
    if isinstance(a, float) or isinstance(b, float):
        if a is None or b is None:
            return a is None and b is None
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def test_every_allowed_function_is_mapped_or_refused() -> None:
    assert unmapped_functions() == []
    assert not set(SPARK_FUNCTIONS) & set(SPARK_REFUSED)
    assert set(SPARK_FUNCTIONS) <= ALLOWED_FUNCTIONS


@pytest.mark.parametrize("expression, source, named", [
    ("log(monthly_charge)", "customers", "function log cannot run on Spark"),
    ("dayofweek(signup_date)", "customers", "function dayofweek cannot run on Spark"),
    ("CAST(age AS HUGEINT)", "customers", "cast to HUGEINT has no Spark equivalent"),
    ("any_value(sessions)", "activity", "function any_value cannot run on Spark: not deterministic"),
])
def test_a_duckdb_only_definition_is_refused_at_registration(expression: str, source: str,
                                                             named: str) -> None:
    definition = FeatureDefinition(name="odd", version=1, dtype="float64", description="x",
                                   source=source, expression=expression,
                                   window_days=7 if source == "activity" else None)
    assert named in spark_problem(expression, source)
    with pytest.raises(ChurnError) as err:
        validate_definitions([definition], "defs.yaml")
    msg = str(err.value)
    assert "\n" not in msg and "feature 'odd' (v1, source " in msg and named in msg, msg


@pytest.fixture(scope="module")
def sample_tables(small_data: Path) -> dict[str, pd.DataFrame]:
    """40 customers (with a cutoff column) and their activity in the 30 days before AS_OF."""
    customers = pq.read_table(small_data / "customers.parquet").to_pandas().head(40)
    customers["cutoff"] = pd.Timestamp(AS_OF)
    con = duckdb.connect()
    act = con.execute(
        f"SELECT * EXCLUDE (date) FROM read_parquet('{small_data}/activity/*/*.parquet', "
        "hive_partitioning = true) WHERE customer_id <= 40 AND date > DATE '2026-03-20' "
        "AND date <= DATE '2026-04-20'").df()
    con.close()
    act["event_timestamp"] = pd.to_datetime(act["event_timestamp"], utc=True)
    return {"customers": customers, "activity": act}


def _engines_disagree(con, spark, fns: list[str], source: str) -> list[str]:
    """The functions of ``fns`` whose samples differ between DuckDB ``con`` and ``spark``,
    all samples in one query per engine (one by one only to name a failing one)."""
    group = " GROUP BY customer_id" if source == "activity" else ""
    cols = ", ".join(f'({SPARK_FUNCTIONS[fn]}) AS "v{i}"' for i, fn in enumerate(fns))
    sql = f"SELECT customer_id, {cols} FROM {source}{group} ORDER BY customer_id"
    try:
        local = con.execute(sql).df()
        remote = spark.sql(to_spark(sql)).toPandas()
    except Exception as exc:  # noqa: BLE001 - narrowed down below, naming the function
        if len(fns) == 1:
            return [f"{fns[0]}: {type(exc).__name__} {str(exc).splitlines()[0][:160]}"]
        return [w for fn in fns for w in _engines_disagree(con, spark, [fn], source)]
    wrong = []
    for i, fn in enumerate(fns):
        bad = [(a, b) for a, b in zip(local[f"v{i}"], remote[f"v{i}"], strict=True) if not _same(a, b)]
        if bad or len(local) != len(remote):
            wrong.append(f"{fn}: {SPARK_FUNCTIONS[fn]} gives {bad[:2]} (DuckDB, Spark)")
    return wrong


@pytest.mark.spark
def test_every_spark_function_evaluates_equal_on_both_engines(spark, sample_tables) -> None:
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    for name, frame in sample_tables.items():
        con.register(name, frame)
        spark.createDataFrame(frame).createOrReplaceTempView(name)
    wrong = []
    for source in ("customers", "activity"):
        fns = sorted(fn for fn in SPARK_FUNCTIONS if (fn in _AGGREGATES) == (source == "activity"))
        for fn in fns:
            assert spark_problem(SPARK_FUNCTIONS[fn], source) is None, fn
        wrong += _engines_disagree(con, spark, fns, source)
    con.close()
    assert wrong == [], "\n".join(wrong)
