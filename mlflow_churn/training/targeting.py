"""Targeted retrain: more weight for the segments a monitoring decision names.

A monitoring decision names segments as ``column=value`` keys (``region=pacific``,
``contract=month-to-month``; ``tenure_bucket`` is derived from ``tenure_days`` as the gate
derives it, :func:`mlflow_churn.stats.metrics.add_segment_columns`). When a retrain acts on
such a decision, the rows of those segments in the recent part of the training window, the
production window (history rows keep ``training.history_weight``), get the sample weight
``training.segment_weight`` in XGBoost; the validation rows of those segments get it too, so
early stopping and Optuna's objective (validation AUC) weigh the segments as the fit does.
A weight of 1 is a plain retrain.

The training run records what was targeted (:func:`SegmentTargets.to_tags`: tags
``churn.target_segments`` (a JSON list) and ``churn.segment_weight``; params
``target_segments``, ``segment_weight``, ``target_rows``), and the gate reads those tags from
the challenger's source run: a targeted challenger must improve each named segment beyond
noise (:mod:`mlflow_churn.evaluation.evaluate`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from mlflow_churn.errors import ChurnError
from mlflow_churn.stats.metrics import add_segment_columns
from mlflow_churn.tags import SEGMENT_WEIGHT_TAG as WEIGHT_TAG
from mlflow_churn.tags import TARGETS_TAG


def parse_segment_key(key: str) -> tuple[str, str]:
    """``column=value`` -> ``(column, value)``; ChurnError naming the key otherwise."""
    column, sep, value = str(key).partition("=")
    if not sep or not column.strip() or not value.strip():
        raise ChurnError(f"segment '{key}' is not 'column=value' (e.g. region=pacific)")
    return column.strip(), value.strip()


def segment_mask(frame: pd.DataFrame, keys: Iterable[str]) -> np.ndarray:
    """Rows of ``frame`` in any of the segments ``keys`` (``column=value``; values compared as
    text). ChurnError when a key's column is not in the frame (nor derivable)."""
    keys = list(keys)
    mask = np.zeros(len(frame), dtype=bool)
    if not keys:
        return mask
    derived = add_segment_columns(frame)
    for key in keys:
        column, value = parse_segment_key(key)
        if column not in derived.columns:
            raise ChurnError(f"segment '{key}': the training frame has no column '{column}'; segments "
                             "name a feature-set column (e.g. region, plan, contract) or tenure_bucket")
        mask |= (derived[column].astype("object").astype(str) == value).to_numpy()
    return mask


@dataclass(frozen=True)
class SegmentTargets:
    """The segments a retrain targets and their sample weight (> 1)."""

    segments: tuple[str, ...]
    weight: float

    def to_tags(self) -> dict[str, str]:
        """The training run's tags (also set on the registered version, for people)."""
        return {TARGETS_TAG: json.dumps(list(self.segments)), WEIGHT_TAG: f"{self.weight:g}"}

    @classmethod
    def from_tags(cls, tags: Mapping[str, str]) -> SegmentTargets | None:
        """The targets recorded in a run's ``tags``; None for a plain (untargeted) run.
        ChurnError when the tags are there but unreadable (the gate must not guess)."""
        raw = tags.get(TARGETS_TAG)
        if not raw:
            return None
        try:
            segments = json.loads(raw)
            weight = float(tags.get(WEIGHT_TAG, "nan"))
        except (ValueError, TypeError):
            raise ChurnError(f"tag {TARGETS_TAG}='{raw[:200]}' / {WEIGHT_TAG}='{tags.get(WEIGHT_TAG)}' is "
                             "unreadable: expected a JSON list of column=value keys and a number") from None
        if not isinstance(segments, list) or not segments or not math.isfinite(weight):
            raise ChurnError(f"tag {TARGETS_TAG}='{raw[:200]}' / {WEIGHT_TAG}='{tags.get(WEIGHT_TAG)}' is "
                             "unreadable: expected a non-empty JSON list and a finite weight")
        for key in segments:
            parse_segment_key(key)
        return cls(tuple(str(s) for s in segments), weight)


def segment_targets(segments: Sequence[str] | None, weight: float) -> SegmentTargets | None:
    """What a retrain on a decision naming ``segments`` targets: None when it names none or
    ``weight`` is 1 (a plain retrain). Keys are checked (``column=value``) and deduplicated."""
    keys = list(dict.fromkeys(str(s).strip() for s in (segments or []) if str(s).strip()))
    if not keys or weight == 1.0:
        return None
    for key in keys:
        parse_segment_key(key)
    return SegmentTargets(tuple(keys), float(weight))


def target_weights(frame: pd.DataFrame, base: np.ndarray, recent: np.ndarray,
                   targets: SegmentTargets | None) -> tuple[np.ndarray, dict[str, int]]:
    """Sample weights of ``frame``: ``base`` (1, or ``history_weight`` on history rows), with
    ``targets.weight`` on the rows of the targeted segments where ``recent`` is true.

    Returns ``(weights, rows per segment key)``. ChurnError when a targeted segment has no
    recent row: the decision named a segment the training window does not hold.
    """
    weights = np.asarray(base, dtype="float64").copy()
    if targets is None:
        return weights, {}
    recent = np.asarray(recent, dtype=bool)
    counts: dict[str, int] = {}
    for key in targets.segments:
        rows = segment_mask(frame, [key]) & recent
        counts[key] = int(rows.sum())
        if counts[key] == 0:
            raise ChurnError(f"segment '{key}' named by the monitoring decision has no row in the "
                             "training window's production cutoffs; check the segment or set "
                             "training.segment_weight: 1 to retrain without targeting")
        weights[rows] = targets.weight
    return weights, counts


__all__ = ["TARGETS_TAG", "WEIGHT_TAG", "SegmentTargets", "parse_segment_key", "segment_mask",
           "segment_targets", "target_weights"]
