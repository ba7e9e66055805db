"""Performance: expected AUC under calibration vs simulation, realised drops."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from mlflow_churn.config import EvaluationConfig
from mlflow_churn.stats.metrics import classification_metrics
from mlflow_churn.stats.performance import assess, expected_auc, expected_business


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
    perf = assess(p, p[:5000], cfg, matured_labels=y, matured_scores=p, label_horizon_days=30)
    assert perf.realised["roc_auc"] == pytest.approx(real["roc_auc"])
    assert abs(perf.recall_drop) < 0.03
    assert abs(perf.estimated_auc_drop) < 0.02
    assert "realised_roc_auc" in perf.metrics()
    # labels that no longer follow the scores (concept drift): realised drops, estimate cannot see it
    y_shuffled = rng.permutation(y)
    bad = assess(p, p, cfg, matured_labels=y_shuffled, matured_scores=p)
    assert bad.realised["roc_auc"] < 0.55 and bad.recall_drop > 0.1 and bad.lift_drop > 0.5
    assert bad.estimated_auc_drop == pytest.approx(0.0)
    # no matured labels: realised metrics are None
    none = assess(p, p, cfg)
    assert none.auc_drop is None and none.realised is None


def test_auc_noise_level_matches_simulation() -> None:
    from mlflow_churn.stats.performance import auc_standard_error

    rng = np.random.default_rng(4)
    x_pos, x_neg = 1.0, 0.0
    aucs = []
    for _ in range(300):
        y = np.r_[np.ones(100), np.zeros(900)]
        s = np.r_[rng.normal(x_pos, 1, 100), rng.normal(x_neg, 1, 900)]
        aucs.append(roc_auc_score(y, s))
    se = auc_standard_error(float(np.mean(aucs)), 100, 900)
    assert se == pytest.approx(np.std(aucs), rel=0.2)


def test_platt_calibration_restores_the_cbpe_estimate() -> None:
    from mlflow_churn.stats.performance import calibrate, fit_calibration

    rng = np.random.default_rng(2)
    true_p = rng.beta(1.2, 20, size=30_000)
    y = (rng.random(true_p.size) < true_p).astype(int)
    logit = np.log(true_p / (1 - true_p))
    squeezed = 1 / (1 + np.exp(-(0.3 * logit - 2.2)))  # an early-stopped booster: scores near the base rate
    realised = roc_auc_score(y, squeezed)
    assert expected_auc(squeezed) < realised - 0.05
    cal = fit_calibration(squeezed, y)
    assert cal["a"] == pytest.approx(1 / 0.3, rel=0.1) and cal["positives"] == y.sum()
    assert expected_auc(calibrate(squeezed, cal)) == pytest.approx(realised, abs=0.01)
    assert fit_calibration(squeezed, np.zeros_like(y))["a"] == 1.0  # one class: the identity
    np.testing.assert_allclose(calibrate(squeezed, None), squeezed)


def test_auc_check_counts_distinct_customers_and_combines_both_errors() -> None:
    from mlflow_churn.stats.performance import auc_check, auc_standard_error

    rng = np.random.default_rng(3)
    ids = np.repeat(np.arange(2000), 7)  # one customer on 7 cutoffs
    churner = rng.random(2000) < 0.05
    y = np.repeat(churner, 7).astype(int)
    s = rng.normal(size=ids.size) + y
    check = auc_check(y, s, ids, baseline=0.8, baseline_se=0.02, z=2.0)
    pos = int(churner.sum())
    assert check.churners == pos
    assert check.se == pytest.approx(auc_standard_error(check.auc, pos, 2000 - pos))
    assert check.drop == pytest.approx(0.8 - check.auc)
    assert check.threshold == pytest.approx(2.0 * np.hypot(check.se, 0.02))
    assert auc_check(y, s, ids, 0.8, 0.02, 2.0, min_churners=pos + 1) is None
    assert auc_check(y, s, ids, None, None, 2.0).drop is None
