"""Window drift on real offline frames, the per-cutoff frame cache, raw source null rates."""

from __future__ import annotations

import shutil
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from mlflow_churn.config import load_config
from mlflow_churn.data.sources import daily_source_nulls, source_integrity, source_reference
from mlflow_churn.features.offline import build_training_frame
from mlflow_churn.features.registry import load_registry
from mlflow_churn.monitoring.frames import FrameCache, window_frame
from mlflow_churn.monitoring.monitor import window_cutoffs
from mlflow_churn.monitoring.window_drift import NOISE_QUANTILE, window_drift
from mlflow_churn.stats import drift
from mlflow_churn.training.profile import build_profile

AS_OF = datetime(2026, 4, 7, tzinfo=UTC)


@pytest.fixture(scope="module")
def window(small_data: Path):
    fs = load_registry().feature_set("churn_default")
    ref = build_training_frame(small_data, fs, [datetime(2026, 3, 10, tzinfo=UTC)], 30, label=False)
    rng = np.random.default_rng(0)
    profile = build_profile(ref, fs, rng.beta(1, 8, len(ref)), segments=["plan", "region", "contract"])
    cur = build_training_frame(small_data, fs, window_cutoffs(AS_OF, 7), 30, label=False)
    cfg = load_config(environ={}, overrides={"monitoring.min_segment_size": 100})
    return fs, profile, cur, rng.beta(1, 8, len(cur)), cfg


def test_window_drift_categoricals_ks_and_segment_thresholds(window) -> None:
    fs, profile, cur, scores, cfg = window
    wd = window_drift(cur, scores, profile, cfg)
    s = wd.stats
    n_eff = cur["customer_id"].nunique()
    # chi-square on distinct-customer counts (one customer is on 7 cutoffs), JS on the shares
    e = profile["features"]["plan"]
    counts = drift.current_counts(e, cur["plan"])
    stat, p = drift.chi2_from_counts(np.array(e["shares"]) * e["count"], counts * n_eff / counts.sum())
    assert s.chi2["plan"] == pytest.approx(stat) and s.chi2_p["plan"] == pytest.approx(p)
    assert s.js["plan"] == pytest.approx(drift.js_from_shares(e["shares"], counts))
    assert set(s.js) == set(fs.categorical) and "monthly_usage" not in s.js
    # KS D against the reference sample, and its size-aware critical value
    assert s.ks_threshold["monthly_usage"] == pytest.approx(
        drift.ks_noise_quantile(len(profile["features"]["monthly_usage"]["sample"]), n_eff,
                                1 - (1 - NOISE_QUANTILE) / (len(fs.columns) + 1)))
    # each segment's threshold uses the bin count of the feature its PSI comes from
    for key, features in s.segment_features.items():
        col, value = key.split("=")
        top = features[0]
        bins = len((profile["score"] if top == "__score__" else profile["features"][top])["shares"])
        n_seg = cur.loc[cur[col].astype(str) == value, "customer_id"].nunique()
        q = 1 - (1 - NOISE_QUANTILE) / ((len(fs.columns)) * 10)  # features + score, minus the segment column
        assert s.segment_threshold[key] == pytest.approx(drift.psi_noise_quantile(
            profile["segments"][col][value]["count"], n_seg, bins, q))
    # daily tables: one row per cutoff; a day's PSI is the PSI of that day's rows
    assert list(wd.daily.index) == sorted(cur["cutoff"].unique())
    assert set(wd.daily_segments.columns) == set(s.segment_psi)
    day = cur[cur["cutoff"] == cur["cutoff"].max()]
    assert wd.daily["monthly_usage"].iloc[-1] == pytest.approx(
        drift.feature_psi_against_profile(profile["features"]["monthly_usage"], day["monthly_usage"],
                                          cfg.monitoring.psi_epsilon))


def test_frame_cache_builds_only_missing_cutoffs(small_data: Path) -> None:
    fs = load_registry().feature_set("churn_default")
    cache = FrameCache(max_entries=10)
    first = window_frame(small_data, fs, window_cutoffs(AS_OF, 3), 30, label_horizon=7,
                         label_as_of=AS_OF + timedelta(days=7), cache=cache)
    later = window_cutoffs(AS_OF + timedelta(days=1), 3)
    cached = window_frame(small_data, fs, later, 30, label_horizon=7, label_as_of=AS_OF + timedelta(days=8),
                          cache=cache)
    direct = build_training_frame(small_data, fs, later, 7, label=True, label_as_of=AS_OF + timedelta(days=8))
    assert cached.equals(direct)
    assert len(cache) == 4 and len(first) > 0
    # another label horizon is another entry
    window_frame(small_data, fs, later, 30, cache=cache)
    assert len(cache) == 7


def test_source_null_rates_per_day_and_missing_days(small_data: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(small_data, data)
    day = data / "activity" / "date=2026-04-05" / "part-0.parquet"
    table = pq.read_table(day)
    col = table.column("data_used_mb").to_numpy(zero_copy_only=False).copy()
    col[: len(col) // 4] = np.nan
    pq.write_table(table.set_column(table.schema.get_field_index("data_used_mb"), "data_used_mb",
                                    [col.astype(np.float32)]), day)
    shutil.rmtree(data / "activity" / "date=2026-04-03")
    ref = source_reference(data, AS_OF - timedelta(days=40), AS_OF - timedelta(days=10))
    assert ref["activity.data_used_mb"]["null_rate"] == 0.0 and ref["activity.sessions"]["rows"] > 0
    nulls = daily_source_nulls(data, AS_OF - timedelta(days=7), AS_OF)
    assert nulls.days == [date(2026, 3, 31) + timedelta(days=i) for i in range(7)]
    found = source_integrity(nulls, ref)
    assert found.rate["activity.data_used_mb"] == pytest.approx(0.25, abs=0.01)
    assert found.rate["activity.minutes_used"] == 0.0
    assert found.missing_days == ["2026-04-03"]
    assert 0 < found.noise["activity.data_used_mb"] < 0.05
    daily = found.daily["activity.data_used_mb"]
    assert np.isnan(daily[3]) and daily[5] == pytest.approx(0.25, abs=0.01)
