"""Training frames on Spark: the same sampled customers and rows as the local engine."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mlflow_churn.config import load_config
from mlflow_churn.data.groups import customer_unit, holdout_mask
from mlflow_churn.features.registry import load_registry
from mlflow_churn.training.spark_window import budget_fraction, sample_unit, training_frame

CUTOFFS = [datetime(2026, 3, 10, tzinfo=UTC) + timedelta(days=7 * i) for i in range(3)]


def test_sample_unit_is_stable_uniform_and_independent_of_the_groups() -> None:
    ids = np.arange(200_000, dtype=np.int64)
    u = sample_unit(ids)
    assert np.array_equal(u, sample_unit(ids.copy())) and ((u >= 0) & (u < 1)).all()
    assert abs((u < 0.25).mean() - 0.25) < 0.01
    holdout = customer_unit(ids) < 0.1  # a group band of the unit keeps its share inside a sample
    assert abs(holdout[u < 0.25].mean() - holdout.mean()) < 0.01
    assert budget_fraction(100, None) == 1.0 and budget_fraction(100, 200) == 1.0
    assert budget_fraction(1000, 250) == 0.25


@pytest.mark.spark
def test_spark_training_frame_equals_the_local_one_within_the_budget(spark, small_data: Path) -> None:
    fs = load_registry().feature_set("churn_default")
    # the shared data is only read here
    cfg = load_config(workspace=small_data.parent, environ={}, overrides={"training.max_rows": 3000})
    local = training_frame(cfg, fs, CUTOFFS, 30)
    remote = training_frame(cfg.model_copy(update={"training": cfg.training.model_copy(
        update={"engine": "spark"})}), fs, CUTOFFS, 30, spark=spark)
    pd.testing.assert_frame_equal(local, remote)
    full = training_frame(cfg.model_copy(update={"training": cfg.training.model_copy(
        update={"max_rows": None})}), fs, CUTOFFS, 30)
    assert 0.7 * 3000 < len(local) < 1.3 * 3000 < len(full)
    # whole customers: every kept customer has all its rows of the full frame
    kept = set(local["customer_id"])
    assert len(full[full["customer_id"].isin(kept)]) == len(local)
    assert 0 < holdout_mask(local["customer_id"], cfg).mean() < 0.3
