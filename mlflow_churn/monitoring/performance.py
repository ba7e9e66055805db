"""Model performance in production: realised once labels mature, estimated before.

Realised metrics (``classification_metrics`` of :mod:`mlflow_churn.evaluation.metrics`,
not re-implemented here) are computed on the scoring cutoffs whose labels have matured:
cutoffs in the monitoring window ending ``label_delay_days`` before ``as_of``, labelled
with churn in the next ``min(label_horizon_days, label_delay_days)`` days, using only
churn events up to ``as_of``.

Estimated AUC without labels (CBPE-style, confidence-based performance estimation):

* **Assumption 1, calibration**: a customer with score p churns with probability p.
* **Assumption 2, independence**: labels are independent Bernoulli(p_i) draws.
* **Assumption 3, no concept drift**: P(churn | features) is what the model learned;
  concept drift (the scenario ``concept_drift``) is invisible to this estimate, only
  realised metrics catch it.

Under 1-2, each pair (i, j) with s_j > s_i is concordant with probability
p_j (1 - p_i). The expected AUC is approximated by the ratio of expectations
E[concordant pairs] / E[positive x negative pairs]:

    AUC_hat = sum_{i != j} [s_j > s_i] p_j (1 - p_i) + 0.5 [s_j = s_i] p_j (1 - p_i)
              -----------------------------------------------------------------
                    (sum_i p_i)(sum_i (1 - p_i)) - sum_i p_i (1 - p_i)

computed in O(n log n) by sorting the scores (ties in groups). The expected recall@k and
revenue lift follow the same way (expected churners in the top k = sum of their scores).
``estimated_auc_drop`` compares AUC_hat of the reference scores (the profile's sample)
with AUC_hat of the current scores, so a miscalibrated model's bias cancels out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from mlflow_churn.config import EvaluationConfig
from mlflow_churn.errors import ChurnError


def expected_auc(scores: Any) -> float:
    """Expected ROC AUC of calibrated scores (see module doc); NaN for < 2 rows."""
    p = np.asarray(scores, dtype="float64").ravel()
    p = p[~np.isnan(p)]
    if p.size < 2:
        return float("nan")
    p = np.clip(p, 0.0, 1.0)
    order = np.argsort(p, kind="stable")
    s = p[order]
    uniq, start = np.unique(s, return_index=True)
    pos = np.add.reduceat(s, start)               # sum of p per tie group
    neg = np.add.reduceat(1.0 - s, start)         # sum of 1 - p per tie group
    pn = np.add.reduceat(s * (1.0 - s), start)    # sum of p(1-p) per group (i == j terms)
    lower_neg = np.concatenate([[0.0], np.cumsum(neg)[:-1]])
    numer = float(np.sum(pos * lower_neg) + 0.5 * np.sum(pos * neg - pn))
    denom = float(s.sum() * (1.0 - s).sum() - (s * (1.0 - s)).sum())
    return numer / denom if denom > 0 else float("nan")


def expected_business(scores: Any, eval_cfg: EvaluationConfig) -> dict[str, float]:
    """Expected recall@k and revenue lift of calibrated scores (same rules as evaluation).

    recall@k = sum of the top-k scores / sum of all scores; revenue_lift =
    (E[TP_k] - k * mean(p)) * save_rate * monthly_revenue / n (currency per customer-month).
    """
    from mlflow_churn.evaluation.metrics import top_k_count

    p = np.asarray(scores, dtype="float64").ravel()
    if p.size == 0:
        raise ChurnError("no scores to estimate performance on")
    k = top_k_count(p.size, eval_cfg.top_k_pct)
    top = np.sort(p)[::-1][:k].sum()
    total = p.sum()
    value = eval_cfg.save_rate * eval_cfg.monthly_revenue
    return {
        "recall_at_k": float(top / total) if total > 0 else float("nan"),
        "revenue_lift": float((top - k * p.mean()) * value / p.size),
    }


def auc_standard_error(auc: float, positives: float, negatives: float) -> float:
    """Hanley & McNeil (1982) standard error of an AUC with these class counts."""
    if not (math.isfinite(auc) and positives > 0 and negatives > 0):
        return float("nan")
    q1 = auc / (2.0 - auc)
    q2 = 2.0 * auc * auc / (1.0 + auc)
    var = (auc * (1 - auc) + (positives - 1) * (q1 - auc * auc) + (negatives - 1) * (q2 - auc * auc)) / (
        positives * negatives)
    return math.sqrt(max(var, 0.0))


def auc_drop_noise(auc: float, positives: float, negatives: float, z: float = 2.326) -> float:
    """AUC drop that sampling noise alone exceeds with ~1% probability: z * sqrt(2) * SE
    (two independent windows of this size: the baseline and the current one)."""
    return z * math.sqrt(2.0) * auc_standard_error(auc, positives, negatives)


@dataclass
class Performance:
    """Realised and estimated performance of one window (None = not measurable)."""

    realised: dict[str, Any] | None
    estimated_auc: float
    reference_estimated_auc: float
    expected: dict[str, float] | None
    auc_drop: float | None
    estimated_auc_drop: float
    recall_drop: float | None
    lift_drop: float | None
    label_horizon_days: int | None = None
    matured_rows: int = 0
    auc_drop_threshold: float | None = None

    def metrics(self) -> dict[str, float]:
        """Finite numbers for ``mlflow.log_metrics``."""
        out: dict[str, float] = {
            "estimated_auc": self.estimated_auc,
            "reference_estimated_auc": self.reference_estimated_auc,
            "estimated_auc_drop": self.estimated_auc_drop,
        }
        if self.realised:
            from mlflow_churn.evaluation.metrics import scalar_metrics

            out.update(scalar_metrics(self.realised, "realised_"))
        for key in ("auc_drop", "recall_drop", "lift_drop"):
            v = getattr(self, key)
            if v is not None:
                out[key] = v
        return {k: float(v) for k, v in out.items() if v is not None and math.isfinite(v)}


def assess(
    current_scores: Any,
    reference_scores: Any,
    eval_cfg: EvaluationConfig,
    val_auc: float | None = None,
    matured_labels: Any = None,
    matured_scores: Any = None,
    label_horizon_days: int | None = None,
    effective_fraction: float = 1.0,
) -> Performance:
    """Performance of a window: estimated from ``current_scores`` and, when labels have
    matured, realised on ``(matured_labels, matured_scores)``.

    ``auc_drop`` = ``val_auc`` (the version's tag) - realised AUC; ``recall_drop`` =
    expected - realised recall@k (absolute); ``lift_drop`` = (expected - realised revenue
    lift) / |expected| (relative), both on the matured rows, so drops measure the model
    falling short of what its own calibrated scores promise. ``effective_fraction``
    (distinct customers / rows, when one customer is scored on several cutoffs) scales the
    class counts of the AUC noise level ``auc_drop_threshold``.
    """
    est = expected_auc(current_scores)
    ref = expected_auc(reference_scores)
    realised = expected = None
    auc_drop = recall_drop = lift_drop = None
    n_mat = 0
    noise = None
    if matured_labels is not None and matured_scores is not None and len(matured_labels):
        from mlflow_churn.evaluation.metrics import classification_metrics

        y = np.asarray(matured_labels)
        n_mat = int(y.size)
        if 0 < y.sum() < y.size:
            realised = classification_metrics(y, matured_scores, eval_cfg)
            expected = expected_business(matured_scores, eval_cfg)
            if val_auc is not None and math.isfinite(realised["roc_auc"]):
                auc_drop = float(val_auc - realised["roc_auc"])
                pos = float(y.sum()) * effective_fraction
                noise = auc_drop_noise(realised["roc_auc"], pos, y.size * effective_fraction - pos)
            recall_drop = float(expected["recall_at_k"] - realised["recall_at_k"])
            if abs(expected["revenue_lift"]) > 0:
                lift_drop = float((expected["revenue_lift"] - realised["revenue_lift"])
                                  / abs(expected["revenue_lift"]))
    return Performance(
        realised=realised, estimated_auc=est, reference_estimated_auc=ref, expected=expected,
        auc_drop=auc_drop, estimated_auc_drop=float(ref - est) if math.isfinite(ref - est) else 0.0,
        recall_drop=recall_drop, lift_drop=lift_drop, label_horizon_days=label_horizon_days,
        matured_rows=n_mat, auc_drop_threshold=noise if noise is not None and math.isfinite(noise) else None,
    )
