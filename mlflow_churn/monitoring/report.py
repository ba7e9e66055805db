"""The monitor run's pictures and report: PSI heatmap, PSI timeline, Evidently HTML.

- :func:`psi_figure` (``psi_heatmap.png``): daily PSI of every feature and the score
  (features x days) and the segments' PSI against their size-aware thresholds;
- :func:`timeline_figure` (``psi_timeline.png``): the same daily PSI as lines for the
  features, the score and the segments that moved most, with the smallest PSI trigger value;
- :func:`evidently_report` (``drift_report.html``): Evidently 0.7's DataDriftPreset on a
  sample of the window against a reference re-sampled from the profile's marginals,
  configured per column with the policy's method and threshold, so that its verdict per
  column is the policy's (see below).

**One verdict.** Evidently's own drift tests (Wasserstein / Jensen-Shannon above 1000 rows,
its PSI on Sturges bins over reference and current together, thresholds without sample
size) would judge other columns than the policy does. :func:`policy_rules` turns the
policy's feature-level triggers (``psi``, ``ks``, ``js``, ``chi2_p`` per feature and
``score_psi`` on the ``score`` column) into one rule per column and trigger for the window
being decided: the statistic, the comparison and the effective threshold, i.e.
max(trigger value, the size-aware noise level monitoring recorded) for ``>`` / ``>=``, and
the hysteresis threshold (value x ``clear_below_fraction``, or / it for ``<`` / ``<=``) for a
key the trigger held active in the previous window. The report registers one Evidently
stattest per metric (``churn-policy-psi``, ``-ks``, ``-js``, ``-chi2_p``, ``-score_psi``,
and ``churn-policy-any`` for a column several triggers judge) and sets them with
``per_column_method`` / ``per_column_threshold``. A stattest computes the policy's statistic
(:mod:`mlflow_churn.stats.drift`, the same functions and bins as
:mod:`mlflow_churn.monitoring.window_drift`: the profile's quantile bins or categories, the
profile's sorted sample for KS, distinct-customer counts for chi-square) on *all* rows of the
window, not on the sample the report draws for its histograms, and marks the column drifted
when any of its rules holds: exactly the keys the policy's triggers have active in this
window. Persistence (how many windows) and the decision itself stay in ``decision.json``.
Columns no feature-level trigger judges are left out of the drift table; with none judged at
all the report is Evidently's DataSummaryPreset (statistics, no verdict).
"""

from __future__ import annotations

import operator
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mlflow_churn.config import PolicyConfig
from mlflow_churn.errors import ChurnError
from mlflow_churn.monitoring.policy import WindowStats, _active_keys, _trigger_name, _values
from mlflow_churn.stats import drift
from mlflow_churn.stats.drift import ColumnKind

#: the report's column of the model's scores
SCORE_COLUMN = "score"
#: trigger metrics judged per report column (the rest are window-level or segment-level)
POLICY_METRICS = ("psi", "ks", "js", "chi2_p", "score_psi")
_OPS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}
_DISPLAY = {
    "psi": "PSI vs the training profile's bins (policy trigger)",
    "ks": "KS D vs the training profile's sample (policy trigger)",
    "js": "Jensen-Shannon distance vs the training profile (policy trigger)",
    "chi2_p": "chi-square p-value on distinct customers (policy trigger)",
    "score_psi": "score PSI vs the training profile's bins (policy trigger)",
    "any": "policy triggers: drifted when any holds (score of the first that does)",
}


@dataclass(frozen=True)
class ColumnRule:
    """One policy trigger judging one report column in the window being decided."""

    column: str  # feature name, or ``score``
    metric: str  # psi | ks | js | chi2_p | score_psi
    trigger: str  # the trigger as the policy names it, e.g. ``psi[*] > 0.2``
    op: str  # the comparison deciding this window
    threshold: float  # the effective threshold this window
    value: float  # the window's statistic as monitoring measured it
    held: bool  # active in the previous window: the hysteresis threshold applies

    def holds(self, value: float) -> bool:
        """True when ``value`` (of this rule's statistic) makes the column drifted."""
        return bool(_OPS[self.op](value, self.threshold))

    @property
    def drifted(self) -> bool:
        return self.holds(self.value)


def policy_rules(windows: Sequence[WindowStats], policy: PolicyConfig) -> dict[str, list[ColumnRule]]:
    """Report column -> its rules in the newest of ``windows`` (oldest first; the history the
    policy decided on, ending with the window itself); see the module doc."""
    if not windows:
        raise ChurnError("policy_rules needs at least the window being decided")
    cur, frac = windows[-1], policy.hysteresis.clear_below_fraction
    out: dict[str, list[ColumnRule]] = {}
    for t in policy.triggers:
        if t.metric not in POLICY_METRICS:
            continue
        before = _active_keys(windows[:-1], t, frac)[-1] if len(windows) > 1 else {}
        raising = t.op in (">", ">=")
        for key, (value, limit) in _values(cur, t).items():
            held = key in before
            if held:  # active until the value clears the hysteresis level
                op, threshold = (">=", limit * frac) if raising else ("<=", limit / frac)
            else:
                op, threshold = t.op, limit
            column = SCORE_COLUMN if t.metric == "score_psi" else key
            out.setdefault(column, []).append(
                ColumnRule(column, t.metric, _trigger_name(t), op, float(threshold), float(value), held))
    return out


# --------------------------------------------------------------------------- Evidently stattests
@dataclass
class _Column:
    """What a stattest needs for one column: its rules, profile entry and all window values."""

    rules: list[ColumnRule]
    entry: dict[str, Any]
    values: Any


@dataclass
class _ReportData:
    columns: dict[str, _Column]
    n_eff: int
    epsilon: float


_CURRENT: ContextVar[_ReportData | None] = ContextVar("churn_policy_report", default=None)
_REGISTER_LOCK = threading.Lock()
_REGISTERED: set[str] = set()


def _statistic(metric: str, col: _Column, data: _ReportData) -> float:
    """The policy's statistic of one column on all of the window's rows (as window_drift)."""
    entry = col.entry
    counts = drift.current_counts(entry, col.values)
    n = int(counts.sum())
    if n == 0:
        return float("nan")
    if metric in ("psi", "score_psi"):
        return drift.psi_from_shares(entry["shares"], drift.shares(counts), data.epsilon)
    if metric == "ks":
        return drift.ks_at_sample_points(np.asarray(entry["sample"], dtype="float64"), col.values)
    if metric == "js":
        return drift.js_from_shares(entry["shares"], counts)
    if metric == "chi2_p":
        ref_counts = np.asarray(entry["shares"], dtype="float64") * float(entry["count"])
        return drift.chi2_from_counts(ref_counts, counts * (min(n, data.n_eff) / n))[1]
    raise ChurnError(f"no policy statistic '{metric}'")


def _judge(_reference: Any, current: pd.Series, *_: Any) -> tuple[float, bool]:
    """The Evidently stattest: the column's statistic(s) on all window rows and the policy's
    verdict (any rule holds); the score shown is that of the first rule that holds, else the
    first rule's."""
    data = _CURRENT.get()
    col = data.columns.get(str(current.name)) if data is not None else None
    if col is None:
        raise ChurnError(f"policy stattest called outside a policy report (column {current.name!r})")
    results = [(rule, _statistic(rule.metric, col, data)) for rule in col.rules]
    firing = [(rule, v) for rule, v in results if v == v and rule.holds(v)]
    shown = firing[0] if firing else results[0]
    return float(shown[1]), bool(firing)


def _method(metric: str) -> str:
    """The registered Evidently stattest name of ``metric`` (``any`` for several rules)."""
    from evidently.legacy.calculations.stattests.registry import StatTest, register_stattest
    from evidently.legacy.core import ColumnType

    name = f"churn-policy-{metric}"
    with _REGISTER_LOCK:
        if name not in _REGISTERED:
            test = StatTest(name=name, display_name=_DISPLAY[metric],
                            allowed_feature_types=[ColumnType.Numerical, ColumnType.Categorical])
            # one function object per name: Evidently maps functions back to names
            register_stattest(test, lambda r, c, t, th: _judge(r, c, t, th))
            _REGISTERED.add(name)
    return name


@contextmanager
def _report_data(data: _ReportData) -> Iterator[None]:
    token = _CURRENT.set(data)
    try:
        yield
    finally:
        _CURRENT.reset(token)


@dataclass
class EvidentlyReport:
    """The HTML file and what Evidently concluded per column (``drifted`` by its tests)."""

    path: Path
    columns: dict[str, dict[str, Any]]  # column -> {method, score, threshold, drifted}

    @property
    def drifted(self) -> list[str]:
        return sorted(c for c, v in self.columns.items() if v["drifted"])


def _verdicts(snapshot: Any) -> dict[str, dict[str, Any]]:
    """Per column, Evidently's ValueDrift result and test status from a snapshot."""
    d = snapshot.dict()
    by_id = {m["id"]: m for m in d["metrics"]}
    out: dict[str, dict[str, Any]] = {}
    for test in d.get("tests", []):
        params = (test.get("metric_config") or {}).get("params") or {}
        if params.get("type", "").endswith("ValueDrift"):
            metric = by_id.get((test.get("metric_config") or {}).get("metric_id"), {})
            out[params["column"]] = {"method": params.get("method"), "threshold": params.get("threshold"),
                                     "score": metric.get("value"), "drifted": test.get("status") == "FAIL"}
    return out


def _reference_frame(profile: dict[str, Any], rows: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    out = {}
    for name, e in list(profile["features"].items()) + [("score", profile["score"])]:
        if e["kind"] == ColumnKind.NUMERIC:
            out[name] = (
                rng.choice(np.asarray(e["sample"], float), size=rows, replace=True)
                if e["sample"]
                else np.full(rows, np.nan)
            )
        else:
            p = np.asarray(e["shares"][:-1], float)
            out[name] = rng.choice(e["categories"], size=rows, p=p / p.sum())
    return pd.DataFrame(out)


def evidently_report(
    frame: pd.DataFrame,
    scores: np.ndarray,
    profile: dict[str, Any],
    path: Path,
    rows: int = 20_000,
    seed: int = 0,
    *,
    windows: Sequence[WindowStats],
    policy: PolicyConfig,
    psi_epsilon: float = 1e-4,
) -> EvidentlyReport:
    """Evidently 0.7 DataDriftPreset HTML of the window against the profile's marginals,
    judged per column with the policy's rules (see the module doc).

    ``frame`` / ``scores``: the window's rows (with ``customer_id``) and the model's scores on
    them; ``rows``: rows drawn for the report's histograms (the verdicts use all rows);
    ``windows``: the policy's history ending with this window's stats; ``psi_epsilon``:
    ``monitoring.psi_epsilon``. Returns the file and Evidently's verdict per column.
    """
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset, DataSummaryPreset

    feats = profile["features"]
    cols = [c for c in feats if c in frame.columns]
    take = min(rows, len(frame))
    idx = np.random.default_rng(seed).choice(len(frame), size=take, replace=False)
    cur = pd.DataFrame(
        {
            c: (
                frame[c].iloc[idx].astype("object").astype(str).to_numpy()
                if feats[c]["kind"] == ColumnKind.CATEGORICAL
                else frame[c].iloc[idx].to_numpy(float)
            )
            for c in cols
        }
    )
    cur[SCORE_COLUMN] = np.asarray(scores)[idx]
    ref = _reference_frame(profile, take, seed)[cols + [SCORE_COLUMN]]
    num = [c for c in cols if feats[c]["kind"] == ColumnKind.NUMERIC] + [SCORE_COLUMN]
    cat = [c for c in cols if feats[c]["kind"] == ColumnKind.CATEGORICAL]
    dd = DataDefinition(numerical_columns=num, categorical_columns=cat)
    rules = {c: r for c, r in policy_rules(windows, policy).items() if c in cols or c == SCORE_COLUMN}
    judged = [c for c in cols + [SCORE_COLUMN] if c in rules]
    entries = {**feats, SCORE_COLUMN: profile["score"]}
    values = {c: (np.asarray(scores) if c == SCORE_COLUMN else frame[c]) for c in judged}
    n_eff = int(frame["customer_id"].nunique()) if "customer_id" in frame else len(frame)
    data = _ReportData({c: _Column(rules[c], entries[c], values[c]) for c in judged}, n_eff, psi_epsilon)
    if judged:
        methods = {c: _method(rules[c][0].metric if len(rules[c]) == 1 else "any") for c in judged}
        thresholds = {c: next((r for r in rules[c] if r.drifted), rules[c][0]).threshold for c in judged}
        # Evidently's dataset-level verdict: drift as soon as one judged column drifts
        preset: Any = DataDriftPreset(columns=judged, per_column_method=methods,
                                      per_column_threshold=thresholds, drift_share=0.5 / len(judged))
    else:
        preset = DataSummaryPreset()
    with _report_data(data):  # Evidently calls the stattests while running and rendering
        snap = Report([preset], include_tests=True).run(
            Dataset.from_pandas(cur, data_definition=dd), Dataset.from_pandas(ref, data_definition=dd)
        )
        snap.save_html(str(path))
        verdicts = _verdicts(snap)
    return EvidentlyReport(path, verdicts)


def psi_figure(daily: pd.DataFrame, stats: WindowStats, title: str) -> Any:
    """Heatmap of daily PSI (features x days) and the top segments' PSI."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 6))
    ax1, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [2, 1]})
    if not daily.empty:
        mat = daily.T.fillna(0.0)
        im = ax1.imshow(
            mat.to_numpy(), aspect="auto", cmap="magma_r", vmin=0, vmax=max(0.3, float(mat.max().max()))
        )
        ax1.set_yticks(range(len(mat.index)), mat.index, fontsize=7)
        ax1.set_xticks(
            range(len(mat.columns)),
            _day_labels(mat.columns),
            fontsize=7,
            rotation=45,
        )
        fig.colorbar(im, ax=ax1, label="PSI")
    ax1.set_title(f"daily PSI vs reference: {title}")
    segs = sorted(stats.segment_psi.items(), key=lambda kv: -kv[1])[:10]
    if segs:
        ax2.barh([k for k, _ in segs][::-1], [v for _, v in segs][::-1], color="tab:red")
        thr = [stats.segment_threshold.get(k, 0) for k, _ in segs][::-1]
        ax2.scatter(thr, range(len(segs)), marker="|", color="k", s=200, label="size-aware noise threshold")
        ax2.legend(fontsize=7)
    ax2.set_title("segment PSI (max over features)")
    ax2.tick_params(labelsize=7)
    fig.tight_layout()
    return fig



def _day_labels(index: pd.Index) -> list[str]:
    return [pd.Timestamp(c).strftime("%m-%d") for c in index]


def timeline_figure(daily: pd.DataFrame, daily_segments: pd.DataFrame, threshold: float, title: str,
                    top: int = 6) -> Any:
    """Daily PSI as lines: the ``top`` features that moved most and the score (left), the
    ``top`` segments that moved most (right); ``threshold`` dashed."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 5))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, table, what in ((axes[0], daily, "features and score"), (axes[1], daily_segments, "segments")):
        if not table.empty:
            order = table.max().sort_values(ascending=False).index[:top]
            x = np.arange(len(table.index))
            for col in order:
                label = "score" if col == "__score__" else str(col)
                ax.plot(x, table[col].to_numpy(float), marker=".", label=label,
                        lw=2.5 if col == "__score__" else 1.5)
            ax.set_xticks(x, _day_labels(table.index), fontsize=7, rotation=45)
            ax.legend(fontsize=7)
        ax.axhline(threshold, color="k", ls="--", lw=1)
        ax.set_title(f"daily PSI, {what}: {title}", fontsize=9)
    axes[0].set_ylabel("PSI vs reference")
    fig.tight_layout()
    return fig
