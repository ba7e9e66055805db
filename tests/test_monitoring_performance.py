"""Performance: expected AUC under calibration vs simulation, realised drops."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from mlflow_churn.config import EvaluationConfig
from mlflow_churn.errors import ChurnError
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


def _segment_frame(rng: np.random.Generator, customers: int = 3000, cutoffs: int = 4):
    """Customers on several cutoffs; in region 'south' the scores follow churn less."""
    import pandas as pd

    region = rng.choice(["north", "south", "tiny"], size=customers, p=[0.6, 0.39, 0.01])
    plan = rng.choice(["basic", "premium"], size=customers)
    churner = rng.random(customers) < 0.08
    frame = pd.DataFrame({"customer_id": np.repeat(np.arange(customers), cutoffs),
                          "region": np.repeat(region, cutoffs), "plan": np.repeat(plan, cutoffs),
                          "label": np.repeat(churner, cutoffs).astype(int)})
    signal = np.where(frame["region"] == "south", 0.3, 1.2) * frame["label"]
    # a customer's scores on nearby cutoffs hardly differ (the rows are one cluster)
    noise = np.repeat(rng.normal(size=customers), cutoffs) + rng.normal(scale=0.1, size=len(frame))
    scores = 1 / (1 + np.exp(-(noise + signal - 2.5)))
    return frame, scores


def test_segment_auc_is_sklearn_roc_auc_on_the_segments_rows() -> None:
    from mlflow_churn.stats.performance import auc_standard_error, segment_performance

    rng = np.random.default_rng(11)
    frame, scores = _segment_frame(rng)
    cfg = EvaluationConfig()
    perfs = segment_performance(["region", "plan"], frame, scores, cfg, matured=frame, matured_scores=scores,
                                min_rows=100, min_churners=20)
    assert list(perfs) == ["plan=basic", "plan=premium", "region=north", "region=south", "region=tiny"]
    for key in ("region=north", "region=south", "plan=premium"):
        col, value = key.split("=")
        rows = (frame[col] == value).to_numpy()
        y, s = frame["label"].to_numpy()[rows], scores[rows]
        p = perfs[key]
        # by hand on the segment's rows
        assert p.auc == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert p.rows == rows.sum()
        churners = frame.loc[rows & (frame["label"] == 1).to_numpy(), "customer_id"].nunique()
        customers = frame.loc[rows, "customer_id"].nunique()
        assert (p.churners, p.customers) == (churners, customers)
        # the SE: a bootstrap over customers (a customer's rows together), redone here by resampling
        seg_ids = frame["customer_id"].to_numpy()[rows]
        uniq, inverse = np.unique(seg_ids, return_inverse=True)
        members = [np.flatnonzero(inverse == i) for i in range(uniq.size)]
        boot = []
        for _ in range(100):
            take = np.concatenate([members[i] for i in rng.integers(0, uniq.size, uniq.size)])
            boot.append(roc_auc_score(y[take], np.asarray(s)[take]))
        assert p.auc_se == pytest.approx(np.std(boot, ddof=1), rel=0.25)
        assert p.auc_se < auc_standard_error(p.auc, churners, customers - churners) * 1.2
        by_hand = classification_metrics(y, s, cfg)
        assert p.recall_at_k == pytest.approx(by_hand["recall_at_k"])
        assert p.revenue_lift == pytest.approx(by_hand["revenue_lift"])
        r, q, k = by_hand["recall_at_k"], by_hand["precision_at_k"], by_hand["k"]
        below = (y.sum() - q * k) / (len(y) - k)
        assert p.recall_at_k_se == pytest.approx(
            r * (1 - r) * np.sqrt((1 - q) / (r * churners) + (1 - below) / ((1 - r) * churners)))
        assert p.revenue_lift_se > 0 and p.estimated_auc_se > 0
        assert p.reason is None and p.estimate_reason is None
    assert perfs["region=south"].auc < perfs["region=north"].auc - 0.15
    # the estimate of a segment is the CBPE estimate on its own rows' scores
    south = (frame["region"] == "south").to_numpy()
    assert perfs["region=south"].estimated_auc == pytest.approx(expected_auc(scores[south]))


def test_small_segments_say_why_instead_of_a_number() -> None:
    from mlflow_churn.stats.performance import segment_performance

    rng = np.random.default_rng(12)
    frame, scores = _segment_frame(rng)
    cfg = EvaluationConfig()
    perfs = segment_performance(["region"], frame, scores, cfg, matured=frame, matured_scores=scores,
                                min_rows=200, min_churners=20)
    tiny = perfs["region=tiny"]  # ~30 customers x 4 cutoffs
    assert tiny.auc is None and tiny.estimated_auc is None
    assert tiny.reason.startswith("too few rows") and "monitoring.segment_min_rows" in tiny.reason
    assert "monitoring.segment_min_rows" in tiny.estimate_reason
    few = segment_performance(["region"], frame, scores, cfg, matured=frame, matured_scores=scores,
                              min_rows=10, min_churners=1000)["region=north"]
    assert few.auc is None and few.reason.startswith("too few churners")
    assert "monitoring.segment_min_churners" in few.reason and few.churners < 1000
    assert few.estimate_reason.startswith("too few expected churners")
    # no matured labels yet: the estimate only, and the reason says so
    est = segment_performance(["region"], frame, scores, cfg, min_rows=10, min_churners=5)["region=north"]
    assert est.auc is None and est.reason == "labels not matured yet" and est.estimated_auc is not None
    with pytest.raises(ChurnError, match="monitoring.segments"):
        segment_performance(["county"], frame, scores, cfg)


def test_segment_standard_errors_match_the_spread_over_samples() -> None:
    from mlflow_churn.stats.performance import segment_performance

    cfg = EvaluationConfig()
    samples = []
    for i in range(80):
        frame, scores = _segment_frame(np.random.default_rng(200 + i), customers=2000)
        samples.append(segment_performance(["plan"], frame, scores, cfg, matured=frame, matured_scores=scores,
                                           min_rows=10, min_churners=5)["plan=basic"])
    for stat in ("auc", "recall_at_k", "revenue_lift"):
        spread = np.std([getattr(p, stat) for p in samples])
        se = np.mean([getattr(p, f"{stat}_se") for p in samples])
        assert se == pytest.approx(spread, rel=0.3), stat


def test_compare_segments_drop_se_and_bonferroni_z() -> None:
    from mlflow_churn.stats.performance import (
        SegmentBaseline,
        compare_segments,
        segment_baseline,
        segment_baseline_metrics,
        segment_performance,
    )
    from mlflow_churn.stats.uncertainty import segment_z

    rng = np.random.default_rng(13)
    frame, scores = _segment_frame(rng)
    cfg = EvaluationConfig()
    perfs = segment_performance(["region"], frame, scores, cfg, matured=frame, matured_scores=scores,
                                min_rows=200, min_churners=20)
    # what training records round-trips through MLflow metric names
    metrics = segment_baseline_metrics(perfs)
    assert metrics["val_segment_auc.region.north"] == pytest.approx(perfs["region=north"].auc)
    assert "val_segment_auc.region.tiny" not in metrics
    base = {k: segment_baseline(metrics, k) for k in perfs}
    assert base["region=tiny"] is None and base["region=south"].source == "training"
    base["region=south"] = SegmentBaseline(0.9, 0.02, 0.9, 0.03, "first window", "training", 0.88, 0.03)
    z = compare_segments(perfs, base, alpha=0.01)
    assert z == pytest.approx(segment_z(0.01, 2))  # north and south compared, tiny not
    south = perfs["region=south"]
    assert south.source == "realised" and south.reference_source == "first window"
    assert south.drop == pytest.approx(0.9 - south.auc) and south.reference == 0.9
    assert south.drop_se == pytest.approx(np.hypot(0.02, south.auc_se))
    assert south.threshold == pytest.approx(z * south.drop_se)
    assert (south.estimate_baseline_source, south.training_auc) == ("training", 0.88)
    # the CBPE expectation of the same rows' scores is kept for reading
    assert south.expected_auc == pytest.approx(expected_auc(scores[(frame["region"] == "south").to_numpy()]))
    # training's baseline alone: its estimate is the reference (a realised AUC is compared only
    # with a first window's), its realised AUC kept for reading
    north = perfs["region=north"]
    assert base["region=north"].auc is None and north.training_auc == pytest.approx(north.auc)
    assert (north.source, north.reference_source) == ("estimated", "training estimate")
    assert perfs["region=tiny"].drop is None
    # before labels mature the estimate is compared
    est = segment_performance(["region"], frame, scores, cfg, min_rows=200, min_churners=20)
    compare_segments(est, {"region=north": SegmentBaseline(None, None, 0.7, 0.01, "training")}, 0.01)
    north = est["region=north"]
    assert north.source == "estimated" and north.drop == pytest.approx(0.7 - north.estimated_auc)
    assert north.reference_source == "training estimate"
    assert north.drop_se == pytest.approx(np.hypot(0.01, north.estimated_auc_se))


def test_estimate_se_is_the_spread_of_the_auc_labels_will_show() -> None:
    import pandas as pd

    from mlflow_churn.stats.performance import segment_performance

    rng = np.random.default_rng(14)
    customers, cutoffs = 3000, 5
    p_customer = rng.beta(1.2, 14, size=customers)  # calibrated: a customer churns with probability p
    frame = pd.DataFrame({"customer_id": np.repeat(np.arange(customers), cutoffs), "plan": "basic"})
    scores = np.repeat(p_customer, cutoffs)
    est = segment_performance(["plan"], frame, scores, EvaluationConfig(), min_rows=10,
                              min_churners=10)["plan=basic"]
    aucs = [roc_auc_score(np.repeat(rng.random(customers) < p_customer, cutoffs), scores) for _ in range(200)]
    assert est.estimated_auc == pytest.approx(np.mean(aucs), abs=0.01)
    assert est.expected_churners == pytest.approx(p_customer.sum())
    assert est.estimated_auc_se == pytest.approx(np.std(aucs), rel=0.25)
