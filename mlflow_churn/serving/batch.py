"""Batch scoring of every customer at one instant: streaming, bounded memory, all cores.

``score_batch(cfg, as_of)`` computes the model's features for every customer alive at
``as_of`` with the offline builder's SQL (the same point-in-time query that builds
training frames: one cutoff, no label), streams them out of DuckDB as Arrow record
batches of ``batch_rows`` rows, scores each batch with the booster's ``inplace_predict``
on all cores and appends it to one Parquet file::

    <out_dir>/date=YYYY-MM-DD/part-0.parquet
        customer_id int64, churn_probability float64, model_version string,
        as_of timestamp[us, UTC], feature_set_hash string

Memory is bounded by DuckDB's ``memory_limit`` (it spills to a temporary directory
beyond it) plus a few batches in Python, whatever the number of customers. A partition
is written to a temporary name and renamed when complete, so readers never see half a
day; scoring the same day again replaces it.

``engine="spark"`` scores the same features through ``mlflow.pyfunc.spark_udf`` on a
Spark cluster (``spark_master``, default ``local[*]``), staged through a directory every
executor can read (:mod:`mlflow_churn.serving.batch_spark` says what runs where: the
executors compute the features with the offline builder's query transpiled to Spark SQL,
or read materialize's snapshot when one holds the model's definitions). Both engines give
the same probabilities (the pyfunc runs the same booster on the same values).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mlflow_churn.config import ChurnConfig
from mlflow_churn.data.tables import TablePaths, check_parquet_files
from mlflow_churn.errors import ChurnError, first_line
from mlflow_churn.features.offline import _connect, _feature_sql, _spine, _what, check_cutoffs
from mlflow_churn.features.registry import FeatureSet, registry_for
from mlflow_churn.features.sandbox import limited
from mlflow_churn.features.snapshots import Snapshot, find_snapshot, read_snapshot
from mlflow_churn.progress import ProgressArg, resolve
from mlflow_churn.registry.aliases import CHAMPION
from mlflow_churn.registry.aliases import model_uri as alias_uri
from mlflow_churn.spark import DEFAULT_SPARK_MASTER, check_staging
from mlflow_churn.times import utc
from mlflow_churn.tracking import server_failure, setup_mlflow
from mlflow_churn.training.model import Scorer, load_scorer

#: rows per Arrow record batch: large enough that per-batch overhead vanishes next to
#: ``inplace_predict``, small enough that a batch is ~20 MB of features
DEFAULT_BATCH_ROWS = 131_072
#: DuckDB memory cap while computing features; beyond it DuckDB spills to disk
DUCKDB_MEMORY_LIMIT = "2GB"
PART_FILE = "part-0.parquet"
ENGINES = ("local", "spark")

OUTPUT_SCHEMA = pa.schema([
    ("customer_id", pa.int64()),
    ("churn_probability", pa.float64()),
    ("model_version", pa.string()),
    ("as_of", pa.timestamp("us", tz="UTC")),
    ("feature_set_hash", pa.string()),
])
# what the writer is handed: the two constant string columns dictionary-encoded (one value,
# no per-row copies); without the Arrow schema stored, the file reads back as OUTPUT_SCHEMA
_WRITE_SCHEMA = pa.schema([
    f.with_type(pa.dictionary(pa.int32(), pa.string())) if f.name in ("model_version", "feature_set_hash")
    else f for f in OUTPUT_SCHEMA
])


@dataclass(frozen=True)
class ScoreResult:
    """What one batch-scoring run wrote.

    ``path`` is the date partition directory; ``seconds`` the wall time of feature
    computation + scoring + writing; ``rows_per_second`` = rows / seconds.
    """

    rows: int
    path: Path
    version: str | None
    seconds: float
    rows_per_second: float
    model_uri: str
    as_of: datetime
    engine: str
    feature_set_hash: str
    #: "snapshot" (materialize's offline snapshot at this as_of, same definitions) or "computed"
    features_from: str = "computed"


@dataclass
class FeatureStream:
    """Feature rows of every customer alive at ``as_of``: their count and an Arrow stream."""

    rows: int
    batches: Iterable[pa.RecordBatch]


@contextmanager
def stream_features(data_dir: Path, feature_set: FeatureSet, as_of: datetime,
                    batch_rows: int = DEFAULT_BATCH_ROWS,
                    memory_limit: str = DUCKDB_MEMORY_LIMIT) -> Iterator[FeatureStream]:
    """Stream ``feature_set``'s raw values at the single cutoff ``as_of`` as Arrow batches.

    The SQL is the offline builder's (``build_training_frame(..., label=False)`` with one
    cutoff: cheaper than ``compute_latest``, which also tracks each row's event time).
    Columns: ``customer_id``, ``cutoff`` and the set's columns, raw (strings for
    categoricals). Rows come in no particular order. Raises ChurnError for an ``as_of``
    outside the data or without a full feature window before it.
    """
    if batch_rows < 1:
        raise ChurnError(f"batch_rows must be >= 1, got {batch_rows}")
    as_of = utc(as_of, "as_of")
    if feature_set.from_table:
        raise ChurnError(
            f"feature set '{feature_set.name}' was inferred from a flat table; batch scoring "
            "computes features from the registry's definitions, so score that table directly"
        )
    check_cutoffs(data_dir, feature_set.features, [as_of])
    spill = tempfile.mkdtemp(prefix="churn-duckdb-")
    con = _connect(data_dir, {"memory_limit": memory_limit, "temp_directory": spill})
    try:
        _spine(con, [as_of], None)
        rows = int(con.execute("SELECT count(*) FROM spine").fetchall()[0][0])
        sql = _feature_sql(feature_set.features, as_of, as_of, with_event_time=False)
        # the stream is computed as it is read: the wall-clock limit covers the whole read
        # (features.query_timeout_seconds; 860,000 customers take ~13 s end to end)
        with limited(con, "batch scoring: " + _what(feature_set.features, data_dir)):
            yield FeatureStream(rows, con.sql(sql).to_arrow_reader(batch_rows))
    finally:
        con.close()
        shutil.rmtree(spill, ignore_errors=True)


@contextmanager
def _features(cfg: ChurnConfig, fs: FeatureSet, as_of: datetime, batch_rows: int,
              snapshot: Snapshot | None) -> Iterator[FeatureStream]:
    """The feature stream of ``score_batch``: ``snapshot``'s rows, else computed."""
    if snapshot is None:
        with stream_features(cfg.data_dir, fs, as_of, batch_rows) as stream:
            yield stream
        return
    with read_snapshot(snapshot, fs, batch_rows) as (rows, batches):
        yield FeatureStream(rows, batches)


@contextmanager
def _data_errors(data_dir: Path) -> Iterator[None]:
    """DuckDB / Arrow errors while reading the tables (a truncated or corrupt Parquet file)
    as a ChurnError naming the data directory."""
    import duckdb

    try:
        yield
    except (duckdb.Error, pa.ArrowException) as exc:
        raise ChurnError(f"cannot read the tables under {data_dir}: {first_line(exc)}; rewrite or remove "
                         "the damaged file") from None


def coerce_batch(feature_set: FeatureSet, batch: pa.RecordBatch | pa.Table) -> pd.DataFrame:
    """The model input of one Arrow batch, column-wise in Arrow compute (no Python loop
    per row): float64 numerics with NaN for nulls, categoricals with the set's fixed
    categories (values outside them become missing). Equal to ``feature_set.coerce`` of
    the same rows as a pandas frame."""
    names = set(batch.schema.names)
    missing = [c for c in feature_set.columns if c not in names]
    if missing:
        raise ChurnError(
            f"input lacks feature column(s) {', '.join(missing)} of feature set '{feature_set.name}'"
        )
    out: dict[str, Any] = {}
    for f in feature_set.features:
        col = batch.column(f.full_name)
        if isinstance(col, pa.ChunkedArray):
            col = col.combine_chunks()
        if f.dtype == "category":
            cats = list(f.categories or ())
            if pa.types.is_dictionary(col.type):
                col = col.dictionary_decode()
            if not pa.types.is_string(col.type) and not pa.types.is_large_string(col.type):
                col = pc.cast(col, pa.string())
            codes = pc.fill_null(pc.index_in(col, value_set=pa.array(cats, pa.string())), -1)
            out[f.full_name] = pd.Categorical.from_codes(codes.to_numpy(zero_copy_only=False),
                                                         categories=cats)
        else:
            try:
                values = pc.cast(col, pa.float64())
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                raise ChurnError(
                    f"feature '{f.full_name}' must be numeric, got Arrow type {col.type}"
                ) from None
            out[f.full_name] = values.to_numpy(zero_copy_only=False)
    return pd.DataFrame(out)


def _constant(value: str, n: int) -> pa.DictionaryArray:
    """``n`` copies of one string, dictionary-encoded (one value, ``n`` zero indices)."""
    indices = pa.array(np.zeros(n, dtype="int32"))
    return pa.DictionaryArray.from_arrays(indices, pa.array([value], pa.string()))


def score_stream(scorer: Scorer, batches: Iterable[pa.RecordBatch], as_of: datetime, path: Path,
                 version: str, on_batch: Callable[[int], None] | None = None) -> int:
    """Score every batch with ``scorer``'s booster and write the rows to Parquet ``path``.

    Each batch needs ``customer_id`` and the scorer's feature columns (raw values).
    ``version`` fills ``model_version``; ``on_batch(rows)`` is called after each batch.
    Returns the number of rows written. ``path`` is written even for zero rows.
    """
    fs = scorer.feature_set
    booster = scorer.booster
    booster.set_param({"nthread": os.cpu_count() or 1})
    as_of = utc(as_of, "as_of")
    as_of_us = round(as_of.timestamp() * 1_000_000)
    rows = 0
    # batch i is written by a second thread while batch i + 1 is scored (both release the GIL)
    with pq.ParquetWriter(str(path), _WRITE_SCHEMA, compression="snappy", store_schema=False) as writer, \
            ThreadPoolExecutor(1, thread_name_prefix="churn-score-writer") as pool:
        pending: Future | None = None
        for batch in batches:
            n = batch.num_rows
            if n == 0:
                continue
            x = coerce_batch(fs, batch)
            prob = np.asarray(booster.inplace_predict(x, predict_type="value", validate_features=False),
                              dtype="float64").reshape(-1)
            ids = pc.cast(batch.column("customer_id"), pa.int64())
            out = pa.RecordBatch.from_arrays([
                ids, pa.array(prob, pa.float64()), _constant(version, n),
                pa.array(np.full(n, as_of_us, dtype="int64")).cast(OUTPUT_SCHEMA.field("as_of").type),
                _constant(fs.hash, n),
            ], schema=_WRITE_SCHEMA)
            if pending is not None:
                pending.result()
            pending = pool.submit(writer.write_batch, out)
            rows += n
            if on_batch is not None:
                on_batch(n)
        if pending is not None:
            pending.result()
    return rows


def _resolve_model(cfg: ChurnConfig, model_uri: str | None) -> tuple[str, str | None]:
    """``(model_uri, registered version or None)``; default ``models:/<name>@champion``."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    uri = model_uri or alias_uri(cfg.training.model_name, CHAMPION)
    if not uri.startswith("models:/"):
        return uri, None
    ref = uri[len("models:/"):]
    client = MlflowClient()
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            return uri, str(client.get_model_version_by_alias(name, alias).version)
        name, _, tail = ref.partition("/")
        if tail.isdigit():
            return uri, tail
        with warnings.catch_warnings():  # stages are deprecated, still honoured
            warnings.simplefilter("ignore", FutureWarning)
            latest = client.get_latest_versions(name, stages=[tail] if tail else None)
        return uri, str(latest[0].version) if latest else None
    except MlflowException as exc:
        if server_failure(exc) is not None:
            raise  # an outage: the CLI names the tracking server (exit 3)
        first = first_line(exc)
        hint = ("; register a model and set the alias (e.g. `churn train`, then promote it), "
                "or pass --model-uri") if model_uri is None else ""
        raise ChurnError(f"cannot resolve model {uri}: {first[:200]}{hint}") from None


def _check_feature_set(cfg: ChurnConfig, fs: FeatureSet, uri: str) -> None:
    """The model's feature set must still be the registry's (same definitions, same hash)."""
    current = registry_for(cfg).feature_set(fs.name)
    if current.hash != fs.hash:
        raise ChurnError(
            f"model {uri} was trained on feature set '{fs.name}' with hash {fs.hash[:12]}, but the "
            f"registry's '{fs.name}' now has hash {current.hash[:12]}; retrain the model or restore "
            "the feature definitions"
        )


def _partition_dir(out_dir: Path, as_of: datetime) -> Path:
    """``<out_dir>/date=YYYY-MM-DD`` for ``as_of`` (UTC)."""
    return Path(out_dir) / f"date={utc(as_of, 'as_of').date().isoformat()}"


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move the complete ``tmp`` partition into place, replacing an older one."""
    old = None
    if final.exists():
        old = final.with_name(final.name + f".old-{os.getpid()}")
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def score_batch(
    cfg: ChurnConfig,
    as_of: datetime,
    model_uri: str | None = None,
    out_dir: Path | str | None = None,
    engine: Literal["local", "spark"] = "local",
    batch_rows: int = DEFAULT_BATCH_ROWS,
    progress: ProgressArg = None,
    spark: Any = None,
    spark_master: str | None = None,
    staging: str | None = None,
    recompute: bool = False,
) -> ScoreResult:
    """Score every customer alive at ``as_of`` and write ``<out_dir>/date=<as_of date>/``.

    The features come from materialize's offline snapshot at exactly ``as_of`` when one holds
    the model's definitions (:mod:`mlflow_churn.features.snapshots`; ``features_from`` says
    which), else, or with ``recompute``, they are computed from the tables.

    ``model_uri`` defaults to ``models:/<training.model_name>@champion``; ``out_dir`` to
    ``<workspace>/scores``. ``engine="spark"`` uses ``mlflow.pyfunc.spark_udf`` on
    ``spark`` (a SparkSession; default: one on ``spark_master``, default ``local[*]``,
    started and stopped here), staging features and scores under ``staging`` (a path or URI every executor
    can read; default a local temporary directory, local masters only):
    :mod:`mlflow_churn.serving.batch_spark`. ``progress`` (:mod:`mlflow_churn.progress`) is
    advanced in rows.
    """

    if engine not in ENGINES:
        raise ChurnError(f"engine must be one of {', '.join(ENGINES)}, got '{engine}'")
    if engine == "spark":

        spark_master = spark_master or DEFAULT_SPARK_MASTER
        check_staging(staging, spark_master)
    as_of = utc(as_of, "as_of")
    check_parquet_files(TablePaths(Path(cfg.data_dir)))  # a damaged table fails before the model loads
    setup_mlflow(cfg)
    uri, version = _resolve_model(cfg, model_uri)
    scorer = load_scorer(uri, version)
    fs = scorer.feature_set
    _check_feature_set(cfg, fs, uri)
    label = version or uri
    out = Path(out_dir) if out_dir else cfg.workspace / "scores"
    final = _partition_dir(out, as_of)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    except OSError as exc:
        raise ChurnError(f"cannot write scores under {out} ({exc.strerror or exc}); pass a writable "
                         "--out directory") from None
    start = time.perf_counter()
    try:
        snapshot = None if recompute else find_snapshot(cfg.feature_snapshot_dir, as_of, fs)
        source = "computed" if snapshot is None else "snapshot"
        if engine == "spark" and snapshot is None:  # features computed by the executors
            from mlflow_churn.serving.batch_spark import score_spark

            desc = f"scoring ({engine}, model {label}, features computed on Spark)"
            with resolve(progress)(desc, 1) as tick:
                rows = score_spark(spark, spark_master, staging, uri, fs, None, as_of, label, tmp,
                                   lambda _rows: tick(1), data_dir=Path(cfg.data_dir))
        else:
            with _data_errors(cfg.data_dir), _features(cfg, fs, as_of, batch_rows, snapshot) as stream:
                desc = f"scoring {stream.rows:,} customers ({engine}, model {label}, features {source})"
                with resolve(progress)(desc, stream.rows) as tick:
                    if engine == "local":
                        rows = score_stream(scorer, stream.batches, as_of, tmp / PART_FILE, label, tick)
                    else:
                        from mlflow_churn.serving.batch_spark import score_spark

                        rows = score_spark(spark, spark_master, staging, uri, fs, stream.batches, as_of,
                                           label, tmp, tick)
        _replace_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.perf_counter() - start
    return ScoreResult(rows=rows, path=final, version=version, seconds=seconds,
                       rows_per_second=rows / seconds if seconds > 0 else float("inf"),
                       model_uri=uri, as_of=as_of, engine=engine, feature_set_hash=fs.hash,
                       features_from=source)


def read_scores(out_dir: Path | str, as_of: datetime | None = None) -> pd.DataFrame:
    """Scores written by :func:`score_batch` (one day when ``as_of`` is given), any engine."""
    path = _partition_dir(Path(out_dir), as_of) if as_of is not None else Path(out_dir)
    if not path.exists():
        raise ChurnError(f"no scores at {path}; run `churn score` first")
    table = pq.read_table(str(path), schema=OUTPUT_SCHEMA if as_of is not None else None)
    return table.to_pandas()
