"""The monitoring window's per-segment performance on Spark (``churn monitor --engine spark``).

:func:`spark_segment_performance` gives what
:func:`~mlflow_churn.stats.performance.segment_performance` gives on the driver (every
:class:`~mlflow_churn.stats.performance.SegmentPerformance` field it fills: the realised AUC,
recall@k and revenue lift with their standard errors on the matured rows, the CBPE estimate
with its standard error on the window's rows, the counts and the reasons), computed on the
executors. Only one line per segment reaches the driver.

How: a row belongs to one segment per segment column, so every row of the window (and of
the matured window) is stacked once per column with the key (column, value). Spark groups
both by the key (``cogroup``), and ``applyInPandas`` runs the local ``segment_performance``
on each segment's rows: the window's and the matured ones. Each group's rows are coerced as
the local builder coerces them (``coerce_frame``) and put in its order (cutoff, then
customer), so the same function sees the same rows in the same order: equal numbers by
construction, not by a second implementation. This includes the bootstrap standard error
of the realised AUC: its Poisson weights
(:func:`~mlflow_churn.stats.uncertainty.customer_weights`) are drawn per distinct customer
of the segment's matured rows, which is what the group holds.

The key is the value as Spark's text (``tenure_bucket`` from ``tenure_days`` with the local
engine's edges, :data:`~mlflow_churn.stats.metrics.TENURE_EDGES`); the segment's key
``column=value`` itself is computed by the local function inside the group. Rows without a
value belong to no segment, as on the driver. A key that came back from two groups (two of
Spark's texts for one of pandas') raises ChurnError rather than giving half a segment.

The limit: one segment's rows (current and matured) are one pandas frame on one executor
(Python worker memory), and the largest segment bounds the parallelism. The overall numbers
of the window (``assess``, the AUC checks) are not computed here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
import pandas as pd

from mlflow_churn.errors import ChurnError
from mlflow_churn.features.definitions import FeatureSet
from mlflow_churn.features.offline import coerce_frame
from mlflow_churn.stats.metrics import TENURE_EDGES, TENURE_LABELS, BusinessParams
from mlflow_churn.stats.performance import SegmentPerformance, segment_performance, segment_rows

__all__ = ["spark_segment_performance"]

_DERIVED = "tenure_bucket"
_SCHEMA = "key string, perf string"


def _key(column: str, present: set[str]) -> Any:
    """The Spark expression grouping the rows of segment column ``column`` (null: no segment);
    ``present``: the frame's columns."""
    from pyspark.sql import functions as F

    if column != _DERIVED or column in present:
        return F.col(column).cast("string")
    days = F.col("tenure_days").cast("double")
    expr = None
    for lo, hi, label in zip(TENURE_EDGES[:-1], TENURE_EDGES[1:], TENURE_LABELS, strict=True):
        cond = (days >= F.lit(float(lo))) & (days < F.lit(float(hi)))  # pd.cut(right=False)
        expr = F.when(cond, F.lit(label)) if expr is None else expr.when(cond, F.lit(label))
    return expr


def spark_segment_performance(
    columns: Sequence[str],
    current: Any,
    feature_set: FeatureSet,
    eval_cfg: BusinessParams,
    *,
    matured: Any = None,
    calibration: Mapping[str, Any] | None = None,
    min_rows: int = 1,
    min_churners: int = 1,
    score_col: str = "churn_probability",
) -> dict[str, SegmentPerformance]:
    """``segment_performance(columns, ...)`` of the Spark DataFrames ``current`` (the window's
    rows: ``customer_id``, ``cutoff``, the feature columns as the feature query gives them,
    ``score_col``) and ``matured`` (the same with ``label``; None: labels not matured yet),
    computed per segment on the executors (see the module doc). Sorted by key."""
    from pyspark.sql import functions as F

    if not columns:
        return {}
    segment_rows(pd.DataFrame(columns=current.columns), columns)  # the local ChurnError for a lacking column
    names = set(current.columns)
    needed = {c for c in columns if c in names}
    if _DERIVED in columns and _DERIVED not in names:
        needed.add("tenure_days")
    sub = FeatureSet(feature_set.name, tuple(f for f in feature_set.features if f.full_name in needed))
    keep = ["customer_id", "cutoff", *sub.columns]
    keys = F.explode(F.array(*[F.struct(F.lit(j).alias("seg"), _key(c, names).alias("value"))
                               for j, c in enumerate(columns)]))

    def stacked(sdf: Any, label: bool) -> Any:
        """``sdf``'s rows once per segment column, with its key (``__seg``, ``__value``)."""
        labels = ["label"] if label else []
        score = F.col(score_col).cast("double").alias("__score")
        return (sdf.select(*keep, *labels, score, keys.alias("__key"))
                .where(F.col("__key.value").isNotNull())
                .select(*keep, *labels, "__score", F.col("__key.seg").alias("__seg"),
                        F.col("__key.value").alias("__value")))

    cols = list(columns)

    def frame(pdf: pd.DataFrame, label: bool) -> tuple[pd.DataFrame, np.ndarray]:
        """A group's rows as the local builder gives them (coerced, by cutoff then customer)."""
        pdf = pdf.sort_values(["cutoff", "customer_id"], kind="stable", ignore_index=True)
        return coerce_frame(pdf, sub, label=label), pdf["__score"].to_numpy(dtype="float64")

    def one_segment(key: tuple[Any, ...], cur: pd.DataFrame, mat: pd.DataFrame | None) -> pd.DataFrame:
        """The local function on one segment's rows (``mat``: its matured rows, None without labels)."""
        cur_rows, cur_scores = frame(cur, False)
        mat_rows, mat_scores = frame(mat, True) if mat is not None else (None, None)
        perfs = segment_performance([cols[int(key[0])]], cur_rows, cur_scores, eval_cfg, matured=mat_rows,
                                    matured_scores=mat_scores, calibration=calibration, min_rows=min_rows,
                                    min_churners=min_churners)
        # object columns even when empty (a group whose values are all unknown categories): an empty
        # float column is not Arrow strings
        return pd.DataFrame({"key": list(perfs), "perf": [json.dumps(asdict(p)) for p in perfs.values()]},
                            columns=["key", "perf"], dtype=object)

    grouped = stacked(current, False).groupBy("__seg", "__value")
    if matured is None:
        def no_labels(key: tuple[Any, ...], cur: pd.DataFrame) -> pd.DataFrame:  # Spark counts the arguments
            return one_segment(key, cur, None)

        result = grouped.applyInPandas(no_labels, _SCHEMA)
    else:  # cogrouped, not a union: a union of two frames of the same query trips Spark's optimizer
        result = grouped.cogroup(stacked(matured, True).groupBy("__seg", "__value")).applyInPandas(
            one_segment, _SCHEMA)
    out: dict[str, SegmentPerformance] = {}
    for row in result.collect():
        if row["key"] in out:
            raise ChurnError(f"segment {row['key']} came out of two Spark groups (two Spark texts for one "
                             "value): its rows were split")
        out[row["key"]] = SegmentPerformance(**json.loads(row["perf"]))
    return dict(sorted(out.items()))
