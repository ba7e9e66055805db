"""The monitoring window's counts on Spark (``churn monitor --engine spark``).

:func:`spark_window_counts` turns a Spark DataFrame of the window's rows (``customer_id``,
``cutoff``, the feature columns, a score column) into the same
:class:`~mlflow_churn.monitoring.window_drift.WindowCounts` the local engine computes;
:func:`~mlflow_churn.monitoring.window_drift.drift_from_counts` then gives the same
PSI / KS / chi-square / JS. Only counts reach the driver.

Two Spark jobs, each one pass over the rows:

- **Histograms and KS counts** (``mapInArrow``): every partition runs the local engine's own
  numpy code on its Arrow batches: :func:`~mlflow_churn.stats.drift.bin_index` per column,
  :func:`~mlflow_churn.stats.drift.grouped_counts` per (day) and per (segment value, day),
  :func:`~mlflow_churn.stats.drift.sample_le_counts` at the reference sample's points. The
  same functions on the same values give the same integers (no second implementation of
  the bins, the edges, NaN, +-inf or unseen categories). A partition returns its sums as
  (day, key, count) rows for its non-zero cells; Spark adds them up by (day, key). Per name
  (feature or score) the key space holds a (groups, bins + 1) block: group 0 all rows, then
  one group per known value of each segment column; bin column 0 the missing values.
  The KS counts (values <= each sample point, summed over partitions) follow the blocks.
- **Distinct customers** overall and per known segment value (a customer has one row per
  daily cutoff, so the effective sample sizes count customers, not rows): one row per
  customer (``groupBy``) with, per segment column, the bit set of the values it had
  (``bit_or``, one 64-bit word per 63 values), then one aggregation counts the customers
  and each bit.

Segment values become small integers once, in SQL, for both jobs: the profile's values by
position (as ``str(value)``, like the local engine's lookup), -1 for null and for a value the
profile lacks (the local engine has no reference for those segments and skips them).
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import Any

import numpy as np
import pandas as pd

from mlflow_churn.config import ChurnConfig
from mlflow_churn.monitoring.window_drift import SCORE, SegmentCounts, WindowCounts, segment_columns
from mlflow_churn.stats import drift
from mlflow_churn.stats.drift import ColumnKind

__all__ = ["spark_window_counts"]

ARROW_BATCH_ROWS = 200_000  # rows per Arrow batch to the counting workers (Spark's default: 10,000)
_WORD = 63  # segment values per bit-set word (a signed 64-bit integer)


def _block_offsets(bins: list[int], groups: int) -> list[int]:
    """Start of each name's (groups, bins + 1) block in the key space, and the end last."""
    return [0, *np.cumsum([groups * (b + 1) for b in bins]).tolist()]


def _column(batch: Any, name: str) -> pd.Series:
    """One column of an Arrow batch as the local engine's frame holds it (text as a
    pandas categorical, which :func:`~mlflow_churn.stats.drift.bin_index` maps by its codes)."""
    import pyarrow as pa

    col = batch.column(name)
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        col = col.dictionary_encode()
    return col.to_pandas()


def _count_partition(batches: Iterator[Any], entries: list[dict[str, Any]], cols: list[str],
                     seg_sizes: list[int], seg_skip: list[int | None], samples: list[np.ndarray],
                     ks_of: list[int]) -> Iterator[Any]:
    """``mapInArrow``: one partition's (day, key, count) rows (see the module doc). Batches hold
    ``__day`` (microseconds), the ``cols`` of ``entries`` and ``__s{j}`` segment codes;
    ``seg_skip[j]``: the entry that is segment column j itself (no per-segment counts)."""
    import pyarrow as pa

    groups = 1 + sum(seg_sizes)
    bins = [len(e["shares"]) for e in entries]
    offs = _block_offsets(bins, groups)
    per_day: dict[int, np.ndarray] = {}
    le = [np.zeros(s.size, dtype="int64") for s in samples]
    for batch in batches:
        if batch.num_rows == 0:
            continue
        day_codes, days = pd.factorize(batch.column("__day").to_numpy(zero_copy_only=False))
        nd = len(days)
        segs = [batch.column(f"__s{j}").to_numpy(zero_copy_only=False) for j in range(len(seg_sizes))]
        flat = np.zeros((nd, offs[-1]), dtype="int64")
        for i, (entry, col) in enumerate(zip(entries, cols, strict=True)):
            values = _column(batch, col)
            idx = drift.bin_index(entry, values) + 1  # 0: missing
            b = bins[i] + 1
            block = flat[:, offs[i]:offs[i + 1]].reshape(nd, groups, b)
            block[:, 0] = drift.grouped_counts(idx, day_codes, nd, b)
            start = 1
            for j, k in enumerate(seg_sizes):
                if seg_skip[j] != i and k:
                    codes = np.where(segs[j] >= 0, segs[j] * nd + day_codes, -1)
                    block[:, start:start + k] = drift.grouped_counts(idx, codes, k * nd, b).reshape(
                        k, nd, b).transpose(1, 0, 2)
                start += k
            if i in ks_of:
                q = ks_of.index(i)
                le[q] += drift.sample_le_counts(samples[q], values)[0]
        for d, day in enumerate(days.tolist()):
            if day in per_day:
                per_day[day] += flat[d]
            else:
                per_day[day] = flat[d]
    day_col, key_col, n_col = [], [], []
    for day, vec in per_day.items():
        nz = np.flatnonzero(vec)
        day_col.append(np.full(nz.size, day, dtype="int64"))
        key_col.append(nz)
        n_col.append(vec[nz])
    ks = np.concatenate([np.zeros(0, dtype="int64"), *le])
    day_col.append(np.zeros(ks.size, dtype="int64"))  # KS keys follow the blocks; any day
    key_col.append(offs[-1] + np.arange(ks.size))
    n_col.append(ks)
    yield pa.RecordBatch.from_arrays(
        [pa.array(np.concatenate(day_col)), pa.array(np.concatenate(key_col).astype("int64")),
         pa.array(np.concatenate(n_col).astype("int64"))], names=["day", "key", "n"])


def _segment_codes(segs: list[str], seg_values: list[list[str]]) -> list[Any]:
    """``__s{j}``: the profile's position of segment column j's value (as text), else -1."""
    from pyspark.sql import functions as F

    out = []
    for j, c in enumerate(segs):
        expr = F.lit(-1)
        if seg_values[j]:
            text = F.col(f"`{c}`").cast("string")
            expr = F.when(text == F.lit(seg_values[j][0]), F.lit(0))
            for pos, value in enumerate(seg_values[j][1:], start=1):
                expr = expr.when(text == F.lit(value), F.lit(pos))
            expr = expr.otherwise(F.lit(-1))
        out.append(expr.alias(f"__s{j}"))
    return out


class _ArrowBatchRows:
    """Within the block, ``spark.sql.execution.arrow.maxRecordsPerBatch`` is ``rows`` (the
    counting does numpy work per batch: fewer, longer batches cost less per row)."""

    KEY = "spark.sql.execution.arrow.maxRecordsPerBatch"

    def __init__(self, spark: Any, rows: int) -> None:
        self.spark, self.rows, self.old = spark, rows, None

    def __enter__(self) -> None:
        self.old = self.spark.conf.get(self.KEY, None)
        self.spark.conf.set(self.KEY, str(self.rows))

    def __exit__(self, *exc: object) -> None:
        if self.old is None:
            self.spark.conf.unset(self.KEY)
        else:
            self.spark.conf.set(self.KEY, self.old)


def spark_window_counts(sdf: Any, profile: dict[str, Any], cfg: ChurnConfig,
                        score_col: str = "churn_probability") -> WindowCounts:
    """:class:`WindowCounts` of the Spark DataFrame ``sdf`` (``customer_id``, ``cutoff``,
    features, ``score_col``) against ``profile`` (see the module doc)."""
    from pyspark.sql import functions as F

    feats = profile["features"]
    present = [f for f in feats if f in sdf.columns]
    names = [*present, SCORE]
    entries = [*(feats[f] for f in present), profile["score"]]
    cols = [*present, score_col]
    segs = segment_columns(profile, cfg, sdf.columns)
    seg_values = [sorted(profile["segments"][c]) for c in segs]
    seg_sizes = [len(v) for v in seg_values]
    ks_of = [i for i, f in enumerate(present)
             if feats[f]["kind"] == ColumnKind.NUMERIC and feats[f].get("sample")]
    samples = [np.asarray(entries[i]["sample"], dtype="float64") for i in ks_of]
    rows = sdf.select(F.col("customer_id"), F.unix_micros(F.col("cutoff").cast("timestamp")).alias("__day"),
                      *[F.col(f"`{c}`") for c in dict.fromkeys(cols)], *_segment_codes(segs, seg_values))
    count = partial(_count_partition, entries=entries, cols=cols, seg_sizes=seg_sizes,
                    seg_skip=[names.index(c) if c in names else None for c in segs], samples=samples,
                    ks_of=ks_of)
    with _ArrowBatchRows(sdf.sparkSession, ARROW_BATCH_ROWS):
        sums = (rows.drop("customer_id").mapInArrow(count, "day long, key long, n long")
                .groupBy("day", "key").agg(F.sum("n").alias("n")).toPandas())
    distinct = _distinct_customers(rows, seg_sizes)

    groups = 1 + sum(seg_sizes)
    bins = [len(e["shares"]) for e in entries]
    offs = _block_offsets(bins, groups)
    hist = sums[sums["key"] < offs[-1]]
    day_us = np.unique(hist["day"].to_numpy(dtype="int64"))
    days = pd.DatetimeIndex(pd.to_datetime(day_us, unit="us", utc=True))
    table = np.zeros((len(days), offs[-1]), dtype="int64")
    np.add.at(table, (np.searchsorted(day_us, hist["day"].to_numpy(dtype="int64")), hist["key"].to_numpy()),
              hist["n"].to_numpy(dtype="int64"))
    blocks = {n: table[:, offs[i]:offs[i + 1]].reshape(len(days), groups, bins[i] + 1)
              for i, n in enumerate(names)}
    per_day = {n: np.ascontiguousarray(b[:, 0, 1:]) for n, b in blocks.items()}
    nulls = {n: int(blocks[n][:, 0, 0].sum()) for n in present}

    ks = sums[sums["key"] >= offs[-1]]
    le_all = np.zeros(sum(s.size for s in samples), dtype="int64")
    np.add.at(le_all, ks["key"].to_numpy() - offs[-1], ks["n"].to_numpy(dtype="int64"))
    ks_le: dict[str, tuple[np.ndarray, int]] = {}
    start = 0
    for i, sample in zip(ks_of, samples, strict=True):
        ks_le[names[i]] = (le_all[start:start + sample.size], int(per_day[names[i]].sum()))
        start += sample.size

    segments: dict[str, SegmentCounts] = {}
    start = 1
    for j, col in enumerate(segs):
        k = seg_sizes[j]
        per = {n: np.ascontiguousarray(b[:, start:start + k, 1:].transpose(1, 0, 2))
               for n, b in blocks.items() if n != col}
        segments[col] = SegmentCounts(seg_values[j], distinct[j], per)
        start += k
    return WindowCounts(days, int(blocks[SCORE][:, 0].sum()), distinct[-1][0], present,
                        [f for f in feats if f not in present], per_day, nulls, ks_le, segments)


def _distinct_customers(rows: Any, seg_sizes: list[int]) -> list[list[int]]:
    """Distinct customers per known value of each segment column (a list per column), and
    overall (the last list, one number); see the module doc."""
    from pyspark.sql import functions as F

    words = [(j, w) for j, k in enumerate(seg_sizes) for w in range(-(-k // _WORD))]
    sets = []
    for j, w in words:
        code = F.col(f"__s{j}")
        inside = (code >= w * _WORD) & (code < (w + 1) * _WORD)
        bit = F.expr(f"shiftleft(CAST(1 AS BIGINT), __s{j} - {w * _WORD})")
        sets.append(F.bit_or(F.when(inside, bit).otherwise(F.lit(0).cast("long"))).alias(f"__w{j}_{w}"))
    customers = (rows.where(F.col("customer_id").isNotNull()).groupBy("customer_id")
                 .agg(*(sets or [F.count(F.lit(1)).alias("__rows")])))
    counts = [F.count(F.lit(1)).alias("__all")]
    for j, k in enumerate(seg_sizes):
        for v in range(k):
            bit = F.col(f"__w{j}_{v // _WORD}").bitwiseAND(F.lit(1 << (v % _WORD)).cast("long"))
            counts.append(F.count_if(bit != 0).alias(f"__n{j}_{v}"))
    got = customers.agg(*counts).collect()[0]
    per_value = [[int(got[f"__n{j}_{v}"]) for v in range(k)] for j, k in enumerate(seg_sizes)]
    return [*per_value, [int(got["__all"])]]
