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
    AGGREGATES,
    SPARK_FUNCTIONS,
    SPARK_REFUSED,
    filtered,
    spark_problem,
    to_spark,
    unmapped_functions,
)

AS_OF = datetime(2026, 4, 20, tzinfo=UTC)


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


def test_filtered_adds_the_window_to_every_aggregate_and_keeps_an_expressions_own_filter() -> None:
    assert filtered("sum(minutes_used) * 30.0 / count(*)", "age_days < 7") == (
        "SUM(minutes_used) FILTER(WHERE age_days < 7) * 30.0 / COUNT(*) FILTER(WHERE age_days < 7)")
    assert filtered("avg(sessions) FILTER (WHERE age_days >= 14)", "age_days < 60") == (
        "AVG(sessions) FILTER(WHERE (age_days >= 14) AND age_days < 60)")
    for fn in AGGREGATES:  # every aggregate a definition may call is found (mean is not a sqlglot AggFunc)
        assert filtered(SPARK_FUNCTIONS[fn], "age_days < 7").count("FILTER(WHERE age_days < 7)") == 1, fn
    for fn in set(SPARK_FUNCTIONS) - AGGREGATES:  # scalars are left alone
        assert "FILTER" not in filtered(SPARK_FUNCTIONS[fn], "age_days < 7"), fn


def _every_aggregate() -> list[FeatureDefinition]:
    """The built-in definitions and one window feature per aggregate sample (windows 7, 30, 60;
    numbers with and without a default)."""
    from mlflow_churn.features.registry import BUILTIN_FEATURES

    not_numbers = {"bool_and", "bool_or", "max"}  # max(event_timestamp)
    # arg_max & co. pick any row of a tie (minutes_used has many): ordered by time they have none
    by_time = {"arg_max", "arg_min", "max_by", "min_by"}
    extra = [FeatureDefinition(name=f"agg_{fn}", version=1, dtype="float64", description=fn,
                               source="activity",
                               expression=SPARK_FUNCTIONS[fn].replace("minutes_used", "event_timestamp")
                               if fn in by_time else SPARK_FUNCTIONS[fn],
                               window_days=(7, 30, 60)[i % 3],
                               default=0.0 if i % 2 and fn not in not_numbers else None)
             for i, fn in enumerate(sorted(AGGREGATES))]
    return [*BUILTIN_FEATURES, *extra]


def test_the_one_pass_query_gives_the_per_window_querys_values(small_data: Path) -> None:
    """DuckDB runs both forms of the builder's query (two cutoffs, event times): equal frames."""
    from mlflow_churn.features.offline import _connect, _feature_sql, _spine

    features, cuts = _every_aggregate(), [datetime(2026, 3, 8, tzinfo=UTC), AS_OF]
    con = _connect(small_data)
    try:
        _spine(con, cuts, None)
        frames = [con.execute(f"SELECT * FROM ({_feature_sql(features, cuts[0], cuts[-1], True, one_pass)}) "
                              "ORDER BY cutoff, customer_id").df() for one_pass in (False, True)]
    finally:
        con.close()
    assert len(frames[0]) > 4000 and frames[0]["agg_count_star"].isna().any()  # windows without rows
    pd.testing.assert_frame_equal(frames[1], frames[0], rtol=1e-9)


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
        fns = sorted(fn for fn in SPARK_FUNCTIONS if (fn in AGGREGATES) == (source == "activity"))
        for fn in fns:
            assert spark_problem(SPARK_FUNCTIONS[fn], source) is None, fn
        wrong += _engines_disagree(con, spark, fns, source)
    con.close()
    assert wrong == [], "\n".join(wrong)


@pytest.mark.slow  # ~15 s idle (60 s at load 14); latest values are also checked byte for byte below
def test_training_frame_and_latest_values_are_equal_on_both_engines(spark, small_data: Path) -> None:
    from mlflow_churn.features.offline import build_training_frame, compute_latest
    from mlflow_churn.features.registry import BUILTIN_FEATURES, load_registry
    from mlflow_churn.features.spark_frames import spark_latest, to_pandas, training_frame_on_spark

    fs = load_registry().feature_set("churn_default")
    cuts = [datetime(2026, 3, 8, tzinfo=UTC), datetime(2026, 3, 22, tzinfo=UTC)]
    local = build_training_frame(small_data, fs, cuts, 30)
    on_spark = training_frame_on_spark(spark, small_data, fs, cuts, 30)
    assert local["label"].sum() > 0 and len(local) > 4000
    pd.testing.assert_frame_equal(on_spark, local, rtol=1e-9)  # categories exact, dtypes equal
    latest = compute_latest(small_data, BUILTIN_FEATURES, AS_OF).frame
    remote = to_pandas(spark_latest(spark, small_data, BUILTIN_FEATURES, AS_OF))
    remote = remote.sort_values("customer_id", ignore_index=True)[list(latest.columns)]
    pd.testing.assert_frame_equal(remote, latest, rtol=1e-9)


def test_every_aggregate_in_a_window_is_equal_on_both_engines(spark, small_data: Path) -> None:
    """The Spark engine's one-pass query (FILTER on each aggregate) against DuckDB's
    per-window query, for every aggregate a definition may call, over 300 customers."""
    from mlflow_churn.features.offline import compute_latest
    from mlflow_churn.features.spark_frames import spark_latest, to_pandas

    features, ids = _every_aggregate(), list(range(1, 301))
    local = compute_latest(small_data, features, AS_OF, customer_ids=ids).frame
    remote = to_pandas(spark_latest(spark, small_data, features, AS_OF, customer_ids=ids))
    remote = remote.sort_values("customer_id", ignore_index=True)
    assert len(local) > 200 and list(remote.columns) == list(local.columns)
    wrong = [(col, i, a, b) for col in local.columns
             for i, (a, b) in enumerate(zip(local[col], remote[col], strict=True)) if not _same(a, b)]
    assert wrong == [], wrong[:5]


def test_materialize_on_spark_writes_the_local_batch_and_a_killed_executor_keeps_the_previous(
        spark, workspace: Path, small_data: Path, redis_url: str, redis_prefix: str,
        tmp_path: Path) -> None:
    import redis

    from mlflow_churn.config import load_config
    from mlflow_churn.features.materialize import materialize
    from mlflow_churn.features.online import open_store

    (workspace / "data").symlink_to(small_data, target_is_directory=True)

    def cfg(prefix: str):
        return load_config(workspace=workspace, environ={}, overrides={
            "features.online_backend": "redis", "features.redis_url": redis_url,
            "features.redis_prefix": prefix})

    local_cfg, spark_cfg = cfg(f"{redis_prefix}:local"), cfg(f"{redis_prefix}:spark")
    t1, t2 = datetime(2026, 4, 10, tzinfo=UTC), AS_OF
    local = materialize(local_cfg, t1, progress=False)
    first = materialize(spark_cfg, t1, progress=False, engine="spark", spark=spark)
    assert (first.rows, first.watermark, first.features, first.feature_hashes) == \
        (local.rows, local.watermark, local.features, local.feature_hashes)
    client = redis.Redis.from_url(redis_url)
    a = client.hgetall(f"{redis_prefix}:local:rows:{local.batch_id}")
    b = client.hgetall(f"{redis_prefix}:spark:rows:{first.batch_id}")
    assert len(a) == local.rows > 2000 and a == b  # the same payloads, byte for byte

    marker = tmp_path / "kill-one-worker"
    marker.write_text("once")
    path = str(marker)

    def kill_once() -> None:  # runs in a Python worker of an executor
        import os

        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        os._exit(17)

    with pytest.raises(ChurnError) as err:
        materialize(spark_cfg, t2, progress=False, engine="spark", spark=spark, partition_hook=kill_once)
    msg = str(err.value)
    assert "\n" not in msg and "the serving batch is unchanged" in msg, msg
    store, local_store = open_store(spark_cfg), open_store(local_cfg)
    try:
        assert store.current_batch().batch_id == first.batch_id
        assert store.get([1, 2, 3]) == local_store.get([1, 2, 3])  # still serves
        assert not [k for k in client.scan_iter(f"{redis_prefix}:spark:rows:*")
                    if not k.decode().endswith(first.batch_id)]  # the failed batch's rows dropped
        second = materialize(spark_cfg, t2, progress=False, engine="spark", spark=spark)
        assert store.current_batch().batch_id == second.batch_id and second.rows > 2000
    finally:
        store.close()
        local_store.close()
        client.close()


def test_sqlite_store_with_a_cluster_master_is_refused_in_one_line(spark, config, small_data: Path) -> None:
    from mlflow_churn.features.materialize import materialize

    (config.workspace / "data").symlink_to(small_data, target_is_directory=True)
    with pytest.raises(ChurnError) as err:
        materialize(config, datetime(2026, 4, 10, tzinfo=UTC), progress=False, engine="spark",
                    spark=spark, spark_master="spark://head:7077")
    msg = str(err.value)
    assert "\n" not in msg and "features.online_backend: redis" in msg and "spark://head:7077" in msg
