"""Drift statistics from counts alone, for engines that aggregate elsewhere (Spark).

:mod:`mlflow_churn.stats.drift` takes values for its KS at the reference sample's points
(:func:`~mlflow_churn.stats.drift.ks_at_sample_points`); an engine that counts on other
machines has only, per sample point, how many current values are at or below it. This
module turns those counts into the same D, so both engines share one formula.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["ks_from_sample_counts"]


def ks_from_sample_counts(sorted_sample: Any, le: Any, n: int) -> float:
    """KS D between a stored sorted reference sample and a current sample of ``n`` non-NaN
    values of which ``le[j]`` are <= ``sorted_sample[j]``: max_j |F_ref(x_j) - le_j / n|
    (the D of :func:`~mlflow_churn.stats.drift.ks_at_sample_points`); NaN without values."""
    sample = np.asarray(sorted_sample, dtype="float64")
    if n == 0 or sample.size == 0:
        return float("nan")
    ref_cdf = np.searchsorted(sample, sample, side="right") / sample.size
    return float(np.abs(ref_cdf - np.asarray(le, dtype="float64") / n).max())

