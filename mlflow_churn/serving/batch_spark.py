"""``churn score --engine spark``: score the batch features with ``mlflow.pyfunc.spark_udf``.

What runs where:

- the driver (the machine running ``churn score``) resolves the model, computes the
  features for every customer with DuckDB from ``<workspace>/data`` (the same streaming,
  spilling query as the local engine: one machine's work), writes them as Parquet into a
  fresh directory under ``staging``, and finally copies the score files Spark wrote back
  into the output partition;
- the Spark executors (``spark_master``: ``local[*]`` = this machine, or e.g.
  ``spark://host:7077``, ``yarn``) read the staged features, score them with the
  registered model (``spark_udf`` ships the model to them; ``env_manager="local"``, so
  their Python needs mlflow, xgboost, pandas and pyarrow) and write the scores, also
  under ``staging``.

``staging`` must be a directory both the driver (pyarrow) and every executor (Spark) can
open under the same name: a local path for ``local[*]``, a shared mount, ``hdfs://``, or
``s3://`` when Spark maps that scheme to S3A (``spark.hadoop.fs.s3.impl``). The default,
a local temporary directory, is refused for a non-local master. The run's directory under
``staging`` is deleted afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from mlflow_churn.features.registry import FeatureSet
from mlflow_churn.spark import Staging, spark_session
from mlflow_churn.times import utc


def write_model_input(fs: FeatureSet, batches: Iterable[pa.RecordBatch], path: str | Path,
                      on_batch: Callable[[int], None] | None = None,
                      filesystem: pafs.FileSystem | None = None) -> int:
    """Write ``customer_id`` + the pyfunc's input schema (strings, float64) to Parquet
    ``path`` (on ``filesystem``, default local); returns the rows written."""
    fields = [("customer_id", pa.int64())] + [
        (f.full_name, pa.string() if f.dtype == "category" else pa.float64()) for f in fs.features
    ]
    schema = pa.schema(fields)
    rows = 0
    with pq.ParquetWriter(str(path), schema, filesystem=filesystem) as writer:
        for batch in batches:
            if batch.num_rows == 0:
                continue
            cols = [pc.cast(batch.column(name), typ) for name, typ in fields]
            writer.write_batch(pa.RecordBatch.from_arrays(cols, schema=schema))
            rows += batch.num_rows
            if on_batch is not None:
                on_batch(batch.num_rows)
    return rows


def score_frame_spark(spark: Any, model_uri: str, fs: FeatureSet, frame: Any,
                      out_col: str = "churn_probability") -> Any:
    """``frame`` (a Spark DataFrame with the feature set's columns) plus ``out_col``, the model's
    P(churn) from ``mlflow.pyfunc.spark_udf`` (executors score; ``env_manager="local"``). The
    inputs are cast to the pyfunc's schema (strings for categories, doubles)."""
    import mlflow.pyfunc
    from pyspark.sql import functions as F

    udf = mlflow.pyfunc.spark_udf(spark, model_uri, result_type="double", env_manager="local")
    cols = [F.col(f.full_name).cast("string" if f.dtype == "category" else "double") for f in fs.features]
    return frame.withColumn(out_col, udf(*cols))


def score_parquet_spark(spark: Any, model_uri: str, fs: FeatureSet, features_path: str,
                        as_of: datetime, version: str, out: str) -> None:
    """Score the model-input Parquet at ``features_path`` with ``mlflow.pyfunc.spark_udf``
    and write Parquet with the batch output columns to the directory ``out`` (Spark URIs)."""
    from pyspark.sql import functions as F

    frame = score_frame_spark(spark, model_uri, fs, spark.read.parquet(features_path))
    as_of = utc(as_of, "as_of")
    scored = frame.select(
        F.col("customer_id").cast("long").alias("customer_id"),
        F.col("churn_probability"),
        F.lit(version).alias("model_version"),
        F.lit(as_of).cast("timestamp").alias("as_of"),  # aware datetime: converted as UTC
        F.lit(fs.hash).alias("feature_set_hash"),
    )
    scored.write.mode("overwrite").parquet(out)


def score_spark(spark: Any, master: str, staging: str | None, uri: str, fs: FeatureSet,
                batches: Iterable[pa.RecordBatch], as_of: datetime, version: str, out: Path,
                on_batch: Callable[[int], None] | None) -> int:
    """Stage the features under ``staging``, score them with ``spark_udf`` on ``spark``
    (default: a session on ``master``, started and stopped here) and copy the score files
    into the local directory ``out``. Returns the rows scored."""
    stage = Staging(staging, master)
    own = spark is None
    try:
        rows = write_model_input(fs, batches, stage.path + "/features.parquet", on_batch, stage.fs)
        if own:
            spark = spark_session(master, "churn-score")
        score_parquet_spark(spark, uri, fs, stage.uri + "/features.parquet", as_of, version,
                            stage.uri + "/scores")
        files = stage.fs.get_file_info(pafs.FileSelector(stage.path + "/scores"))
        for info in files:
            if info.is_file and info.base_name.endswith(".parquet"):
                pafs.copy_files(info.path, str(out / info.base_name), source_filesystem=stage.fs,
                                destination_filesystem=pafs.LocalFileSystem())
        return rows
    finally:
        if own and spark is not None:
            spark.stop()
        stage.cleanup()
