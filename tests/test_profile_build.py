"""build_profile's one-sort, one-bincount build gives exactly the numbers of the per-column,
per-segment definitions (drift.quantile_edges / bin_counts / category_counts / null_rate on
each segment's rows): equal floats, so a stored profile's JSON does not change."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mlflow_churn.features.registry import table_feature_set
from mlflow_churn.stats import drift
from mlflow_churn.training.profile import build_profile


@pytest.fixture(scope="module")
def mixed() -> tuple[pd.DataFrame, np.ndarray]:
    rng = np.random.default_rng(3)
    n = 4000
    frame = pd.DataFrame({
        "num": np.where(rng.random(n) < 0.1, np.nan, rng.normal(size=n)),
        "ints": rng.integers(0, 5, n),
        "const": np.ones(n),
        "obj": pd.Series(rng.choice(["a", "b", None, "c"], n), dtype=object),
        "cat": pd.Categorical(rng.choice(["x", "y", "z"], n), categories=["x", "y", "z", "w"]),
        "seg_num": rng.integers(0, 3, n),
        "seg_str": pd.Series(rng.choice(["k1", "k2", None], n), dtype=object),
    })
    return frame, rng.beta(1, 5, n)


def reference_entry(entry: dict, values: pd.Series) -> dict:
    """A segment entry by the definitions, on the segment's own rows."""
    counts = drift.current_counts(entry, values)
    return {"shares": drift.shares(counts).tolist(), "count": int(counts.sum()),
            "null_rate": drift.null_rate(values)}


def test_profile_equals_the_definitions(mixed) -> None:
    frame, scores = mixed
    fs = table_feature_set("t", frame)
    prof = build_profile(frame, fs, scores, bins=10, segments=["cat", "obj", "seg_num", "seg_str"],
                         sample_size=500)
    for name in fs.columns:
        e = prof["features"][name]
        if name in fs.categorical:
            s = frame[name]
            assert e["shares"] == drift.shares(drift.category_counts(s, e["categories"])).tolist()
            observed = {str(v) for v in s[s.notna()].unique()}
            assert set(e["categories"]) == set(map(str, fs.categorical[name])) | observed
            continue
        values = drift.as_float_array(frame[name])
        finite = values[~np.isnan(values)]
        assert e["edges"] == drift.quantile_edges(finite, 10).tolist()
        assert e["shares"] == drift.shares(drift.bin_counts(finite, np.array(e["edges"]))).tolist()
        assert (e["mean"], e["std"], e["min"], e["max"]) == (
            float(finite.mean()), float(finite.std()), float(finite.min()), float(finite.max()))
        assert e["null_rate"] == float(np.isnan(values).mean())
        assert e["sample"] == sorted(e["sample"]) and len(e["sample"]) == min(500, finite.size)
    for col, per_value in prof["segments"].items():
        keys = frame[col].astype("object").map(lambda v: None if pd.isna(v) else str(v))
        assert list(per_value) == sorted(keys.dropna().unique())
        for value, seg in per_value.items():
            mask = (keys == value).to_numpy()
            assert seg["count"] == int(mask.sum()) and seg["share"] == float(mask.sum() / len(frame))
            for name in fs.columns:
                assert seg["features"][name] == reference_entry(prof["features"][name], frame[name][mask])
            assert seg["score"] == reference_entry(prof["score"], scores[mask])


def test_profile_without_segments_is_the_same_population(mixed) -> None:
    frame, scores = mixed
    fs = table_feature_set("t", frame)
    with_segments = build_profile(frame, fs, scores, segments=["cat"])
    plain = build_profile(frame, fs, scores)
    assert plain["segments"] == {}
    assert plain["features"] == with_segments["features"] and plain["score"] == with_segments["score"]


def test_edge_bins_is_searchsorted_left() -> None:
    rng = np.random.default_rng(1)
    for n_edges in (0, 1, 9, 200):  # 200: past the small-integer path
        edges = np.sort(rng.normal(size=n_edges))
        values = rng.normal(size=3000)
        values[:4] = [np.nan, np.inf, -np.inf, edges[0] if n_edges else 0.0]  # an edge goes left
        expected = np.searchsorted(edges, values, side="left")
        expected[np.isnan(values)] = -1
        np.testing.assert_array_equal(drift.edge_bins(values, edges), expected)
        assert drift.edge_bins(values, edges).dtype == np.int64
