"""Classification, business and calibration metrics of churn scores, overall and per segment.

Every function takes labels ``y`` (0/1, 1 = churned within the horizon) and scores ``p``
(P(churn) in [0, 1]) as arrays of equal length, and the evaluation config section
(anything with the attributes of :class:`BusinessParams`, e.g. the ``evaluation`` config
section) for ``top_k_pct`` and the revenue model.

Top k%: the ``ceil(n * top_k_pct / 100)`` customers with the highest scores (ties broken by
row order, stable, so the result is deterministic). ``recall_at_k`` = churners among them /
all churners; ``precision_at_k`` = churners among them / k.

Revenue model (``revenue_*``, currency units per month, the unit of ``monthly_revenue``):
a retention offer costs ``offer_cost`` per targeted customer and keeps ``save_rate`` of the
targeted churners, each worth ``monthly_revenue`` for one month.

- ``revenue_targeted`` = TP_k * save_rate * monthly_revenue - k * offer_cost
  (net revenue retained by offering the top k% by score);
- ``revenue_random``   = k * base_rate * save_rate * monthly_revenue - k * offer_cost
  (expected net revenue retained by offering k customers drawn at random);
- ``revenue_lift``     = (revenue_targeted - revenue_random) / n
  (extra net revenue per evaluated customer per month thanks to the model; 0 = no better
  than random; the offer cost cancels out since both target k customers, it still shows in
  the two net figures);
- ``lift_at_k``        = precision_at_k / base_rate (the classic lift ratio; 1 = random).

Calibration: ``ece`` is the expected calibration error over ``bins`` equal-width score bins
(sum over bins of |mean score - churn rate| weighted by the bin's share of rows);
``calibration`` holds those reliability bins.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, brier_score_loss, log_loss, roc_auc_score

from mlflow_churn.errors import ChurnError

#: keys of :func:`classification_metrics` that are plain numbers (loggable as MLflow metrics)
SCALAR_KEYS = (
    "n", "positives", "base_rate", "roc_auc", "pr_auc", "log_loss", "brier", "k",
    "recall_at_k", "precision_at_k", "lift_at_k", "revenue_targeted", "revenue_random",
    "revenue_lift", "ece",
)
#: tenure buckets (days since signup) of the derived segment column ``tenure_bucket``
TENURE_EDGES = (0, 90, 365, 730, math.inf)
TENURE_LABELS = ("0-90d", "90-365d", "1-2y", "2y+")



class BusinessParams(Protocol):
    """What the business metrics read (the ``evaluation`` config section has these)."""

    top_k_pct: float
    save_rate: float
    monthly_revenue: float
    offer_cost: float
    segments: Sequence[str]
    min_segment_size: int


def _arrays(y: Any, p: Any) -> tuple[np.ndarray, np.ndarray]:
    y_arr = np.asarray(y, dtype="float64").reshape(-1)
    p_arr = np.asarray(p, dtype="float64").reshape(-1)
    if len(y_arr) != len(p_arr):
        raise ChurnError(f"labels and scores differ in length ({len(y_arr)} vs {len(p_arr)})")
    if len(y_arr) == 0:
        raise ChurnError("no rows to evaluate: the evaluation window holds no customers")
    if not np.isin(y_arr, (0.0, 1.0)).all():
        raise ChurnError("labels must be 0 or 1 (churned within the horizon)")
    if np.isnan(p_arr).any() or (p_arr < 0).any() or (p_arr > 1).any():
        raise ChurnError("scores must be probabilities in [0, 1] without NaN")
    return y_arr.astype("int8"), p_arr


def top_k_count(n: int, top_k_pct: float) -> int:
    """Customers in the top ``top_k_pct`` % of ``n`` (at least 1)."""
    return max(1, math.ceil(n * top_k_pct / 100.0))


def calibration_bins(y: Any, p: Any, bins: int = 10) -> tuple[float, list[dict[str, float]]]:
    """ECE and reliability bins over ``bins`` equal-width score bins on [0, 1].

    Each bin: ``lo``, ``hi``, ``count``, ``mean_score``, ``churn_rate`` (empty bins are kept
    with count 0 and NaN means so every report has the same bins).
    """
    y_arr, p_arr = _arrays(y, p)
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.digitize(p_arr, edges[1:-1], right=False), 0, bins - 1)
    out, ece = [], 0.0
    for b in range(bins):
        mask = idx == b
        count = int(mask.sum())
        mean_score = float(p_arr[mask].mean()) if count else float("nan")
        rate = float(y_arr[mask].mean()) if count else float("nan")
        if count:
            ece += count / len(p_arr) * abs(mean_score - rate)
        out.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": count,
                    "mean_score": mean_score, "churn_rate": rate})
    return float(ece), out


def classification_metrics(y: Any, p: Any, eval_cfg: BusinessParams, bins: int = 10) -> dict[str, Any]:
    """Every metric of the module docstring for labels ``y`` and scores ``p``.

    Returns a dict with the numbers in :data:`SCALAR_KEYS` (``roc_auc``/``pr_auc`` are NaN
    when only one class is present; ``log_loss`` in nats per row, ``brier`` mean squared
    error, both lower = better) and ``calibration`` (the reliability bins).
    Raises ChurnError on empty input, labels other than 0/1 or scores outside [0, 1].
    """
    y_arr, p_arr = _arrays(y, p)
    n = len(y_arr)
    positives = int(y_arr.sum())
    base_rate = positives / n
    both = 0 < positives < n
    k = top_k_count(n, eval_cfg.top_k_pct)
    order = np.argsort(-p_arr, kind="stable")
    tp_k = int(y_arr[order[:k]].sum())
    value = eval_cfg.save_rate * eval_cfg.monthly_revenue
    revenue_targeted = tp_k * value - k * eval_cfg.offer_cost
    revenue_random = k * base_rate * value - k * eval_cfg.offer_cost
    precision_k = tp_k / k
    ece, reliability = calibration_bins(y_arr, p_arr, bins)
    eps = 1e-15
    return {
        "n": n,
        "positives": positives,
        "base_rate": base_rate,
        "roc_auc": float(roc_auc_score(y_arr, p_arr)) if both else float("nan"),
        "pr_auc": float(average_precision_score(y_arr, p_arr)) if positives else float("nan"),
        "log_loss": float(log_loss(y_arr, np.clip(p_arr, eps, 1 - eps), labels=[0, 1])),
        "brier": float(brier_score_loss(y_arr, p_arr)),
        "k": k,
        "recall_at_k": tp_k / positives if positives else float("nan"),
        "precision_at_k": precision_k,
        "lift_at_k": precision_k / base_rate if positives else float("nan"),
        "revenue_targeted": float(revenue_targeted),
        "revenue_random": float(revenue_random),
        "revenue_lift": float((revenue_targeted - revenue_random) / n),
        "ece": ece,
        "calibration": reliability,
    }


def scalar_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numbers of ``metrics`` (for ``mlflow.log_metrics``), keys prefixed."""
    out = {}
    for key in SCALAR_KEYS:
        value = metrics.get(key)
        if value is not None and np.isfinite(value):
            out[prefix + key] = float(value)
    return out


def add_segment_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` plus derived segment columns: ``tenure_bucket`` from ``tenure_days``."""
    out = frame
    if "tenure_days" in frame.columns and "tenure_bucket" not in frame.columns:
        out = frame.copy()
        out["tenure_bucket"] = pd.cut(
            pd.to_numeric(frame["tenure_days"], errors="coerce"), TENURE_EDGES,
            labels=TENURE_LABELS, right=False,
        ).astype("object")
    return out


def segment_metrics(
    frame: pd.DataFrame,
    score_col: str,
    label_col: str,
    segments: Sequence[str] | None,
    eval_cfg: BusinessParams,
    min_size: int | None = None,
) -> pd.DataFrame:
    """:func:`classification_metrics` per value of each segment column.

    ``segments`` defaults to ``eval_cfg.segments`` and ``min_size`` to
    ``eval_cfg.min_segment_size``; ``tenure_bucket`` is derived from ``tenure_days`` when
    asked for. One row per (segment, value) with ``n``, ``gated`` (n >= min_size: only
    those count in the gate) and the scalar metrics; sorted by segment then value.
    Raises ChurnError naming a segment column that ``frame`` lacks.
    """
    segments = list(eval_cfg.segments if segments is None else segments)
    min_size = eval_cfg.min_segment_size if min_size is None else int(min_size)
    for col in (score_col, label_col):
        if col not in frame.columns:
            raise ChurnError(f"frame lacks column '{col}' needed for segment metrics")
    frame = add_segment_columns(frame) if "tenure_bucket" in segments else frame
    missing = [s for s in segments if s not in frame.columns]
    if missing:
        raise ChurnError(
            f"segment column(s) {', '.join(missing)} not in the evaluation frame; "
            f"available: {', '.join(map(str, frame.columns))} (config evaluation.segments)"
        )
    rows = []
    for seg in segments:
        values = frame[seg].astype("object").where(frame[seg].notna(), "<missing>")
        for value, part in frame.groupby(values, sort=True, observed=True):
            m = classification_metrics(part[label_col], part[score_col], eval_cfg)
            row = {"segment": seg, "value": str(value), "gated": len(part) >= min_size}
            row.update({k: m[k] for k in SCALAR_KEYS})
            rows.append(row)
    cols = ["segment", "value", "gated", *SCALAR_KEYS]
    return pd.DataFrame(rows, columns=cols).sort_values(["segment", "value"], ignore_index=True)


#: per-segment metrics logged as MLflow metrics: table column -> metric name prefix
SEGMENT_METRICS = {"roc_auc": "segment_auc", "recall_at_k": "segment_recall_at_k"}


def _metric_name_part(text: str) -> str:
    """``text`` with every character MLflow refuses in a metric name (anything but letters,
    digits, ``_ - . : /`` and space) replaced by ``_``; ``.`` too, since it separates the parts."""
    return "".join(c if c.isascii() and (c.isalnum() or c in "_-:/ ") else "_" for c in str(text)) or "_"


def segment_metric_values(table: pd.DataFrame, prefix: str = "") -> dict[str, float]:
    """MLflow metrics from a :func:`segment_metrics` table, with the same names in every run:
    ``<prefix>segment_auc.<column>.<value>`` and ``<prefix>segment_recall_at_k.<column>.<value>``
    (column and value through :func:`_metric_name_part`). Undefined values (a segment with one
    class) are left out."""
    out: dict[str, float] = {}
    for row in table.to_dict(orient="records"):
        for col, name in SEGMENT_METRICS.items():
            value = row.get(col)
            if value is None or not math.isfinite(float(value)):
                continue
            out[f"{prefix}{name}.{_metric_name_part(row['segment'])}.{_metric_name_part(row['value'])}"] = (
                float(value))
    return out
