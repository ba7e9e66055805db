"""``churn features materialize --engine spark``: the executors compute and write the batch.

What runs where:

- the driver holds the store's writer lock (as the local path does), checks the batch
  order, and starts one Spark job: :func:`~mlflow_churn.features.spark_frames.spark_latest`
  (the offline builder's query, transpiled) over the tables under ``data_dir`` (which every
  executor must be able to read);
- Redis: each partition opens its own connection to ``features.redis_url`` and writes its
  rows, encoded by the same :func:`~mlflow_churn.features.online.base.encode_rows` as the
  local path, in pipelines, under the NEW batch's key; it returns its row count and newest
  event time. The driver then records the batch and flips it live with the store's own
  :meth:`~mlflow_churn.features.online.redis.RedisStore.write_batch_by` (the same lock,
  staging and atomic swap). A failed job (an executor killed, Redis gone) drops the new
  batch's rows and leaves the serving batch as it was;
- SQLite is one local file with one writer: with a local master the rows are collected on
  the driver and written by the store as usual (and the offline snapshot too); a cluster
  master is refused.

The Redis path writes no offline snapshot (``churn score --engine spark`` computes its
features on Spark instead).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any

import pandas as pd

from mlflow_churn.errors import ChurnError, first_line
from mlflow_churn.features.definitions import FeatureDefinition
from mlflow_churn.features.online import BatchInfo, OnlineStore
from mlflow_churn.features.online.base import encode_rows, finish_batch
from mlflow_churn.features.online.redis import RedisStore, write_payloads
from mlflow_churn.features.snapshots import write_snapshot
from mlflow_churn.features.spark_frames import spark_latest, to_pandas
from mlflow_churn.spark import is_local_master

#: called in every partition before it writes (tests use it to kill a worker); None = nothing
PartitionHook = Callable[[], None] | None


_CAUSE = re.compile(r"^\s*(?::\s*)?(?:Caused by: )?([\w.$]+(?:Exception|Error)(?:: .*)?)$")


def spark_cause(exc: BaseException, limit: int = 240) -> str:
    """The most telling line of a Spark failure: the first ``...Exception: ...`` /
    ``...Error`` line of a Py4J error's Java trace (its first line only names the call),
    cut to ``limit`` characters."""
    text = str(exc)
    for line in text.splitlines()[1:]:
        found = _CAUSE.match(line)
        if found:
            return found.group(1)[:limit]
    return f"{type(exc).__name__}: {first_line(exc, limit)}"


def _partition_writer(url: str, rows_key: str, features: Sequence[str],
                      hook: PartitionHook) -> Callable[[Iterator[pd.DataFrame]], Iterator[pd.DataFrame]]:
    """The function each partition runs (``mapInPandas``): write its rows to ``rows_key`` over
    its own Redis connection; yield (rows, newest event time) per Arrow batch."""
    names = list(features)

    def write(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        import redis

        client = redis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=5)
        try:
            for pdf in batches:
                if hook is not None:
                    hook()
                times = pd.to_datetime(pdf["event_time"])
                pdf["event_time"] = times.dt.tz_localize("UTC") if times.dt.tz is None else times
                n = write_payloads(client, rows_key, encode_rows(pdf, names))
                yield pd.DataFrame({"rows": [n], "newest": [pdf["event_time"].max() if n else pd.NaT]})
        finally:
            client.close()

    return write


def _newest(value: Any) -> datetime | None:
    if value is None or pd.isna(value):
        return None
    ts = pd.Timestamp(value)
    return (ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")).to_pydatetime()


def _executors_write(spark: Any, cfg: Any, store: RedisStore, features: list[FeatureDefinition],
                     info: BatchInfo, force: bool, hook: PartitionHook) -> BatchInfo:
    sdf = spark_latest(spark, cfg.data_dir, features, info.as_of)
    cols = ["customer_id", "event_time", *info.features]

    def write_rows(rows_key: str) -> BatchInfo:
        writer = _partition_writer(store.url, rows_key, info.features, hook)
        try:
            parts = sdf.select(*[f"`{c}`" for c in cols]).mapInPandas(
                writer, "rows long, newest timestamp").collect()
        except Exception as exc:  # noqa: BLE001 - any Spark / executor failure: one line
            raise ChurnError(
                f"materialize on Spark failed ({spark_cause(exc)}); batch "
                f"{info.batch_id} was not published, the serving batch is unchanged; re-run "
                "`churn features materialize --engine spark`") from None
        rows = sum(int(p["rows"]) for p in parts)
        stamps = [_newest(p["newest"]) for p in parts]
        watermark = max((s for s in stamps if s is not None), default=None)
        return finish_batch(replace(info, watermark=watermark, updated_rows=rows), rows)

    return store.write_batch_by(info, write_rows, allow_older=force)


def write_batch_on_spark(spark: Any, master: str, cfg: Any, store: OnlineStore,
                         features: list[FeatureDefinition], info: BatchInfo, force: bool,
                         hook: PartitionHook = None) -> BatchInfo:
    """Compute ``features`` at ``info.as_of`` on ``spark`` and publish them as batch ``info``
    (rows and watermark filled in) in ``store``; call with the store's writer lock held."""
    if isinstance(store, RedisStore):
        return _executors_write(spark, cfg, store, features, info, force, hook)
    if not is_local_master(master):
        raise ChurnError(
            f"the {store.location} online store is one local SQLite file with one writer; "
            f"materialize --engine spark on --spark-master {master} needs "
            "features.online_backend: redis (or use --spark-master local[*])")
    frame = to_pandas(spark_latest(spark, cfg.data_dir, features, info.as_of))
    frame = frame.sort_values("customer_id", ignore_index=True)
    newest = frame["event_time"].max() if len(frame) else None
    info = replace(info, rows=len(frame), updated_rows=len(frame), watermark=_newest(newest))
    write_snapshot(cfg.feature_snapshot_dir, frame, info.as_of, features, info.batch_id,
                   cfg.features.snapshot_keep_days)
    return store.write_batch(frame, info, allow_older=force)


__all__ = ["PartitionHook", "spark_cause", "write_batch_on_spark"]
