"""Drift engine: PSI by hand and against Evidently 0.7, KS against scipy, chi2/JS, streaming."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy import stats
from scipy.spatial.distance import jensenshannon

from mlflow_churn.errors import ChurnError
from mlflow_churn.stats import drift


def test_psi_quantile_matches_hand_computation() -> None:
    # reference 0..99: deciles -> edges 9.9, 19.8, ... ; with bins=4 edges at 24.75, 49.5, 74.25
    ref = np.arange(100, dtype=float)
    cur = np.concatenate([np.full(10, 10.0), np.full(20, 30.0), np.full(30, 60.0), np.full(40, 90.0)])
    edges = drift.quantile_edges(ref, 4)
    np.testing.assert_allclose(edges, [24.75, 49.5, 74.25])
    r = np.array([0.25, 0.25, 0.25, 0.25])
    c = np.array([0.1, 0.2, 0.3, 0.4])
    expected = float(np.sum((c - r) * np.log(c / r)))
    assert drift.psi(ref, cur, bins=4) == pytest.approx(expected, abs=1e-15)
    assert expected == pytest.approx(0.2282174, abs=1e-6)  # 0.1374+0.0112+0.0091+0.0705


def test_psi_empty_bin_uses_epsilon_and_edge_goes_left() -> None:
    ref = np.array([1.0, 2.0, 3.0, 4.0])
    # bins=2 -> one edge at the median 2.5; current all on the left side
    cur = np.array([1.0, 2.0, 2.5])
    eps = 1e-4
    # left bin: 1.0 vs 0.5 ; right bin: 0 -> eps vs 0.5
    expected = (1.0 - 0.5) * math.log(1.0 / 0.5) + (eps - 0.5) * math.log(eps / 0.5)
    assert drift.psi(ref, cur, bins=2, epsilon=eps) == pytest.approx(expected, rel=1e-12)
    assert drift.psi(ref, cur, bins=2, epsilon=1e-3) < drift.psi(ref, cur, bins=2, epsilon=1e-6)
    # NaNs are ignored, identical samples give 0
    assert drift.psi([1, 2, np.nan, 3], [1, 2, 3]) == pytest.approx(0.0)
    with pytest.raises(ChurnError, match="binning"):
        drift.psi(ref, cur, binning="sturges")
    with pytest.raises(ChurnError, match="non-missing"):
        drift.psi([np.nan], cur)


def _evidently_stattest(ref: pd.Series, cur: pd.Series, categorical: bool = False) -> float:
    from evidently.legacy.calculations.stattests.psi import _psi
    from evidently.legacy.core import ColumnType

    kind = ColumnType.Categorical if categorical else ColumnType.Numerical
    return float(_psi(ref, cur, kind, 0.1)[0])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_psi_evidently_binning_equals_evidently(seed: int) -> None:
    rng = np.random.default_rng(seed)
    ref = pd.Series(rng.lognormal(3, 1, 5000))
    cur = pd.Series(rng.lognormal(3.2, 1.1, 4000))
    assert drift.psi(ref, cur, binning="evidently") == _evidently_stattest(ref, cur)
    # few distinct values: Evidently bins by value (with a value only current has)
    ref_d = pd.Series(rng.integers(0, 6, 3000).astype(float))
    cur_d = pd.Series(rng.integers(0, 8, 2000).astype(float))
    assert drift.psi(ref_d, cur_d, binning="evidently") == pytest.approx(
        _evidently_stattest(ref_d, cur_d), rel=1e-12
    )
    cats_r = pd.Series(rng.choice(["a", "b", "c"], 1000))
    cats_c = pd.Series(rng.choice(["a", "b", "d"], 800))
    assert drift.evidently_psi(cats_r, cats_c, categorical=True) == pytest.approx(
        _evidently_stattest(cats_r, cats_c, categorical=True), rel=1e-12
    )


def test_psi_evidently_binning_equals_data_drift_preset() -> None:
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    rng = np.random.default_rng(5)
    ref = pd.DataFrame({"a": rng.normal(size=3000), "b": rng.integers(0, 5, 3000).astype(float)})
    cur = pd.DataFrame({"a": rng.normal(0.25, 1.2, size=2500), "b": rng.integers(0, 6, 2500).astype(float)})
    dd = DataDefinition(numerical_columns=["a", "b"])
    snap = Report([DataDriftPreset(method="psi")]).run(
        Dataset.from_pandas(cur, data_definition=dd), Dataset.from_pandas(ref, data_definition=dd)
    )
    values = [m["value"] for m in snap.dict()["metrics"] if isinstance(m["value"], float)]
    ours = [drift.psi(ref[c], cur[c], binning="evidently") for c in ("a", "b")]
    assert len(values) == 2
    np.testing.assert_allclose(sorted(values), sorted(ours), rtol=1e-12)


@pytest.mark.parametrize("n1,n2", [(50, 70), (3000, 2000), (20_000, 15_000)])
def test_ks_equals_scipy(n1: int, n2: int) -> None:
    rng = np.random.default_rng(n1)
    a = rng.normal(size=n1)
    b = np.round(rng.normal(0.1, 1.0, size=n2), 2)  # ties on one side
    d, p = drift.ks(a, b)
    ref = stats.ks_2samp(a, b)
    assert abs(d - ref.statistic) < 1e-12
    assert p == pytest.approx(ref.pvalue, rel=1e-9, abs=1e-300)


def test_ks_against_sorted_sample_is_ks_of_the_sample() -> None:
    rng = np.random.default_rng(3)
    sample = np.sort(rng.normal(size=1000))
    cur = rng.normal(0.3, size=5000)
    assert drift.ks_against_sample(sample, cur) == pytest.approx(
        stats.ks_2samp(sample, cur).statistic, abs=1e-12
    )


def test_categorical_psi_unseen_bucket_by_hand() -> None:
    ref = ["a"] * 50 + ["b"] * 50
    cur = ["a"] * 40 + ["b"] * 40 + ["z"] * 20  # z was never seen
    eps = 1e-4
    expected = (0.4 - 0.5) * math.log(0.4 / 0.5) * 2 + (0.2 - eps) * math.log(0.2 / eps)
    assert drift.categorical_psi(ref, cur) == pytest.approx(expected, rel=1e-12)
    assert drift.categorical_psi(ref, ["a", "b"] * 10) == pytest.approx(0.0)


def test_chi2_and_js_equal_scipy() -> None:
    rng = np.random.default_rng(9)
    ref = rng.choice(list("abcd"), 2000, p=[0.4, 0.3, 0.2, 0.1])
    cur = rng.choice(list("abcde"), 1500, p=[0.3, 0.3, 0.2, 0.1, 0.1])
    stat, p = drift.chi2(ref, cur)
    cats = sorted(set(ref) | set(cur))
    table = np.array([[np.sum(ref == c) for c in cats], [np.sum(cur == c) for c in cats]])
    s_ref = stats.chi2_contingency(table, correction=False)
    assert stat == pytest.approx(s_ref.statistic, rel=1e-12)
    assert p == pytest.approx(s_ref.pvalue, rel=1e-9, abs=1e-300)
    assert drift.js(ref, cur) == pytest.approx(jensenshannon(table[0], table[1], base=2), rel=1e-12)
    assert drift.js(["a", "b"], ["a", "b"]) == pytest.approx(0.0)
    assert drift.js(["a"], ["b"]) == pytest.approx(1.0)


def test_size_aware_threshold_tracks_the_noise() -> None:
    # small samples: the chi-square quantile dominates the configured value
    small = drift.psi_threshold(0.2, 150, 150, 10)
    assert small == pytest.approx((2 / 150) * stats.chi2.ppf(0.99, 9))
    assert small > 0.2
    assert drift.psi_threshold(0.2, 1_000_000, 1_000_000, 10) == 0.2
    # empirical: PSI of two samples from one distribution stays below the 99% noise level
    rng = np.random.default_rng(0)
    vals = [drift.psi(rng.normal(size=400), rng.normal(size=400)) for _ in range(200)]
    assert np.mean(np.array(vals) > drift.psi_noise_quantile(400, 400, 10)) < 0.05


def test_streaming_equals_in_memory(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    ref = pd.DataFrame({"x": rng.normal(size=5000), "c": rng.choice(["a", "b"], 5000)})
    profile = {
        "features": {
            "x": {
                "kind": "numeric",
                "edges": drift.quantile_edges(ref.x, 10).tolist(),
                "shares": drift.shares(drift.bin_counts(ref.x, drift.quantile_edges(ref.x, 10))).tolist(),
                "count": 5000,
                "null_rate": 0.0,
                "sample": np.sort(ref.x.to_numpy()[:2000]).tolist(),
            },
            "c": {
                "kind": "categorical",
                "categories": ["a", "b"],
                "shares": drift.shares(drift.category_counts(ref.c, ["a", "b"])).tolist(),
                "count": 5000,
                "null_rate": 0.0,
            },
        }
    }
    cur = pd.DataFrame({"x": rng.normal(0.2, size=30_000), "c": rng.choice(["a", "b", "q"], 30_000)})
    cur.loc[::100, "x"] = np.nan
    pq.write_table(pa.Table.from_pandas(cur), tmp_path / "cur.parquet", row_group_size=4000)
    streamed = drift.stream_drift(tmp_path / "cur.parquet", profile, batch_rows=3000)
    for c in ("x", "c"):
        whole = drift.drift_against_entry(c, profile["features"][c], cur[c], 0.2)
        assert streamed[c].psi == pytest.approx(whole.psi, rel=1e-12)
        assert streamed[c].null_rate == pytest.approx(whole.null_rate)
    # streamed KS at the sample's points equals the exact KS of sample vs current
    assert streamed["x"].ks == pytest.approx(
        drift.ks_against_sample(np.array(profile["features"]["x"]["sample"]), cur.x), abs=1e-12
    )
    with pytest.raises(ChurnError, match="not in the profile"):
        drift.stream_drift(tmp_path / "cur.parquet", profile, columns=["nope"])


def test_grouped_fast_path_equals_direct_counts() -> None:
    rng = np.random.default_rng(21)
    x = rng.normal(size=5000)
    x[::50] = np.nan
    entry = {"kind": "numeric", "edges": drift.quantile_edges(x, 10).tolist()}
    groups = rng.integers(0, 4, 5000)
    idx = drift.bin_index(entry, x)
    got = drift.grouped_counts(idx, groups, 4, len(entry["edges"]) + 1)
    for g in range(4):
        np.testing.assert_array_equal(got[g], drift.bin_counts(x[groups == g], np.array(entry["edges"])))
    cats = pd.Series(pd.Categorical(rng.choice(["a", "b", "z"], 5000)))
    centry = {"kind": "categorical", "categories": ["a", "b"]}
    cidx = drift.bin_index(centry, cats)
    np.testing.assert_array_equal(np.bincount(cidx, minlength=3), drift.category_counts(cats, ["a", "b"]))
    np.testing.assert_array_equal(drift.bin_index(centry, cats.astype(str)), cidx)
    # KS at the sample points: the streamed definition, within 1/k of the exact sample KS
    sample = np.sort(rng.normal(size=2000))
    cur = rng.normal(0.2, size=20_000)
    fast = drift.ks_at_sample_points(sample, cur)
    exact = drift.ks_against_sample(sample, cur)
    assert fast <= exact + 1e-12 and exact - fast <= 1 / 2000 + 1e-3


def test_ks_and_null_noise_levels_match_simulation() -> None:
    rng = np.random.default_rng(8)
    crit = drift.ks_noise_quantile(1000, 3000, 0.99)
    ds = [stats.ks_2samp(rng.normal(size=1000), rng.normal(size=3000)).statistic for _ in range(400)]
    assert np.mean(np.array(ds) > crit) < 0.03
    assert crit == pytest.approx(stats.kstwo.ppf(0.99, round(1000 * 3000 / 4000)), rel=0.05)
    # a null rate of 2% on 500 rows vs a reference of 2% on 10,000: the rise noise alone reaches
    noise = drift.null_rise_noise(0.02, 10_000, 0.02, 500, 0.99)
    rises = [rng.binomial(500, 0.02) / 500 - rng.binomial(10_000, 0.02) / 10_000 for _ in range(2000)]
    assert np.mean(np.array(rises) > noise) < 0.02
    assert drift.null_rise_noise(0.0, 0, 0.0, 0) == float("inf")


def test_psi_rows_equals_psi_per_row() -> None:
    ref = np.array([0.25, 0.25, 0.5])
    counts = np.array([[10, 20, 30], [0, 0, 0], [5, 0, 5]])
    got = drift.psi_rows(ref, counts)
    assert got[0] == pytest.approx(drift.psi_from_shares(ref, drift.shares(counts[0])))
    assert np.isnan(got[1])
    assert got[2] == pytest.approx(drift.psi_from_shares(ref, drift.shares(counts[2])))
