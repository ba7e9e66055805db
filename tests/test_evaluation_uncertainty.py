"""The paired cluster bootstrap behind the gate's segment rule (mlflow_churn.stats.uncertainty)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from mlflow_churn.stats.uncertainty import (
    customer_weights,
    paired_auc_diff_se,
    segment_auc_diff_se,
    segment_z,
    weighted_auc,
)


def _data(customers: int, rows_each: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    risk = rng.normal(size=customers)
    ids = np.repeat(np.arange(customers), rows_each)
    y = (rng.random(customers) < 1 / (1 + np.exp(2.5 - risk)))[ids].astype(int)
    # a customer's rows at nearby cutoffs score almost alike (as in a holdout)
    good = (risk + rng.normal(scale=0.3, size=customers))[ids] + rng.normal(scale=0.01, size=len(ids))
    worse = (risk + rng.normal(scale=1.0, size=customers))[ids] + rng.normal(scale=0.01, size=len(ids))
    return pd.DataFrame({"customer_id": ids, "label": y, "good": good, "worse": worse,
                         "seg": np.where(ids % 2, "odd", "even")})


def test_weighted_auc_equals_sklearn_with_ties_and_repeats() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 500)
    score = np.round(rng.random(500) + 0.3 * y, 1)  # coarse scores: many ties
    assert weighted_auc(y, score, np.ones((1, 500)))[0] == pytest.approx(roc_auc_score(y, score), abs=1e-12)
    w = rng.integers(0, 4, 500)
    rep = np.repeat(np.arange(500), w)
    assert weighted_auc(y, score, w[None, :].astype(float))[0] == pytest.approx(
        roc_auc_score(y[rep], score[rep]), abs=1e-12)
    assert np.isnan(weighted_auc(np.zeros(5), np.arange(5.0), np.ones((1, 5)))[0])


def test_customer_weights_are_shared_by_a_customers_rows() -> None:
    ids = np.array([7, 7, 3, 9, 3, 7])
    w = customer_weights(ids, replicates=50, seed=1)
    assert w.shape == (50, 6)
    np.testing.assert_array_equal(w[:, 0], w[:, 1])
    np.testing.assert_array_equal(w[:, 2], w[:, 4])
    np.testing.assert_array_equal(w, customer_weights(ids, replicates=50, seed=1))  # seeded


def test_se_is_zero_for_the_same_model_and_shrinks_with_customers() -> None:
    small, large = _data(150, 7), _data(6000, 7)
    w = customer_weights(small["customer_id"].to_numpy())
    assert paired_auc_diff_se(small["label"], small["good"], small["good"], w) == 0.0
    se = {}
    for name, d in (("small", small), ("large", large)):
        se[name] = paired_auc_diff_se(d["label"].to_numpy(), d["good"].to_numpy(), d["worse"].to_numpy(),
                                      customer_weights(d["customer_id"].to_numpy()))
    assert se["large"] < se["small"] / 3  # ~ 1/sqrt(40) of it
    # 7 rows per customer are not 7 independent rows: the cluster SE exceeds the row-level one
    row_level = paired_auc_diff_se(small["label"].to_numpy(), small["good"].to_numpy(),
                                   small["worse"].to_numpy(), customer_weights(np.arange(len(small))))
    assert se["small"] > 2 * row_level  # ~ sqrt(7) x


def test_segment_table_counts_customers_and_churners() -> None:
    d = _data(400, 3)
    out = segment_auc_diff_se(d, d["good"].to_numpy(), d["worse"].to_numpy(), ["seg"])
    assert list(out["value"]) == ["even", "odd"] and list(out["customers"]) == [200, 200]
    churned = d[d["label"] == 1].groupby("seg")["customer_id"].nunique()
    assert list(out["churners"]) == [churned["even"], churned["odd"]]
    assert (out["auc_diff_se"] > 0).all()


def test_segment_z_is_bonferroni() -> None:
    assert segment_z(0.05, 1) == pytest.approx(1.6449, abs=1e-4)
    assert segment_z(0.05, 17) == pytest.approx(2.7543, abs=1e-3)  # 17 segments: plan, region, contract
    assert segment_z(0.0, 17) == 0.0 and segment_z(0.05, 0) == 0.0
