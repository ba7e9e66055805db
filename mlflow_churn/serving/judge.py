"""The canary judge: canary arm vs champion arm over the same period, metric by metric.

Interface (pure: frames in, a typed result out; no MLflow, no I/O, no clock)::

    judge(champion_rows, canary_rows, cfg, labels=None, calibration=None) -> JudgeVerdict

- ``champion_rows`` / ``canary_rows``: prediction-log rows of one arm each (columns ``status``,
  ``score``, ``latency_ms``; ``request_id`` and ``customer_id`` when ``labels`` are given), the
  same period for both arms: the judge never compares an arm with history.
- ``cfg``: the :class:`~mlflow_churn.config.ChurnConfig` (``canary.judge.*`` and
  ``evaluation.top_k_pct``), or a :class:`~mlflow_churn.config.CanaryJudgeConfig` (then
  ``top_k_pct`` = 10).
- ``labels``: matured labels, a frame with ``request_id``, ``customer_id`` and ``label`` (0/1)
  (what :func:`~mlflow_churn.serving.prediction_log.attach_labels` adds), or a ``label`` column
  in the rows themselves. With at least ``canary.judge.min_labelled`` labelled rows per arm AUC
  and recall@k are *realised*; else they are the label-free *estimate* (CBPE,
  :func:`~mlflow_churn.stats.performance.expected_auc` / ``expected_business`` of the
  calibrated scores). :attr:`MetricResult.source` says which.
- ``calibration``: ``{"champion": platt_map, "canary": platt_map}`` (each version's profile
  ``calibration``), applied to each arm's scores before the estimate; raw scores without it.

Rows with status ``not_found`` or ``refused`` / ``rejected`` are left out of every score and
performance comparison and counted on their own (:attr:`JudgeVerdict.excluded`); the
refusal rate is a metric of its own.

Per metric (:class:`MetricResult`: statistic, effect, p-value, tolerance, decision
``pass | fail | nodata``, rows per arm), with ``alpha = 1 - canary.judge.confidence``:

============  ===========  ==========================================  ============================
metric        group        test (one-sided: the canary worse)          effect
============  ===========  ==========================================  ============================
error_rate    errors       two-proportion z                            canary rate - champion rate
refusal_rate  errors       two-proportion z                            canary rate - champion rate
latency_ms    latency      Mann-Whitney U (trimmed)                    median ratio - 1
score         scores       Mann-Whitney U (trimmed), two-sided         P(canary > champion) - 0.5
auc           performance  z on the difference; SEs: Hanley-McNeil     canary - champion
                           (realised), delta method (estimate)
recall_at_k   performance  z on the difference; SEs: binomial          canary - champion
                           (realised), delta method (estimate)
============  ===========  ==========================================  ============================

``p_value`` is the test of "no difference". A metric **fails** when its effect lies beyond its
tolerance band (``canary.judge.tolerance``) in the bad direction (for ``score``: either
direction) *significantly*: the test of "the effect is inside the band" is rejected,
``p_band < alpha`` (Kayenta's rule: the effect's confidence bound at ``confidence`` lies
beyond the band). For the rates and AUC / recall@k that is a z test of ``effect`` against the
band edge; for latency the Mann-Whitney U of the canary against the champion's latencies x
(1 + tolerance), or + ``canary.judge.latency_min_ms`` when that is more; for scores the
normal approximation of U against 0.5 +- tolerance (two-sided).
A difference inside the band passes however significant. **NODATA** when an arm has
fewer than ``canary.judge.min_rows`` rows for the metric (AUC / recall@k: fewer than
``canary.judge.min_churners`` churners, expected or labelled): explicit, never a pass.

Verdict (Kayenta's shape): each group's share of passed metrics (NODATA metrics left out),
weighted by ``canary.judge.weights``, gives a score 0-100; ``pass`` at >= ``pass_score``,
``marginal`` at >= ``marginal_score``, else ``fail``; a failed metric named in
``canary.judge.critical`` fails the verdict whatever the score; any NODATA metric caps the
verdict at ``marginal`` (wait: never a pass, nor a rollback, on partial data).
**Stages.** When the rows carry the log's per-stage times (``feature_ms``: the feature
fetch; ``model_ms``: the arm's own scoring), :attr:`JudgeVerdict.stages` holds each arm's
p99 of each, and a latency that fails (or is marginal: slower beyond the band, not
significantly) is attributed in the reasons and :attr:`JudgeVerdict.latency_attribution` to
the stage whose p99 rose most, e.g. "model stage p99 3.1x the champion's: try `churn
compress`" or "feature stage p99 2.5x the champion's: the feature path, not the model".
(The log stage, timed in ``/metrics``, cannot be in a row: it is the row's own commit.)
:class:`JudgeGrade` is the verdict's vocabulary (``pass | marginal | fail``, and ``insufficient``
for the rollout controller's "too few rows to ask"); :data:`ACTIONS` maps it onto the canary's
:class:`~mlflow_churn.registry.vocab.CanaryVerdict` (``promote | wait | rollback``).
:meth:`JudgeVerdict.to_dict` is the ``decision.json`` body.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from scipy import stats as sps

from mlflow_churn.config import JUDGE_METRIC_GROUPS, CanaryJudgeConfig, ChurnConfig
from mlflow_churn.errors import ChurnError
from mlflow_churn.jsonable import jsonable
from mlflow_churn.registry.vocab import CanaryVerdict
from mlflow_churn.stats.metrics import classification_metrics, top_k_count
from mlflow_churn.stats.performance import auc_standard_error, calibrate


class JudgeGrade(StrEnum):
    """The canary judge's verdict: ``pass`` (advance / promote), ``marginal`` (wait: pause for a
    person, never a pass nor a rollback on partial data), ``fail`` (roll back); ``insufficient``
    is the rollout controller's own "too few canary rows to ask the judge" (never the judge's).
    A StrEnum: it equals (and is written as) its string."""

    PASS = "pass"
    MARGINAL = "marginal"
    FAIL = "fail"
    INSUFFICIENT = "insufficient"


class MetricCall(StrEnum):
    """One metric's decision: ``pass`` (inside the tolerance band), ``fail`` (beyond it) or
    ``nodata`` (too few rows on an arm: left out of the score, caps the verdict at marginal)."""

    PASS = "pass"
    FAIL = "fail"
    NODATA = "nodata"


#: verdict -> the canary's action
ACTIONS = {JudgeGrade.PASS: CanaryVerdict.PROMOTE, JudgeGrade.MARGINAL: CanaryVerdict.WAIT,
           JudgeGrade.FAIL: CanaryVerdict.ROLLBACK}
#: statuses counted on their own and left out of the score comparisons
NOT_FOUND = ("not_found",)
REFUSED = ("refused", "rejected")
#: the request stages each prediction-log row times (stage -> its column, ms), summarised per
#: arm as p99 in the evidence, and what to look at when that stage makes the canary slower
STAGES = {"feature": "feature_ms", "model": "model_ms"}
STAGE_HINTS = {"feature": "the feature path, not the model", "model": "try `churn compress`"}


@dataclass
class MetricResult:
    """One metric, canary vs champion: the test's statistic and p-value, the effect (see the
    module table for its unit), the tolerance band, the decision and the rows per arm."""

    name: str
    group: str
    statistic: float
    effect: float
    p_value: float  # the test of "no difference"
    tolerance: float
    decision: MetricCall  # pass | fail | nodata
    n_champion: int
    n_canary: int
    champion: float = float("nan")  # the metric's value on each arm (rate, median, AUC...)
    canary: float = float("nan")
    critical: bool = False
    p_band: float = float("nan")  # the test of "the effect is inside the band": decides the metric
    source: str = ""  # auc / recall_at_k: realised | estimated; else the test's name
    reason: str = ""


@dataclass
class JudgeVerdict:
    """The judge's verdict (:class:`JudgeGrade`: pass | marginal | fail), its score and every
    metric's evidence."""

    verdict: JudgeGrade
    score: float
    metrics: list[MetricResult]
    groups: dict[str, float]  # group -> share of its metrics that passed (0..1)
    reasons: list[str]
    excluded: dict[str, dict[str, int]]  # arm -> {"not_found": n, "refused": n}
    rows: dict[str, int]  # arm -> rows judged on (not_found / refused excluded)
    confidence: float
    performance_source: str  # realised | estimated | none
    #: arm -> stage (feature | model, see :data:`STAGES`) -> p99 (ms) of the judged rows; NaN
    #: without the log's per-stage columns
    stages: dict[str, dict[str, float]] = field(default_factory=dict)
    #: which stage a failed or marginal latency comes from ("" when latency is fine)
    latency_attribution: str = ""

    @property
    def action(self) -> CanaryVerdict:
        """``promote`` | ``wait`` | ``rollback``."""
        return ACTIONS[self.verdict]

    def metric(self, name: str) -> MetricResult:
        for m in self.metrics:
            if m.name == name:
                return m
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["action"] = self.action
        return jsonable(out)

    def mlflow_metrics(self, prefix: str = "judge_") -> dict[str, float]:
        """The finite numbers of the verdict, flat, for ``mlflow.log_metrics``."""
        out = {f"{prefix}score": self.score}
        for m in self.metrics:
            for key in ("statistic", "effect", "p_value", "p_band", "champion", "canary"):
                value = float(getattr(m, key))
                if math.isfinite(value):
                    out[f"{prefix}{m.name}_{key}"] = value
            out[f"{prefix}{m.name}_failed"] = float(m.decision == MetricCall.FAIL)
        for arm, stages in self.stages.items():
            for stage, value in stages.items():
                if math.isfinite(value):
                    out[f"{prefix}stage_{stage}_p99_ms_{arm}"] = float(value)
        return out


# --------------------------------------------------------------------------- tests
def trim(values: np.ndarray, fraction: float) -> np.ndarray:
    """``values`` without the lowest and highest ``fraction`` of them (each tail, floor)."""
    v = np.sort(np.asarray(values, dtype="float64"))
    cut = int(math.floor(v.size * fraction))
    return v[cut: v.size - cut] if cut else v


def two_proportion_z(x_champion: int, n_champion: int, x_canary: int, n_canary: int) -> tuple[float, float]:
    """Pooled two-proportion z test of "the canary's rate is higher": ``(z, one-sided p)``;
    ``(0, 1)`` when neither arm has an event."""
    if n_champion <= 0 or n_canary <= 0:
        raise ChurnError(f"two_proportion_z needs rows on both arms (got {n_champion} and {n_canary})")
    pooled = (x_champion + x_canary) / (n_champion + n_canary)
    var = pooled * (1 - pooled) * (1 / n_champion + 1 / n_canary)
    if var <= 0:
        return 0.0, 1.0
    z = (x_canary / n_canary - x_champion / n_champion) / math.sqrt(var)
    return float(z), float(sps.norm.sf(z))


def _nodata(name: str, tol: float, n0: int, n1: int, critical: bool, why: str,
            source: str = "") -> MetricResult:
    return MetricResult(name, JUDGE_METRIC_GROUPS[name], float("nan"), float("nan"), float("nan"), tol,
                        MetricCall.NODATA, n0, n1, critical=critical, source=source, reason=why)


def _decide(p_band: float, alpha: float) -> str:
    """``fail`` when "the effect lies inside the band" is rejected at ``alpha``: the effect's
    one-sided confidence bound lies beyond the tolerance (Kayenta's rule)."""
    return MetricCall.FAIL if p_band < alpha else MetricCall.PASS


def _rate_metric(name: str, champ: pd.DataFrame, can: pd.DataFrame, hit: tuple[str, ...],
                 jc: CanaryJudgeConfig, alpha: float) -> MetricResult:
    tol, critical = jc.tolerance.get(name, 0.0), name in jc.critical
    n0, n1 = len(champ), len(can)
    if min(n0, n1) < jc.min_rows:
        return _nodata(name, tol, n0, n1, critical, f"{min(n0, n1)} rows on an arm < canary.judge.min_rows "
                       f"{jc.min_rows}", "two-proportion z")
    x0, x1 = int(champ["status"].isin(hit).sum()), int(can["status"].isin(hit).sum())
    z, p = two_proportion_z(x0, n0, x1, n1)
    r0, r1 = x0 / n0, x1 / n1
    effect = r1 - r0
    se = math.sqrt(r0 * (1 - r0) / n0 + r1 * (1 - r1) / n1)  # unpooled: the band edge is not 0
    p_band = float(sps.norm.sf((effect - tol) / se)) if se > 0 else (0.0 if effect > tol else 1.0)
    return MetricResult(name, JUDGE_METRIC_GROUPS[name], z, effect, p, tol, _decide(p_band, alpha), n0, n1,
                        r0, r1, critical, p_band, "two-proportion z",
                        f"{x1}/{n1} canary vs {x0}/{n0} champion")


def _mann_whitney(name: str, champ: np.ndarray, can: np.ndarray, jc: CanaryJudgeConfig,
                  alpha: float, expected: float = 0.0) -> MetricResult:
    tol, critical = jc.tolerance.get(name, 0.0), name in jc.critical
    champ, can = champ[np.isfinite(champ)], can[np.isfinite(can)]
    if min(champ.size, can.size) < jc.min_rows:
        return _nodata(name, tol, int(champ.size), int(can.size), critical,
                       f"{min(champ.size, can.size)} values on an arm < canary.judge.min_rows {jc.min_rows}",
                       "Mann-Whitney U")
    a, b = trim(champ, jc.trim), trim(can, jc.trim)
    m0, m1 = float(np.median(a)), float(np.median(b))
    if name == "latency_ms":
        res = sps.mannwhitneyu(b, a, alternative="greater")
        effect = m1 / m0 - 1 if m0 > 0 else (0.0 if m1 == m0 else math.inf)
        # the band edge: the canary slower than the champion x (1 + tolerance), and by more than
        # canary.judge.latency_min_ms (sub-millisecond noise of a loaded host is no regression)?
        edge = np.maximum(a * (1 + tol), a + jc.latency_min_ms)
        p_band = float(sps.mannwhitneyu(b, edge, alternative="greater").pvalue)
    else:  # score: any shift of the distribution, either way, beyond the one the gate measured
        res = sps.mannwhitneyu(b, a, alternative="two-sided")
        effect = float(res.statistic) / (a.size * b.size) - 0.5 - expected
        # |P(canary > champion) - 0.5 - expected| beyond the band, either side (normal
        # approximation of U)
        se = math.sqrt((a.size + b.size + 1) / (12.0 * a.size * b.size))
        p_band = min(1.0, 2 * float(sps.norm.sf((abs(effect) - tol) / se)))
    p = float(res.pvalue)
    why = (f"medians {m1:.4g} canary vs {m0:.4g} champion (trimmed {jc.trim:g} per tail)"
           + (f"; effect net of the {expected:+.4f} the gate measured between the two models"
              if expected else ""))
    return MetricResult(name, JUDGE_METRIC_GROUPS[name], float(res.statistic), float(effect), p, tol,
                        _decide(p_band, alpha), int(champ.size), int(can.size), m0, m1, critical, p_band,
                        "Mann-Whitney U", why)


def _difference(name: str, v0: float, v1: float, se: float, n0: int, n1: int, tol: float, critical: bool,
                alpha: float, source: str) -> MetricResult:
    effect = v1 - v0
    if not (math.isfinite(effect) and math.isfinite(se)):
        return _nodata(name, tol, n0, n1, critical, f"{name} not measurable on an arm (one class only?)",
                       source)
    z = effect / se if se > 0 else (0.0 if effect == 0 else math.copysign(math.inf, effect))
    p = float(sps.norm.cdf(z))  # one-sided: the canary is worse
    p_band = float(sps.norm.cdf((effect + tol) / se)) if se > 0 else (0.0 if -effect > tol else 1.0)
    return MetricResult(name, JUDGE_METRIC_GROUPS[name], float(z), float(effect), p, tol,
                        _decide(p_band, alpha), n0, n1, v0, v1, critical, p_band, source,
                        f"{source}: {v1:.4f} canary vs {v0:.4f} champion, SE of the difference {se:.4f}")


@dataclass
class _TopK:
    """The business parameters ``classification_metrics`` reads (only ``top_k_pct`` matters here)."""

    top_k_pct: float
    save_rate: float = 0.0
    monthly_revenue: float = 0.0
    offer_cost: float = 0.0
    segments: tuple = ()
    min_segment_size: int = 1


def estimated_auc_se(p: np.ndarray) -> tuple[float, float]:
    """The label-free AUC estimate of calibrated scores ``p``
    (:func:`~mlflow_churn.stats.performance.expected_auc`, the same number) and its standard
    error over which customers were sampled: the estimate is a ratio of two U-statistics of
    order 2 (concordant-pair mass over all-pair mass), so its variance is the delta method over
    their Hajek projections, ``4 / n * var_i((N_i - A M_i) / 2 (n - 1)) / U_D^2`` with ``N_i``,
    ``M_i`` unit i's pair sums; O(n log n). It matches a bootstrap within a few % (tests)."""
    s = np.sort(np.clip(np.asarray(p, dtype="float64"), 0.0, 1.0))
    n = s.size
    if n < 3:
        return float("nan"), float("nan")
    uniq, start, counts = np.unique(s, return_index=True, return_counts=True)
    pos, neg = np.add.reduceat(s, start), np.add.reduceat(1.0 - s, start)
    cpos, cneg = np.cumsum(pos), np.cumsum(neg)
    g = np.repeat(np.arange(uniq.size), counts)
    above_pos = cpos[-1] - cpos[g]  # sum of p over strictly higher scores
    below_neg = (cneg - neg)[g]  # sum of 1 - p over strictly lower scores
    tie_pos, tie_neg = pos[g] - s, neg[g] - (1.0 - s)
    n_i = (1 - s) * (above_pos + 0.5 * tie_pos) + s * (below_neg + 0.5 * tie_neg)
    m_i = (1 - s) * (cpos[-1] - s) + s * (cneg[-1] - (1 - s))
    if m_i.sum() <= 0:
        return float("nan"), float("nan")
    auc = float(n_i.sum() / m_i.sum())
    u_d = m_i.sum() / 2 / (n * (n - 1))
    h = (n_i - auc * m_i) / (2 * (n - 1))
    return auc, float(math.sqrt(4.0 / n * np.var(h, ddof=1)) / u_d)


def estimated_recall_se(p: np.ndarray, top_k_pct: float) -> tuple[float, float]:
    """The label-free recall@k estimate of calibrated scores ``p`` (expected churners in the
    top k over all expected churners, as
    :func:`~mlflow_churn.stats.performance.expected_business`) and its standard error (delta
    method; the top-k sum's influence is ``max(p - t, 0)``, ``t`` the k-th score)."""
    p = np.asarray(p, dtype="float64")
    n = p.size
    if n < 3 or not p.sum() > 0:
        return float("nan"), float("nan")
    ranked = np.sort(p)[::-1]
    k = top_k_count(n, top_k_pct)
    recall = float(ranked[:k].sum() / p.sum())
    h = np.maximum(p - ranked[k - 1], 0.0) - recall * p
    return recall, float(math.sqrt(np.var(h, ddof=1) / n) / p.mean())


def _estimated(scores: dict[str, np.ndarray], jc: CanaryJudgeConfig, top_k_pct: float, alpha: float,
               calibration: dict[str, Any] | None) -> list[MetricResult]:
    n0, n1 = scores["champion"].size, scores["canary"].size
    crit = {m: m in jc.critical for m in ("auc", "recall_at_k")}
    tol = {m: jc.tolerance.get(m, 0.0) for m in ("auc", "recall_at_k")}
    if min(n0, n1) < jc.min_rows:
        why = f"{min(n0, n1)} scored rows on an arm < canary.judge.min_rows {jc.min_rows}"
        return [_nodata(m, tol[m], n0, n1, crit[m], why, "estimated") for m in ("auc", "recall_at_k")]
    est, se = {}, {}
    calibrated = {arm: calibrate(scores[arm], (calibration or {}).get(arm)) for arm in scores}
    churners = min(float(p.sum()) for p in calibrated.values())
    if churners < jc.min_churners:
        why = (f"{churners:.1f} expected churners (sum of calibrated scores) on an arm < "
               f"canary.judge.min_churners {jc.min_churners:g}")
        return [_nodata(m, tol[m], n0, n1, crit[m], why, "estimated") for m in ("auc", "recall_at_k")]
    for arm in ("champion", "canary"):
        p = calibrated[arm]
        (auc, se_auc), (recall, se_recall) = estimated_auc_se(p), estimated_recall_se(p, top_k_pct)
        est[arm], se[arm] = (auc, recall), (se_auc, se_recall)
    return [_difference(m, est["champion"][j], est["canary"][j],
                        math.hypot(se["champion"][j], se["canary"][j]),
                        n0, n1, tol[m], crit[m], alpha, "estimated")
            for j, m in enumerate(("auc", "recall_at_k"))]


def _realised(labelled: dict[str, pd.DataFrame], jc: CanaryJudgeConfig, top_k_pct: float,
              alpha: float) -> list[MetricResult]:
    n0, n1 = len(labelled["champion"]), len(labelled["canary"])
    churners = min(int(rows["label"].sum()) for rows in labelled.values())
    if churners < jc.min_churners:
        why = f"{churners} labelled churners on an arm < canary.judge.min_churners {jc.min_churners:g}"
        return [_nodata(m, jc.tolerance.get(m, 0.0), n0, n1, m in jc.critical, why, "realised")
                for m in ("auc", "recall_at_k")]
    vals: dict[str, dict[str, float]] = {}
    for arm, rows in labelled.items():
        y, s = rows["label"].to_numpy(), rows["score"].to_numpy(float)
        m = classification_metrics(y, s, _TopK(top_k_pct))
        pos = int(m["positives"])
        auc, recall = float(m["roc_auc"]), float(m["recall_at_k"])
        vals[arm] = {"auc": auc, "recall_at_k": recall,
                     "se_auc": auc_standard_error(auc, pos, len(y) - pos),
                     "se_recall": math.sqrt(max(recall * (1 - recall), 0.0) / pos) if pos else float("nan")}
    c, k = vals["champion"], vals["canary"]
    return [
        _difference("auc", c["auc"], k["auc"], math.hypot(c["se_auc"], k["se_auc"]), n0, n1,
                    jc.tolerance.get("auc", 0.0), "auc" in jc.critical, alpha, "realised"),
        _difference("recall_at_k", c["recall_at_k"], k["recall_at_k"],
                    math.hypot(c["se_recall"], k["se_recall"]), n0, n1,
                    jc.tolerance.get("recall_at_k", 0.0), "recall_at_k" in jc.critical, alpha, "realised"),
    ]


def _labelled(rows: pd.DataFrame, labels: pd.DataFrame | None) -> pd.DataFrame:
    """The arm's scored rows with a matured ``label``."""
    if "label" in rows.columns:
        out = rows
    elif labels is None or not len(labels):
        return rows.iloc[0:0].assign(label=pd.Series(dtype="int8"))
    else:
        keys = [c for c in ("request_id", "customer_id") if c in labels.columns and c in rows.columns]
        if not keys:
            raise ChurnError("judge labels need request_id and/or customer_id columns to join on; "
                             f"got {sorted(labels.columns)}")
        out = rows.merge(labels[[*keys, "label"]].drop_duplicates(keys), on=keys, how="inner")
    return out[out["label"].notna()]


def _score(metrics: list[MetricResult], weights: dict[str, float]) -> tuple[float, dict[str, float]]:
    """100 x the weighted share of passed metrics over the groups with data (NODATA metrics
    left out, as Kayenta does; the caller caps a verdict with NODATA at marginal); NaN when no
    weighted group has data."""
    groups: dict[str, list[MetricResult]] = {}
    for m in metrics:
        if m.decision != MetricCall.NODATA:
            groups.setdefault(m.group, []).append(m)
    shares = {g: sum(m.decision == MetricCall.PASS for m in ms) / len(ms) for g, ms in groups.items()}
    total = sum(weights.get(g, 0.0) for g in shares)
    if total <= 0:
        return float("nan"), shares
    return 100.0 * sum(weights.get(g, 0.0) * s for g, s in shares.items()) / total, shares


# --------------------------------------------------------------------------- the judge
def judge(champion_rows: pd.DataFrame, canary_rows: pd.DataFrame, cfg: ChurnConfig | CanaryJudgeConfig,
          labels: pd.DataFrame | None = None, calibration: dict[str, Any] | None = None,
          expected_score_shift: float = 0.0) -> JudgeVerdict:
    """Judge the canary arm against the champion arm (see the module docstring).
    ``expected_score_shift``: the score effect the gate measured between the two models on
    the same rows (:func:`mlflow_churn.serving.canary.gate_score_shift`); the score metric
    judges the live effect's distance from it."""
    if isinstance(cfg, ChurnConfig):
        jc, top_k_pct = cfg.canary.judge, cfg.evaluation.top_k_pct
    else:
        jc, top_k_pct = cfg, 10.0
    arms = {"champion": champion_rows, "canary": canary_rows}
    for arm, rows in arms.items():
        missing = {"status", "score", "latency_ms"} - set(rows.columns)
        if missing:
            raise ChurnError(f"judge: the {arm} rows lack columns {sorted(missing)}; pass prediction-log "
                             "rows")
    alpha = 1.0 - jc.confidence
    excluded, kept = {}, {}
    for arm, rows in arms.items():
        nf, rf = rows["status"].isin(NOT_FOUND), rows["status"].isin(REFUSED)
        excluded[arm] = {"not_found": int(nf.sum()), "refused": int(rf.sum())}
        kept[arm] = rows[~(nf | rf)]
    metrics = [
        _rate_metric("error_rate", kept["champion"], kept["canary"], ("error",), jc, alpha),
        # refusals are counted against every request the arm was asked for (not_found excluded)
        _rate_metric("refusal_rate", arms["champion"][~arms["champion"]["status"].isin(NOT_FOUND)],
                     arms["canary"][~arms["canary"]["status"].isin(NOT_FOUND)], REFUSED, jc, alpha),
        _mann_whitney("latency_ms", *(kept[a]["latency_ms"].to_numpy(dtype="float64", na_value=np.nan)
                                      for a in ("champion", "canary")), jc, alpha),
    ]
    ok = {a: kept[a][kept[a]["status"] == "ok"] for a in arms}
    scores = {a: ok[a]["score"].to_numpy(dtype="float64", na_value=np.nan) for a in arms}
    scores = {a: s[np.isfinite(s)] for a, s in scores.items()}
    metrics.append(_mann_whitney("score", scores["champion"], scores["canary"], jc, alpha,
                                 expected=expected_score_shift))
    labelled = {a: _labelled(ok[a], labels) for a in arms}
    if min(len(v) for v in labelled.values()) >= jc.min_labelled:
        source = "realised"
        metrics += _realised(labelled, jc, top_k_pct, alpha)
    else:
        source = "estimated"
        metrics += _estimated(scores, jc, top_k_pct, alpha, calibration)
    if all(m.decision == MetricCall.NODATA for m in metrics if m.group == "performance"):
        source = "none"
    score, shares = _score(metrics, jc.weights)
    reasons: list[str] = []
    critical_failed = [m.name for m in metrics if m.decision == MetricCall.FAIL and m.critical]
    if critical_failed:
        verdict = JudgeGrade.FAIL
        reasons.append(f"critical metric(s) failed: {', '.join(critical_failed)}")
    elif math.isnan(score) or score >= jc.marginal_score:
        verdict = JudgeGrade.PASS if score >= jc.pass_score else JudgeGrade.MARGINAL
    else:
        verdict = JudgeGrade.FAIL
    nodata = [m.name for m in metrics if m.decision == MetricCall.NODATA]
    if verdict == JudgeGrade.PASS and nodata:  # a decision is never taken on partial data
        verdict = JudgeGrade.MARGINAL
        reasons.append(f"NODATA for {', '.join(nodata)}: marginal at best until every metric has data")
    reasons.append(f"score {score:.1f} (pass >= {jc.pass_score:g}, marginal >= {jc.marginal_score:g})")
    for m in metrics:
        if m.decision == MetricCall.FAIL:
            reasons.append(f"{m.name} failed: effect {m.effect:+.4g} beyond tolerance {m.tolerance:g} "
                           f"(p {m.p_band:.3g} < {alpha:.3g} against the band edge; {m.reason})")
        elif m.decision == MetricCall.NODATA:
            reasons.append(f"{m.name}: NODATA ({m.reason})")
    stages = {a: stage_p99(kept[a]) for a in arms}
    attribution = attribute_latency(stages, next(m for m in metrics if m.name == "latency_ms"))
    if attribution:
        reasons.append(attribution)
    rows = {a: len(kept[a]) for a in arms}
    return JudgeVerdict(verdict, float(score), metrics, shares, reasons, excluded, rows, jc.confidence,
                        source, stages, attribution)


def stage_p99(rows: pd.DataFrame) -> dict[str, float]:
    """p99 (ms) of each of :data:`STAGES` over ``rows`` (NaN without the column or values)."""
    out = {}
    for stage, column in STAGES.items():
        v = (rows[column].to_numpy(dtype="float64", na_value=np.nan) if column in rows.columns
             else np.zeros(0))
        v = v[np.isfinite(v)]
        out[stage] = float(np.percentile(v, 99)) if v.size else float("nan")
    return out


def attribute_latency(stages: dict[str, dict[str, float]], latency: MetricResult) -> str:
    """Which stage a canary latency that failed, or is marginal (median slower beyond the band,
    not significantly), comes from: the stage whose p99 rose the most (ms) over the
    champion's, with its ratio and what to look at; "" while latency is fine."""
    beyond = math.isfinite(latency.effect) and latency.effect > latency.tolerance
    if latency.decision == MetricCall.FAIL:
        state = "failed"
    elif latency.decision == MetricCall.PASS and beyond:
        state = "marginal (slower beyond the band, not significantly)"
    else:
        return ""
    rises = {}
    for stage in STAGES:
        c, k = stages.get("champion", {}).get(stage, math.nan), stages.get("canary", {}).get(stage, math.nan)
        if math.isfinite(c) and math.isfinite(k):
            rises[stage] = (k - c, c, k)
    if not rises:
        return (f"latency {state}: the rows carry no per-stage times (feature_ms, model_ms) to say "
                "which stage it comes from")
    stage = max(rises, key=lambda name: rises[name][0])
    rise, c, k = rises[stage]
    if rise <= 0:
        return (f"latency {state}: neither the feature nor the model stage is slower at p99; the rest "
                "of the request (parsing, the host) is")
    ratio = f"{k / c:.1f}x" if c > 0 else "above"
    return (f"latency {state}: {stage} stage p99 {ratio} the champion's ({k:.2f} ms vs {c:.2f} ms): "
            f"{STAGE_HINTS[stage]}")


#: the sign that makes each metric's effect "worse" when positive
_BAD_SIGN = {"error_rate": 1.0, "refusal_rate": 1.0, "latency_ms": 1.0, "score": 0.0, "auc": -1.0,
             "recall_at_k": -1.0}


def judge_figure(verdict: JudgeVerdict, title: str = "") -> Figure:
    """Each metric's effect in the bad direction as a multiple of its tolerance band (the band
    edge at 1; ``score`` either way), coloured by decision, NODATA shown as such."""
    ms = verdict.metrics
    fig = Figure(figsize=(8, 0.6 * len(ms) + 1.6))
    ax = fig.add_subplot()
    colours = {MetricCall.PASS: "tab:green", MetricCall.FAIL: "tab:red", MetricCall.NODATA: "tab:gray"}
    for i, m in enumerate(ms):
        sign = _BAD_SIGN.get(m.name, 1.0)
        worse = abs(m.effect) if sign == 0.0 else sign * m.effect
        x = worse / m.tolerance if m.tolerance > 0 else (math.copysign(10.0, worse) if worse else 0.0)
        x = 0.0 if not math.isfinite(x) else max(-10.0, min(10.0, x))
        ax.barh(i, x, color=colours[m.decision])
        label = "NODATA" if m.decision == MetricCall.NODATA else f"{m.decision}, p_band {m.p_band:.2g}"
        ax.text(x, i, f"  {label}" + (" (critical)" if m.critical else ""), va="center", fontsize=8)
    ax.axvline(1.0, color="black", linestyle="--", linewidth=1, label="tolerance band edge")
    ax.axvline(0.0, color="black", linewidth=0.5)
    ax.set_yticks(range(len(ms)), [f"{m.name} ({m.group})" for m in ms])
    ax.invert_yaxis()
    ax.set_xlabel("canary worse than champion, in tolerances (effect / tolerance)")
    ax.set_title(title or f"canary judge: {verdict.verdict}, score {verdict.score:.1f}")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


__all__ = ["ACTIONS", "STAGES", "JudgeVerdict", "MetricResult", "attribute_latency", "estimated_auc_se",
           "estimated_recall_se", "judge", "judge_figure", "stage_p99", "trim", "two_proportion_z"]
