"""Metrics of churn scores: values checked against hand computations."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mlflow_churn.config import EvaluationConfig
from mlflow_churn.errors import ChurnError
from mlflow_churn.stats.metrics import (
    calibration_bins,
    classification_metrics,
    scalar_metrics,
    segment_metrics,
)


def test_top_k_and_revenue_by_hand() -> None:
    # 10 customers, 4 churners; top 20% = 2 customers, both churners
    y = np.array([1, 1, 0, 0, 1, 0, 0, 1, 0, 0])
    p = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05])
    cfg = EvaluationConfig(top_k_pct=20, monthly_revenue=100, offer_cost=10, save_rate=0.5)
    m = classification_metrics(y, p, cfg)
    assert m["k"] == 2
    assert m["recall_at_k"] == pytest.approx(2 / 4)
    assert m["precision_at_k"] == pytest.approx(1.0)
    assert m["lift_at_k"] == pytest.approx(1.0 / 0.4)
    # targeted: 2 churners * 0.5 * 100 - 2 * 10 = 80; random: 2 * 0.4 * 50 - 20 = 20
    assert m["revenue_targeted"] == pytest.approx(80.0)
    assert m["revenue_random"] == pytest.approx(20.0)
    assert m["revenue_lift"] == pytest.approx((80 - 20) / 10)
    # AUC: pairs (churner, non-churner) ranked right / 24
    pos, neg = p[y == 1], p[y == 0]
    auc = np.mean([[a > b for b in neg] for a in pos])
    assert m["roc_auc"] == pytest.approx(auc)
    assert m["brier"] == pytest.approx(np.mean((p - y) ** 2))
    assert set(scalar_metrics(m)) <= set(m)


def test_calibration_perfect_and_biased() -> None:
    rng = np.random.default_rng(1)
    p = rng.random(200_000)
    y = (rng.random(200_000) < p).astype(int)
    ece, bins = calibration_bins(y, p, bins=10)
    assert ece < 0.01 and len(bins) == 10 and sum(b["count"] for b in bins) == 200_000
    ece_biased, _ = calibration_bins(y, np.clip(p + 0.2, 0, 1), bins=10)
    assert ece_biased > 0.1


def test_single_class_auc_is_nan_and_bad_input_named() -> None:
    m = classification_metrics([0, 0, 0], [0.1, 0.2, 0.3], EvaluationConfig())
    assert np.isnan(m["roc_auc"]) and "roc_auc" not in scalar_metrics(m)
    with pytest.raises(ChurnError, match="no rows"):
        classification_metrics([], [], EvaluationConfig())
    with pytest.raises(ChurnError, match=r"\[0, 1\]"):
        classification_metrics([0, 1], [0.2, 1.5], EvaluationConfig())


def test_segment_metrics_sizes_and_missing_column() -> None:
    rng = np.random.default_rng(2)
    n = 1000
    frame = pd.DataFrame({
        "score": rng.random(n), "label": rng.integers(0, 2, n),
        "plan": np.where(np.arange(n) < 900, "basic", "premium"),
        "tenure_days": rng.integers(0, 1500, n),
    })
    seg = segment_metrics(frame, "score", "label", ["plan", "tenure_bucket"], EvaluationConfig(),
                          min_size=150)
    plan = seg[seg.segment == "plan"].set_index("value")
    assert plan.loc["basic", "n"] == 900 and bool(plan.loc["basic", "gated"])
    assert plan.loc["premium", "n"] == 100 and not bool(plan.loc["premium", "gated"])
    assert seg[seg.segment == "tenure_bucket"]["n"].sum() == n
    with pytest.raises(ChurnError, match="region"):
        segment_metrics(frame, "score", "label", ["region"], EvaluationConfig())
