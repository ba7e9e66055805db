"""Point-in-time feature frames on Spark: the DuckDB builder's own query, transpiled.

:func:`spark_training_frame` (many cutoffs, labels) and :func:`spark_latest` (one cutoff,
values for the online store) run the SQL of :mod:`mlflow_churn.features.offline`
(``_feature_sql``, the spine's ``_ALIVE`` condition, :func:`~mlflow_churn.features.offline.labelled_sql`)
transpiled to Spark SQL by :func:`mlflow_churn.features.spark_sql.to_spark`, over temp views
of the same Parquet tables (:func:`register_tables`), in its one-pass form (``one_pass``:
every window in one aggregation, so Spark reads the activity once; it would compute the
query's ``act`` CTE again for each window that reads it). Each output column is cast to the type
DuckDB gives it (read from the query compiled on empty tables: no data), so both engines
hand over the same values with the same types: the online payloads are byte-identical.

The executors read ``data_dir`` themselves: a local path for ``local[*]``, otherwise a
location every executor can open (a shared mount, ``hdfs://``, ``s3a://``).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd

from mlflow_churn.data.tables import TablePaths, register_empty_views
from mlflow_churn.errors import ChurnError, first_line
from mlflow_churn.features.definitions import FeatureDefinition, FeatureSet
from mlflow_churn.features.offline import (
    _ALIVE,
    _feature_sql,
    check_cutoffs,
    coerce_frame,
    frame_cutoffs,
    labelled_sql,
)
from mlflow_churn.features.sandbox import lock_down
from mlflow_churn.features.spark_sql import to_spark
from mlflow_churn.spark import is_local_master
from mlflow_churn.times import utc

#: DuckDB result type -> Spark SQL type (the casts that make both engines' columns alike)
_SPARK_TYPES = {
    "DOUBLE": "double", "FLOAT": "float", "BIGINT": "bigint", "INTEGER": "int", "SMALLINT": "smallint",
    "TINYINT": "tinyint", "BOOLEAN": "boolean", "VARCHAR": "string", "DATE": "date",
    "TIMESTAMP WITH TIME ZONE": "timestamp", "TIMESTAMP": "timestamp", "HUGEINT": "double",
    "UINTEGER": "bigint",  # regr_count
}


def _spark_type(duck: str) -> str:
    if duck.startswith("DECIMAL"):
        return "double"  # DuckDB hands decimals to pandas as float64
    try:
        return _SPARK_TYPES[duck]
    except KeyError:
        raise ChurnError(f"a feature query column has DuckDB type {duck}, which has no Spark type "
                         "here; cast the expression to DOUBLE, BIGINT or VARCHAR") from None


def _duckdb_types(sql: str) -> dict[str, str]:
    """Column -> DuckDB type of ``sql`` (over the spine and the tables) compiled on empty
    tables of the data layout: types only, no data read."""
    con = duckdb.connect()
    try:
        register_empty_views(con)
        con.execute("CREATE TEMP TABLE spine (customer_id BIGINT, cutoff TIMESTAMPTZ)")
        lock_down(con, (), {"TimeZone": "UTC"})
        return {d[0]: str(d[1]) for d in con.execute(f"DESCRIBE {sql}").fetchall()}
    except duckdb.Error as exc:
        raise ChurnError(f"the feature query does not compile: {first_line(exc)}") from None
    finally:
        con.close()


def _uri(path: Path | str) -> str:
    text = str(path)
    return text if "://" in text else f"file://{Path(text).resolve()}"


def register_tables(spark: Any, data_dir: Path | str) -> None:
    """Temp views ``customers``, ``activity`` (with its ``date`` partition column) and
    ``churn_events`` of the tables under ``data_dir`` on ``spark``."""
    paths = TablePaths(Path(data_dir))
    if "://" not in str(data_dir):
        paths.check()
    activity = _uri(Path(data_dir) / "activity")
    spark.read.parquet(_uri(paths.customers)).createOrReplaceTempView("customers")
    spark.read.option("basePath", activity).parquet(activity).createOrReplaceTempView("activity")
    spark.read.parquet(_uri(paths.churn_events)).createOrReplaceTempView("churn_events")


def _spine(spark: Any, cutoffs: Sequence[datetime], customer_ids: Sequence[int] | None) -> None:
    """Temp view ``spine(customer_id, cutoff)``: the customers alive at each cutoff."""
    cuts = pd.DataFrame({"cutoff": pd.to_datetime([utc(c, "cutoff") for c in cutoffs], utc=True)})
    spark.createDataFrame(cuts).createOrReplaceTempView("cutoffs_df")
    id_filter = ""
    if customer_ids is not None:
        ids = pd.DataFrame({"customer_id": pd.Series(list(customer_ids), dtype="int64")})
        spark.createDataFrame(ids).createOrReplaceTempView("ids_df")
        id_filter = "AND c.customer_id IN (SELECT customer_id FROM ids_df)"
    sql = (f"SELECT c.customer_id, k.cutoff FROM customers c CROSS JOIN cutoffs_df k "
           f"WHERE {_ALIVE} {id_filter}")
    spine = spark.sql(to_spark(sql))
    if len(cutoffs) == 1 and is_local_master(spark.sparkContext.master):
        # one process, one row per customer: the spine joins every activity row by hash in
        # memory instead of a shuffle and sort of the activity. Many cutoffs (training
        # frames) multiply the spine: not broadcast
        from pyspark.sql.functions import broadcast

        spine = broadcast(spine)
    spine.createOrReplaceTempView("spine")


def _run(spark: Any, sql: str) -> Any:
    """``sql`` (DuckDB dialect) on Spark, every column cast to DuckDB's type for it."""
    types = _duckdb_types(sql)
    frame = spark.sql(to_spark(sql))
    return frame.selectExpr(*[f"CAST(`{c}` AS {_spark_type(t)}) AS `{c}`" for c, t in types.items()])


def spark_training_frame(spark: Any, data_dir: Path | str, feature_set: FeatureSet,
                         cutoffs: Sequence[datetime], horizon_days: int, label: bool = True,
                         label_as_of: datetime | None = None,
                         customer_ids: Sequence[int] | None = None) -> Any:
    """:func:`~mlflow_churn.features.offline.build_training_frame`'s rows as a Spark
    DataFrame (raw values, unordered; :func:`training_frame_on_spark` coerces them): the
    same checks, the same query."""
    cuts = frame_cutoffs(cutoffs, horizon_days, label, label_as_of)
    check_cutoffs(Path(data_dir), feature_set.features, cuts)
    register_tables(spark, data_dir)
    _spine(spark, cuts, customer_ids)
    sql = _feature_sql(feature_set.features, cuts[0], cuts[-1], with_event_time=False, one_pass=True)
    if label:
        sql = labelled_sql(sql, horizon_days, label_as_of)
    return _run(spark, sql)


def training_frame_on_spark(spark: Any, data_dir: Path | str, feature_set: FeatureSet,
                            cutoffs: Sequence[datetime], horizon_days: int, label: bool = True,
                            label_as_of: datetime | None = None,
                            customer_ids: Sequence[int] | None = None) -> pd.DataFrame:
    """:func:`~mlflow_churn.features.offline.build_training_frame` computed on Spark: equal
    frame (same rows, order, columns and dtypes)."""
    raw = to_pandas(spark_training_frame(spark, data_dir, feature_set, cutoffs, horizon_days, label,
                                         label_as_of, customer_ids))
    raw = raw.sort_values(["cutoff", "customer_id"], ignore_index=True)
    return coerce_frame(raw, feature_set, label)


def spark_latest(spark: Any, data_dir: Path | str, features: Sequence[FeatureDefinition],
                 as_of: datetime, with_event_time: bool = True,
                 customer_ids: Sequence[int] | None = None) -> Any:
    """:func:`~mlflow_churn.features.offline.compute_latest`'s rows as a Spark DataFrame:
    ``customer_id``, ``event_time`` (with ``with_event_time``), the features (unordered)."""
    as_of = utc(as_of, "as_of")
    register_tables(spark, data_dir)
    _spine(spark, [as_of], customer_ids)
    sql = _feature_sql(features, as_of, as_of, with_event_time=with_event_time, one_pass=True)
    return _run(spark, sql).drop("cutoff")


def to_pandas(frame: Any) -> pd.DataFrame:
    """A Spark DataFrame as pandas with timestamps tz-aware UTC (the session's time zone)."""
    out = frame.toPandas()
    for col in out.columns:
        if pd.api.types.is_datetime64_any_dtype(out[col]) and out[col].dt.tz is None:
            out[col] = out[col].dt.tz_localize("UTC")
        if isinstance(out[col].dtype, pd.DatetimeTZDtype):
            out[col] = out[col].astype("datetime64[us, UTC]")  # DuckDB's resolution
    return out


__all__ = ["register_tables", "spark_latest", "spark_training_frame", "to_pandas",
           "training_frame_on_spark"]
