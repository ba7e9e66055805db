"""Monitoring windows as MLflow runs: what one run logs, and reading earlier ones back.

A window's run (experiment ``training.experiment``, or nested in a parent):

- params: as_of, window bounds, model name / alias / version, rows, label horizons, the
  version's val_auc, val_auc_unselected and val_auc_<d>d, ``window_step``;
- metrics with step = the window (:func:`window_step`: days since 1970-01-01 of the window's
  end, so the monitor runs of a version line up in order on the MLflow UI's charts, one point
  per run): ``psi.<feature>``, ``ks.<feature>`` (D against the reference sample),
  ``js.<feature>`` / ``chi2.<feature>`` / ``chi2_p.<feature>`` (categoricals),
  ``null_rate.<feature>``, ``source_null_rate.activity.<column>`` (highest daily share),
  ``score_psi``, ``segment_psi.<col>.<value>``, performance (``estimated_auc``,
  ``realised_*``, ``auc_drop``, ``early_auc``, ``early_auc_drop``, their thresholds) and per
  segment (:data:`SEGMENT_RUN_METRICS`: ``segment_auc.<col>.<value>`` and its ``_se``,
  ``segment_estimated_auc.*``, ``segment_recall_at_k.*``, ``segment_revenue_lift.*``,
  ``segment_expected_auc.*``, ``segment_auc_reference.*``, ``segment_auc_drop.*`` and its noise
  level, ``segment_churners.*``); with step = day index
  in the window: ``daily_psi.<feature>``, ``daily_score_psi``,
  ``daily_segment_psi.<col>.<value>``, ``daily_null_rate.activity.<column>``;
- tags ``monitor.*`` (model, version, as_of, action, features, segments, drift_segments,
  fired) and ``decision``;
- artifacts ``decision.json`` (decision + window stats), ``window_stats.json``,
  ``segment_performance.png`` (:func:`segment_figure`), ``psi_heatmap.png``,
  ``psi_timeline.png`` and, unless ``report=False``,
  ``drift_report.html`` (Evidently, judged per column by the policy's triggers: tag
  ``monitor.report_drifted`` lists the columns it marks drifted, :mod:`mlflow_churn.monitoring.report`);
- the served requests' input warnings of the window (:mod:`mlflow_churn.monitoring.input_warnings`):
  metrics ``input_invalid.<feature>.<kind>``, ``input_invalid.<feature>``,
  ``input_checked_rows``, ``input_flagged_rows``, tag ``monitor.input_warnings``.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mlflow_churn.config import ChurnConfig
from mlflow_churn.monitoring.input_warnings import log_input_warnings
from mlflow_churn.monitoring.policy import PolicyDecision, WindowStats, decision_from_dict, psi_floor
from mlflow_churn.monitoring.report import evidently_report, psi_figure, timeline_figure
from mlflow_churn.stats.performance import Performance, SegmentPerformance, segment_metric_suffix
from mlflow_churn.tags import MONITOR_PREFIX as TAG_PREFIX
from mlflow_churn.tracking import download_artifact, download_if_present, setup_mlflow
from mlflow_churn.training.baseline import UNSELECTED, early_key


@dataclass
class MonitorResult:
    """What one monitoring window found and decided."""

    decision: PolicyDecision
    run_id: str | None
    as_of: datetime
    window_start: datetime
    model_version: str
    stats: WindowStats
    performance: Performance
    population_psi_max: float
    rows: int
    daily_psi: pd.DataFrame = field(repr=False, default_factory=pd.DataFrame)
    daily_segments: pd.DataFrame = field(repr=False, default_factory=pd.DataFrame)
    source_daily: dict[str, np.ndarray] = field(repr=False, default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "decision": self.decision.to_dict(),
            "run_id": self.run_id,
            "as_of": self.as_of.isoformat(),
            "window_start": self.window_start.isoformat(),
            "model_version": self.model_version,
            "rows": self.rows,
            "population_psi_max": self.population_psi_max,
            "performance": dict(self.performance.metrics()),
            "stats": self.stats.to_dict(),
        }


def monitoring_experiment(cfg: ChurnConfig) -> str:
    """Name of the experiment holding monitoring runs: ``training.experiment`` itself, the one
    `mlflow run . -e monitor` uses too, so monitor runs land in one experiment however they
    were started (told apart by their ``monitor.*`` tags and run names)."""
    return cfg.training.experiment


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-/ " else "_" for ch in name)


def _finite(metrics: dict[str, float | None]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(v)}


def _window_metrics(result: MonitorResult) -> dict[str, float]:
    """The window-level metrics of ``result`` (see the module doc)."""
    s = result.stats
    metrics: dict[str, float | None] = {}
    for prefix, table in (("psi", s.psi), ("ks", s.ks), ("js", s.js), ("chi2", s.chi2), ("chi2_p", s.chi2_p),
                          ("null_rate", s.null_rate), ("source_null_rate", s.source_null_rate)):
        metrics.update({f"{prefix}.{_safe(k)}": v for k, v in table.items()})
    metrics.update({f"segment_psi.{_safe(k.replace('=', '.'))}": v for k, v in s.segment_psi.items()})
    metrics["score_psi"] = s.score_psi
    metrics["population_psi_max"] = result.population_psi_max
    metrics.update(result.performance.metrics())
    return _finite(metrics)


#: per-segment metrics of a window's run: metric name prefix -> :class:`SegmentPerformance` field
SEGMENT_RUN_METRICS = {
    "segment_auc": "auc", "segment_auc_se": "auc_se", "segment_estimated_auc": "estimated_auc",
    "segment_estimated_auc_se": "estimated_auc_se", "segment_recall_at_k": "recall_at_k",
    "segment_recall_at_k_se": "recall_at_k_se", "segment_revenue_lift": "revenue_lift",
    "segment_revenue_lift_se": "revenue_lift_se", "segment_expected_auc": "expected_auc",
    "segment_auc_reference": "reference", "segment_auc_drop": "drop",
    "segment_auc_drop_threshold": "threshold", "segment_churners": "churners",
}


def window_step(as_of: datetime) -> int:
    """The MLflow ``step`` of the window ending at ``as_of``: whole days since 1970-01-01 (UTC)."""
    return int(as_of.timestamp() // 86400)


def _segment_metrics(result: MonitorResult) -> dict[str, float]:
    """``<prefix>.<column>.<value>`` of :data:`SEGMENT_RUN_METRICS` for every measured number."""
    metrics: dict[str, float | None] = {}
    for key, seg in result.performance.segments.items():
        suffix = segment_metric_suffix(key)
        for prefix, attr in SEGMENT_RUN_METRICS.items():
            value = getattr(seg, attr)
            metrics[f"{prefix}.{suffix}"] = None if value is None else float(value)
    return _finite(metrics)


def segment_figure(segments: dict[str, SegmentPerformance], decision: PolicyDecision, title: str,
                   min_drop: float = 0.0) -> Any:
    """One row per segment: its AUC (realised: dot; estimated before labels mature: diamond) with
    +-1 SE bars, its reference (black tick: its AUC in the version's first window that measured
    it, or its baseline estimate) and the drop limit below it (grey band: max(``min_drop``,
    z x SE); a point left of its band dropped beyond it); segments the segment rule named in
    red, pending ones in orange; an unmeasured segment says why."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    keys = list(segments)[::-1]
    fig = Figure(figsize=(11, 0.32 * len(keys) + 1.9))
    ax = fig.subplots()
    limits = {d.segment: d.limit for d in decision.segment_drops}
    points = []
    for y, key in enumerate(keys):
        seg = segments[key]
        realised = seg.auc is not None
        value, se = (seg.auc, seg.auc_se) if realised else (seg.estimated_auc, seg.estimated_auc_se)
        base = seg.reference
        if value is None:
            continue
        points.append(value)
        if base is not None:
            points.append(base)
            band = limits.get(key, max(seg.threshold or 0.0, min_drop))
            ax.plot([base - band, base], [y, y], color="0.85", lw=7, solid_capstyle="butt", zorder=1)
            ax.plot([base], [y], marker="|", color="k", ms=14, mew=2, zorder=3)
        color = ("tab:red" if key in decision.segments else
                 "tab:orange" if key in decision.pending_drops else "tab:blue")
        ax.errorbar([value], [y], xerr=[[se or 0.0], [se or 0.0]], fmt="o" if realised else "D", color=color,
                    mfc=color if realised else "white", ms=6, capsize=3, zorder=4)
    lo = min(points, default=0.5) - 0.08
    for y, key in enumerate(keys):
        seg = segments[key]
        if (seg.auc if seg.auc is not None else seg.estimated_auc) is None:
            ax.text(lo + 0.005, y, f"not measured: {seg.reason or seg.estimate_reason}", va="center",
                    fontsize=7, color="0.4")
    ax.set_yticks(range(len(keys)), keys, fontsize=8)
    ax.set_xlim(max(0.0, lo), min(1.0, max(points, default=0.9) + 0.05))
    ax.set_xlabel("ROC AUC (bars: +-1 SE)")
    handles = [Line2D([], [], marker="o", ls="", color="tab:blue", label="realised (matured labels)"),
               Line2D([], [], marker="D", ls="", color="tab:blue", mfc="white",
                      label="estimated (no labels yet)"),
               Line2D([], [], marker="|", ls="", color="k", ms=12, mew=2,
                      label="reference: first window's AUC\n(estimate: baseline estimate)"),
               Line2D([], [], color="0.85", lw=7, label="drop limit (noise, min drop)"),
               Line2D([], [], marker="o", ls="", color="tab:red", label="named by the segment rule"),
               Line2D([], [], marker="o", ls="", color="tab:orange", label="dropped, not yet persistent")]
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    named = ", ".join(f"{d.segment} (drop {d.drop:.3f}, SE {d.se:.3f})" for d in decision.segment_drops[:3])
    ax.set_title(f"{title}\nsegment rule: {named or 'no segment named'}", fontsize=9)
    fig.tight_layout()
    return fig


def _daily_metrics(result: MonitorResult) -> list[dict[str, float]]:
    """Per day of the window (step = index): daily PSI of features, score, segments and the
    raw columns' null rates."""
    tables = [
        result.daily_psi.rename(columns=lambda k: "daily_score_psi" if k == "__score__"
                                else f"daily_psi.{_safe(k)}"),
        result.daily_segments.rename(columns=lambda k: f"daily_segment_psi.{_safe(k.replace('=', '.'))}"),
    ]
    steps: list[dict[str, float]] = [{} for _ in range(len(result.daily_psi.index))]
    for table in tables:
        for step, (_, row) in enumerate(table.iterrows()):
            if step < len(steps):
                steps[step].update(_finite(dict(row.items())))
    for col, rates in result.source_daily.items():
        for step, v in enumerate(np.asarray(rates, dtype="float64")[: len(steps)]):
            steps[step].update(_finite({f"daily_null_rate.{_safe(col)}": float(v)}))
    return steps


def log_window(result: MonitorResult, profile: dict[str, Any], frame: pd.DataFrame, scores: np.ndarray,
               cfg: ChurnConfig, name: str, alias: str, report: bool, report_rows: int,
               mv_tags: dict[str, str] | None = None, history: Sequence[WindowStats] = ()) -> None:
    """Log one window into the active run (see the module doc); ``history``: the earlier
    windows the policy decided on (the Evidently report applies its hysteresis)."""
    import mlflow

    tags = mv_tags or {}
    early = early_key(cfg.monitoring.early_label_days)
    mlflow.log_params({
        "as_of": result.as_of.isoformat(), "window_start": result.window_start.isoformat(),
        "window_days": cfg.monitoring.window_days, "model_name": name, "alias": alias,
        "model_version": result.model_version, "rows": result.rows,
        "label_horizon_days": result.performance.label_horizon_days,
        "early_label_days": cfg.monitoring.early_label_days, "auc_baseline": cfg.monitoring.auc_baseline,
        "val_auc": tags.get("val_auc", ""), UNSELECTED: tags.get(UNSELECTED, ""), early: tags.get(early, ""),
        "window_step": window_step(result.as_of),
    })
    mlflow.log_metrics(_window_metrics(result) | _segment_metrics(result), step=window_step(result.as_of))
    for step, values in enumerate(_daily_metrics(result)):
        if values:
            mlflow.log_metrics(values, step=step)
    d = result.decision
    mlflow.set_tags({
        f"{TAG_PREFIX}model_name": name, f"{TAG_PREFIX}model_version": result.model_version,
        f"{TAG_PREFIX}as_of": result.as_of.isoformat(), f"{TAG_PREFIX}action": d.action,
        f"{TAG_PREFIX}features": ",".join(d.features)[:4000],
        f"{TAG_PREFIX}segments": ",".join(d.segments)[:4000],
        f"{TAG_PREFIX}drift_segments": ",".join(d.drift_segments)[:4000],
        f"{TAG_PREFIX}fired": "; ".join(d.fired)[:4000], "decision": d.action,
    })
    mlflow.log_dict(result.to_dict(), "decision.json")
    mlflow.log_dict(result.stats.to_dict(), "window_stats.json")
    title = f"{name} v{result.model_version}, window to {result.as_of:%Y-%m-%d}"
    if result.performance.segments:
        mlflow.log_figure(segment_figure(result.performance.segments, d, f"per-segment performance: {title}",
                                         cfg.monitoring.policy.segment_min_drop), "segment_performance.png")
    mlflow.log_figure(psi_figure(result.daily_psi, result.stats, title), "psi_heatmap.png")
    floor = psi_floor(cfg.monitoring.policy)
    mlflow.log_figure(timeline_figure(result.daily_psi, result.daily_segments, floor, title),
                      "psi_timeline.png")
    if report:
        with tempfile.TemporaryDirectory() as tmp:
            rep = evidently_report(frame, scores, profile, Path(tmp) / "drift_report.html", report_rows,
                                   windows=[*history, result.stats], policy=cfg.monitoring.policy,
                                   psi_epsilon=cfg.monitoring.psi_epsilon)
            mlflow.log_artifact(str(rep.path))
        mlflow.set_tag(f"{TAG_PREFIX}report_drifted", ",".join(rep.drifted)[:4000])
    log_input_warnings(cfg, result.as_of, result.model_version)


def _version_runs(client: Any, model_name: str, version: str | None = None) -> list[Any]:
    exps = [e.experiment_id for e in client.search_experiments()]
    flt = f"tags.`{TAG_PREFIX}model_name` = '{model_name}'"
    if version is not None:
        flt += f" and tags.`{TAG_PREFIX}model_version` = '{version}'"
    runs = client.search_runs(exps, filter_string=flt, max_results=1000)
    return [r for r in runs if r.info.status == "FINISHED" and r.data.tags.get(f"{TAG_PREFIX}as_of")]


def read_history(cfg: ChurnConfig, model_name: str, version: str, before: datetime,
                 limit: int = 12) -> list[WindowStats]:
    """The newest ``limit`` earlier windows of this model version (oldest first), read back
    from MLflow. Enough for persistence and hysteresis; the AUC baseline never depends on
    it (training's baselines, or the first window's value carried in every window's stats)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    items = sorted((datetime.fromisoformat(r.data.tags[f"{TAG_PREFIX}as_of"]), r.info.run_id)
                   for r in _version_runs(client, model_name, version))
    items = [(t, run_id) for t, run_id in items if t < before]
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for _, run_id in items[-limit:]:
            local = download_if_present(client, run_id, "window_stats.json", tmp)
            if local is None:  # a run without the artifact (crashed window): skip it
                continue
            out.append(WindowStats.from_dict(json.loads(Path(local).read_text())))
    return out


def latest_decision(cfg: ChurnConfig, model_name: str | None = None) -> dict[str, Any] | None:
    """The newest monitoring run's ``decision.json`` content plus ``run_id`` (None if none).

    For ``retrain``: retrain when ``["decision"]["action"] == "retrain"``.
    """
    from mlflow import MlflowClient

    setup_mlflow(cfg, monitoring_experiment(cfg))
    client = MlflowClient()
    runs = _version_runs(client, model_name or cfg.training.model_name)
    if not runs:
        return None
    newest = max(runs, key=lambda r: r.data.tags[f"{TAG_PREFIX}as_of"])
    with tempfile.TemporaryDirectory() as tmp:
        data = json.loads(
            Path(download_artifact(client, newest.info.run_id, "decision.json", tmp)).read_text()
        )
    # through the policy's one reader: a decision a newer release wrote is refused, not misread
    data["decision"] = decision_from_dict(data["decision"]).to_dict()
    data["run_id"] = newest.info.run_id
    return data
