"""drift.ks / drift.ks_many give scipy.stats.ks_2samp's D and p exactly (the same floats):
random data with ties within and across the sides, NaNs, small n (scipy's exact path) and
sizes above 10,000 (Smirnov's distribution), 1-D, 2-D and column mappings."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from mlflow_churn.errors import ChurnError
from mlflow_churn.stats import drift


def scipy_ks(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """scipy's answer on the non-missing values (drift.ks drops NaNs)."""
    res = stats.ks_2samp(a[~np.isnan(a)], b[~np.isnan(b)], method="auto")
    return float(res.statistic), float(res.pvalue)


def sample(rng: np.random.Generator, n: int, kind: str, shift: float = 0.0) -> np.ndarray:
    if kind == "continuous":
        x = rng.gamma(2.0, 10.0, n) * (1.0 + shift)
    elif kind == "ties":  # few distinct values: ties within and across the two sides
        x = rng.integers(0, 12, n).astype(float) + (shift > 0)
    else:  # rounded: many ties, some across sides
        x = np.round(rng.normal(shift, 1.0, n), 2)
    x[rng.random(n) < 0.03] = np.nan
    return x


@pytest.mark.parametrize("kind", ["continuous", "ties", "rounded"])
@pytest.mark.parametrize("n1,n2", [(1, 3), (7, 7), (40, 90), (900, 1200), (2_000, 2_000),
                                   (12_000, 9_000), (30_000, 30_000), (25_000, 61_000)])
def test_ks_is_scipy_exactly(kind: str, n1: int, n2: int) -> None:
    rng = np.random.default_rng(n1 * 7 + n2)
    for shift in (0.0, 0.02, 0.3):
        a, b = sample(rng, n1, kind), sample(rng, n2, kind, shift)
        if np.isnan(a).all() or np.isnan(b).all():
            continue
        assert drift.ks(a, b) == scipy_ks(a, b)
        assert drift.ks(b, a) == scipy_ks(b, a)


def test_ks_many_is_scipy_exactly_per_column() -> None:
    rng = np.random.default_rng(5)
    n1, n2 = 20_000, 14_000
    kinds = ["continuous", "ties", "rounded"] * 2
    ref = np.column_stack([sample(rng, n1, k) for k in kinds])
    cur = np.column_stack([sample(rng, n2, k, shift=0.05 * j) for j, k in enumerate(kinds)])
    expected = {j: scipy_ks(ref[:, j], cur[:, j]) for j in range(len(kinds))}
    before = ref.copy(), cur.copy()
    assert drift.ks_many(ref, cur) == expected
    assert drift.ks_many(np.asfortranarray(ref), cur) == expected
    np.testing.assert_array_equal(ref, before[0])  # never sorted in place
    np.testing.assert_array_equal(cur, before[1])
    frames = pd.DataFrame(ref, columns=[f"c{j}" for j in range(6)]), pd.DataFrame(
        cur, columns=[f"c{j}" for j in range(6)])
    assert drift.ks_many(*frames) == {f"c{j}": v for j, v in expected.items()}
    small = drift.ks_many({"x": ref[:50, 0]}, {"x": cur[:80, 0]})  # scipy's exact path
    assert small == {"x": scipy_ks(ref[:50, 0], cur[:80, 0])}


def test_ks_identical_and_disjoint_samples() -> None:
    a = np.arange(20_000, dtype=float)
    assert drift.ks(a, a.copy()) == scipy_ks(a, a.copy())
    assert drift.ks(a, a + 1e6) == scipy_ks(a, a + 1e6) == (1.0, 0.0)


def test_ks_bad_input_names_the_column() -> None:
    with pytest.raises(ChurnError, match="at least one non-missing"):
        drift.ks([np.nan], [1.0])
    with pytest.raises(ChurnError, match="column 'b' has no non-missing value on the current side"):
        drift.ks_many({"a": [1.0, 2.0], "b": [1.0]}, {"a": [3.0], "b": [np.nan]})
    with pytest.raises(ChurnError, match="same columns"):
        drift.ks_many({"a": [1.0]}, {"z": [1.0]})
    with pytest.raises(ChurnError, match="2-D array"):
        drift.ks_many(np.zeros(3), np.zeros(3))
