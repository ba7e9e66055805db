"""How sure a gate can be that one model ranks worse than another on a (small) segment.

A holdout holds the same customers at several daily cutoffs, so its rows are far from
independent: a segment of 400 rows may be 60 customers with five churners, and its AUC
moves by 0.1 from one sample to the next. The gate therefore widens its segment tolerance
by the standard error of the *paired* AUC difference, estimated with a Poisson bootstrap
over customers (every customer's rows share one weight ~ Poisson(1) per replicate, so the
correlation between a customer's rows and between the two models' scores on the same rows
is kept). With many segments tested at once, one of them falls by chance: the margin is
``z`` standard errors with a Bonferroni ``z`` over the tested segments (:func:`segment_z`).

AUC with weights ``w`` (ties count one half)::

    AUC = sum_{i pos, j neg} w_i w_j [s_i > s_j] + 0.5 [s_i = s_j]  /  (sum_pos w)(sum_neg w)

computed for all replicates at once from one sort of the scores (``O(B * n)``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

DEFAULT_REPLICATES = 200


def segment_z(alpha: float, tests: int) -> float:
    """One-sided z of a Bonferroni family: ``Phi^-1(1 - alpha / tests)``; 0 when ``alpha``
    is 0 (point estimates only) or nothing is tested."""
    if alpha <= 0 or tests < 1:
        return 0.0
    from scipy.stats import norm

    return float(norm.ppf(1.0 - alpha / tests))


def weighted_auc(y: np.ndarray, score: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC of ``score`` for labels ``y`` (0/1) under each row of ``weights`` (B x n);
    NaN for a replicate without positive or negative weight."""
    y = np.asarray(y, dtype=bool)
    score = np.asarray(score, dtype=np.float64)
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    order = np.argsort(score, kind="stable")
    s, yo, wo = score[order], y[order], w[:, order]
    starts = np.flatnonzero(np.r_[True, np.diff(s) != 0])
    pos = np.add.reduceat(wo * yo, starts, axis=1)
    neg = np.add.reduceat(wo * ~yo, starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    denom = pos.sum(axis=1) * neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (pos * (below + 0.5 * neg)).sum(axis=1) / denom, np.nan)


def customer_weights(customer_ids: np.ndarray, replicates: int = DEFAULT_REPLICATES,
                     seed: int = 0) -> np.ndarray:
    """Poisson(1) bootstrap weights (replicates x rows), one draw per distinct customer."""
    _, idx = np.unique(np.asarray(customer_ids), return_inverse=True)
    draws = np.random.default_rng(seed).poisson(1.0, size=(replicates, idx.max() + 1 if len(idx) else 0))
    return draws[:, idx].astype(np.float64)


def paired_auc_diff_se(y: np.ndarray, p_a: np.ndarray, p_b: np.ndarray, weights: np.ndarray) -> float:
    """Standard error of AUC(p_a) - AUC(p_b) over the bootstrap ``weights`` (NaN if undefined)."""
    diff = weighted_auc(y, p_a, weights) - weighted_auc(y, p_b, weights)
    diff = diff[np.isfinite(diff)]
    return float(np.std(diff, ddof=1)) if len(diff) >= 10 else float("nan")


def segment_auc_diff_se(frame: pd.DataFrame, p_a: np.ndarray, p_b: np.ndarray, segments: Sequence[str],
                        label_col: str = "label", replicates: int = DEFAULT_REPLICATES,
                        seed: int = 0) -> pd.DataFrame:
    """Per (segment, value): ``customers`` and ``churners`` (distinct ids) and ``auc_diff_se``, the bootstrap
    standard error of AUC(p_a) - AUC(p_b) on that segment's rows (``frame`` needs
    ``customer_id``, ``label_col`` and the segment columns; values as in ``segment_metrics``)."""
    weights = customer_weights(frame["customer_id"].to_numpy(), replicates, seed)
    y = frame[label_col].to_numpy()
    p_a, p_b = np.asarray(p_a), np.asarray(p_b)
    rows = []
    for seg in segments:
        values = frame[seg].astype("object").where(frame[seg].notna(), "<missing>")
        for value, idx in values.groupby(values, sort=True).indices.items():
            ids = frame["customer_id"].to_numpy()[idx]
            rows.append({"segment": seg, "value": str(value), "customers": int(len(np.unique(ids))),
                         "churners": int(len(np.unique(ids[y[idx] == 1]))),
                         "auc_diff_se": paired_auc_diff_se(y[idx], p_a[idx], p_b[idx], weights[:, idx])})
    return pd.DataFrame(rows, columns=["segment", "value", "customers", "churners", "auc_diff_se"])


__all__ = ["customer_weights", "paired_auc_diff_se", "segment_auc_diff_se", "segment_z", "weighted_auc"]
