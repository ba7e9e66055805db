"""Model performance in production: realised once labels mature, estimated before.

Realised metrics (``classification_metrics`` of :mod:`mlflow_churn.stats.metrics`,
not re-implemented here) are computed on the scoring cutoffs whose labels have matured:
cutoffs in the monitoring window ending ``label_delay_days`` before ``as_of``, labelled
with churn in the next ``min(label_horizon_days, label_delay_days)`` days, using only
churn events up to ``as_of``.

Comparisons with a baseline (:func:`auc_check`) use customers no model trained on (the
``holdout`` and ``validation`` groups of :mod:`mlflow_churn.data.groups`), the population the
baseline was measured on: a model is worse on the customers it trained on (it learned their
past), so the realised AUC on everyone sits below ``val_auc`` without any degradation.

- ``auc_drop`` = baseline - realised AUC on matured ``label_horizon_days`` labels; the
  baseline is the version's ``val_auc`` (``monitoring.auc_baseline: val_auc``) or its first
  measured window (``first_window``);
- ``early_auc_drop`` = ``val_auc_7d`` - AUC on short labels (churn within
  ``monitoring.early_label_days``, mature after that many days) of the newest cutoffs whose
  short labels have matured, against the same short-horizon AUC measured at training on
  customers no model trained on (:mod:`mlflow_churn.training.baseline`). It sees concept
  drift weeks before the 30-day labels do.

Each comparison's noise level is ``z * sqrt(SE_baseline^2 + SE_current^2)`` with Hanley &
McNeil standard errors over *distinct* customers (one customer scored on several cutoffs is
one cluster: counting rows would understate the noise); a window with fewer than
``early_min_churners`` distinct churners is not measured.

Estimated AUC without labels (CBPE-style, confidence-based performance estimation):

* **Assumption 1, calibration**: a customer with score p churns with probability p. The
  raw scores are not calibrated (early stopping on a small validation set stops a
  low-learning-rate booster after a few trees, leaving scores squeezed around the base
  rate: the estimate then falls towards 0.5; measured 0.55 vs a realised 0.73), so training
  fits a Platt map (logistic regression of the validation labels on logit(score),
  :func:`fit_calibration`) and stores it in the profile; every estimate applies it first.
* **Assumption 2, independence**: labels are independent Bernoulli(p_i) draws.
* **Assumption 3, no concept drift**: P(churn | features) is what the model learned;
  concept drift (the scenario ``concept_drift``) is invisible to this estimate, only
  realised and early-label metrics catch it.

Under 1-2, each pair (i, j) with s_j > s_i is concordant with probability
p_j (1 - p_i). The expected AUC is approximated by the ratio of expectations
E[concordant pairs] / E[positive x negative pairs]:

    AUC_hat = sum_{i != j} [s_j > s_i] p_j (1 - p_i) + 0.5 [s_j = s_i] p_j (1 - p_i)
              -----------------------------------------------------------------
                    (sum_i p_i)(sum_i (1 - p_i)) - sum_i p_i (1 - p_i)

computed in O(n log n) by sorting the scores (ties in groups). The expected recall@k and
revenue lift follow the same way (expected churners in the top k = sum of their scores).
``estimated_auc_drop`` compares AUC_hat of the reference scores (the profile's sample)
with AUC_hat of the current scores, both calibrated.

Per segment (:func:`segment_performance`, one :class:`SegmentPerformance` per key
``column=value``):

* realised, on the segment's matured rows: ROC AUC with its standard error from a Poisson
  bootstrap over customers (:func:`clustered_auc_se`: a customer's rows on the window's
  cutoffs share one weight; the Hanley-McNeil error over distinct customers, which the
  population's check uses, overstated it by ~40% on the simulator: 0.021 against a bootstrap
  0.015 for ``region=pacific`` with 40,000 customers); recall@k and revenue lift as the
  evaluation defines them (:func:`~mlflow_churn.stats.metrics.classification_metrics` on
  the segment's rows, its own top k%), with standard errors from binomial counts over
  customers (a customer's rows move together). Recall@k is r = A / (A + B), A = r P
  churners in the top k and B = (1 - r) P outside it (P distinct churners), each binomial,
  so SE(r) = r (1 - r) sqrt((1 - q) / A + (1 - q') / B), q the precision in the top k and
  q' the churn rate below it (the delta method; sqrt(r (1 - r) / P) when A or B is 0).
  SE(revenue lift) = value / n * sqrt(c (k q (1 - q) + k^2 b (1 - b) / n)), b the base
  rate, value = save_rate x monthly_revenue, c = rows per customer (a binomial count of
  customers scaled to rows);
* estimated, on the segment's current rows: AUC_hat of the calibrated scores with SE =
  Hanley-McNeil at the expected class counts over distinct customers (sum of p / c and
  sum of (1 - p) / c): the spread of the AUC these customers' labels will show if the CBPE
  assumptions hold;
* fewer than ``min_rows`` rows or ``min_churners`` distinct churners (expected churners for
  the estimate) give ``reason`` / ``estimate_reason`` instead of a number.

:func:`compare_segments` sets each segment's drop against a reference (``reference``,
``reference_source``), and the noise level ``threshold = z * drop_se`` with ``z`` one-sided
Bonferroni over the segments compared (:func:`~mlflow_churn.stats.uncertainty.segment_z`):

* once labels have matured: ``drop = baseline AUC - auc``, the baseline being the segment's
  realised AUC in the version's first window that measured it (the caller carries it
  forward), ``drop_se = sqrt(SE_baseline^2 + SE^2)``: the same measurement on the same kind of
  rows, so neither bias nor another population. Two references were measured and dropped:
  training's reference rows (customers no model trained on, at a few cutoffs) gave
  ``region=pacific`` 0.830 +- 0.023 (80,000 customers) and 0.893 +- 0.022 (20,000) where the
  matured windows realised ~0.80 and ~0.78: biased and noisy; the CBPE expectation of the
  matured rows' own scores (``expected_auc``, kept for reading) has no noise of its own but a
  calibration bias per segment that grows as the model ages: in a ``stable`` replay it named
  ``contract=month-to-month`` three months after training;
* before: ``drop = baseline estimate - estimated_auc`` against the segment's baseline estimate
  (training's reference rows, :func:`segment_baseline_metrics` / :func:`segment_baseline`,
  else the version's first window), ``drop_se = sqrt(SE_baseline^2 + SE^2)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from mlflow_churn.errors import ChurnError
from mlflow_churn.stats.metrics import (
    BusinessParams,
    _metric_name_part,
    add_segment_columns,
    classification_metrics,
    scalar_metrics,
    top_k_count,
)
from mlflow_churn.stats.uncertainty import customer_weights, segment_z, weighted_auc


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


def expected_business(scores: Any, eval_cfg: BusinessParams) -> dict[str, float]:
    """Expected recall@k and revenue lift of calibrated scores (same rules as evaluation).

    recall@k = sum of the top-k scores / sum of all scores; revenue_lift =
    (E[TP_k] - k * mean(p)) * save_rate * monthly_revenue / n (currency per customer-month).
    """
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


def fit_calibration(scores: Any, labels: Any, iterations: int = 50) -> dict[str, Any]:
    """Platt map of ``scores`` to P(label = 1): logistic regression of ``labels`` on logit(score)
    (Newton steps) -> ``{"method": "platt", "a", "b", "rows", "positives"}``; the identity
    (a = 1, b = 0) when both classes are not present."""
    p = np.clip(np.asarray(scores, dtype="float64").ravel(), 1e-6, 1 - 1e-6)
    y = np.asarray(labels, dtype="float64").ravel()
    out = {"method": "platt", "a": 1.0, "b": 0.0, "rows": int(y.size), "positives": int(y.sum())}
    if y.size == 0 or not 0 < y.sum() < y.size:
        return out
    x = np.log(p / (1 - p))
    coef = np.array([1.0, 0.0])
    design = np.column_stack([x, np.ones_like(x)])
    for _ in range(iterations):
        q = 1.0 / (1.0 + np.exp(-(design @ coef)))
        grad = design.T @ (y - q)
        hess = (design * (q * (1 - q))[:, None]).T @ design + 1e-9 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        coef += step
        if np.abs(step).max() < 1e-10:
            break
    if np.isfinite(coef).all():
        out["a"], out["b"] = float(coef[0]), float(coef[1])
    return out


def calibrate(scores: Any, calibration: Mapping[str, Any] | None) -> np.ndarray:
    """``scores`` through a :func:`fit_calibration` map (None: unchanged)."""
    p = np.asarray(scores, dtype="float64").ravel()
    if not calibration:
        return p
    q = np.clip(p, 1e-6, 1 - 1e-6)
    return 1.0 / (1.0 + np.exp(-(calibration["a"] * np.log(q / (1 - q)) + calibration["b"])))


def _cluster_counts(labels: Any, customer_ids: Any | None) -> tuple[int, int]:
    """(distinct churners, distinct non-churners): customers with a positive row, and the rest."""
    y = np.asarray(labels).astype(bool)
    if customer_ids is None:
        return int(y.sum()), int((~y).sum())
    ids = np.asarray(customer_ids)
    pos = np.unique(ids[y])
    return int(pos.size), int(np.setdiff1d(np.unique(ids), pos).size)


@dataclass
class AucCheck:
    """A realised AUC against its baseline: ``drop`` = baseline - auc, ``threshold`` = its noise
    level (``z * sqrt(baseline_se^2 + se^2)``), ``churners`` = distinct churners measured."""

    auc: float
    se: float
    churners: int
    baseline: float | None = None
    baseline_se: float | None = None
    drop: float | None = None
    threshold: float | None = None


def auc_check(labels: Any, scores: Any, customer_ids: Any | None, baseline: float | None,
              baseline_se: float | None, z: float, min_churners: int = 1) -> AucCheck | None:
    """ROC AUC of ``scores`` on ``labels`` compared with ``baseline`` (None: no comparison);
    None when there are fewer than ``min_churners`` distinct churners or one class only."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(labels).astype(int)
    pos, neg = _cluster_counts(y, customer_ids)
    if pos < max(min_churners, 1) or neg == 0:
        return None
    auc = float(roc_auc_score(y, np.asarray(scores, dtype="float64")))
    check = AucCheck(auc=auc, se=auc_standard_error(auc, pos, neg), churners=pos)
    if baseline is not None and math.isfinite(baseline):
        check.baseline, check.baseline_se = float(baseline), baseline_se
        check.drop = float(baseline - auc)
        var = check.se**2 + (baseline_se or 0.0) ** 2
        check.threshold = float(z * math.sqrt(var)) if math.isfinite(var) else None
    return check


@dataclass
class Performance:
    """Realised and estimated performance of one window (None = not measurable)."""

    realised: dict[str, Any] | None
    estimated_auc: float
    reference_estimated_auc: float
    expected: dict[str, float] | None
    estimated_auc_drop: float
    recall_drop: float | None
    lift_drop: float | None
    label_horizon_days: int | None = None
    matured_rows: int = 0
    auc: AucCheck | None = None
    early: AucCheck | None = None
    uncalibrated_estimated_auc: float = float("nan")
    #: per segment key ``column=value`` (:func:`segment_performance`, compared by the caller)
    segments: dict[str, SegmentPerformance] = field(default_factory=dict)
    #: the Bonferroni z of the segments' noise levels (:func:`compare_segments`)
    segment_z: float | None = None

    @property
    def auc_drop(self) -> float | None:
        return self.auc.drop if self.auc else None

    @property
    def auc_drop_threshold(self) -> float | None:
        return self.auc.threshold if self.auc else None

    def metrics(self) -> dict[str, float]:
        """Finite numbers for ``mlflow.log_metrics``."""
        out: dict[str, float | None] = {
            "estimated_auc": self.estimated_auc,
            "reference_estimated_auc": self.reference_estimated_auc,
            "estimated_auc_drop": self.estimated_auc_drop,
            "uncalibrated_estimated_auc": self.uncalibrated_estimated_auc,
            "recall_drop": self.recall_drop,
            "lift_drop": self.lift_drop,
        }
        if self.realised:
            out.update(scalar_metrics(self.realised, "realised_"))
        for names, check in ((("realised_auc_unseen", "auc_baseline", "auc_drop", "auc_drop_threshold",
                                "matured_churners"), self.auc),
                              (("early_auc", "early_auc_baseline", "early_auc_drop",
                                "early_auc_drop_threshold", "early_churners"), self.early)):
            if check is not None:
                values = (check.auc, check.baseline, check.drop, check.threshold, float(check.churners))
                out.update(dict(zip(names, values, strict=True)))
        return {k: float(v) for k, v in out.items() if v is not None and math.isfinite(v)}


def assess(
    current_scores: Any,
    reference_scores: Any,
    eval_cfg: BusinessParams,
    matured_labels: Any = None,
    matured_scores: Any = None,
    label_horizon_days: int | None = None,
    calibration: Mapping[str, Any] | None = None,
) -> Performance:
    """Performance of a window: estimated from ``current_scores`` (calibrated) and, when labels
    have matured, realised on ``(matured_labels, matured_scores)`` (all rows: the business KPIs).

    ``recall_drop`` = expected - realised recall@k (absolute); ``lift_drop`` = (expected -
    realised revenue lift) / |expected| (relative), both on the matured rows with the
    calibrated scores' expectations, so drops measure the model falling short of what its
    own calibrated scores promise. The AUC comparisons (:func:`auc_check`) are added by the
    caller, which knows the customer groups and the baselines.
    """
    est = expected_auc(calibrate(current_scores, calibration))
    ref = expected_auc(calibrate(reference_scores, calibration))
    realised = expected = None
    recall_drop = lift_drop = None
    n_mat = 0
    if matured_labels is not None and matured_scores is not None and len(matured_labels):

        y = np.asarray(matured_labels)
        n_mat = int(y.size)
        if 0 < y.sum() < y.size:
            realised = classification_metrics(y, matured_scores, eval_cfg)
            expected = expected_business(calibrate(matured_scores, calibration), eval_cfg)
            recall_drop = float(expected["recall_at_k"] - realised["recall_at_k"])
            if abs(expected["revenue_lift"]) > 0:
                lift_drop = float((expected["revenue_lift"] - realised["revenue_lift"])
                                  / abs(expected["revenue_lift"]))
    return Performance(
        realised=realised, estimated_auc=est, reference_estimated_auc=ref, expected=expected,
        estimated_auc_drop=float(ref - est) if math.isfinite(ref - est) else 0.0,
        recall_drop=recall_drop, lift_drop=lift_drop, label_horizon_days=label_horizon_days,
        matured_rows=n_mat, uncalibrated_estimated_auc=expected_auc(current_scores),
    )


#: prefix of the per-segment baselines training logs: ``val_segment_<stat>.<column>.<value>``
SEGMENT_BASELINE_PREFIX = "val_segment_"
#: the per-segment statistics training logs as baselines (``<stat>`` above)
SEGMENT_BASELINE_STATS = ("auc", "auc_se", "churners", "estimated_auc", "estimated_auc_se")


@dataclass
class SegmentPerformance:
    """One segment's performance in a window (module doc, "Per segment"); None = not measured,
    with ``reason`` (realised) / ``estimate_reason`` (estimate) saying why.

    ``rows`` / ``customers`` / ``churners`` count the matured rows, ``expected_auc`` is the CBPE
    expectation of their calibrated scores; ``window_rows`` counts the current ones.
    :func:`compare_segments` fills the rest: the segment's baselines (``baseline_auc`` from
    ``baseline_source``, ``baseline_estimated_auc`` from ``estimate_baseline_source``,
    training's realised ``training_auc`` for reading), ``source`` (``realised`` |
    ``estimated``: which AUC the drop is on), ``reference`` (what it is compared with) and
    ``reference_source``, ``drop`` = reference - AUC, ``drop_se``, ``z`` and ``threshold`` =
    z x drop_se."""

    segment: str
    rows: int = 0
    customers: int = 0
    churners: int | None = None
    auc: float | None = None
    auc_se: float | None = None
    recall_at_k: float | None = None
    recall_at_k_se: float | None = None
    revenue_lift: float | None = None
    revenue_lift_se: float | None = None
    expected_auc: float | None = None
    reason: str | None = None
    window_rows: int = 0
    expected_churners: float | None = None
    estimated_auc: float | None = None
    estimated_auc_se: float | None = None
    estimate_reason: str | None = None
    baseline_auc: float | None = None
    baseline_auc_se: float | None = None
    baseline_estimated_auc: float | None = None
    baseline_estimated_auc_se: float | None = None
    baseline_source: str | None = None
    estimate_baseline_source: str | None = None
    training_auc: float | None = None
    training_auc_se: float | None = None
    source: str | None = None
    reference: float | None = None
    reference_source: str | None = None
    drop: float | None = None
    drop_se: float | None = None
    z: float | None = None
    threshold: float | None = None


@dataclass(frozen=True)
class SegmentBaseline:
    """What a segment's performance is compared with: its realised AUC (``auc`` from ``source``)
    and its estimate (``estimated_auc`` from ``estimate_source``, default ``source``), each
    ``training`` (the version's reference rows) or ``first window`` (the version's first window
    that measured it); ``training_auc`` / ``_se``: training's realised AUC, kept for reading."""

    auc: float | None
    auc_se: float | None
    estimated_auc: float | None
    estimated_auc_se: float | None
    source: str
    estimate_source: str | None = None
    training_auc: float | None = None
    training_auc_se: float | None = None


def _finite(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def segment_rows(frame: pd.DataFrame, columns: Sequence[str]) -> dict[str, np.ndarray]:
    """Row positions of each segment ``column=value`` of ``frame`` (values as text; rows without a
    value belong to none); ``tenure_bucket`` is derived from ``tenure_days`` when asked for.
    ChurnError names a column ``frame`` lacks."""
    frame = add_segment_columns(frame) if "tenure_bucket" in columns else frame
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ChurnError(f"segment column(s) {', '.join(missing)} not in the window's rows; available: "
                         f"{', '.join(map(str, frame.columns))} (config monitoring.segments)")
    out: dict[str, np.ndarray] = {}
    for col in columns:
        values = frame[col].astype("object")
        present = values.notna().to_numpy()
        for value, idx in values[present].astype(str).groupby(values[present].astype(str)).indices.items():
            out[f"{col}={value}"] = np.flatnonzero(present)[idx]
    return out


def _ids(frame: pd.DataFrame) -> np.ndarray:
    return frame["customer_id"].to_numpy() if "customer_id" in frame.columns else np.arange(len(frame))


def _fill_realised(p: SegmentPerformance, y: np.ndarray, s: np.ndarray, calibrated: np.ndarray,
                   ids: np.ndarray, eval_cfg: BusinessParams, min_rows: int, min_churners: int) -> None:
    """The realised numbers of segment ``p`` from its matured rows (labels ``y``, scores ``s``,
    ``calibrated`` scores for the expected AUC)."""
    pos, neg = _cluster_counts(y, ids)
    p.rows, p.customers, p.churners = int(y.size), int(np.unique(ids).size), pos
    if y.size < min_rows:
        p.reason = f"too few rows: {y.size} < {min_rows} (monitoring.segment_min_rows)"
        return
    if pos < min_churners:
        p.reason = f"too few churners: {pos} < {min_churners} (monitoring.segment_min_churners)"
        return
    if neg == 0 or y.sum() == y.size:
        p.reason = "every customer churned: no AUC"
        return
    m = classification_metrics(y, s, eval_cfg)
    p.auc, p.auc_se = float(m["roc_auc"]), clustered_auc_se(y, s, ids)
    p.expected_auc = _finite(expected_auc(calibrated))
    r, n, k = float(m["recall_at_k"]), float(y.size), float(m["k"])
    c = n / max(p.customers, 1)
    q, b = float(m["precision_at_k"]), float(m["base_rate"])
    below = (float(y.sum()) - q * k) / (n - k) if n > k else 0.0
    inside, outside = r * pos, (1 - r) * pos
    p.recall_at_k = r
    p.recall_at_k_se = (r * (1 - r) * math.sqrt((1 - q) / inside + (1 - below) / outside)
                        if inside > 0 and outside > 0 else math.sqrt(max(r * (1 - r), 0.0) / pos))
    value = eval_cfg.save_rate * eval_cfg.monthly_revenue
    p.revenue_lift = float(m["revenue_lift"])
    p.revenue_lift_se = value / n * math.sqrt(c * (k * q * (1 - q) + k * k * b * (1 - b) / n))


#: bootstrap replicates of a segment's AUC standard error, computed this many at a time
SEGMENT_REPLICATES, _REPLICATE_CHUNK = 100, 20


def clustered_auc_se(labels: Any, scores: Any, customer_ids: Any, replicates: int = SEGMENT_REPLICATES,
                     seed: int = 0) -> float:
    """Standard error of the ROC AUC of ``scores`` on ``labels`` from a Poisson bootstrap over
    customers (:func:`~mlflow_churn.stats.uncertainty.customer_weights`: a customer's rows share
    a weight), drawn and computed a chunk of replicates at a time to bound memory (chunk ``i``
    seeded ``seed + i``); NaN when fewer than 10 replicates have both classes."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype="float64")
    ids = np.asarray(customer_ids)
    chunks = [(i, min(_REPLICATE_CHUNK, replicates - i)) for i in range(0, replicates, _REPLICATE_CHUNK)]
    aucs = np.concatenate([weighted_auc(y, s, customer_weights(ids, n, seed + i)) for i, n in chunks])
    aucs = aucs[np.isfinite(aucs)]
    return float(np.std(aucs, ddof=1)) if aucs.size >= 10 else float("nan")


def _fill_estimate(p: SegmentPerformance, calibrated: np.ndarray, ids: np.ndarray, min_rows: int,
                   min_churners: int) -> None:
    """The label-free estimate of segment ``p`` from its current rows' calibrated scores."""
    n = int(calibrated.size)
    c = n / max(int(np.unique(ids).size), 1)
    expected_pos = float(calibrated.sum()) / c if n else 0.0
    p.window_rows, p.expected_churners = n, expected_pos
    if n < min_rows:
        p.estimate_reason = f"too few rows: {n} < {min_rows} (monitoring.segment_min_rows)"
    elif expected_pos < min_churners:
        p.estimate_reason = (f"too few expected churners: {expected_pos:.1f} < {min_churners} "
                             "(monitoring.segment_min_churners)")
    else:
        est = expected_auc(calibrated)
        if math.isfinite(est):
            p.estimated_auc = est
            p.estimated_auc_se = _finite(auc_standard_error(est, expected_pos, n / c - expected_pos))
        else:
            p.estimate_reason = "no estimate: the scores are all equal"


def segment_performance(
    columns: Sequence[str],
    current: pd.DataFrame,
    current_scores: Any,
    eval_cfg: BusinessParams,
    *,
    matured: pd.DataFrame | None = None,
    matured_scores: Any = None,
    calibration: Mapping[str, Any] | None = None,
    min_rows: int = 1,
    min_churners: int = 1,
) -> dict[str, SegmentPerformance]:
    """Performance of every segment (key ``column=value`` of ``columns``), sorted by key: the
    estimate on ``current`` rows with their ``current_scores`` (through ``calibration``) and,
    when given, the realised numbers on ``matured`` rows (with ``label``) and ``matured_scores``.
    Frames carry the segment columns and ``customer_id`` (each row its own customer without it).
    See the module doc for the numbers and their standard errors."""
    out: dict[str, SegmentPerformance] = {}
    if matured is not None and len(matured):
        y = np.asarray(matured["label"]).astype(int)
        s = np.asarray(matured_scores, dtype="float64").ravel()
        if s.size != y.size:
            raise ChurnError(f"matured scores have {s.size} values but the matured rows are {y.size}")
        ids, cal = _ids(matured), calibrate(s, calibration)
        for key, idx in segment_rows(matured, columns).items():
            out[key] = SegmentPerformance(key)
            _fill_realised(out[key], y[idx], s[idx], cal[idx], ids[idx], eval_cfg, min_rows, min_churners)
    no_labels = "labels not matured yet" if matured is None else "no matured rows of this segment"
    cal = calibrate(current_scores, calibration)
    if cal.size != len(current):
        raise ChurnError(f"scores have {cal.size} values but the window has {len(current)} rows")
    ids = _ids(current)
    for key, idx in segment_rows(current, columns).items():
        perf = out.setdefault(key, SegmentPerformance(key, reason=no_labels))
        _fill_estimate(perf, cal[idx], ids[idx], min_rows, min_churners)
    for perf in out.values():
        if perf.window_rows == 0 and perf.estimate_reason is None:
            perf.estimate_reason = "no rows of this segment in the window"
    return dict(sorted(out.items()))


def compare_segments(perfs: Mapping[str, SegmentPerformance],
                     baselines: Mapping[str, SegmentBaseline | None], alpha: float) -> float:
    """Each segment's drop against its baseline (module doc), in place. Returns the Bonferroni z
    over the segments compared (0 when none is)."""
    pairs: dict[str, tuple[str, float, float, float, float, str]] = {}
    for key, p in perfs.items():
        base = baselines.get(key)
        if base is None:
            continue
        est_source = base.estimate_source or base.source
        p.baseline_auc, p.baseline_auc_se, p.baseline_source = base.auc, base.auc_se, base.source
        p.baseline_estimated_auc, p.baseline_estimated_auc_se = base.estimated_auc, base.estimated_auc_se
        p.estimate_baseline_source = est_source
        p.training_auc, p.training_auc_se = base.training_auc, base.training_auc_se
        if p.auc is not None and base.auc is not None:
            pairs[key] = ("realised", base.auc, base.auc_se or 0.0, p.auc, p.auc_se or 0.0, base.source)
        elif p.estimated_auc is not None and base.estimated_auc is not None:
            pairs[key] = ("estimated", base.estimated_auc, base.estimated_auc_se or 0.0, p.estimated_auc,
                          p.estimated_auc_se or 0.0, f"{est_source} estimate")
    z = segment_z(alpha, len(pairs))
    for key, (source, ref, ref_se, auc, se, ref_source) in pairs.items():
        p = perfs[key]
        p.source, p.reference, p.reference_source = source, ref, ref_source
        p.drop, p.drop_se, p.z = ref - auc, math.hypot(ref_se, se), z
        p.threshold = z * p.drop_se
    return z


def segment_metric_suffix(key: str) -> str:
    """``<column>.<value>`` of segment ``column=value`` as it appears in MLflow metric names."""
    column, _, value = key.partition("=")
    return f"{_metric_name_part(column)}.{_metric_name_part(value)}"


def segment_baseline_metrics(perfs: Mapping[str, SegmentPerformance]) -> dict[str, float]:
    """What training logs as the segments' baselines: ``val_segment_<stat>.<column>.<value>`` for
    each of :data:`SEGMENT_BASELINE_STATS` that was measured."""
    out: dict[str, float] = {}
    for key, p in perfs.items():
        for stat in SEGMENT_BASELINE_STATS:
            value = _finite(getattr(p, stat))
            if value is not None:
                out[f"{SEGMENT_BASELINE_PREFIX}{stat}.{segment_metric_suffix(key)}"] = value
    return out


def segment_baseline(metrics: Mapping[str, Any], key: str,
                     source: str = "training") -> SegmentBaseline | None:
    """Segment ``key``'s baseline from a training run's metrics (:func:`segment_baseline_metrics`):
    its estimate, and its realised AUC as ``training_auc`` (for reading: a realised AUC is
    compared with the version's first window, module doc); None when training recorded
    neither."""
    suffix = segment_metric_suffix(key)
    got = {stat: _finite(metrics.get(f"{SEGMENT_BASELINE_PREFIX}{stat}.{suffix}"))
           for stat in SEGMENT_BASELINE_STATS}
    if got["auc"] is None and got["estimated_auc"] is None:
        return None
    return SegmentBaseline(None, None, got["estimated_auc"], got["estimated_auc_se"], source, source,
                           got["auc"], got["auc_se"])
