"""The monitoring window's counts as Spark aggregations (``churn monitor --engine spark``).

:func:`spark_window_counts` turns a Spark DataFrame of the window's rows (``customer_id``,
``cutoff``, the feature columns, a score column) into the same
:class:`~mlflow_churn.monitoring.window_drift.WindowCounts` the local engine computes with
numpy; :func:`~mlflow_churn.monitoring.window_drift.drift_from_counts` then gives the same
PSI / KS / chi-square / JS. Only counts reach the driver.

Bins exactly as :func:`mlflow_churn.stats.drift.bin_index`:

- numeric: bin ``i`` holds ``edges[i-1] < x <= edges[i]`` (right-closed); ``+inf`` is in the
  last bin, ``-inf`` in the first, NaN and null are missing (-1; Spark orders NaN above
  every number, so it is tested first). The profile's few edges: a ``CASE`` chain
  (``x <= e_0`` -> 0, ``x <= e_1`` -> 1, ...);
- categorical: the category's position by its string, unknown values the last bin
  (``__unseen__``), null missing;
- KS: the same bins on the reference sample's distinct points (thousands: Spark's
  ``Bucketizer``, a binary search; it is left-closed, ``[a, b)``, so it bins ``0.0 - x`` on
  the negated, reversed points: ``-x`` in ``[-e_i, -e_{i-1})`` is ``e_{i-1} < x <= e_i``;
  ``0.0 - x`` also turns ``-0.0`` into ``0.0``, which its binary search would order below
  ``0.0``); the cumulative counts
  give, per sample point, the current values at or below it
  (:func:`~mlflow_churn.stats.drift_counts.le_counts_from_bins`).

One pass bins every column (a projection plus one multi-column Bucketizer for the KS points), the binned
integers are cached, and three aggregations read them: (day, segment values, feature, bin)
counts (per-day and per-segment histograms and null counts are sums of it on the driver),
(feature, KS bin) counts, and distinct customers overall and per segment value.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from mlflow_churn.config import ChurnConfig
from mlflow_churn.monitoring.window_drift import SCORE, SegmentCounts, WindowCounts, segment_columns
from mlflow_churn.stats.drift import ColumnKind
from mlflow_churn.stats.drift_counts import le_counts_from_bins

__all__ = ["spark_window_counts"]


def _negated_splits(points: np.ndarray) -> list[float]:
    """Bucketizer splits binning ``0.0 - x`` so that bucket ``j`` is searchsorted-left ``k - j``."""
    return [-np.inf, *[0.0 - float(p) for p in points[::-1]], np.inf]


def _missing(col: Any) -> Any:
    from pyspark.sql import functions as F

    d = col.cast("double")
    return d.isNull() | F.isnan(d)


def spark_window_counts(sdf: Any, profile: dict[str, Any], cfg: ChurnConfig,
                        score_col: str = "churn_probability") -> WindowCounts:
    """:class:`WindowCounts` of the Spark DataFrame ``sdf`` (``customer_id``, ``cutoff``,
    features, ``score_col``) against ``profile`` (see the module doc)."""
    from pyspark.ml.feature import Bucketizer
    from pyspark.sql import functions as F

    feats = profile["features"]
    present = [f for f in feats if f in sdf.columns]
    entries = {**{f: feats[f] for f in present}, SCORE: profile["score"]}
    names = list(entries)
    source = {n: F.col(score_col if n == SCORE else n) for n in names}
    segs = segment_columns(profile, cfg, sdf.columns)

    # segment values as small integers: the profile's values by position (as str(value), like
    # the local engine's lookup), null -1, a value the profile lacks -2 (the local engine skips
    # those segments: no reference), so the grouping keys are integers
    seg_values = [sorted(profile["segments"][c]) for c in segs]
    sel = [F.col("customer_id"), F.col("cutoff").alias("__day")]
    for j, c in enumerate(segs):
        expr = F.when(F.col(c).isNull(), F.lit(-1))
        for pos, value in enumerate(seg_values[j]):
            expr = expr.when(F.col(c).cast("string") == F.lit(value), F.lit(pos))
        sel.append(expr.otherwise(F.lit(-2)).alias(f"__s{j}"))
    buckets: list[tuple[str, str, list[float]]] = []  # (input, output, splits)
    ks_points: dict[str, np.ndarray] = {}
    for i, n in enumerate(names):
        e, v = entries[n], source[n]
        if e["kind"] == ColumnKind.CATEGORICAL:
            cats = [str(c) for c in e["categories"]]
            expr = F.when(v.isNull(), F.lit(-1))
            for pos, c in enumerate(cats):
                expr = expr.when(v.cast("string") == F.lit(c), F.lit(pos))
            sel.append(expr.otherwise(F.lit(len(cats))).alias(f"__b{i}"))
            continue
        sel.append(_missing(v).alias(f"__m{i}"))
        sel.append(F.when(_missing(v), F.lit(0.0)).otherwise(F.lit(0.0) - v.cast("double")).alias(f"__n{i}"))
        # the few profile edges: a CASE chain (compiled by code generation), the first edge >= x
        d = v.cast("double")
        expr = F.when(_missing(v), F.lit(-1))
        for pos, edge in enumerate(np.asarray(e["edges"], dtype="float64")):
            expr = expr.when(d <= F.lit(float(edge)), F.lit(pos))
        sel.append(expr.otherwise(F.lit(len(e["edges"]))).alias(f"__b{i}"))
        if n != SCORE and e.get("sample"):
            sample = np.asarray(e["sample"], dtype="float64")
            ks_points[n] = np.unique(sample[np.isfinite(sample)])
            if ks_points[n].size:
                buckets.append((f"__n{i}", f"__q{i}", _negated_splits(ks_points[n])))
    frame = sdf.select(*sel)
    if buckets:
        frame = Bucketizer(inputCols=[b[0] for b in buckets], outputCols=[b[1] for b in buckets],
                           splitsArray=[b[2] for b in buckets]).transform(frame)
    have = {b[1] for b in buckets}
    out = [F.col("customer_id"), F.col("__day"), *[F.col(f"__s{j}") for j in range(len(segs))]]
    for i, n in enumerate(names):
        if entries[n]["kind"] == ColumnKind.CATEGORICAL:
            out.append(F.col(f"__b{i}").cast("int").alias(f"__b{i}"))
            continue
        out.append(F.col(f"__b{i}").cast("int").alias(f"__b{i}"))
        if n in ks_points:
            k = len(ks_points[n])
            q = (F.lit(k) - F.col(f"__q{i}")).cast("int") if f"__q{i}" in have else F.lit(0)
            out.append(F.when(F.col(f"__m{i}"), F.lit(-1)).otherwise(q).alias(f"__q{i}"))
    binned = frame.select(*out).persist()
    try:
        return _collect(binned, profile, entries, names, segs, seg_values, present, ks_points)
    finally:
        binned.unpersist()


def _stack(pairs: list[tuple[int, str]], alias: str) -> str:
    return f"stack({len(pairs)}, " + ", ".join(f"{i}, {c}" for i, c in pairs) + f") as (__f, {alias})"


def _collect(binned: Any, profile: dict[str, Any], entries: dict[str, dict[str, Any]], names: list[str],
             segs: list[str], seg_values: list[list[str]], present: list[str],
             ks_points: dict[str, np.ndarray]) -> WindowCounts:
    from pyspark.sql import functions as F

    seg_cols = [f"__s{j}" for j in range(len(segs))]
    stacked = _stack([(i, f"__b{i}") for i in range(len(names))], "__bin")
    hist = (binned.selectExpr("__day", *seg_cols, stacked)
            .groupBy("__day", *seg_cols, "__f", "__bin").count().toPandas())
    day = pd.to_datetime(hist["__day"])
    if day.dt.tz is None:
        day = day.dt.tz_localize("UTC")  # Spark hands back UTC wall times (session time zone UTC)
    days = pd.DatetimeIndex(sorted(day.unique()))
    hist["__d"] = day.map({d: p for p, d in enumerate(days)}).astype("int64")
    per_day: dict[str, np.ndarray] = {}
    nulls: dict[str, int] = {}
    ok = hist[hist["__bin"] >= 0]
    for i, n in enumerate(names):
        part = ok[ok["__f"] == i]
        arr = np.zeros((len(days), len(entries[n]["shares"])), dtype="int64")
        np.add.at(arr, (part["__d"].to_numpy(), part["__bin"].to_numpy()), part["count"].to_numpy())
        per_day[n] = arr
        if n != SCORE:
            nulls[n] = int(hist.loc[(hist["__f"] == i) & (hist["__bin"] < 0), "count"].sum())

    ks_le: dict[str, tuple[np.ndarray, int]] = {}
    ks_cols = [(i, f"__q{i}") for i, n in enumerate(names) if n in ks_points and len(ks_points[n])]
    if ks_cols:
        ks = (binned.selectExpr(_stack(ks_cols, "__q")).where("__q >= 0").groupBy("__f", "__q").count()
              .toPandas())
        for i, _ in ks_cols:
            n, part = names[i], ks[ks["__f"] == i]
            counts = np.zeros(len(ks_points[n]) + 1, dtype="int64")
            np.add.at(counts, part["__q"].to_numpy(), part["count"].to_numpy())
            sample = np.asarray(entries[n]["sample"], dtype="float64")
            ks_le[n] = (le_counts_from_bins(sample, ks_points[n], counts), int(counts.sum()))
    for n in present:  # a sample without finite points: every value at or below none of them
        if n not in ks_le and entries[n]["kind"] == ColumnKind.NUMERIC and entries[n].get("sample"):
            total = int(per_day[n].sum())
            ks_le[n] = (np.zeros(len(entries[n]["sample"]), dtype="int64"), total)

    # distinct customers overall and per known segment value, in one aggregation
    keys = [F.col(f"__s{j}") for j in range(len(segs))]
    dist = (binned.select("customer_id", F.explode(F.array(
        F.lit(-1).cast("int"), *[F.when(k >= 0, F.lit(j * 1_000_000) + k).otherwise(F.lit(-3)) for j, k in
                                 enumerate(keys)])).alias("__g"))
            .where("__g >= -1").groupBy("__g").agg(F.countDistinct("customer_id").alias("n")).toPandas())
    n_by = dict(zip(dist["__g"].astype("int64"), dist["n"].astype("int64"), strict=True))
    rows = int(hist.loc[hist["__f"] == 0, "count"].sum())
    segments: dict[str, SegmentCounts] = {}
    for j, col in enumerate(segs):
        values = seg_values[j]
        part = ok[ok[f"__s{j}"] >= 0]
        per: dict[str, np.ndarray] = {}
        for i, n in enumerate(names):
            if n == col:
                continue
            p = part[part["__f"] == i]
            arr = np.zeros((len(values), len(days), len(entries[n]["shares"])), dtype="int64")
            np.add.at(arr, (p[f"__s{j}"].to_numpy(), p["__d"].to_numpy(), p["__bin"].to_numpy()),
                      p["count"].to_numpy())
            per[n] = arr
        distinct = [int(n_by.get(j * 1_000_000 + v, 0)) for v in range(len(values))]
        segments[col] = SegmentCounts(values, distinct, per)
    feats = profile["features"]
    return WindowCounts(days, rows, int(n_by.get(-1, 0)), present,
                        [f for f in feats if f not in present], per_day, nulls, ks_le, segments)

