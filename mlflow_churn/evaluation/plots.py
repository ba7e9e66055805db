"""Evaluation plots (matplotlib Agg -> PNG): ROC, PR, cumulative gain / lift, calibration,
per-segment AUC bars of champion vs challenger.

Every function takes ``scores``: model label -> P(churn) array on the same rows as ``y``
(e.g. ``{"challenger v3": p1, "champion v2": p0}``), writes one PNG and returns its path.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from mlflow_churn.stats.metrics import calibration_bins


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return path


def _curve_plot(y: np.ndarray, scores: Mapping[str, np.ndarray], path: Path, curve: Any, summary: Any,
                baseline: Any, labels: tuple[str, str, str, str]) -> Path:
    """One curve per model: ``curve(y, p)`` -> (x, y) points, ``summary(y, p)`` in the legend
    after ``labels[3]``, ``baseline(ax)`` draws the random model; labels = (x, y, title, summary)."""
    fig = Figure(figsize=(5, 5))
    ax = fig.subplots()
    for label, p in scores.items():
        xs, ys = curve(y, p)
        ax.plot(xs, ys, label=f"{label} ({labels[3]} {summary(y, p):.3f})")
    baseline(ax)
    ax.set(xlabel=labels[0], ylabel=labels[1], title=labels[2])
    ax.legend(loc="lower right" if labels[3] == "AUC" else "upper right")
    return _save(fig, path)


def roc_plot(y: np.ndarray, scores: Mapping[str, np.ndarray], path: Path) -> Path:
    """ROC curves (true vs false positive rate), AUC in the legend."""
    return _curve_plot(y, scores, path, lambda t, p: roc_curve(t, p)[:2], roc_auc_score,
                       lambda ax: ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="random"),
                       ("false positive rate", "true positive rate (recall)", "ROC", "AUC"))


def pr_plot(y: np.ndarray, scores: Mapping[str, np.ndarray], path: Path) -> Path:
    """Precision-recall curves; the churn base rate as the random baseline."""
    return _curve_plot(y, scores, path, lambda t, p: precision_recall_curve(t, p)[1::-1],
                       average_precision_score,
                       lambda ax: ax.axhline(float(np.mean(y)), ls="--", c="grey", lw=1, label="random"),
                       ("recall", "precision", "Precision-recall", "AP"))


def _gain(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-np.asarray(p), kind="stable")
    caught = np.cumsum(np.asarray(y)[order]) / max(1, int(np.sum(y)))
    share = np.arange(1, len(order) + 1) / len(order)
    return share, caught


def gain_lift_plot(y: np.ndarray, scores: Mapping[str, np.ndarray], path: Path, top_k_pct: float) -> Path:
    """Cumulative gain (share of churners caught vs share targeted) and lift, k% marked."""
    fig = Figure(figsize=(10, 4.5))
    ax1, ax2 = fig.subplots(1, 2)
    for label, p in scores.items():
        share, caught = _gain(y, p)
        ax1.plot(share * 100, caught * 100, label=label)
        ax2.plot(share * 100, caught / share, label=label)
    ax1.plot([0, 100], [0, 100], ls="--", c="grey", lw=1, label="random")
    ax2.axhline(1.0, ls="--", c="grey", lw=1, label="random")
    for ax in (ax1, ax2):
        ax.axvline(top_k_pct, c="k", lw=0.8, ls=":")
        ax.legend()
    ax1.set(xlabel="customers targeted (%)", ylabel="churners caught (%)", title="Cumulative gain")
    ax2.set(xlabel="customers targeted (%)", ylabel="lift (x random)", title="Lift", xlim=(1, 100))
    return _save(fig, path)


def calibration_plot(y: np.ndarray, scores: Mapping[str, np.ndarray], path: Path, bins: int = 10) -> Path:
    """Reliability diagram: churn rate vs mean score per score bin, ECE in the legend."""
    fig = Figure(figsize=(5, 5))
    ax = fig.subplots()
    for label, p in scores.items():
        ece, rows = calibration_bins(y, p, bins)
        pts = [(r["mean_score"], r["churn_rate"]) for r in rows if r["count"]]
        ax.plot(*zip(*pts, strict=True), marker="o", label=f"{label} (ECE {ece:.3f})")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="perfect")
    ax.set(xlabel="mean predicted P(churn)", ylabel="observed churn rate", title="Calibration")
    ax.legend(loc="upper left")
    return _save(fig, path)


def segment_auc_plot(segments: Mapping[str, pd.DataFrame], path: Path, tolerance: float) -> Path:
    """Per-segment AUC bars side by side, one panel per segment column.

    ``segments``: model label -> :func:`~mlflow_churn.stats.metrics.segment_metrics`
    frame. Segments below the gate's minimum size are hatched.
    """
    labels = list(segments)
    base = next(iter(segments.values()))
    cols = list(dict.fromkeys(base["segment"]))
    fig = Figure(figsize=(10, 3.2 * max(1, len(cols))))
    axes = fig.subplots(len(cols), 1, squeeze=False)
    width = 0.8 / max(1, len(labels))
    for ax, col in zip(axes[:, 0], cols, strict=True):
        values = list(base.loc[base["segment"] == col, "value"])
        x = np.arange(len(values))
        for i, label in enumerate(labels):
            part = segments[label].set_index(["segment", "value"]).loc[col].reindex(values)
            bars = ax.bar(x + i * width, part["roc_auc"].to_numpy(dtype=float), width, label=label)
            for bar, gated in zip(bars, part["gated"].fillna(False), strict=True):
                if not gated:
                    bar.set_hatch("//")
        ax.set_xticks(x + width * (len(labels) - 1) / 2, values, rotation=20)
        ax.set(ylabel="ROC AUC", title=f"AUC by {col} (hatched: too small to gate; tolerance {tolerance})")
        ax.set_ylim(0.0, 1.0)
        ax.legend(loc="lower right")
    return _save(fig, path)
