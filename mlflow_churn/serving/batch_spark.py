"""``churn score --engine spark``: score the batch features with ``mlflow.pyfunc.spark_udf``.

What runs where:

- the driver (the machine running ``churn score``) resolves the model and finally copies
  the score files Spark wrote back into the output partition; when materialize left an
  offline snapshot at exactly ``as_of`` it stages that snapshot's rows as Parquet under
  ``staging``;
- the Spark executors (``spark_master``: ``local[*]`` = this machine, or e.g.
  ``spark://host:7077``, ``yarn``) compute the features from the tables under
  ``<workspace>/data`` (the offline builder's query transpiled to Spark SQL:
  :mod:`mlflow_churn.features.spark_frames`; the data directory must be readable by every
  executor) or read the staged snapshot rows, score them with the
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
from mlflow_churn.features.spark_frames import spark_latest
from mlflow_churn.spark import Staging, session_for
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


def score_to_parquet(spark: Any, model_uri: str, fs: FeatureSet, frame: Any, as_of: datetime,
                     version: str, out: str) -> None:
    """Score ``frame`` (Spark: ``customer_id`` and the set's columns) with ``spark_udf`` and
    write Parquet with the batch output columns to the directory ``out`` (a Spark URI)."""
    from pyspark.sql import functions as F

    frame = score_frame_spark(spark, model_uri, fs, frame)
    as_of = utc(as_of, "as_of")
    scored = frame.select(
        F.col("customer_id").cast("long").alias("customer_id"),
        F.col("churn_probability"),
        F.lit(version).alias("model_version"),
        F.lit(as_of).cast("timestamp").alias("as_of"),  # aware datetime: converted as UTC
        F.lit(fs.hash).alias("feature_set_hash"),
    )
    scored.write.mode("overwrite").parquet(out)


def score_parquet_spark(spark: Any, model_uri: str, fs: FeatureSet, features_path: str,
                        as_of: datetime, version: str, out: str) -> None:
    """Score the model-input Parquet at ``features_path`` with ``mlflow.pyfunc.spark_udf``
    and write Parquet with the batch output columns to the directory ``out`` (Spark URIs)."""
    score_to_parquet(spark, model_uri, fs, spark.read.parquet(features_path), as_of, version, out)


def score_spark(spark: Any, master: str, staging: str | None, uri: str, fs: FeatureSet,
                batches: Iterable[pa.RecordBatch] | None, as_of: datetime, version: str, out: Path,
                on_batch: Callable[[int], None] | None, data_dir: Path | None = None) -> int:
    """Score with ``spark_udf`` on ``spark`` (default: a session on ``master``, started and
    stopped here) and copy the score files into the local directory ``out``; returns the rows
    scored. The features: ``batches`` (e.g. a snapshot's) staged under ``staging``, or, when
    ``batches`` is None, computed on Spark from the tables under ``data_dir``
    (:func:`~mlflow_churn.features.spark_frames.spark_latest`: executors, not the driver)."""
    stage = Staging(staging, master)
    try:
        if batches is not None:
            write_model_input(fs, batches, stage.path + "/features.parquet", on_batch, stage.fs)
        with session_for(spark, master, "churn-score") as session:
            if batches is None:
                frame = spark_latest(session, data_dir, fs.features, as_of, with_event_time=False)
                score_to_parquet(session, uri, fs, frame, as_of, version, stage.uri + "/scores")
            else:
                score_parquet_spark(session, uri, fs, stage.uri + "/features.parquet", as_of, version,
                                    stage.uri + "/scores")
        rows = 0
        for info in stage.fs.get_file_info(pafs.FileSelector(stage.path + "/scores")):
            if info.is_file and info.base_name.endswith(".parquet"):
                pafs.copy_files(info.path, str(out / info.base_name), source_filesystem=stage.fs,
                                destination_filesystem=pafs.LocalFileSystem())
                rows += pq.read_metadata(str(out / info.base_name)).num_rows
        if batches is None and on_batch is not None:
            on_batch(rows)
        return rows
    finally:
        stage.cleanup()
