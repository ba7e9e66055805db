"""The monitoring window's counts on Spark (``churn monitor --engine spark``).

:func:`spark_window_counts` turns a Spark DataFrame of the window's rows (``customer_id``,
``cutoff``, the feature columns, a score column) into the same
:class:`~mlflow_churn.monitoring.window_drift.WindowCounts` the local engine computes;
:func:`~mlflow_churn.monitoring.window_drift.drift_from_counts` then gives the same
PSI / KS / chi-square / JS. Only counts reach the driver.

Two Spark jobs, each one pass over the rows, submitted at once from two driver threads (each
keeps a core busy while the other waits on a stage start-up, a shuffle or its result):

- **Histograms and KS counts** (``mapInArrow``): every partition runs the local engine's own
  numpy code on its Arrow batches: :func:`~mlflow_churn.stats.drift.bin_index` per column,
  :func:`~mlflow_churn.stats.drift.grouped_counts` per cell of a joint table of the segment
  columns, :func:`~mlflow_churn.stats.drift.sample_le_counts` at the reference sample's points.
  The same functions on the same values give the same integers (no second implementation of
  the bins, the edges, NaN, +-inf or unseen categories). Per name (feature or score) the key
  space holds a (groups, bins + 1) block: group 0 all rows, then one group per known value of
  each segment column; bin column 0 the missing values. The block comes from one ``bincount``
  per name and batch, not one per group: its cells are (each segment column's code: one of
  its known values or none of them, day, bin), and sums of that table over the other columns
  (integer sums, exact) give each column's per-value counts, over all of them the all-rows
  counts. Columns whose joint table would pass ``JOINT_CELLS`` cells are split into groups,
  a ``bincount`` each (:func:`_joints`). A partition returns one row: its
  (days, keys) table and its KS counts (values <= each sample point), as numpy arrays; the RDD's
  ``treeAggregate`` adds them up (on the driver for a few partitions, in a tree of Python
  tasks for many), with no shuffle stage for a local session's one or two partitions.
- **Distinct customers** overall and per known segment value (a customer has one row per
  daily cutoff, so the effective sample sizes count customers, not rows): one row per
  customer (``groupBy``) with the bit set of the segment values it had (``bit_or``; the
  values of all segment columns side by side, one 64-bit word per 63 values), then one
  aggregation counts the customers and each bit. The ``groupBy`` runs with Spark's
  ``bypassPartialAggregation`` (4.3+): one aggregation after the shuffle instead of a partial
  one before it, which cannot shrink rows of customers seldom together in a partition (it
  cost a hash table of every row: about a fifth of this job's executor CPU at 1M customers).

What the JVM sends the counting workers (moving rows to the Python workers as Arrow is most of
the counting pass's time, and it costs about the same per field of a row whatever its type, so
fewer, wider fields): the day (``unix_micros`` of the cutoff); the numeric columns of type
double as one array column (a (columns, rows) matrix in the worker); codes packed in 64-bit
integer columns (``__c0``, ...: each code + 1 in the fewest bits that hold its values, side by
side, at most 63 bits a column, so one column for the usual few categorical and segment
columns; the worker unpacks them with shifts and masks, :func:`_pack_layout`): per categorical
column of text its category's position in the profile's categories (their count for another
value, -1 for null), which the worker turns into a pandas categorical on those categories plus
one value the profile lacks (``bin_index`` gives it the same bins as the text), then per
segment column its value's position among the profile's values (as ``str(value)``, like the
local engine's lookup; -1 for null and for a value the profile lacks: the local engine has no
reference for those segments and skips them), except for a segment column that is also such a
categorical column with all its segment values among the categories: the worker looks its
segment codes up from the category codes (:func:`_segment_sources`); any other profiled column
as it is.

Both queries are written as Spark SQL text (``selectExpr``): a few calls to the JVM per query
instead of a few per category value with the Column API (those calls and their analysis cost
about 0.5 s of driver and JVM CPU per run at 1M rows, more than the codes' work on the rows);
the profile's texts go in as hex bytes (:func:`_sql_text`), so no value can break the quoting.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
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
ARROW_BATCH_KEY = "spark.sql.execution.arrow.maxRecordsPerBatch"
_WORD = 63  # segment values per bit-set word (a signed 64-bit integer)
#: Spark 4.3+: the distinct job's groupBy aggregates once, after the shuffle (older versions ignore it)
BYPASS_PARTIAL = "spark.sql.execution.bypassPartialAggregation"
JOINT_CELLS = 1 << 16  # cells of a joint count table of segment columns (see _joints)

#: counts of a partition or a sum of partitions: its days (microseconds, sorted), the (days, keys)
#: table of the histogram blocks, the KS counts (see the module doc)
_Counts = tuple[np.ndarray, np.ndarray, np.ndarray]


def _block_offsets(bins: list[int], groups: int) -> list[int]:
    """Start of each name's (groups, bins + 1) block in the key space, and the end last."""
    return [0, *np.cumsum([groups * (b + 1) for b in bins]).tolist()]


def _column(batch: Any, name: str) -> pd.Series:
    """One column of an Arrow batch as the local engine's frame holds it (text as a pandas
    categorical, which :func:`~mlflow_churn.stats.drift.bin_index` maps by its codes)."""
    import pyarrow as pa

    col = batch.column(name)
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        col = col.dictionary_encode()
    return col.to_pandas()


def _decoded(codes: np.ndarray, categories: list[str]) -> pd.Series:
    """A coded column (each row's position among the profile's ``categories``, their count for
    another value, -1 for null; see :func:`_category_codes`) as a pandas categorical on the
    categories and one value the profile lacks, which :func:`~mlflow_churn.stats.drift.bin_index`
    maps to its unseen bin, as it maps the text of such a value."""
    other = "\0" * (max(map(len, categories), default=0) + 1)  # not one of them
    return pd.Series(pd.Categorical.from_codes(codes, [*categories, other]))


def _pack_layout(tops: list[int]) -> list[tuple[int, int, int]]:
    """Where each code (values -1 .. ``tops[q]``) sits in the packed columns: (column, shift,
    bits) of its value + 1, the columns filled in order, at most 63 bits each (non-negative)."""
    layout, column, used = [], 0, 0
    for top in tops:
        bits = (top + 1).bit_length()
        if used + bits > 63:
            column, used = column + 1, 0
        layout.append((column, used, bits))
        used += bits
    return layout


def _packed_codes(codes: list[str], tops: list[int]) -> list[str]:
    """Spark SQL: the packed columns of ``codes`` (SQL of int expressions, values -1 ..
    ``tops[q]``), see :func:`_pack_layout`."""
    words: dict[int, list[str]] = {}
    for code, (column, shift, _) in zip(codes, _pack_layout(tops), strict=True):
        words.setdefault(column, []).append(f"shiftleft(CAST(({code}) + 1 AS BIGINT), {shift})")
    return [f"{' | '.join(words[w])} AS __c{w}" for w in sorted(words)]


def _unpacked_codes(batch: Any, tops: list[int]) -> np.ndarray:
    """The codes of a batch's packed columns (:func:`_packed_codes`) as a (codes, rows) array."""
    layout = _pack_layout(tops)
    words = [batch.column(f"__c{w}").to_numpy() for w in range(layout[-1][0] + 1)] if layout else []
    out = np.empty((len(layout), batch.num_rows), dtype="int64")
    for q, (column, shift, bits) in enumerate(layout):
        np.right_shift(words[column], shift, out=out[q])
        out[q] &= (1 << bits) - 1
        out[q] -= 1
    return out


def _unpacked(batch: Any, name: str, width: int) -> np.ndarray:
    """The array column ``name`` (``width`` values a row) as a (width, rows) array."""
    flat = batch.column(name).flatten().to_numpy(zero_copy_only=False)
    return np.ascontiguousarray(flat.reshape(batch.num_rows, width).T)


def _joints(seg_sizes: list[int], cells: int) -> list[list[int]]:
    """The segment columns (indices) in consecutive groups counted jointly: a group's table has
    a cell per combination of its columns' codes (each value, or none of them) times ``cells``,
    at most :data:`JOINT_CELLS` unless one column alone needs more. One group at least (empty
    without segment columns)."""
    groups: list[list[int]] = [[]]
    size = 1
    for j, k in enumerate(seg_sizes):
        if groups[-1] and size * (k + 1) * cells > JOINT_CELLS:
            groups.append([])
            size = 1
        groups[-1].append(j)
        size *= k + 1
    return groups


def _count_partition(batches: Iterator[Any], entries: list[dict[str, Any]], cols: list[str],
                     seg_sizes: list[int], seg_skip: list[int | None], samples: list[np.ndarray],
                     ks_of: list[int], dense: list[str], coded: dict[str, list[str]],
                     tops: list[int], seg_from: list[tuple[int, np.ndarray | None]]) -> Iterator[Any]:
    """``mapInArrow``: one partition's counts as one row (see the module doc). Batches hold
    ``__day`` (microseconds), ``__x`` (the ``dense`` columns' values), ``__c0``, ... (the ``coded``
    columns' category codes, then the segment columns' codes, packed: :func:`_packed_codes`;
    ``tops``: the codes' largest values) and the other ``cols`` of
    ``entries`` as they are; ``seg_skip[j]``: the entry that is segment column j itself (no
    per-segment counts); ``seg_from[j]``: where segment column j's codes come from (see
    :func:`_segment_sources`)."""
    import pyarrow as pa

    groups = 1 + sum(seg_sizes)
    bins = [len(e["shares"]) for e in entries]
    offs = _block_offsets(bins, groups)
    first = np.cumsum([1, *seg_sizes]).tolist()  # group of (segment column j, value 0)
    ks_start = np.cumsum([0, *(s.size for s in samples)]).tolist()
    total = _no_counts(offs[-1], ks_start[-1])
    for batch in batches:
        if batch.num_rows == 0:
            continue
        day_codes, days = pd.factorize(batch.column("__day").to_numpy(zero_copy_only=False))
        nd = len(days)
        x = _unpacked(batch, "__x", len(dense)) if dense else np.zeros((0, batch.num_rows))
        c = _unpacked_codes(batch, tops)
        columns: dict[str, Any] = {name: x[p] for p, name in enumerate(dense)}
        columns |= {name: _decoded(c[q], cats) for q, (name, cats) in enumerate(coded.items())}
        segments = [c[q] if lookup is None else lookup[c[q] + 1] for q, lookup in seg_from]
        joints = _joints(seg_sizes, nd * (max(bins) + 1))
        keys = []  # per group of segment columns: each row's cell (code + 1 of each column, day)
        for joint in joints:
            key = np.zeros(batch.num_rows, dtype="int64")
            for j in joint:
                key *= seg_sizes[j] + 1
                key += segments[j]
                key += 1  # -1 (none of the profile's values) -> 0
            key *= nd
            key += day_codes
            keys.append(key)
        flat = np.zeros((nd, offs[-1]), dtype="int64")
        ks = np.zeros(ks_start[-1], dtype="int64")
        for i, (entry, col) in enumerate(zip(entries, cols, strict=True)):
            values = columns[col] if col in columns else _column(batch, col)
            idx = drift.bin_index(entry, values) + 1  # 0: missing
            b = bins[i] + 1
            block = flat[:, offs[i]:offs[i + 1]].reshape(nd, groups, b)
            for g, (joint, key) in enumerate(zip(joints, keys, strict=True)):
                shape = [seg_sizes[j] + 1 for j in joint]
                table = drift.grouped_counts(idx, key, int(np.prod(shape)) * nd, b).reshape(*shape, nd, b)
                if g == 0:  # all rows
                    block[:, 0] = table.sum(axis=tuple(range(len(joint))))
                for a, j in enumerate(joint):
                    if seg_skip[j] != i and seg_sizes[j]:
                        per_value = table.sum(axis=tuple(e for e in range(len(joint)) if e != a))
                        block[:, first[j]:first[j + 1]] = per_value[1:].transpose(1, 0, 2)
            if i in ks_of:
                q = ks_of.index(i)
                ks[ks_start[q]:ks_start[q + 1]] = drift.sample_le_counts(samples[q], values)[0]
        total = _add(total, (np.asarray(days, dtype="int64"), flat, ks))
    yield pa.RecordBatch.from_arrays([pa.array([pickle.dumps(total)], pa.binary())], names=["counts"])


def _no_counts(keys: int, ks: int) -> _Counts:
    """The counts of no rows: no days, ``keys`` histogram keys, ``ks`` KS counts."""
    return np.zeros(0, dtype="int64"), np.zeros((0, keys), dtype="int64"), np.zeros(ks, dtype="int64")


def _add(a: _Counts, b: _Counts) -> _Counts:
    """The sum of two counts (batches', partitions' or sums'): tables aligned on the union of their days."""
    days = np.union1d(a[0], b[0])
    table = np.zeros((days.size, a[1].shape[1]), dtype="int64")
    for d, t in (a[:2], b[:2]):
        table[np.searchsorted(days, d)] += t  # each side's days are distinct
    return days, table, a[2] + b[2]


def _add_row(acc: _Counts, row: Any) -> _Counts:
    return _add(acc, pickle.loads(row[0]))


def _sql_name(column: str) -> str:
    """Spark SQL: the column ``column``."""
    return "`" + column.replace("`", "``") + "`"


def _sql_text(value: str) -> str:
    """Spark SQL: the text ``value`` (its UTF-8 bytes in hex, cast to a string: a constant, with
    no quoting or escaping to get wrong whatever the value and the parser's settings)."""
    return f"CAST(X'{value.encode('utf-8').hex()}' AS STRING)"


def _position(column: str, values: list[str], other: int) -> str:
    """Spark SQL: the position of ``column``'s value (as text) among ``values`` (as text),
    ``other`` for another value, -1 for null. Expressions are built as SQL text: one call to
    the JVM each instead of a few per value (building the queries was a good part of the
    driver's time)."""
    text = f"CAST({_sql_name(column)} AS STRING)"
    whens = "".join(f" WHEN {text} = {_sql_text(str(v))} THEN {p}" for p, v in enumerate(values))
    return f"CASE WHEN {text} IS NULL THEN -1{whens} ELSE {other} END"


def _segment_sources(segs: list[str], seg_values: list[list[str]], coded: dict[str, list[str]]
                     ) -> tuple[list[int], list[tuple[int, np.ndarray | None]]]:
    """Segment columns whose codes the JVM sends (their indices), and per segment column where
    the counting worker finds its codes: (position among the packed codes, None), or, for a
    coded categorical column whose categories hold all its segment values (as text), (the
    categorical's position, a lookup from its code + 1 to the segment code): the same text
    comparisons give both codes, so the JVM codes the column once."""
    sent: list[int] = []
    sources: list[tuple[int, np.ndarray | None]] = []
    names = list(coded)
    for j, (col, values) in enumerate(zip(segs, seg_values, strict=True)):
        cats = coded.get(col)
        if cats is not None and all(isinstance(v, str) for v in values) and set(values) <= set(cats):
            where = {v: p for p, v in enumerate(values)}
            # code + 1: 0 null, 1 + position among cats, 1 + len(cats) another value
            lookup = np.array([-1, *(where.get(cat, -1) for cat in cats), -1], dtype="int64")
            sources.append((names.index(col), lookup))
        else:
            sources.append((len(coded) + len(sent), None))
            sent.append(j)
    return sent, sources


def _category_codes(sdf: Any, entries: list[dict[str, Any]], cols: list[str]) -> dict[str, list[str]]:
    """The categorical columns of text type, with their profile categories (as text): the
    JVM sends their positions (:func:`_position`) to the counting workers instead of the text
    (the same bins, see :func:`_decoded`)."""
    from pyspark.sql.types import StringType

    types = {f.name: f.dataType for f in sdf.schema.fields}
    coded = {c: [str(v) for v in e["categories"]] for e, c in zip(entries, cols, strict=True)
             if e["kind"] == ColumnKind.CATEGORICAL and isinstance(types.get(c), StringType)}
    return {c: cats for c, cats in coded.items() if len(set(cats)) == len(cats)}  # else: as text


def _dense_columns(sdf: Any, entries: list[dict[str, Any]], cols: list[str]) -> list[str]:
    """The numeric columns of type double, which the JVM sends as one array column."""
    from pyspark.sql.types import DoubleType

    types = {f.name: f.dataType for f in sdf.schema.fields}
    return list(dict.fromkeys(c for e, c in zip(entries, cols, strict=True)
                              if e["kind"] == ColumnKind.NUMERIC and isinstance(types.get(c), DoubleType)))


class _SessionConf:
    """Within the block, the session's SQL settings ``values`` (name -> value); each is put
    back as it was (or unset) when the block ends. The two jobs' threads set different names."""

    def __init__(self, spark: Any, values: dict[str, str]) -> None:
        self.spark, self.values, self.old = spark, values, {}

    def __enter__(self) -> None:
        self.old = {k: self.spark.conf.get(k, None) for k in self.values}
        for k, v in self.values.items():
            self.spark.conf.set(k, v)

    def __exit__(self, *exc: object) -> None:
        for k, v in self.old.items():
            if v is None:
                self.spark.conf.unset(k)
            else:
                self.spark.conf.set(k, v)


def spark_window_counts(sdf: Any, profile: dict[str, Any], cfg: ChurnConfig,
                        score_col: str = "churn_probability") -> WindowCounts:
    """:class:`WindowCounts` of the Spark DataFrame ``sdf`` (``customer_id``, ``cutoff``,
    features, ``score_col``) against ``profile`` (see the module doc)."""
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
    coded = _category_codes(sdf, entries, cols)
    dense = _dense_columns(sdf, entries, cols)
    sent, seg_from = _segment_sources(segs, seg_values, coded)
    codes = [*(_position(c, cats, len(cats)) for c, cats in coded.items()),
             *(_position(segs[j], seg_values[j], -1) for j in sent)]
    tops = [*(len(cats) for cats in coded.values()), *(len(seg_values[j]) - 1 for j in sent)]  # largest codes
    rows = sdf.selectExpr(f"unix_micros(CAST({_sql_name('cutoff')} AS TIMESTAMP)) AS __day",
                          *([f"array({', '.join(map(_sql_name, dense))}) AS __x"] if dense else []),
                          *_packed_codes(codes, tops),
                          *(_sql_name(c) for c in dict.fromkeys(cols) if c not in coded and c not in dense))
    count = partial(_count_partition, entries=entries, cols=cols, seg_sizes=seg_sizes,
                    seg_skip=[names.index(c) if c in names else None for c in segs], samples=samples,
                    ks_of=ks_of, dense=dense, coded=coded, tops=tops, seg_from=seg_from)
    groups = 1 + sum(seg_sizes)
    bins = [len(e["shares"]) for e in entries]
    offs = _block_offsets(bins, groups)
    zero = _no_counts(offs[-1], sum(s.size for s in samples))
    # the two jobs at once, from two driver threads: each keeps a core busy while the other waits
    # (a scan is one task per input split; stage start-ups, the result fetches)
    with ThreadPoolExecutor(1, thread_name_prefix="churn-distinct") as pool:
        distinct_job = pool.submit(_distinct_customers, sdf, segs, seg_values)
        # the counting does numpy work per batch: fewer, longer batches cost less per row
        with _SessionConf(sdf.sparkSession, {ARROW_BATCH_KEY: str(ARROW_BATCH_ROWS)}):
            day_us, table, le_all = rows.mapInArrow(count, "counts binary").rdd.treeAggregate(
                zero, _add_row, _add)
        distinct = distinct_job.result()

    days = pd.DatetimeIndex(pd.to_datetime(day_us, unit="us", utc=True))
    blocks = {n: table[:, offs[i]:offs[i + 1]].reshape(len(days), groups, bins[i] + 1)
              for i, n in enumerate(names)}
    per_day = {n: np.ascontiguousarray(b[:, 0, 1:]) for n, b in blocks.items()}
    nulls = {n: int(blocks[n][:, 0, 0].sum()) for n in present}

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


def _distinct_customers(sdf: Any, segs: list[str], seg_values: list[list[str]]) -> list[list[int]]:
    """Distinct customers per known value of each segment column (a list per column), and
    overall (the last list, one number); see the module doc."""
    from pyspark.sql import functions as F

    seg_sizes = [len(v) for v in seg_values]
    first = np.cumsum([0, *seg_sizes]).tolist()  # bit of (column j, value v): first[j] + v
    words = []  # the bit set of a row: its segment values' bits, one 63-bit word per 63 values
    for w in range(-(-first[-1] // _WORD)):
        parts = []
        for j, (col, values) in enumerate(zip(segs, seg_values, strict=True)):
            text = f"CAST({_sql_name(col)} AS STRING)"
            whens = "".join(f" WHEN {text} = {_sql_text(str(v))} THEN {1 << (first[j] + p - w * _WORD)}L"
                            for p, v in enumerate(values) if w * _WORD <= first[j] + p < (w + 1) * _WORD)
            if whens:
                parts.append(f"CASE{whens} ELSE 0L END")  # null, another value: no bit
        words.append(f"{' | '.join(parts)} AS __b{w}")
    rows = sdf.selectExpr("customer_id", *words).where("customer_id IS NOT NULL")
    sets = [f"bit_or(__b{w}) AS __w{w}" for w in range(len(words))] or ["count(1) AS __rows"]
    customers = rows.groupBy("customer_id").agg(*map(F.expr, sets))
    counts = ["count(1) AS __all", *(f"count_if((__w{b // _WORD} & {1 << (b % _WORD)}L) != 0) AS __n{b}"
                                      for b in range(first[-1]))]
    # a customer's rows are seldom together in a partition (one row a day, the rows laid out by
    # day or by file): an aggregation before the shuffle would only copy every row into a hash
    # table; bypassed, the groupBy is one aggregation after the shuffle
    with _SessionConf(sdf.sparkSession, {BYPASS_PARTIAL: "true"}):
        got = customers.selectExpr(*counts).collect()[0]
    per_value = [[int(got[f"__n{first[j] + v}"]) for v in range(k)] for j, k in enumerate(seg_sizes)]
    return [*per_value, [int(got["__all"])]]
