"""A training window's frame on either engine, sampled by customer to a row budget.

``training.engine: spark`` builds the frame with the offline builder's own query on Spark
(:func:`~mlflow_churn.features.spark_frames.spark_training_frame`; the executors read
``<workspace>/data``), keeps a stable sample of customers there and collects only that to
the trainer (XGBoost fits on one machine). ``training.max_rows`` is the budget: when the
window holds more rows, every customer whose :func:`sample_unit` is below
``max_rows / rows`` is kept with all its cutoffs (about ``max_rows`` rows; a customer is
in or out on every run and machine). Both engines sample the same customers, so the frames
are equal.

:func:`sample_unit` comes from the customer's unit of :mod:`mlflow_churn.data.groups` (its
low bits, where the holdout / validation / train groups use its high bits), so a sample
keeps the groups' proportions: the holdout customers stay out of training as always.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd

from mlflow_churn.config import ChurnConfig
from mlflow_churn.data.groups import customer_unit
from mlflow_churn.features.offline import build_training_frame, coerce_frame
from mlflow_churn.features.registry import FeatureSet
from mlflow_churn.features.spark_frames import spark_training_frame, to_pandas
from mlflow_churn.spark import session_for

__all__ = ["budget_fraction", "sample_unit", "training_frame"]


def sample_unit(ids: Any) -> np.ndarray:
    """A second stable number in ``[0, 1)`` per customer id, independent of its group: the
    fractional part of ``customer_unit * 2**20`` (exact: the unit has 53 bits)."""
    return np.modf(customer_unit(np.asarray(ids, dtype=np.int64)) * float(2**20))[0]


def budget_fraction(rows: int, max_rows: int | None) -> float:
    """The share of customers to keep so that ``rows`` shrink to about ``max_rows`` (1 = all)."""
    return 1.0 if not max_rows or rows <= max_rows else max_rows / rows


def _local(cfg: ChurnConfig, fs: FeatureSet, cutoffs: Sequence[datetime], horizon: int) -> pd.DataFrame:
    frame = build_training_frame(cfg.data_dir, fs, cutoffs, horizon)
    frac = budget_fraction(len(frame), cfg.training.max_rows)
    if frac >= 1.0:
        return frame
    return frame[sample_unit(frame["customer_id"]) < frac].reset_index(drop=True)


def _spark(spark: Any, cfg: ChurnConfig, fs: FeatureSet, cutoffs: Sequence[datetime],
           horizon: int) -> pd.DataFrame:
    from pyspark.sql import functions as F

    rows = spark_training_frame(spark, cfg.data_dir, fs, cutoffs, horizon, label=True).persist()
    try:
        frac = budget_fraction(rows.count(), cfg.training.max_rows) if cfg.training.max_rows else 1.0
        if frac < 1.0:
            unit = F.pandas_udf(lambda ids: pd.Series(sample_unit(ids.to_numpy())), "double")
            rows = rows.where(unit(F.col("customer_id")) < F.lit(frac))
        raw = to_pandas(rows).sort_values(["cutoff", "customer_id"], ignore_index=True)
    finally:
        rows.unpersist()
    return coerce_frame(raw, fs, label=True)


def training_frame(cfg: ChurnConfig, fs: FeatureSet, cutoffs: Sequence[datetime], horizon: int,
                   spark: Any = None) -> pd.DataFrame:
    """The labelled frame of ``cutoffs`` on ``cfg.training.engine`` within ``training.max_rows``
    (see the module doc); ``spark``: a running session to use (default: one on
    ``training.spark_master``, started and stopped here)."""
    if cfg.training.engine != "spark":
        return _local(cfg, fs, cutoffs, horizon)
    with session_for(spark, cfg.training.spark_master, "churn-train") as session:
        return _spark(session, cfg, fs, cutoffs, horizon)
