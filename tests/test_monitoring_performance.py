"""Performance: expected AUC under calibration vs simulation, realised drops."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from mlflow_churn.config import EvaluationConfig
from mlflow_churn.evaluation.metrics import classification_metrics
from mlflow_churn.monitoring.performance import assess, expected_auc, expected_business


def test_expected_auc_matches_monte_carlo_for_calibrated_scores() -> None:
    rng = np.random.default_rng(0)
    p = rng.beta(1.2, 9, size=4000)
    p[:200] = 0.1  # a tie group
    aucs = [roc_auc_score(rng.random(p.size) < p, p) for _ in range(300)]
    # ratio-of-expectations approximation: within Monte-Carlo error of the mean AUC
    assert expected_auc(p) == pytest.approx(np.mean(aucs), abs=0.004)


def test_expected_auc_hand_case_and_edges() -> None:
    # two rows p = (0.2, 0.8): concordant pair prob = 0.8 * 0.8 ; denom = 1*1 - (0.16+0.16)
    # E[conc] = p2(1-p1) = 0.64 ; E[pos*neg] = 0.64 + p1(1-p2) = 0.64 + 0.04 = 0.68
    assert expected_auc([0.2, 0.8]) == pytest.approx(0.64 / 0.68)
    assert expected_auc([0.3, 0.3, 0.3]) == pytest.approx(0.5)
    assert np.isnan(expected_auc([0.5]))


def test_expected_business_and_realised_drops() -> None:
    rng = np.random.default_rng(1)
    cfg = EvaluationConfig()
    p = rng.beta(1, 8, size=20_000)
    y = (rng.random(p.size) < p).astype(int)
    exp = expected_business(p, cfg)
    real = classification_metrics(y, p, cfg)
    assert exp["recall_at_k"] == pytest.approx(real["recall_at_k"], abs=0.03)
    assert exp["revenue_lift"] == pytest.approx(real["revenue_lift"], rel=0.1)
    perf = assess(p, p[:5000], cfg, val_auc=0.80, matured_labels=y, matured_scores=p, label_horizon_days=30)
    assert perf.auc_drop == pytest.approx(0.80 - real["roc_auc"])
    assert abs(perf.recall_drop) < 0.03
    assert abs(perf.estimated_auc_drop) < 0.02
    assert "realised_roc_auc" in perf.metrics()
    # labels that no longer follow the scores (concept drift): realised drops, estimate cannot see it
    y_shuffled = rng.permutation(y)
    bad = assess(p, p, cfg, val_auc=0.80, matured_labels=y_shuffled, matured_scores=p)
    assert bad.auc_drop > 0.2 and bad.recall_drop > 0.1 and bad.lift_drop > 0.5
    assert bad.estimated_auc_drop == pytest.approx(0.0)
    # no matured labels: realised metrics are None
    none = assess(p, p, cfg, val_auc=0.8)
    assert none.auc_drop is None and none.realised is None


def test_auc_noise_level_matches_simulation() -> None:
    from mlflow_churn.monitoring.performance import auc_standard_error

    rng = np.random.default_rng(4)
    x_pos, x_neg = 1.0, 0.0
    aucs = []
    for _ in range(300):
        y = np.r_[np.ones(100), np.zeros(900)]
        s = np.r_[rng.normal(x_pos, 1, 100), rng.normal(x_neg, 1, 900)]
        aucs.append(roc_auc_score(y, s))
    se = auc_standard_error(float(np.mean(aucs)), 100, 900)
    assert se == pytest.approx(np.std(aucs), rel=0.2)
