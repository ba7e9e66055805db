"""One monitoring window: integrity, drift, performance, policy decision, one MLflow run.

``monitor(cfg, as_of)`` takes the last ``cfg.monitoring.window_days`` daily cutoffs up to
``as_of`` (cutoffs at ``as_of - i days``), builds their features with the offline builder,
scores them with the model behind ``models:/<name>@<alias>`` and compares both with the
version's reference profile (``reference/profile.json`` of its training run: the training
data is never re-read):

- **integrity**: null rates of the features and, per day, of the raw source columns
  (:mod:`mlflow_churn.data.sources`), missing features and days;
- **drift** (:mod:`mlflow_churn.monitoring.window_drift`): PSI, KS, Jensen-Shannon,
  chi-square, score PSI, per segment;
- **performance** (:mod:`mlflow_churn.stats.performance`): the CBPE estimate from the
  calibrated scores; realised AUC, recall@k, revenue lift on the cutoffs whose labels have
  matured (``min(label_horizon_days, label_delay_days)`` before ``as_of``); ``auc_drop``
  against the version's baseline (``monitoring.auc_baseline``); ``early_auc_drop`` on the
  cutoffs whose short labels (``early_label_days``) have matured against ``val_auc_<d>d``.
  Only cutoffs at or after the version's training ``as_of`` count: earlier ones share churn
  events with the training labels, which inflates the realised AUC. Per segment
  (``monitoring.segments``): realised AUC, recall@k and revenue lift on the matured rows of
  every customer, the estimate on the window's rows, each with its standard error, compared
  with the segment's baseline (training's ``val_segment_*`` metrics, else the segment's first
  measured window of the version) for the policy's segment rule;
- the **policy** (:mod:`mlflow_churn.monitoring.policy`) on the version's history.

``source`` (``churn monitor --source``): ``offline`` builds the window's rows as above;
``served`` takes them from the prediction log, the feature values and scores the version
actually served (:mod:`mlflow_churn.monitoring.served`); ``auto`` (default) takes the served
rows when the window holds at least ``monitoring.min_served_rows`` of them, else offline. The
run records which (param ``source``, tag ``monitor.source``) and why. Whatever the source,
when the window holds served values the **serving-skew check** recomputes a sample of them
offline and compares them per feature (mismatch rate, PSI): an integrity fault of the policy
beyond ``policy.max_serving_mismatch_rate`` / ``policy.max_serving_skew_psi``.

What the run holds: :mod:`mlflow_churn.monitoring.runs`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion

from mlflow_churn.config import ChurnConfig
from mlflow_churn.data.bounds import data_bounds
from mlflow_churn.data.sources import daily_source_nulls, source_integrity
from mlflow_churn.errors import ChurnError
from mlflow_churn.features.offline import check_cutoffs, coerce_frame, longest_window
from mlflow_churn.features.spark_frames import spark_training_frame
from mlflow_churn.jsonable import jsonable
from mlflow_churn.monitoring.frames import FrameCache, window_frame
from mlflow_churn.monitoring.policy import WindowStats, decide
from mlflow_churn.monitoring.runs import (
    TAG_PREFIX,
    MonitorResult,
    latest_decision,
    log_window,
    monitoring_experiment,
    read_history,
)
from mlflow_churn.monitoring.served import (
    SOURCES,
    ServedRows,
    ServingSkew,
    choose_source,
    read_served,
    served_frame,
    serving_skew,
    skew_figure,
)
from mlflow_churn.monitoring.spark_drift import spark_window_counts
from mlflow_churn.monitoring.spark_performance import spark_segment_performance
from mlflow_churn.monitoring.window_drift import WindowDrift, drift_from_counts, window_drift
from mlflow_churn.registry.aliases import alias_version, model_uri
from mlflow_churn.serving.batch import ENGINES
from mlflow_churn.serving.batch_spark import score_frame_spark
from mlflow_churn.spark import DEFAULT_SPARK_MASTER, Staging, check_staging, session_for
from mlflow_churn.stats.performance import (
    AucCheck,
    Performance,
    SegmentBaseline,
    SegmentPerformance,
    assess,
    auc_check,
    compare_segments,
    segment_performance,
)
from mlflow_churn.tags import REFRESH_TAG
from mlflow_churn.tracking import setup_mlflow, step_run
from mlflow_churn.training.baseline import Baseline, unseen_mask, version_baseline
from mlflow_churn.training.model import Scorer, load_scorer
from mlflow_churn.training.profile import profile_for_version

__all__ = ["TAG_PREFIX", "MonitorResult", "SparkEngine", "latest_decision", "monitor",
           "monitoring_experiment", "read_history", "window_cutoffs"]


def window_cutoffs(as_of: datetime, days: int) -> list[datetime]:
    """The ``days`` daily cutoffs ending at ``as_of`` (``as_of - (days-1)`` .. ``as_of``)."""
    return [as_of - timedelta(days=i) for i in range(days - 1, -1, -1)]


def _clean(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)


@dataclass
class _Labelled:
    """Rows of the cutoffs whose labels of ``horizon`` days have matured, with the scores."""

    frame: pd.DataFrame
    scores: np.ndarray
    horizon: int

    def unseen(self, cfg: ChurnConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(labels, scores, customer ids) of the customers no model trained on."""
        m = unseen_mask(self.frame["customer_id"].to_numpy(), cfg)
        return self.frame["label"].to_numpy()[m], self.scores[m], self.frame["customer_id"].to_numpy()[m]


def _label_cutoffs(cfg: ChurnConfig, fs: Any, as_of: datetime, horizon: int,
                   not_before: datetime | None) -> list[datetime]:
    """The window's cutoffs ``horizon`` days before ``as_of`` (only those at or after
    ``not_before`` and with every feature's history in the data)."""
    cutoffs = window_cutoffs(as_of - timedelta(days=horizon), cfg.monitoring.window_days)
    if not_before is not None:
        cutoffs = [c for c in cutoffs if c >= not_before]
    first = data_bounds(cfg.data_dir).first_event + timedelta(days=longest_window(fs.features))
    return [c for c in cutoffs if c >= first]


def _label_horizons(cfg: ChurnConfig, tags: dict[str, str]) -> tuple[int, int, datetime | None]:
    """(matured labels' horizon, early labels' horizon, the version's training ``as_of``)."""
    trained_at = datetime.fromisoformat(tags["as_of"]) if tags.get("as_of") else None
    mon = cfg.monitoring
    return min(cfg.features.label_horizon_days, mon.label_delay_days), mon.early_label_days, trained_at


def _labelled(cfg: ChurnConfig, fs: Any, scorer: Any, as_of: datetime, horizon: int,
              not_before: datetime | None, cache: FrameCache | None) -> _Labelled | None:
    """The rows of :func:`_label_cutoffs`, labelled with churn in the next ``horizon`` days up
    to ``as_of``."""
    cutoffs = _label_cutoffs(cfg, fs, as_of, horizon, not_before)
    if not cutoffs:
        return None
    frame = window_frame(cfg.data_dir, fs, cutoffs, horizon, label_horizon=horizon, label_as_of=as_of,
                         cache=cache)
    if frame.empty:
        return None
    return _Labelled(frame, scorer.predict_proba(frame), horizon)


def _auc_against_baseline(cfg: ChurnConfig, matured: _Labelled | None, base: Baseline,
                          history: Sequence[WindowStats], version: str) -> AucCheck | None:
    """``auc_drop`` of the matured window on unseen customers against the configured baseline
    (``val_auc_unselected``, ``val_auc``, or the version's first measured window, carried
    forward in every window's stats so the history's length never moves it; always the
    latter when the matured labels are shorter than training's)."""
    if matured is None:
        return None
    y, s, ids = matured.unseen(cfg)
    z = cfg.monitoring.auc_noise_z
    # labels shorter than training's (label_delay_days < label_horizon_days) match no training baseline
    same_labels = matured.horizon == cfg.features.label_horizon_days
    if same_labels and cfg.monitoring.auc_baseline != "first_window":
        return auc_check(y, s, ids, *base.auc(cfg.monitoring.auc_baseline), z)
    first = next((w for w in history if w.model_version == version and w.auc_baseline is not None), None)
    if first is not None:
        return auc_check(y, s, ids, first.auc_baseline, first.auc_baseline_se, z)
    check = auc_check(y, s, ids, None, None, z)
    if check is not None:  # this window becomes the baseline
        check = auc_check(y, s, ids, check.auc, check.se, z)
    return check


def _fill_performance(stats: WindowStats, perf: Performance) -> None:
    stats.realised_auc = _clean(perf.realised["roc_auc"]) if perf.realised else None
    stats.estimated_auc_drop = _clean(perf.estimated_auc_drop)
    stats.recall_drop = _clean(perf.recall_drop)
    stats.lift_drop = _clean(perf.lift_drop)
    if perf.auc is not None:
        stats.realised_auc_unseen = perf.auc.auc
        stats.auc_baseline, stats.auc_baseline_se = perf.auc.baseline, perf.auc.baseline_se
        stats.auc_drop, stats.auc_drop_threshold = _clean(perf.auc.drop), _clean(perf.auc.threshold)
    if perf.early is not None:
        stats.early_auc, stats.early_auc_baseline = perf.early.auc, perf.early.baseline
        stats.early_auc_drop = _clean(perf.early.drop)
        stats.early_auc_drop_threshold = _clean(perf.early.threshold)
    for key, seg in perf.segments.items():
        stats.segment_performance[key] = {k: (_clean(v) if isinstance(v, float) else v)
                                          for k, v in asdict(seg).items()}
        drop, noise = _clean(seg.drop), _clean(seg.threshold)
        if drop is not None and noise is not None:
            stats.segment_auc_drop[key], stats.segment_auc_drop_threshold[key] = drop, noise


def _first_window_part(history: Sequence[WindowStats], version: str, key: str,
                       stat: str) -> tuple[float, float | None] | None:
    """(baseline, its SE) of ``stat`` (``auc`` | ``estimated_auc``) of segment ``key`` carried in
    the version's windows whose baseline of it is their first measured window, or None."""
    source = "baseline_source" if stat == "auc" else "estimate_baseline_source"
    for w in history:
        entry = (w.segment_performance.get(key) if w.model_version == version else None) or {}
        if entry.get(source) == "first window" and entry.get(f"baseline_{stat}") is not None:
            return float(entry[f"baseline_{stat}"]), entry.get(f"baseline_{stat}_se")
    return None


def _segment_baseline(key: str, seg: SegmentPerformance, base: Baseline, history: Sequence[WindowStats],
                      version: str, same_labels: bool) -> SegmentBaseline | None:
    """What segment ``key`` is compared with (:func:`~mlflow_churn.stats.performance.compare_segments`):
    its realised AUC in the version's first window that measured it, carried forward in every
    window's stats (this window's own when none did); its estimate against training's
    ``val_segment_estimated_auc``, else (a version trained before they were recorded, too few
    churners of the segment at training, labels shorter than training's) the first window's
    estimate; training's realised AUC kept for reading."""
    trained = base.segment(key) if same_labels else None
    auc = _first_window_part(history, version, key, "auc")
    if auc is None and seg.auc is not None:
        auc = (seg.auc, seg.auc_se)
    if trained is not None and trained.estimated_auc is not None:
        est, est_source = (trained.estimated_auc, trained.estimated_auc_se), "training"
    else:
        est, est_source = _first_window_part(history, version, key, "estimated_auc"), "first window"
        if est is None and seg.estimated_auc is not None:
            est = (seg.estimated_auc, seg.estimated_auc_se)
    if auc is None and est is None and trained is None:
        return None
    return SegmentBaseline(auc[0] if auc else None, auc[1] if auc else None, est[0] if est else None,
                           est[1] if est else None, "first window", est_source,
                           trained.training_auc if trained else None,
                           trained.training_auc_se if trained else None)


def _segment_columns(cfg: ChurnConfig, present: Sequence[str]) -> list[str]:
    """The configured segment columns the window's rows have (``tenure_bucket`` is derived)."""
    return [c for c in cfg.monitoring.segments if c in present or c == "tenure_bucket"]


def _segments(cfg: ChurnConfig, win: _Window, matured: _Labelled | None, base: Baseline,
              history: Sequence[WindowStats], version: str) -> tuple[dict[str, SegmentPerformance], float]:
    """Per-segment performance of the window compared with each segment's baseline, and the z
    of the noise levels."""
    mon = cfg.monitoring
    segs = win.segments
    if segs is None:
        segs = segment_performance(_segment_columns(cfg, win.frame.columns), win.frame, win.scores,
                                   cfg.evaluation, matured=matured.frame if matured else None,
                                   matured_scores=matured.scores if matured else None,
                                   calibration=win.profile.get("calibration"), min_rows=mon.segment_min_rows,
                                   min_churners=mon.segment_min_churners)
    same_labels = matured is None or matured.horizon == cfg.features.label_horizon_days
    baselines = {k: _segment_baseline(k, seg, base, history, version, same_labels) for k, seg in segs.items()}
    return segs, compare_segments(segs, baselines, mon.segment_alpha)


def _fill_integrity(stats: WindowStats, cfg: ChurnConfig, profile: dict[str, Any],
                    as_of: datetime) -> dict[str, np.ndarray]:
    window = daily_source_nulls(cfg.data_dir, as_of - timedelta(days=cfg.monitoring.window_days), as_of)
    src = source_integrity(window, profile.get("sources"))
    stats.source_null_rate, stats.ref_source_null_rate = src.rate, src.ref_rate
    stats.source_null_threshold, stats.missing_days = src.noise, src.missing_days
    return src.daily


@dataclass
class _Window:
    """Step 1 of :func:`monitor`: the version in service and the window's customers scored."""

    version: ModelVersion
    profile: dict[str, Any]
    scorer: Scorer
    cutoffs: list[datetime]
    frame: pd.DataFrame
    scores: np.ndarray
    source: str = "offline"
    source_reason: str = ""
    served: ServedRows | None = None
    #: the Spark engine's, computed where it scored (None: computed on the driver from ``frame``)
    drift: WindowDrift | None = None
    labelled: dict[int, _Labelled | None] | None = None  # by label horizon
    segments: dict[str, SegmentPerformance] | None = None


@dataclass
class SparkEngine:
    """``engine="spark"`` of :func:`monitor`: a session on ``master`` (or the caller's ``spark``,
    left running) and a staging directory the driver and the executors can read (``staging``,
    see :class:`~mlflow_churn.spark.Staging`); the executors also read ``<workspace>/data``."""

    master: str = DEFAULT_SPARK_MASTER
    staging: str | None = None
    spark: Any = None

    def window(self, cfg: ChurnConfig, cutoffs: Sequence[datetime], uri: str, scorer: Scorer,
               profile: dict[str, Any], as_of: datetime, labels: Mapping[int, list[datetime]],
               segment_labels: int, rows: bool) -> _SparkWindow:
        """The window's frame built on Spark (the offline builder's query,
        :func:`~mlflow_churn.features.spark_frames.spark_training_frame`), scored there
        (``mlflow.pyfunc.spark_udf``), its drift from counts aggregated there
        (:func:`~mlflow_churn.monitoring.spark_drift.spark_window_counts`); the labelled rows of
        ``labels`` (label horizon -> cutoffs, labels up to ``as_of``) built and scored there too,
        and the per-segment performance of the window and of the labelled rows of horizon
        ``segment_labels`` computed there
        (:func:`~mlflow_churn.monitoring.spark_performance.spark_segment_performance`). What the
        driver reads back through ``staging`` (executors write Parquet, the driver reads it):
        the window's scores for the overall estimate, every column of its rows only with
        ``rows`` (the report), and (customer, cutoff, label, score) of the labelled rows for
        the overall realised AUC checks."""
        fs, mon = scorer.feature_set, cfg.monitoring
        stage = Staging(self.staging, self.master)
        try:
            with session_for(self.spark, self.master, "churn-monitor") as spark:
                raw = spark_training_frame(spark, cfg.data_dir, fs, cutoffs, cfg.features.label_horizon_days,
                                           label=False)
                sdf = score_frame_spark(spark, uri, fs, raw).persist()
                on_spark: dict[int, Any] = {}  # the labelled rows, scored
                labelled: dict[int, _Labelled | None] = {}
                try:
                    wanted = sdf.columns if rows else ["customer_id", "cutoff", "churn_probability"]
                    sdf.select(*wanted).write.mode("overwrite").parquet(stage.uri + "/scored")
                    counts = spark_window_counts(sdf, profile, cfg)
                    for horizon, cuts in labels.items():
                        if cuts:
                            lab = spark_training_frame(spark, cfg.data_dir, fs, cuts, horizon, label=True,
                                                       label_as_of=as_of)
                            on_spark[horizon] = score_frame_spark(spark, uri, fs, lab).persist()
                        labelled[horizon] = _labelled_rows(stage, on_spark.get(horizon), horizon)
                    segments = spark_segment_performance(
                        _segment_columns(cfg, sdf.columns), sdf, fs, cfg.evaluation,
                        matured=on_spark[segment_labels] if labelled.get(segment_labels) else None,
                        calibration=profile.get("calibration"), min_rows=mon.segment_min_rows,
                        min_churners=mon.segment_min_churners)
                finally:
                    for frame in (sdf, *on_spark.values()):
                        frame.unpersist()
            window = _staged(stage, "scored")
            scores = window.pop("churn_probability").to_numpy(dtype="float64")
            frame = coerce_frame(window, fs, label=False) if rows else window
            return _SparkWindow(frame, scores, drift_from_counts(counts, profile, cfg), labelled, segments)
        finally:
            stage.cleanup()


@dataclass
class _SparkWindow:
    """What :meth:`SparkEngine.window` hands the driver."""

    frame: pd.DataFrame
    scores: np.ndarray
    drift: WindowDrift
    labelled: dict[int, _Labelled | None]
    segments: dict[str, SegmentPerformance]


def _labelled_rows(stage: Staging, sdf: Any, horizon: int) -> _Labelled | None:
    """The labelled rows ``sdf`` (Spark, scored; None: no cutoff) on the driver as the local
    engine's :func:`_labelled` gives them, with only (customer, cutoff, label) of the frame:
    staged as Parquet, read back (None when empty)."""
    if sdf is None:
        return None
    sdf.select("customer_id", "cutoff", "label", "churn_probability").write.mode("overwrite") \
        .parquet(f"{stage.uri}/labelled-{horizon}")
    part = _staged(stage, f"labelled-{horizon}")
    if part.empty:
        return None
    scores = part.pop("churn_probability").to_numpy(dtype="float64")
    return _Labelled(part.astype({"label": "int8"}), scores, horizon)


def _staged(stage: Staging, name: str) -> pd.DataFrame:
    """The Parquet directory ``name`` of ``stage`` as pandas, in the local builder's order."""
    import pyarrow.dataset as pads

    raw = pads.dataset(f"{stage.path}/{name}", filesystem=stage.fs, format="parquet").to_table().to_pandas()
    return raw.sort_values(["cutoff", "customer_id"], ignore_index=True)


def _scored_window(cfg: ChurnConfig, client: MlflowClient, alias: str, as_of: datetime,
                   cache: FrameCache | None, source: str = "auto",
                   engine: SparkEngine | None = None, rows: bool = True) -> _Window:
    """Step 1 of :func:`monitor`. ``rows``: the Spark engine brings every column of the window's
    rows to the driver (the report needs them), else only customer, cutoff and score."""
    name = cfg.training.model_name
    mv = alias_version(client, name, alias)
    if mv is None:
        raise ChurnError(
            f"model '{name}' has no alias '{alias}'; train and promote a model first "
            f"(churn train, then churn evaluate / promote)"
        )
    version = str(mv.version)
    profile = profile_for_version(client, name, version)
    scorer = load_scorer(model_uri(name, alias), version)
    fs = scorer.feature_set
    cutoffs = window_cutoffs(as_of, cfg.monitoring.window_days)
    check_cutoffs(cfg.data_dir, list(fs.features), cutoffs)
    served = read_served(cfg.prediction_log_url, as_of, cfg.monitoring.window_days)
    chosen, reason = choose_source(source, served, version, cfg.monitoring.min_served_rows)
    if chosen == "served":
        frame, scores = served_frame(served, fs, version, as_of, cfg.monitoring.window_days)
        return _Window(mv, profile, scorer, cutoffs, frame, scores, chosen, reason, served)
    if engine is not None:
        horizon, early, trained_at = _label_horizons(cfg, mv.tags or {})
        labels = {h: _label_cutoffs(cfg, fs, as_of, h, trained_at) for h in (horizon, early)}
        got = engine.window(cfg, cutoffs, model_uri(name, alias), scorer, profile, as_of, labels, horizon,
                            rows)
        if got.frame.empty:
            raise ChurnError(f"no live customers in the window ending {as_of.isoformat()}")
        return _Window(mv, profile, scorer, cutoffs, got.frame, got.scores, chosen, reason, served, got.drift,
                       got.labelled, got.segments)
    frame = window_frame(cfg.data_dir, fs, cutoffs, cfg.features.label_horizon_days, cache=cache)
    if frame.empty:
        raise ChurnError(f"no live customers in the window ending {as_of.isoformat()}")
    return _Window(mv, profile, scorer, cutoffs, frame, scorer.predict_proba(frame), chosen, reason, served)


def _fill_serving(stats: WindowStats, cfg: ChurnConfig, win: _Window) -> ServingSkew | None:
    """The window's source and the serving-skew check of its served values (None without any)."""
    stats.source, stats.source_reason = win.source, win.source_reason
    skew = serving_skew(cfg, win.served) if win.served is not None else None
    if skew is not None:
        stats.serving_mismatch_rate = dict(skew.report.mismatch_rate)
        stats.serving_skew_psi = dict(skew.report.psi)
        stats.serving_skew_rows = skew.report.compared
        stats.serving_values_age_hours = skew.values_age_hours
    return skew


def _performance(cfg: ChurnConfig, client: MlflowClient, win: _Window, as_of: datetime,
                 history: Sequence[WindowStats], cache: FrameCache | None) -> Performance:
    """Step 3 of :func:`monitor`: realised AUC on matured labels against the version's
    baseline, the early-label check and the label-free estimate."""
    mon, tags, version = cfg.monitoring, win.version.tags or {}, str(win.version.version)
    base = version_baseline(client, tags, mon.early_label_days)
    horizon, early_days, trained_at = _label_horizons(cfg, tags)
    if win.labelled is not None:  # the Spark engine's
        matured, early = win.labelled[horizon], win.labelled[early_days]
    else:
        fs, scorer = win.scorer.feature_set, win.scorer
        matured = _labelled(cfg, fs, scorer, as_of, horizon, trained_at, cache)
        early = _labelled(cfg, fs, scorer, as_of, early_days, trained_at, cache)
    perf = assess(win.scores, win.profile["score"]["sample"], cfg.evaluation,
                  matured.frame["label"].to_numpy() if matured else None,
                  matured.scores if matured else None, horizon if matured else None,
                  calibration=win.profile.get("calibration"))
    perf.auc = _auc_against_baseline(cfg, matured, base, history, version)
    if early is not None:
        perf.early = auc_check(*early.unseen(cfg), base.early_auc, base.early_auc_se,
                               mon.early_auc_noise_z, mon.early_min_churners)
    perf.segments, perf.segment_z = _segments(cfg, win, matured, base, history, version)
    return perf


def monitor(
    cfg: ChurnConfig,
    as_of: datetime,
    alias: str = "champion",
    progress: bool = False,
    history: Sequence[WindowStats] | None = None,
    report: bool = True,
    report_rows: int = 20_000,
    parent_run_id: str | None = None,
    log: bool = True,
    cache: FrameCache | None = None,
    on_decision: Callable[[MonitorResult], Any] | None = None,
    source: str = "auto",
    engine: str = "local",
    spark: SparkEngine | None = None,
) -> MonitorResult:
    """Monitor the window ending at ``as_of`` (tz-aware UTC) for ``models:/name@alias``.

    ``history``: earlier windows (oldest first) for persistence / hysteresis / cooldown;
    None reads them back from MLflow. ``report=False`` skips the Evidently HTML (fast mode).
    ``log=False`` computes without an MLflow run. ``cache``: per-cutoff frames shared by the
    windows of a replay (:class:`~mlflow_churn.monitoring.frames.FrameCache`).
    ``on_decision(result)`` is called with the result once its run is logged (the CLI passes
    :func:`~mlflow_churn.monitoring.alerting.alert_decision`: the decision as an alert). Raises
    ChurnError when the alias is not set, the version has no profile, or the window is
    outside the data. ``source``: ``auto`` | ``served`` | ``offline`` (see the module doc);
    ``served`` with fewer than ``monitoring.min_served_rows`` served rows raises ChurnError.
    ``engine="spark"``: the offline window and its labelled windows are built and scored on
    Spark (``mlflow.pyfunc.spark_udf``), the window's drift counted by Spark aggregations and
    the per-segment performance computed per segment there
    (:mod:`~mlflow_churn.monitoring.spark_performance`); ``spark``: the master, staging and
    session (default ``local[*]``). The statistics code, the overall performance and the
    decision are the local engine's (docs/scale.md says what stays on the driver). Served rows
    are judged locally.

    The steps: the window scored, drift against the version's profile, performance, the
    policy's decision, the run.
    """
    if as_of.tzinfo is None:
        raise ChurnError(f"as_of must be timezone-aware (UTC), got {as_of.isoformat()}")
    if source not in SOURCES:
        raise ChurnError(f"source must be one of {', '.join(SOURCES)}, got '{source}'")
    if engine not in ENGINES:
        raise ChurnError(f"engine must be one of {', '.join(ENGINES)}, got '{engine}'")
    if engine == "spark":
        spark = spark or SparkEngine()
        check_staging(spark.staging, spark.master)  # before any work: a bad --staging fails at once
    exp_id = setup_mlflow(cfg, monitoring_experiment(cfg))
    client = MlflowClient()
    win = _scored_window(cfg, client, alias, as_of, cache, source, spark if engine == "spark" else None,
                         rows=log and report)
    version, tags = str(win.version.version), win.version.tags or {}
    wd = win.drift or window_drift(win.frame, win.scores, win.profile, cfg)
    stats = wd.stats
    stats.as_of, stats.model_version = as_of, version
    source_daily = _fill_integrity(stats, cfg, win.profile, as_of)
    skew = _fill_serving(stats, cfg, win)
    if history is None:
        history = read_history(cfg, cfg.training.model_name, version, as_of) if log else []
    perf = _performance(cfg, client, win, as_of, history, cache)
    _fill_performance(stats, perf)

    due, trained = tags.get(REFRESH_TAG), tags.get("as_of")
    decision = decide([*history, stats], cfg.monitoring.policy, as_of,
                      last_retrain=datetime.fromisoformat(trained) if trained else None,
                      refresh_due=datetime.fromisoformat(due) if due else None)
    pop_max = max(stats.psi.values()) if stats.psi else 0.0
    result = MonitorResult(decision, None, as_of, win.cutoffs[0], version, stats, perf, pop_max,
                           len(win.frame), wd.daily, wd.daily_segments, source_daily)
    if log:
        result.run_id = _log_run(cfg, exp_id, result, win.profile, win.frame, win.scores, alias, report,
                                 report_rows, tags, parent_run_id, skew, history)
    if on_decision is not None:  # after the run: an alert links the run that holds the evidence
        on_decision(result)
    return result


def _log_run(cfg: ChurnConfig, exp_id: str, result: MonitorResult, profile: dict[str, Any],
             frame: pd.DataFrame, scores: np.ndarray, alias: str, report: bool, report_rows: int,
             tags: dict[str, str], parent_run_id: str | None, skew: ServingSkew | None = None,
             history: Sequence[WindowStats] = ()) -> str:
    """One run for the window (nested in ``parent_run_id`` / ``MLFLOW_RUN_ID`` when set)."""
    name = f"monitor {result.as_of:%Y-%m-%d} v{result.model_version}"
    with step_run(name, exp_id, parent_run_id) as run:
        log_window(result, profile, frame, scores, cfg, cfg.training.model_name, alias, report, report_rows,
                   tags, history)
        _log_served(cfg, result, skew)
        return run.info.run_id


def _log_served(cfg: ChurnConfig, result: MonitorResult, skew: ServingSkew | None) -> None:
    """Into the active run: the source (param ``source``, tags ``monitor.source`` and
    ``monitor.source_reason``) and the serving-skew check: metrics
    ``serving_skew.mismatch_rate.<feature>``, ``serving_skew.psi.<feature>``,
    ``serving_skew.rows``, ``serving_skew.values_age_hours``; artifacts ``serving_skew.json``
    (per-feature figures and the mismatching sample: customer, feature, served value,
    recomputed value, instant) and ``serving_skew.png``."""
    import mlflow

    s = result.stats
    mlflow.log_param("source", s.source)
    mlflow.set_tags({f"{TAG_PREFIX}source": s.source, f"{TAG_PREFIX}source_reason": s.source_reason[:4000]})
    if skew is None:
        return
    metrics = {f"serving_skew.mismatch_rate.{k}": v for k, v in skew.report.mismatch_rate.items()}
    metrics |= {f"serving_skew.psi.{k}": v for k, v in skew.report.psi.items()}
    metrics["serving_skew.rows"] = float(skew.report.compared)
    if skew.values_age_hours is not None:
        metrics["serving_skew.values_age_hours"] = skew.values_age_hours
    mlflow.log_metrics({k: float(v) for k, v in metrics.items() if math.isfinite(v)})
    mlflow.log_dict(jsonable(skew.to_dict()), "serving_skew.json")
    if skew.report.mismatch_rate:
        title = f"v{result.model_version}, window to {result.as_of:%Y-%m-%d}"
        policy = cfg.monitoring.policy
        limits = (policy.max_serving_mismatch_rate, policy.max_serving_skew_psi)
        mlflow.log_figure(skew_figure(skew, title, limits), "serving_skew.png")
