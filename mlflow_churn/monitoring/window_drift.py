"""Drift of one monitoring window's rows against a version's reference profile (vectorised).

:func:`window_drift` bins every column once (:func:`~mlflow_churn.stats.drift.bin_index`)
and takes every histogram (per day, per segment and day) from one ``bincount`` over
(group, bin) codes; the window totals are sums over days. Per feature: PSI, KS D at the
reference sample's points (:func:`~mlflow_churn.stats.drift.ks_at_sample_points`),
for categoricals Jensen-Shannon distance and chi-square, null rates; PSI of the scores;
per segment the largest PSI over its features and scores, against the segment's own
reference shares.

Effective sample sizes: one customer appears once per daily cutoff, so the size-aware
thresholds and the chi-square use the number of distinct customers, not rows. Every
threshold is the 99% noise quantile split over the window's tests (Bonferroni):

- PSI: (1/N + 1/M) chi2_{B-1} with B = that feature's bin count (also per segment: the
  bins of the feature whose PSI is the segment's);
- KS: Smirnov's critical D for the reference sample and the window's customers;
- null rate: the normal quantile of the rise of a proportion.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd

from mlflow_churn.config import ChurnConfig
from mlflow_churn.monitoring.policy import WindowStats
from mlflow_churn.stats import drift
from mlflow_churn.stats.drift import ColumnKind
from mlflow_churn.stats.drift_counts import ks_from_sample_counts

NOISE_QUANTILE = 0.99
SCORE = "__score__"


@dataclass
class WindowDrift:
    """Window statistics (without performance) and the daily PSI tables (index = cutoff):
    ``daily`` per feature and ``__score__``, ``daily_segments`` per segment key (max over
    features)."""

    stats: WindowStats
    daily: pd.DataFrame = field(repr=False)
    daily_segments: pd.DataFrame = field(repr=False)


@dataclass(frozen=True)
class _Sizes:
    """Sample sizes and test level shared by a window's statistics."""

    n_eff: int      # distinct customers in the window
    ref_rows: int   # rows of the reference profile
    q: float        # noise quantile per test (Bonferroni)
    eps: float      # PSI epsilon


def _feature_stats(stats: WindowStats, name: str, entry: dict[str, Any], counts: np.ndarray,
                   ks_le: tuple[np.ndarray, int] | None, nulls: float, size: _Sizes) -> None:
    """Fill the per-feature statistics of ``name`` from its window totals ``counts``."""
    stats.null_rate[name] = nulls
    stats.ref_null_rate[name] = float(entry.get("null_rate", 0.0))
    stats.null_threshold[name] = drift.null_rise_noise(
        stats.ref_null_rate[name], size.ref_rows, nulls, size.n_eff, size.q)
    n = int(counts.sum())
    if n == 0:
        return
    n_cur = min(n, size.n_eff)
    stats.psi[name] = drift.psi_from_shares(entry["shares"], drift.shares(counts), size.eps)
    stats.psi_threshold[name] = drift.psi_noise_quantile(
        int(entry["count"]), n_cur, len(entry["shares"]), size.q)
    if entry["kind"] == ColumnKind.NUMERIC and entry.get("sample"):
        sample = np.asarray(entry["sample"], dtype="float64")
        le, n_finite = ks_le if ks_le is not None else (np.zeros(sample.size, dtype="int64"), 0)
        stats.ks[name] = ks_from_sample_counts(sample, le, n_finite)
        stats.ks_threshold[name] = drift.ks_noise_quantile(sample.size, n_cur, size.q)
    elif entry["kind"] == ColumnKind.CATEGORICAL:
        ref_counts = np.asarray(entry["shares"], dtype="float64") * float(entry["count"])
        stats.js[name] = drift.js_from_shares(entry["shares"], counts)
        stats.chi2[name], stats.chi2_p[name] = drift.chi2_from_counts(ref_counts, counts * (n_cur / n))


@dataclass
class SegmentCounts:
    """Histograms of one segment column: its values (sorted), the distinct customers of each,
    and per feature (and ``__score__``) a (values, days, bins) count array."""

    values: list[Any]
    distinct: list[int]
    per_day: dict[str, np.ndarray] = field(repr=False)


@dataclass
class WindowCounts:
    """Everything :func:`drift_from_counts` needs from a window's rows: counts only, so the
    local engine (numpy, :func:`window_counts`) and the Spark engine
    (:func:`mlflow_churn.monitoring.spark_drift.spark_window_counts`) feed the same statistics.

    ``per_day[name]``: (days, bins) counts of the non-missing values per profile bin;
    ``nulls[name]``: rows whose value is missing; ``ks_le[name]``: (counts of the non-NaN
    values <= each reference-sample point, how many non-NaN values) for numeric features with
    a sample; ``segments[col]``: :class:`SegmentCounts`."""

    days: pd.DatetimeIndex
    rows: int
    n_eff: int
    present: list[str]
    missing_features: list[str]
    per_day: dict[str, np.ndarray] = field(repr=False)
    nulls: dict[str, int] = field(repr=False)
    ks_le: dict[str, tuple[np.ndarray, int]] = field(repr=False)
    segments: dict[str, SegmentCounts] = field(repr=False)


def _entries(profile: dict[str, Any], present: list[str]) -> dict[str, dict[str, Any]]:
    feats = profile["features"]
    return {**{f: feats[f] for f in present}, SCORE: profile["score"]}


def segment_columns(profile: dict[str, Any], cfg: ChurnConfig, columns: Any) -> list[str]:
    """The profile's segment columns that ``cfg.monitoring.segments`` watches and the rows have."""
    return [c for c in profile.get("segments", {}) if c in cfg.monitoring.segments and c in columns]


def window_counts(frame: pd.DataFrame, scores: np.ndarray, profile: dict[str, Any],
                  cfg: ChurnConfig) -> WindowCounts:
    """The local engine's :class:`WindowCounts` of ``frame`` and ``scores`` (numpy: one
    :func:`~mlflow_churn.stats.drift.bin_index` per column, one ``bincount`` per histogram)."""
    feats = profile["features"]
    present = [f for f in feats if f in frame.columns]
    entries = _entries(profile, present)
    idx = {f: drift.bin_index(feats[f], frame[f]) for f in present}
    idx[SCORE] = drift.bin_index(profile["score"], scores)
    day_codes, days = pd.factorize(frame["cutoff"], sort=True)
    per_day = {name: drift.grouped_counts(idx[name], day_codes, len(days), len(entry["shares"]))
               for name, entry in entries.items()}
    nulls = {f: int((idx[f] < 0).sum()) for f in present}
    ks_le: dict[str, tuple[np.ndarray, int]] = {}
    for f in present:
        if feats[f]["kind"] == ColumnKind.NUMERIC and feats[f].get("sample"):
            ks_le[f] = drift.sample_le_counts(np.asarray(feats[f]["sample"], dtype="float64"), frame[f])
    cust = frame["customer_id"].to_numpy() if "customer_id" in frame else np.arange(len(frame))
    segments: dict[str, SegmentCounts] = {}
    for col in segment_columns(profile, cfg, frame.columns):
        seg_codes, uniques = pd.factorize(frame[col], sort=True)
        k = len(uniques)
        distinct = pd.Series(cust).groupby(seg_codes).nunique() if k else pd.Series(dtype=int)
        groups = np.where(seg_codes >= 0, seg_codes * len(days) + day_codes, -1)
        per = {n: drift.grouped_counts(idx[n], groups, k * len(days), len(entries[n]["shares"])).reshape(
            k, len(days), -1) for n in idx if n != col}
        segments[col] = SegmentCounts(list(uniques), [int(distinct.get(i, 0)) for i in range(k)], per)
    n_eff = int(frame["customer_id"].nunique()) if "customer_id" in frame else len(frame)
    return WindowCounts(pd.DatetimeIndex(days), len(frame), n_eff, present,
                        [f for f in feats if f not in frame.columns], per_day, nulls, ks_le, segments)


def _segment_stats(stats: WindowStats, col: str, values: dict[str, Any], seg: SegmentCounts,
                   entries: dict[str, dict[str, Any]], cfg: ChurnConfig,
                   size: _Sizes) -> dict[str, np.ndarray]:
    """Per value of segment column ``col``: PSI (max over features and score) against the
    segment's reference, its size-aware threshold, the features that moved most; returns the
    daily max PSI per segment key."""
    mon = cfg.monitoring
    per = seg.per_day
    q_seg = 1.0 - (1.0 - NOISE_QUANTILE) / max(len(per) * 10, 1)
    daily: dict[str, np.ndarray] = {}
    for i, value in enumerate(seg.values):
        ref = values.get(str(value))
        n_seg = seg.distinct[i]
        if ref is None or n_seg < mon.min_segment_size or ref["count"] < mon.min_segment_size:
            continue
        psi: dict[str, float] = {}
        day_psi = []
        for name, counts in per.items():
            seg_ref = ref["score"] if name == SCORE else ref["features"].get(name)
            total = counts[i].sum(axis=0)
            if seg_ref is None or total.sum() == 0:
                continue
            psi[name] = drift.psi_from_shares(seg_ref["shares"], drift.shares(total), size.eps)
            day_psi.append(drift.psi_rows(seg_ref["shares"], counts[i], size.eps))
        if not psi:
            continue
        key = f"{col}={value}"
        top = max(psi, key=lambda n: psi[n])
        stats.segment_psi[key] = psi[top]
        stats.segment_threshold[key] = drift.psi_noise_quantile(
            int(ref["count"]), n_seg, len(entries[top]["shares"]), q_seg)
        stats.segment_features[key] = [n for n, _ in sorted(psi.items(), key=lambda kv: -kv[1])][:5]
        with np.errstate(all="ignore"):
            daily[key] = np.nanmax(np.vstack(day_psi), axis=0)
    return daily


def window_drift(frame: pd.DataFrame, scores: np.ndarray, profile: dict[str, Any],
                 cfg: ChurnConfig) -> WindowDrift:
    """Drift of ``frame`` (rows at the window's cutoffs, with ``customer_id`` and ``cutoff``)
    and its ``scores`` against ``profile`` (see the module doc)."""
    return drift_from_counts(window_counts(frame, scores, profile, cfg), profile, cfg)


def drift_from_counts(counts: WindowCounts, profile: dict[str, Any], cfg: ChurnConfig) -> WindowDrift:
    """The window's drift statistics from its :class:`WindowCounts` (either engine's)."""
    import warnings

    feats = profile["features"]
    n_eff = counts.n_eff
    size = _Sizes(n_eff=n_eff, ref_rows=int(profile.get("rows", 0)),
                  q=1.0 - (1.0 - NOISE_QUANTILE) / (len(feats) + 1), eps=cfg.monitoring.psi_epsilon)
    # the newest cutoff (the caller sets the window's as_of); no clock read for an empty frame
    as_of = counts.days.max().to_pydatetime() if len(counts.days) else datetime.fromtimestamp(0, UTC)
    stats = WindowStats(as_of=as_of)
    stats.missing_features = list(counts.missing_features)
    entries = _entries(profile, counts.present)
    daily: dict[str, np.ndarray] = {}
    for name, entry in entries.items():
        per_day = counts.per_day[name]
        daily[name] = drift.psi_rows(entry["shares"], per_day, size.eps)
        totals = per_day.sum(axis=0)
        if name == SCORE:
            stats.score_psi = drift.psi_from_shares(entry["shares"], drift.shares(totals), size.eps)
            stats.score_psi_threshold = drift.psi_noise_quantile(
                int(entry["count"]), n_eff, len(entry["shares"]), NOISE_QUANTILE)
            continue
        nulls = counts.nulls[name] / counts.rows if counts.rows else 0.0
        _feature_stats(stats, name, entry, totals, counts.ks_le.get(name), nulls, size)
    seg_daily: dict[str, np.ndarray] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN days of a small segment
        for col, seg in counts.segments.items():
            seg_daily |= _segment_stats(stats, col, profile["segments"][col], seg, entries, cfg, size)
    index = pd.DatetimeIndex(counts.days)
    return WindowDrift(stats, pd.DataFrame(daily, index=index), pd.DataFrame(seg_daily, index=index))
