"""Replay a simulated scenario through train -> monitor -> policy -> retrain, and score it.

``backtest(cfg, scenario, days)`` simulates ``days`` days into ``cfg.data_dir``, trains
the first champion at the first feasible day (+ ``warmup_days``), then steps monitoring
windows every ``step_days`` (default ``cfg.monitoring.window_days``; 1 = overlapping daily
windows) to the end of the data. Each window runs :func:`monitor` with the in-memory
history of the current champion and the policy; a ``retrain`` decision calls
``mlflow_churn.monitoring.retrain.retrain`` (train + evaluate + gate; a passed challenger
is then promoted, standing in for a healthy canary).

Scoring (onset = first drifted day of the simulation):

* an **alarm** is a window whose decision is not ``ok``;
* **false alarms**: alarms in windows ending at or before the onset (all windows for
  ``stable``); rate = false alarms / those windows;
* **detection delay**: days from the onset to the end of the first alarmed window after
  it, and the same in windows (days / window_days);
* **attribution** (segment_shift): whether the first post-onset alarm names the
  scenario's segment (``region=pacific``: by performance, else as drift context) and the
  population PSI max at that time;
* **segment by performance** (segment_concept): the first window whose decision names the
  scenario's segment through the segment rule (``segment_named``), its delay in windows after
  the labels of the onset day mature (``onset + min(label_horizon_days, label_delay_days)``;
  negative when the label-free estimate named it before), the segment's drop and its SE then,
  the population's ``auc_drop`` and PSI max in that window, and every other segment the rule
  named after the onset (``other_segments_named``);
* **AUC over time**: realised AUC per window on every customer (labels matured
  ``label_delay_days`` after scoring) and the early-label AUC; ``pre_drift_auc`` averages
  the first model's windows whose label periods end by the onset (``as_of <= onset``);
  ``post_retrain_auc`` the windows of the newest retrained champion that has any, whose
  labelled cutoffs all follow its training (``as_of - label horizon - window >= retrain
  day``): ``post_retrain_version`` / ``post_retrain_windows`` say which and how many.
  With a 30-day label horizon a retrain on drifted data needs the drift's labels to
  mature first, so measuring it takes about ``onset + 2 x (horizon + holdout) + window``
  days of replay.

The run (experiment ``training.experiment``, beside the training runs) logs per-window metrics
(step = window index), the summary, ``backtest.json`` and ``backtest_timeline.png``.
``fast=True`` skips per-window MLflow runs and Evidently reports (tests).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timedelta
from typing import Any

import numpy as np
from mlflow import MlflowClient

from mlflow_churn.config import SCENARIOS, ChurnConfig
from mlflow_churn.data.bounds import data_bounds, latest_as_of
from mlflow_churn.data.simulator import HazardParams, SimulationSpec, read_manifest, simulate
from mlflow_churn.errors import ChurnError
from mlflow_churn.features.offline import longest_window
from mlflow_churn.features.registry import registry_for
from mlflow_churn.monitoring.frames import FrameCache
from mlflow_churn.monitoring.monitor import monitor, monitoring_experiment
from mlflow_churn.monitoring.policy import PolicyAction, WindowStats
from mlflow_churn.monitoring.retrain import retrain
from mlflow_churn.progress import ProgressArg
from mlflow_churn.registry.aliases import CHAMPION, move_alias
from mlflow_churn.times import midnight
from mlflow_churn.tracking import setup_mlflow, step_run, without_project_run
from mlflow_churn.training.train import train


@dataclass
class WindowRecord:
    """One replayed window."""

    index: int
    as_of: str
    model_version: str
    action: PolicyAction
    population_psi_max: float
    top_feature: str
    score_psi: float | None
    top_segment: str
    top_segment_psi: float | None
    realised_auc: float | None
    estimated_auc: float
    post_onset: bool
    early_auc: float | None = None
    auc_drop: float | None = None
    early_auc_drop: float | None = None
    retrained_to: str | None = None
    reasons: list[str] = field(default_factory=list)
    #: segments the segment rule named (performance) and those whose PSI moved (context)
    named_segments: list[str] = field(default_factory=list)
    drift_segments: list[str] = field(default_factory=list)
    #: the scenario's segment in this window: AUC drop vs its reference, its SE, the rule's limit,
    #: source; its AUC and the reference; its realised baseline (the version's first window) and SE
    segment_drop: float | None = None
    segment_drop_se: float | None = None
    segment_drop_limit: float | None = None
    segment_source: str | None = None
    segment_auc: float | None = None
    segment_reference: float | None = None
    segment_baseline_auc: float | None = None
    segment_baseline_se: float | None = None


@dataclass
class BacktestResult:
    """Summary of a replay (see module doc for the definitions)."""

    scenario: str
    onset: str
    windows: list[WindowRecord]
    window_days: int
    step_days: int
    pre_onset_windows: int
    false_alarms: int
    false_alarm_rate: float
    detected: bool
    detection_delay_days: float | None
    detection_delay_windows: float | None
    attributed: bool | None
    population_psi_at_detection: float | None
    retrains: list[str]
    pre_drift_auc: float | None
    post_retrain_auc: float | None
    run_id: str | None = None
    segment: str = ""
    post_retrain_version: str | None = None
    post_retrain_windows: int = 0
    pre_drift_windows: int = 0
    labels_matured: str | None = None
    segment_named: bool | None = None
    segment_delay_windows: float | None = None
    segment_drop_at_detection: float | None = None
    segment_se_at_detection: float | None = None
    population_auc_drop_at_segment: float | None = None
    population_psi_at_segment: float | None = None
    other_segments_named: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("windows")
        d["n_windows"] = len(self.windows)
        return d


def _retrain(cfg: ChurnConfig, as_of: datetime, n_trials: int, progress: ProgressArg,
             decision: dict[str, Any]) -> str | None:
    """Retrain; returns the new champion version (None when the gate rejected it)."""

    client = MlflowClient()
    name = cfg.training.model_name
    res = retrain(cfg.model_copy(update={"training": cfg.training.model_copy(update={"n_trials": n_trials})}),
                  as_of, force=True, progress=progress, decision=decision)
    gate = getattr(res, "gate", None)
    if gate is None or not gate.passed:
        return None
    version = str(gate.challenger_version)
    move_alias(client, name, CHAMPION, version, cfg.evaluation.mirror_stages)
    return version


def _log_backtest(cfg: ChurnConfig, exp_id: str, result: BacktestResult, spec: Any, manifest: dict,
                  step: int, n_trials: int, fast: bool, retrain_days: list[str]) -> str:
    """One run (nested in the project run under ``mlflow run``) with the replay's evidence."""
    import mlflow

    setup_mlflow(cfg, monitoring_experiment(cfg))
    with step_run(f"backtest {result.scenario} {spec.days}d", exp_id) as run:
        mlflow.set_tags({"backtest.scenario": result.scenario, "backtest.fast": str(fast)})
        mlflow.log_params({"scenario": result.scenario, "days": spec.days, "customers": spec.customers,
                           "onset": manifest["onset_date"], "step_days": step,
                           "window_days": cfg.monitoring.window_days, "n_trials": n_trials,
                           "label_delay_days": cfg.monitoring.label_delay_days,
                           "triggers": "; ".join(f"{x.metric}[{x.feature}]{x.op}{x.value}"
                                                 for x in cfg.monitoring.policy.triggers)[:500]})
        for w in result.windows:
            mlflow.log_metrics({k: float(v) for k, v in {
                "bt_population_psi_max": w.population_psi_max, "bt_score_psi": w.score_psi,
                "bt_realised_auc": w.realised_auc, "bt_estimated_auc": w.estimated_auc,
                "bt_alarm": float(w.action != PolicyAction.OK),
                "bt_retrain": float(w.retrained_to is not None),
                "bt_top_segment_psi": w.top_segment_psi, "bt_early_auc": w.early_auc,
                "bt_segment_drop": w.segment_drop, "bt_segment_drop_limit": w.segment_drop_limit,
                "bt_segments_named": float(len(w.named_segments)),
            }.items() if v is not None and math.isfinite(v)}, step=w.index)
        mlflow.log_metrics({k: float(v) for k, v in result.summary().items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)
                            and math.isfinite(v)})
        mlflow.log_dict({"summary": result.summary(), "windows": [asdict(w) for w in result.windows]},
                        "backtest.json")
        fig = _timeline(result, retrain_days)
        mlflow.log_figure(fig, "backtest_timeline.png")
        return run.info.run_id


def first_training_index(cfg: ChurnConfig, warmup_days: int = 14) -> int:
    """Day index (from the simulation start) of the replay's first training: a full feature
    window (60 days), the label horizon, the holdout days and ``warmup_days``."""
    return cfg.features.label_horizon_days + cfg.evaluation.holdout_days + 60 + warmup_days


def _first_train_day(cfg: ChurnConfig) -> datetime:

    fs = registry_for(cfg).feature_set(cfg.features.feature_set)
    first = data_bounds(cfg.data_dir).first_event - timedelta(days=1)
    first += timedelta(days=longest_window(fs.features))
    return first + timedelta(days=cfg.features.label_horizon_days + cfg.evaluation.holdout_days)


def _timeline(result: BacktestResult, retrain_days: list[str]) -> Any:
    from matplotlib.figure import Figure

    x = [datetime.fromisoformat(w.as_of) for w in result.windows]
    fig = Figure(figsize=(12, 7))
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    ax1.plot(x, [w.population_psi_max for w in result.windows], label="population PSI (max feature)")
    ax1.plot(x, [w.score_psi or 0 for w in result.windows], label="score PSI")
    ax1.plot(x, [w.top_segment_psi or 0 for w in result.windows], label="top segment PSI", alpha=0.7)
    alarms = [(xi, w.population_psi_max) for xi, w in zip(x, result.windows, strict=True)
              if w.action != PolicyAction.OK]
    if alarms:
        ax1.scatter(*zip(*alarms, strict=True), color="red", zorder=3, s=18, label="alarm (not ok)")
    ax1.set_ylabel("PSI")
    ax1.legend(fontsize=8)
    ax2.plot(
        x,
        [np.nan if w.realised_auc is None else w.realised_auc for w in result.windows],
        marker=".",
        label="realised AUC (matured labels)",
    )
    ax2.plot(x, [w.estimated_auc for w in result.windows], label="estimated AUC (calibration)", alpha=0.7)
    ax2.plot(x, [np.nan if w.early_auc is None else w.early_auc for w in result.windows], marker="x",
             label="early-label AUC (unseen customers)", alpha=0.7)
    ax2.set_ylabel("AUC")
    ax2.legend(fontsize=8)
    for ax in (ax1, ax2):
        ax.axvline(datetime.fromisoformat(result.onset), color="k", ls="--", lw=1)
        for r in retrain_days:
            ax.axvline(datetime.fromisoformat(r), color="tab:green", ls=":", lw=1.5)
    ax1.set_title(f"backtest {result.scenario}: onset (dashed), retrains (dotted green)")
    fig.autofmt_xdate()
    fig.tight_layout()
    return fig


def _mean(values: list[float]) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(vals)) if vals else None


def _simulate(cfg: ChurnConfig, scenario: str, days: int, customers: int | None, onset_day: int | None,
              seed: int | None, warmup_days: int,
              hazard: HazardParams | None = None) -> tuple[SimulationSpec, dict[str, Any], datetime]:
    """Step 1: the scenario simulated into ``cfg.data_dir``: (spec, manifest, onset)."""
    if scenario not in SCENARIOS:
        raise ChurnError(f"--scenario must be one of {', '.join(SCENARIOS)}, got '{scenario}'")
    sim = cfg.simulation
    first_train_idx = first_training_index(cfg, warmup_days)
    onset = onset_day if onset_day is not None else first_train_idx + 28
    if days < first_train_idx + 2 * cfg.monitoring.window_days:
        raise ChurnError(
            f"--days must be at least {first_train_idx + 2 * cfg.monitoring.window_days} "
            f"(first training needs {first_train_idx} days of history), got {days}"
        )
    spec = SimulationSpec(
        customers=customers or sim.customers, days=days, start=sim.start, scenario=scenario,
        seed=sim.seed if seed is None else seed, onset_day=min(onset, days),
        segment_column=sim.segment_column, segment_value=sim.segment_value, params=hazard or HazardParams(),
    )
    simulate(spec, cfg.data_dir, overwrite=True)
    manifest = read_manifest(cfg.data_dir)
    return spec, manifest, midnight(date.fromisoformat(manifest["onset_date"]))


def _window_times(first: datetime, last: datetime, step_days: int) -> list[datetime]:
    """Step 2: the monitoring times, every ``step_days`` after the first training up to ``last``."""
    times, t = [], first + timedelta(days=step_days)
    while t <= last:
        times.append(t)
        t += timedelta(days=step_days)
    return times


def _record(index: int, as_of: datetime, version: str, res: Any, onset: datetime, seg_key: str = "",
            min_drop: float = 0.0) -> WindowRecord:
    """One window's row of the replay, from its monitoring result (``seg_key``: the scenario's
    segment, whose drop and limit, max(``min_drop``, z x SE), are recorded)."""
    s, d = res.stats, res.decision
    top_feat = max(s.psi.items(), key=lambda kv: kv[1])[0] if s.psi else ""
    top_seg = max(s.segment_psi.items(), key=lambda kv: kv[1]) if s.segment_psi else ("", None)
    seg = res.performance.segments.get(seg_key)
    limit = max(seg.threshold, min_drop) if seg is not None and seg.threshold is not None else None
    return WindowRecord(
        index=index, as_of=as_of.isoformat(), model_version=version, action=d.action,
        population_psi_max=res.population_psi_max, top_feature=top_feat, score_psi=s.score_psi,
        top_segment=(d.segments or d.drift_segments or [""])[0],
        top_segment_psi=top_seg[1], realised_auc=s.realised_auc,
        estimated_auc=res.performance.estimated_auc, post_onset=as_of > onset,
        reasons=d.reasons[:8], early_auc=s.early_auc, auc_drop=s.auc_drop,
        early_auc_drop=s.early_auc_drop, named_segments=list(d.segments),
        drift_segments=list(d.drift_segments),
        segment_drop=seg.drop if seg else None, segment_drop_se=seg.drop_se if seg else None,
        segment_drop_limit=limit, segment_source=seg.source if seg else None,
        segment_auc=(seg.auc if seg.source == "realised" else seg.estimated_auc) if seg else None,
        segment_reference=seg.reference if seg else None,
        segment_baseline_auc=seg.baseline_auc if seg else None,
        segment_baseline_se=seg.baseline_auc_se if seg else None,
    )


@dataclass
class _Replay:
    records: list[WindowRecord] = field(default_factory=list)
    retrains: list[str] = field(default_factory=list)
    retrain_days: list[str] = field(default_factory=list)


def _replay(cfg: ChurnConfig, times: list[datetime], version: str, onset: datetime, n_trials: int,
            fast: bool, progress: ProgressArg, on_window: Callable[[WindowRecord], None] | None,
            seg_key: str = "") -> _Replay:
    """Step 3: monitor each window with the model in service; retrain (gate, promote) when
    the policy says so, and go on with the new champion."""
    out = _Replay()
    history: dict[str, list[WindowStats]] = {}
    cache = FrameCache()
    with without_project_run():
        for i, as_of in enumerate(times):
            hist = history.setdefault(version, [])
            res = monitor(cfg, as_of, history=list(hist), report=False, log=not fast, cache=cache)
            hist.append(res.stats)
            rec = _record(i, as_of, version, res, onset, seg_key, cfg.monitoring.policy.segment_min_drop)
            if res.decision.action == PolicyAction.RETRAIN:
                new = _retrain(cfg, as_of, n_trials, progress, res.decision.to_dict())
                if new is not None:
                    res.stats.retrained = True
                    rec.retrained_to = new
                    out.retrains.append(new)
                    out.retrain_days.append(as_of.isoformat())
                    version = new
            out.records.append(rec)
            if on_window:
                on_window(rec)
    return out


def backtest(
    cfg: ChurnConfig,
    scenario: str,
    days: int,
    customers: int | None = None,
    onset_day: int | None = None,
    seed: int | None = None,
    step_days: int | None = None,
    warmup_days: int = 14,
    n_trials: int = 3,
    fast: bool = False,
    progress: ProgressArg = None,
    on_window: Callable[[WindowRecord], None] | None = None,
    hazard: HazardParams | None = None,
) -> BacktestResult:
    """Replay ``scenario`` over ``days`` simulated days (see module doc); returns the scores.

    ``onset_day`` defaults to 28 days after the first training day, so four weekly windows
    precede the drift. ``hazard``: the simulator's hazard and drift sizes (default
    :class:`~mlflow_churn.data.simulator.HazardParams`). Overwrites ``cfg.data_dir``.
    """
    spec, manifest, onset = _simulate(cfg, scenario, days, customers, onset_day, seed, warmup_days, hazard)
    exp_id = setup_mlflow(cfg, monitoring_experiment(cfg))
    as_of0 = _first_train_day(cfg) + timedelta(days=warmup_days)
    with without_project_run():
        first_version = str(train(cfg, as_of0, n_trials=n_trials, progress=False).version)
    move_alias(MlflowClient(), cfg.training.model_name, CHAMPION, first_version, cfg.evaluation.mirror_stages)
    step = step_days or cfg.monitoring.window_days
    times = _window_times(as_of0, latest_as_of(cfg.data_dir), step)
    sim = cfg.simulation
    seg_key = f"{sim.segment_column}={sim.segment_value}"
    replay = _replay(cfg, times, first_version, onset, n_trials, fast, progress, on_window, seg_key)
    horizon = min(cfg.features.label_horizon_days, cfg.monitoring.label_delay_days)
    result = _score(scenario, onset, replay.records, cfg.monitoring.window_days, step, replay.retrains,
                    replay.retrain_days, first_version, horizon, seg_key)
    result.run_id = _log_backtest(cfg, exp_id, result, spec, manifest, step, n_trials, fast,
                                  replay.retrain_days)
    return result


def _score(
    scenario: str,
    onset: datetime,
    records: list[WindowRecord],
    window_days: int,
    step: int,
    retrains: list[str],
    retrain_days: list[str],
    first_version: str,
    horizon: int,
    seg_key: str,
) -> BacktestResult:
    quiet = [r for r in records if scenario == "stable" or not r.post_onset]
    false = [r for r in quiet if r.action != PolicyAction.OK]
    post = [r for r in records if r.post_onset and scenario != "stable"]
    first = next((r for r in post if r.action != PolicyAction.OK), None)
    delay_days = (datetime.fromisoformat(first.as_of) - onset).total_seconds() / 86400 if first else None
    attributed = None
    if scenario in ("segment_shift", "usage_and_segment"):
        attributed = bool(first and any(seg_key == r.top_segment for r in post
                                         if r.action != PolicyAction.OK))
    lag = timedelta(days=horizon + window_days)
    pre = [r for r in records if r.model_version == first_version and datetime.fromisoformat(r.as_of) <= onset
           and r.realised_auc is not None]
    post_version, post = None, []
    for version, day in reversed(list(zip(retrains, retrain_days, strict=True))):
        start = datetime.fromisoformat(day)
        post = [r for r in records if r.model_version == version and r.realised_auc is not None
                and datetime.fromisoformat(r.as_of) - lag >= start]
        if post:
            post_version = version
            break
    named = _segment_named(scenario, onset, records, window_days, horizon, seg_key)
    return BacktestResult(
        **named,
        scenario=scenario,
        onset=onset.isoformat(),
        windows=records,
        window_days=window_days,
        step_days=step,
        pre_onset_windows=len(quiet),
        false_alarms=len(false),
        false_alarm_rate=len(false) / len(quiet) if quiet else 0.0,
        detected=first is not None,
        detection_delay_days=delay_days,
        detection_delay_windows=delay_days / window_days if delay_days is not None else None,
        attributed=attributed,
        population_psi_at_detection=first.population_psi_max if first else None,
        retrains=retrains,
        pre_drift_auc=_mean([r.realised_auc for r in pre]),
        post_retrain_auc=_mean([r.realised_auc for r in post]),
        segment=seg_key,
        post_retrain_version=post_version,
        post_retrain_windows=len(post),
        pre_drift_windows=len(pre),
    )


def _segment_named(scenario: str, onset: datetime, records: list[WindowRecord], window_days: int,
                   horizon: int, seg_key: str) -> dict[str, Any]:
    """The segment-by-performance scores of ``segment_concept`` (module doc); empty otherwise."""
    if scenario != "segment_concept":
        return {}
    matured = onset + timedelta(days=horizon)
    post = [r for r in records if r.post_onset]
    first = next((r for r in post if seg_key in r.named_segments), None)
    delay = ((datetime.fromisoformat(first.as_of) - matured).total_seconds() / 86400 / window_days
             if first else None)
    others = sorted({k for r in post for k in r.named_segments if k != seg_key})
    return {"labels_matured": matured.isoformat(), "segment_named": first is not None,
            "segment_delay_windows": delay,
            "segment_drop_at_detection": first.segment_drop if first else None,
            "segment_se_at_detection": first.segment_drop_se if first else None,
            "population_auc_drop_at_segment": first.auc_drop if first else None,
            "population_psi_at_segment": first.population_psi_max if first else None,
            "other_segments_named": others}
