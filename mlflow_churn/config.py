"""One typed configuration for the whole loop, with its defaults documented here.

Sources, later ones win:

1. the defaults below;
2. a YAML file: ``--config PATH`` or ``CHURN_CONFIG``, else ``churn.yaml`` in the
   working directory when it exists;
3. environment variables ``CHURN_<SECTION>__<KEY>`` (e.g. ``CHURN_TRAINING__WINDOW_DAYS=14``;
   lists and mappings as JSON), plus ``CHURN_WORKSPACE``, ``CHURN_TRACKING_URI`` and the short
   names ``CHURN_MLFLOW_BACKEND_URI`` (= ``mlflow.server_backend_uri``) and
   ``CHURN_ADMIN_TOKEN`` (= ``serving.admin_token``), read by pydantic-settings; a ``CHURN_*``
   variable that names no key is refused with the nearest known name;
4. explicit overrides (CLI flags, MLproject parameters).

The MLflow tracking URI is ``MLFLOW_TRACKING_URI`` when set (as everywhere in MLflow),
else ``tracking_uri`` from the sources above, else ``sqlite:///<workspace>/mlflow.db``.
Unknown keys and bad values fail at load time with the dotted key named: every number must
be finite (no ``inf`` / ``nan``), shares and probabilities lie in [0, 1], and settings that
can never work are refused (:func:`_sense_problem`: a trigger that always or never fires on
its metric's range, persistence ``required`` above ``windows``, ``k`` above the number of
triggers, an early label horizon longer than the label horizon).
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Mapping
from datetime import date
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict, SettingsError
from pydantic_settings.sources.utils import parse_env_vars

from mlflow_churn.errors import ChurnError, ConfigError, first_line
from mlflow_churn.times import parse_duration

ENV_PREFIX = "CHURN_"
DEFAULT_WORKSPACE = Path("churn-workspace")
SCENARIOS = (
    "stable", "usage_shift", "segment_shift", "concept_drift", "gradual", "data_outage",
    "usage_and_segment", "segment_concept",
)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# the HTTP edges of each of the three apps (features, serving, hooks: web.limits), one
# definition each: the same bounds and defaults, the app named in the description
def _max_header_bytes(app: str) -> Any:
    return Field(16_384, ge=1024, le=1_048_576,
                 description=f"{app}: longest request head (request line + headers, bytes); a longer one "
                 "is answered 431 and nothing past the limit is read")


def _max_headers(app: str) -> Any:
    return Field(100, ge=8, le=10_000, description=f"{app}: most header lines of a request (more: 431)")


def _read_timeout_seconds(app: str) -> Any:
    return Field(10.0, gt=0, le=3600,
                 description=f"{app}: a client has this long from connecting (or from the first byte of a "
                 "request on a kept-alive connection) to send its whole request; then the "
                 "connection is closed (408 for a head begun), so slow clients are not held")


class SimulationConfig(_Section):
    """Defaults of ``churn simulate`` (every one can be overridden on the command line)."""

    customers: int = Field(
        5000, ge=1, le=1_000_000_000, description="customers at the start of the simulation"
    )
    days: int = Field(120, ge=1, le=36_500, description="simulated days of daily activity")
    start: date = Field(date(2026, 1, 1), ge=date(1970, 1, 1), le=date(2200, 12, 31),
                        description="first simulated day (UTC), 1970-01-01 .. 2200-12-31")
    scenario: Literal[SCENARIOS] = Field(  # type: ignore[valid-type]
        "stable", description="what changes in the simulated data and when (docs/simulator.md)")
    seed: int = Field(42, ge=0, description="random seed: the same seed and sizes give the same bytes")
    onset_day: int | None = Field(
        None, ge=0, description="day index where the scenario starts drifting; None = days // 2"
    )
    segment_column: str = Field("region", description="column of the segment that shifts")
    segment_value: str = Field("pacific", description="value of the segment that shifts")


class FeaturesConfig(_Section):
    """Feature store: online backend, freshness SLA and label horizon."""

    online_backend: Literal["sqlite", "redis"] = Field(
        "sqlite", description="online store: sqlite (a file in the workspace) or redis (features.redis_url)")
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis of the online store (redis)")
    redis_prefix: str = Field("churn", description="key prefix of every Redis key we write")
    feature_set: str = Field("churn_default", description="feature set the model trains on")
    label_horizon_days: int = Field(30, ge=1, description="churn within this many days = 1")
    freshness_sla_hours: float = Field(26.0, gt=0, description="newest batch older = stale")
    max_ids: int = Field(1000, ge=1, description="most ids one GET /features may ask for")
    definitions_file: Path | None = Field(
        None, description="extra feature definitions / feature sets (YAML) merged into the built-in ones"
    )
    cache_ttl_seconds: float = Field(60.0, ge=0, description="API cache lifetime; a new batch clears it")
    host: str = Field("127.0.0.1", description="bind address of `churn features serve`")
    port: int = Field(8081, ge=1, le=65535, description="port of `churn features serve`")
    api_token: str | None = Field(
        None, description="bearer token of GET /features and /metrics (None = open; needed to bind "
        "a non-loopback address); a secret: shown as *** by `config show`"
    )
    max_body_bytes: int = Field(
        65_536, ge=1, le=1 << 30, description="feature API: larger request bodies get 413 (at most 1 GiB)"
    )
    max_header_bytes: int = _max_header_bytes("feature API")
    max_headers: int = _max_headers("feature API")
    read_timeout_seconds: float = _read_timeout_seconds("feature API")
    redis_timeout_ms: float = Field(
        50.0, ge=1, le=60_000,
        description="HTTP apps: Redis connect and socket timeout of one online-store read (ms, 1..60000)"
    )
    sqlite_timeout_ms: float = Field(
        1000.0, ge=1, le=600_000,
        description="HTTP apps: SQLite busy timeout of one online-store read (ms, 1..600000)"
    )
    breaker_failures: int = Field(
        3, ge=1, description="HTTP apps: consecutive online-store failures that open the circuit (503 at "
        "once, no request waits on the store)"
    )
    breaker_probe_seconds: float = Field(
        1.0, gt=0, description="HTTP apps: while the circuit is open, probe the store this often (s)"
    )
    query_memory_limit: str = Field(
        "2GB", pattern=r"^\s*\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)\s*$",
        description="DuckDB memory_limit of every feature query (materialize, offline frames, loading "
        "definitions), e.g. 2GB or 512MiB; a query over it fails in one line naming its definitions"
    )
    query_threads: int = Field(
        2, ge=1, le=256, description="DuckDB threads of every feature query"
    )
    query_timeout_seconds: float = Field(
        900.0, gt=0, le=86_400, description="wall-clock limit of one feature query (s); the query is "
        "interrupted and its command fails in one line naming its definitions and this limit"
    )
    snapshot_keep_days: int = Field(
        7, ge=0, le=3650,
        description="materialize also writes its rows as an offline Parquet snapshot (by date and "
        "definitions) that `churn score` reads instead of computing the features again; snapshots older "
        "than this many days are removed; 0 = no snapshots",
    )


class TrainingConfig(_Section):
    """Training window, tuning budget and registration."""

    model_name: str = Field("churn-model", description="registered model the loop trains, gates and serves")
    experiment: str = Field("churn", description="MLflow experiment of the training runs")
    window_days: int = Field(30, ge=1, description="production window ending at as_of (days)")
    history_days: int = Field(0, ge=0, description="extra rolling history before the window")
    history_weight: float = Field(0.5, ge=0, le=1, description="sample weight of history rows")
    segment_weight: float = Field(
        3.0, ge=1, le=100,
        description="targeted retrain: sample weight of the recent training rows (and the validation rows) "
        "of the segments the monitoring decision names; 1 = plain retrain",
    )
    segment_recent_days: int = Field(
        14, ge=1,
        description="targeted retrain: the recent rows are those at production cutoffs within this many days "
        "of the newest training cutoff (>= window_days: the whole production window; history rows never)",
    )
    cutoff_every_days: int = Field(7, ge=1, description="spacing of training cutoffs (days)")
    validation_fraction: float = Field(
        0.25, gt=0, lt=1, description="newest share of the production cutoffs that validates"
    )
    validation_customer_fraction: float = Field(
        0.2, gt=0, lt=1,
        description="share of the non-holdout customers whose newest rows validate; never trained on",
    )
    n_trials: int = Field(20, ge=1, description="Optuna trials per training")
    timeout_seconds: float | None = Field(
        None, gt=0, description="time limit of the Optuna study (seconds); None: n_trials only")
    seed: int = Field(42, description="seed of the split, the tuning and the bootstraps")
    storage: str | None = Field(
        None, description="Optuna RDB storage URL shared by workers (e.g. postgresql://...); None = in memory"
    )
    early_stopping_rounds: int = Field(30, ge=1, description="XGBoost early stopping on validation AUC")
    max_estimators: int = Field(600, ge=10, description="upper bound of n_estimators searched")
    nthread: int = Field(
        0,
        ge=0,
        description="XGBoost threads per trial; 0 = all cores (1 is faster on an oversubscribed machine)",
    )
    engine: Literal["local", "spark"] = Field(
        "local", description="where the training frame is built: local (DuckDB) or spark (the offline "
        "builder's query on Spark, sampled there; the trainer fits on the collected sample)")
    spark_master: str = Field("local[*]", description="engine spark: Spark master URL (e.g. spark://HOST:7077)")
    max_rows: int | None = Field(
        None, ge=1, description="row budget of the training frame: above it, customers are sampled by a "
        "stable hash (all their cutoffs kept) to about this many rows; None = every row")


class EvaluationConfig(_Section):
    """Business metrics and the champion/challenger gate."""

    top_k_pct: float = Field(10.0, gt=0, le=100, description="share of customers targeted (%)")
    monthly_revenue: float = Field(60.0, ge=0, description="revenue per customer per month")
    offer_cost: float = Field(10.0, ge=0, description="cost of one retention offer")
    save_rate: float = Field(0.3, ge=0, le=1, description="share of targeted churners kept")
    segments: list[str] = Field(default_factory=lambda: ["plan", "region", "contract"],
                                description="columns the gate compares the models on, per value")
    min_auc_delta: float = Field(0.0, ge=0, le=1, description="challenger AUC must beat by this")
    segment_tolerance: float = Field(0.02, ge=0, le=1, description="max per-segment AUC loss")
    segment_alpha: float = Field(
        0.05, ge=0, lt=1,
        description="segment rule: chance of rejecting an equally good model on noise, over all tested "
        "segments (widens segment_tolerance by Bonferroni z x bootstrap SE; 0 = point estimates only)",
    )
    min_auc: float = Field(
        0.65, ge=0, le=1,
        description="absolute ROC AUC floor with no champion (honest holdout AUC on the simulator ~0.72)",
    )
    holdout_days: int = Field(
        7, ge=1, description="newest matured days kept out of training and used to evaluate (days)"
    )
    holdout_customer_fraction: float = Field(
        0.2, gt=0, lt=1,
        description="customers no model trains on (stable hash of the id); the gate scores only them",
    )
    recall_tolerance: float = Field(
        0.02, ge=0, le=1, description="max recall@k loss vs champion (absolute)"
    )
    lift_tolerance: float = Field(0.05, ge=0, description="max revenue-lift loss vs champion (relative)")
    min_segment_size: int = Field(200, ge=1, description="segments with fewer rows are not gated")
    min_segment_churners: int = Field(
        20, ge=1, description="segments with fewer distinct churned customers are not gated"
    )
    mirror_stages: bool = Field(
        False, description="also move legacy stages (canary->Staging, champion->Production)"
    )


class PersistenceConfig(_Section):
    windows: int = Field(3, ge=1, description="look at the last N monitoring windows")
    required: int = Field(2, ge=1, description="of which this many must fire")


#: trigger metrics; the feature-level ones (psi, ks, js, chi2_p, segment_psi) take ``feature``
TRIGGER_METRICS = (
    "psi", "ks", "js", "chi2_p", "score_psi", "segment_psi", "auc_drop", "early_auc_drop",
    "estimated_auc_drop", "recall_drop", "lift_drop",
)


class TriggerConfig(_Section):
    """One retraining trigger: ``metric op value`` (e.g. psi > 0.2 on any feature).

    ``value`` may be left out only for ``ks``: it is then ``monitoring.ks_threshold``.
    ``persistence`` overrides the policy's persistence for this trigger (e.g. a
    noise-thresholded performance trigger that may act on one window).
    """

    metric: Literal[TRIGGER_METRICS] = Field(  # type: ignore[valid-type]
        description="a drift statistic (per feature or segment) or a performance drop")
    feature: str = Field("*", description="feature name, or * for any feature")
    op: Literal[">", ">=", "<", "<="] = Field(">", description="how the metric compares with value")
    value: float | None = Field(None, description="threshold; only ks may leave it out")
    persistence: PersistenceConfig | None = Field(
        None, description="this trigger's own persistence (windows, required); None: the policy's")

    @model_validator(mode="after")
    def _needs_value(self) -> TriggerConfig:
        if self.value is None and self.metric != "ks":
            raise ValueError(f"trigger on '{self.metric}' needs a value, e.g. {{metric: {self.metric}, "
                             "value: 0.05}")
        return self


class HysteresisConfig(_Section):
    clear_below_fraction: float = Field(
        0.5, gt=0, le=1, description="an alarm clears once the metric falls below value x this"
    )


class PolicyConfig(_Section):
    """The multi-trigger retraining policy (see mlflow_churn.monitoring.policy)."""

    triggers: list[TriggerConfig] = Field(
        default_factory=lambda: [
            TriggerConfig(metric="psi", feature="*", op=">", value=0.2),
            TriggerConfig(metric="auc_drop", op=">", value=0.05),
            TriggerConfig(metric="early_auc_drop", op=">", value=0.05,
                          persistence=PersistenceConfig(windows=1, required=1)),
        ],
        description="the retraining triggers, each metric op value; combine says how many must fire",
    )
    combine: Literal["any", "all", "k_of_n"] = Field(
        "any", description="how the triggers combine: any, all, or k of them (k_of_n, k)")
    k: int = Field(1, ge=1, description="triggers that must fire when combine = k_of_n")
    persistence: PersistenceConfig = Field(default_factory=PersistenceConfig)
    hysteresis: HysteresisConfig = Field(default_factory=HysteresisConfig)
    cooldown_days: int = Field(7, ge=0, description="no retrain within this many days of the last")
    integrity: Literal["block", "warn"] = Field(
        "block", description="an integrity fault blocks the decision (block) or is only reported (warn)")
    max_null_increase: float = Field(
        0.05, ge=0, le=1,
        description="null-rate rise (absolute) of a feature or a raw source column that is an integrity "
        "fault, when it is also beyond sampling noise (size-aware)",
    )
    drift_alone: Literal["investigate", "retrain"] = Field(
        "investigate", description="decision when only drift triggers fire and performance holds"
    )
    segment_min_drop: float = Field(
        0.05, ge=0, le=1,
        description="segment rule: a segment's AUC drop against its baseline (realised, else the label-free "
        "estimate) must exceed both this and its noise level (monitoring.segment_alpha) to count",
    )
    segment_action: Literal["retrain", "investigate"] = Field(
        "retrain",
        description="decision when the segment rule names segments (their AUC dropped beyond noise in enough "
        "windows); retrain: a retrain targeted at those segments (training.segment_weight)",
    )
    refresh_after_drift: bool = Field(
        True,
        description="a retrain on a performance drop trains on labels from before the drop; retrain "
        "once more when the training window holds only later data (label horizon + holdout + "
        "training window days after the drop was seen)",
    )
    max_serving_mismatch_rate: float = Field(
        0.01, ge=0, le=1,
        description="serving-skew check: share of a feature's sampled served values that differ from "
        "their offline recomputation above which it is an integrity fault",
    )
    max_serving_skew_psi: float = Field(
        0.1, gt=0,
        description="serving-skew check: PSI of a feature's served values against their offline "
        "recomputation above which it is an integrity fault",
    )


class MonitoringConfig(_Section):
    """Drift and performance monitoring windows, statistics and the policy."""

    window_days: int = Field(7, ge=1, description="length of one monitoring window (days)")
    label_delay_days: int = Field(30, ge=1, description="labels mature this many days after scoring")
    bins: int = Field(10, ge=2, description="PSI bins (reference quantiles)")
    psi_epsilon: float = Field(1e-4, gt=0, lt=1, description="floor of an empty bin's share in PSI")
    ks_threshold: float = Field(
        0.1, gt=0, le=1,
        description="KS D (vs the reference sample) above which a `{metric: ks}` trigger without a value "
        "fires; not in the default triggers",
    )
    min_segment_size: int = Field(300, ge=1, description="smaller segments are not tested")
    segments: list[str] = Field(default_factory=lambda: ["plan", "region", "contract"],
                                description="customer columns monitored value by value (drift, performance)")
    auc_baseline: Literal["val_auc_unselected", "val_auc", "first_window"] = Field(
        "val_auc_unselected",
        description="what auc_drop compares the realised AUC (customers never trained on) with: the "
        "version's AUC at training on such customers' rows that model selection never saw "
        "(val_auc_unselected), its val_auc (optimistic: tuned and early-stopped on those rows), or "
        "its first measured window (kept for the version's life, never a sliding one)",
    )
    auc_noise_z: float = Field(
        2.326, gt=0, description="one-sided z of the auc_drop noise level (2.326: 1% per window)"
    )
    early_label_days: int = Field(
        7, ge=1, description="short label horizon (days) of the early-label AUC (early_auc_drop)"
    )
    early_auc_noise_z: float = Field(
        3.09, gt=0,
        description="one-sided z of the early_auc_drop noise level (3.09: 0.1% per window; stricter than "
        "auc_noise_z because the default early trigger acts on one window)",
    )
    early_min_churners: int = Field(
        30, ge=1, description="distinct churners a window needs before its early-label AUC counts"
    )
    segment_min_rows: int = Field(
        200, ge=1,
        description="per-segment performance: a segment with fewer rows (matured rows for the realised "
        "metrics, window rows for the estimate) reports 'too few rows' instead of a number",
    )
    segment_min_churners: int = Field(
        20, ge=1,
        description="per-segment performance: a segment with fewer distinct churners (expected churners for "
        "the label-free estimate) reports 'too few churners' instead of a number",
    )
    segment_alpha: float = Field(
        0.01, gt=0, lt=1,
        description="segment rule: chance per window that noise alone names a segment, over all segments "
        "measured (the noise level of each segment's AUC drop is a Bonferroni z x its SE)",
    )
    min_served_rows: int = Field(
        1000, ge=1,
        description="`churn monitor --source auto`: the window is built from the prediction log's served "
        "values when it holds at least this many rows with values of the monitored version, else offline",
    )
    serving_skew_sample: int = Field(
        500, ge=0,
        description="serving-skew check: served rows of the window recomputed offline and compared per "
        "feature (0 = no check)",
    )
    policy: PolicyConfig = Field(default_factory=PolicyConfig)

    @model_validator(mode="after")
    def _ks_default(self) -> MonitoringConfig:
        for t in self.policy.triggers:
            if t.metric == "ks" and t.value is None:
                t.value = self.ks_threshold
        return self


#: the canary judge's metrics (mlflow_churn.serving.judge) and the group each belongs to
JUDGE_METRIC_GROUPS = {"error_rate": "errors", "refusal_rate": "errors", "latency_ms": "latency",
                       "score": "scores", "auc": "performance", "recall_at_k": "performance"}


class CanaryJudgeConfig(_Section):
    """The canary judge (mlflow_churn.serving.judge): canary arm vs champion arm, per metric a
    test at ``confidence`` and a tolerance band; weighted groups give a score and a verdict."""

    enabled: bool = Field(
        False, description="`churn canary evaluate` (evaluate_canary) takes its verdict from the judge "
        "(pass = promote, fail = rollback, marginal = wait) instead of the fixed serving.max_* limits"
    )
    confidence: float = Field(
        0.98, gt=0.5, lt=1, description="a metric fails only when its test is significant at this "
        "confidence (p < 1 - confidence) and its effect lies beyond the metric's tolerance"
    )
    tolerance: dict[str, float] = Field(
        default_factory=lambda: {"error_rate": 0.005, "refusal_rate": 0.01, "latency_ms": 0.25,
                                 "score": 0.05, "auc": 0.02, "recall_at_k": 0.05},
        description="per metric, the effect inside which a difference is not a failure: error_rate / "
        "refusal_rate absolute increase of the rate; latency_ms relative increase of the median "
        "(0.25 = 25 %); score |P(canary score > champion score) - 0.5|; auc / recall_at_k absolute drop; "
        "a metric left out has tolerance 0",
    )
    latency_min_ms: float = Field(
        5.0, ge=0, description="latency: a canary slower by less than this many ms is inside the band "
        "whatever the relative tolerance (the band edge is max(champion x (1 + tolerance), champion + this))"
    )
    trim: float = Field(
        0.01, ge=0, lt=0.5, description="share of each arm's rows cut from each tail before the "
        "Mann-Whitney tests of latency and scores (outlier trimming)"
    )
    min_rows: int = Field(
        50, ge=2, description="rows an arm needs for a metric; fewer = NODATA for that metric (never a pass)"
    )
    min_churners: float = Field(
        10.0, ge=1, description="churners an arm needs for AUC / recall@k (realised: labelled positives; "
        "estimate: the sum of its calibrated scores); fewer = NODATA for both"
    )
    min_labelled: int = Field(
        200, ge=2, description="matured labels per arm before AUC / recall@k are realised; fewer = the "
        "label-free estimate (CBPE) of the calibrated scores"
    )
    weights: dict[str, float] = Field(
        default_factory=lambda: {"errors": 30.0, "latency": 20.0, "scores": 20.0, "performance": 30.0},
        description="weight of each metric group (errors, latency, scores, performance) in the score: "
        "100 x sum(weight x share of the group's metrics that passed) / sum(weight) over the groups with "
        "data; a NODATA metric is left out of the score and caps the verdict at marginal; a group left "
        "out has weight 0",
    )
    critical: list[str] = Field(
        default_factory=lambda: ["error_rate", "score", "auc"],
        description="metrics whose failure fails the verdict whatever the score",
    )
    pass_score: float = Field(95.0, ge=0, le=100, description="score at or above which the verdict is pass")
    marginal_score: float = Field(
        75.0, ge=0, le=100, description="score at or above which (below pass_score) the verdict is "
        "marginal; below = fail"
    )

    @model_validator(mode="after")
    def _known_names(self) -> CanaryJudgeConfig:
        metrics, groups = set(JUDGE_METRIC_GROUPS), set(JUDGE_METRIC_GROUPS.values())
        for where, names, known in (("tolerance", self.tolerance, metrics),
                                    ("critical", self.critical, metrics), ("weights", self.weights, groups)):
            unknown = sorted(set(names) - known)
            if unknown:
                raise ValueError(f"canary.judge.{where}: unknown {unknown}; use {sorted(known)}")
        if any(v < 0 for v in self.tolerance.values()) or any(v < 0 for v in self.weights.values()):
            raise ValueError("canary.judge.tolerance and canary.judge.weights must be >= 0")
        if not sum(self.weights.values()) > 0:
            raise ValueError("canary.judge.weights are all 0; give at least one group a weight")
        if self.marginal_score > self.pass_score:
            raise ValueError(f"canary.judge.marginal_score {self.marginal_score} > pass_score "
                             f"{self.pass_score}: lower marginal_score")
        return self


class CanaryAlarmsConfig(_Section):
    """Alarms of a canary rollout (mlflow_churn.serving.alarms): checked on every controller tick
    over the last ``window`` of the prediction log; a breach rolls the canary back at once (no
    bake wait, no judge) and raises the alert ChurnCanaryAlarm."""

    enabled: bool = Field(
        True, description="check the alarms on every `churn canary run` tick of a running or paused rollout"
    )
    window: str = Field(
        "5m", description="the alarms look at the rows served (wall clock) in this last stretch, a "
        "duration like 90s, 5m, 1h"
    )
    min_requests: int = Field(
        100, ge=1, description="rows the canary arm must have served in the window before any alarm may "
        "fire (fewer = NODATA, never a breach); the score PSI needs this many scored rows in both arms"
    )
    max_error_rate: float = Field(
        0.05, ge=0, le=1, description="the canary's error rate (rows with status error / its rows) above "
        "this fires when it is also above the champion's by error_rate_margin"
    )
    error_rate_margin: float = Field(
        0.02, ge=0, le=1, description="how far above the champion's error rate the canary's must be too "
        "(a failure shared by both arms is not the canary's)"
    )
    max_p99_ms: float = Field(
        1000.0, gt=0, description="the canary's p99 latency (ms) above this fires when it is also above "
        "max_p99_ratio x the champion's"
    )
    max_p99_ratio: float = Field(
        3.0, ge=1, description="how many times the champion's p99 the canary's must be too (a loaded "
        "host slows both arms)"
    )
    score_min_mean: float | None = Field(
        None, ge=0, le=1, description="the canary's mean score (P(churn)) below this fires; None = no limit"
    )
    score_max_mean: float | None = Field(
        None, ge=0, le=1, description="the canary's mean score above this fires; None = no limit"
    )
    max_score_psi: float | None = Field(
        0.5, gt=0, description="PSI of the canary's scores against the champion's above this (plus the PSI "
        "the gate measured between the two versions, and never below what sampling noise gives at "
        "these counts) fires; None = no limit"
    )

    @model_validator(mode="after")
    def _limits(self) -> CanaryAlarmsConfig:
        try:
            parse_duration(self.window, "canary.alarms.window")
        except ChurnError as exc:
            raise ValueError(str(exc)) from None
        if (self.score_min_mean is not None and self.score_max_mean is not None
                and self.score_min_mean > self.score_max_mean):
            raise ValueError(f"canary.alarms.score_min_mean {self.score_min_mean} > score_max_mean "
                             f"{self.score_max_mean}")
        return self

    @property
    def window_seconds(self) -> float:
        return parse_duration(self.window, "canary.alarms.window").total_seconds()


class ServingConfig(_Section):
    """Online scoring service, canary split and canary analysis."""

    host: str = Field("127.0.0.1", description="bind address of `churn serve`")
    port: int = Field(8080, ge=1, le=65535, description="port of `churn serve`")
    canary_fraction: float = Field(0.1, ge=0, le=1, description="share of customers routed to canary")
    routing_salt: str = Field("churn", description="salt of the sticky customer hash")
    prediction_log: str | None = Field(
        None, description="sqlite path or postgresql:// URL; None = <workspace>/predictions.db"
    )
    prediction_log_mode: Literal["sync", "async"] = Field(
        "sync",
        description="sync: a request's rows are committed before its response is sent (a kill "
        "loses nothing answered; the log down = 503); async: a background writer commits "
        "every 0.2 s or 512 rows (a hard kill loses what is not committed yet, SIGTERM flushes)",
    )
    prediction_log_max_pending: int = Field(
        100_000, ge=1, description="async mode: uncommitted rows held at most; more are dropped "
        "and counted in churn_prediction_log_dropped_total"
    )
    log_features_sample_rate: float = Field(
        1.0, ge=0, le=1,
        description="share of prediction-log rows (drawn per row) that keep the feature values the model "
        "was served (monitoring's served data and serving-skew check); 0 = none",
    )
    log_features_max_bytes: int = Field(
        16_384, ge=2,
        description="longest JSON text of one row's served values; a longer one is not stored, a "
        "{\"__omitted__\": \"size\"} marker is (counted in churn_prediction_log_features_omitted_total)",
    )
    admin_token: str | None = Field(
        None, description="bearer token of /admin/* and of a client as_of on /predict; None = `churn "
        "serve` creates one in <workspace>/secrets/admin_token (mode 0600); a secret"
    )
    api_token: str | None = Field(
        None, description="bearer token of /predict, /ready and /metrics (None = open; needed to bind a "
        "non-loopback address; the admin token is accepted too); a secret"
    )
    max_body_bytes: int = Field(
        2_097_152, ge=1, le=1 << 30, description="scoring service: larger bodies get 413 (at most 1 GiB)"
    )
    max_header_bytes: int = _max_header_bytes("scoring service")
    max_headers: int = _max_headers("scoring service")
    read_timeout_seconds: float = _read_timeout_seconds("scoring service")
    reload_seconds: float = Field(10.0, gt=0, description="how often aliases are re-checked")
    min_canary_samples: int = Field(500, ge=1, description="canary predictions before any verdict")
    max_error_rate: float = Field(0.01, ge=0, le=1, description="canary error rate above: rollback")
    max_p99_ms: float = Field(
        50.0,
        gt=0,
        description="canary p99 latency SLO (ms); breached only "
        "when the canary is also slower than the champion (max_p99_ratio)",
    )
    max_p99_ratio: float = Field(
        1.5,
        gt=0,
        description="canary p99 / champion p99 above which an SLO "
        "breach is the canary's (a loaded host slows both routes)",
    )
    max_score_psi: float = Field(0.2, gt=0, description="PSI between the routes' score distributions")
    max_auc_drop: float = Field(0.02, ge=0, le=1, description="canary AUC below champion by more = rollback")
    auc_loss_budget: float = Field(0.002, ge=0, le=1, description="`churn compress` AUC-loss budget")
    on_invalid: Literal["flag", "reject"] = Field(
        "flag",
        description="what /predict does with feature values the scoring version's training profile calls "
        "invalid (a category training never saw, a number beyond the observed range by more than "
        "range_margin, a null where training had none): flag = score them and list them in each "
        "prediction's warnings; reject = answer 422 naming the field and the allowed values",
    )
    range_margin: float = Field(
        0.1, ge=0, le=100,
        description="input checks: a number is out of range when it lies below the training profile's "
        "observed min or above its max by more than this fraction of (max - min)",
    )
    predictor: Literal["xgboost", "compiled"] = Field(
        "xgboost",
        description="what computes the probabilities of /predict: xgboost = the booster's "
        "inplace_predict; compiled = the trees compiled to C (treelite + tl2cgen, extra `compiled`, "
        "needs gcc), once per model digest into compiled_cache_dir, equal to xgboost within 1e-6 "
        "(bench/RESULTS.md, bench_predictor, has both measured)",
    )
    compiled_cache_dir: Path | None = Field(
        None, description="where compiled models are kept, one directory per model digest; None = "
        "<workspace>/compiled"
    )


class RolloutStep(_Section):
    """One step of the canary rollout plan: ``{weight: 25, bake: 2h}`` (route ``weight`` % of
    customers to the canary for at least ``bake``) or ``{pause: true}`` (wait for `churn canary
    resume`). ``weight: 100`` is the promotion itself: only the last step may have it."""

    weight: float | None = Field(
        None, gt=0, le=100, description="percent (0 < weight <= 100) of customers routed to the canary "
        "during this step; 100 = promote the canary"
    )
    bake: str = Field(
        "0s", description="least time at this weight before the judge may advance the plan, a duration "
        "like 90s, 30m, 2h, 1d (0s = as soon as the judge passes)"
    )
    pause: bool = Field(False, description="true = a pause step: the rollout waits for `churn canary resume`")

    @model_validator(mode="after")
    def _one_kind(self) -> RolloutStep:
        if self.pause and self.weight is not None:
            raise ValueError(f"a step is either {{pause: true}} or {{weight: W, bake: D}}, not both "
                             f"(got weight {self.weight:g} with pause); split it into two steps")
        if not self.pause and self.weight is None:
            raise ValueError("a step needs a weight (percent of customers, 0 < weight <= 100) or pause: true")
        try:
            parse_duration(self.bake, "bake", zero=True)
        except ChurnError as exc:
            raise ValueError(str(exc)) from None
        return self

    @property
    def bake_seconds(self) -> float:
        return parse_duration(self.bake, "bake", zero=True).total_seconds()


def _default_steps() -> list[RolloutStep]:
    return [RolloutStep(weight=10, bake="30m"), RolloutStep(weight=100)]


class CanaryConfig(_Section):
    """Promotion of the canary (`churn canary promote`, the admin route, the auto loop) and the
    rollout plan `churn canary run` follows."""

    min_requests: int | None = Field(
        None, ge=1, description="logged canary requests `promote` needs (unless --force --reason), and "
        "the requests each arm must serve during a rollout step before it may advance; "
        "None = serving.min_canary_samples, the number the canary verdict needs"
    )
    steps: list[RolloutStep] = Field(
        default_factory=_default_steps,
        description="the rollout plan of `churn canary run`: steps {weight: <percent>, bake: <duration>} "
        "or {pause: true}, in order; reaching a weight-100 step (only the last may have it) promotes; "
        "default [{weight: 10, bake: 30m}, {weight: 100}]",
    )
    mode: Literal["split", "shadow"] = Field(
        "split", description="how the canary meets traffic: split = a sticky share of customers is "
        "answered by the canary (serving.canary_fraction or the rollout's weight); shadow = every "
        "customer is answered by the champion and the canary scores the same rows off the response "
        "path, logged with route shadow and judged like a split canary (a rollout's weights then "
        "route nobody: the plan judges, then promotes at its last step); default split",
    )
    shadow_fraction: float = Field(
        1.0, ge=0.0, le=1.0, description="shadow mode: the share of customers (sticky by customer id, "
        "serving.routing_salt) whose found rows the canary also scores; default 1.0 (all)",
    )
    shadow_queue: int = Field(
        256, ge=1, le=100_000, description="shadow mode: requests waiting for their shadow scoring at "
        "most; beyond it a request's shadow scoring is dropped and counted in "
        "churn_shadow_dropped_total (the response never waits for it); default 256",
    )

    @model_validator(mode="after")
    def _plan(self) -> CanaryConfig:
        if not self.steps:
            raise ValueError("canary.steps is empty; give at least one step, e.g. [{weight: 10, bake: 30m}, "
                             "{weight: 100}]")
        if self.steps[0].pause:
            raise ValueError("canary.steps[0] is a pause; start the plan with a weight step "
                             "(e.g. {weight: 5, bake: 30m})")
        if self.steps[-1].pause:
            raise ValueError(f"canary.steps[{len(self.steps) - 1}] (the last) is a pause; end the plan "
                             "with a weight step (e.g. {weight: 100})")
        for i, step in enumerate(self.steps[:-1]):
            if step.weight == 100:
                raise ValueError(f"canary.steps[{i}] has weight 100 (the promotion) but is not the last "
                                 "step; lower its weight or drop the steps after it")
        return self

    def needed(self, serving: ServingConfig) -> int:
        """The request floor of a promotion."""
        return self.min_requests if self.min_requests is not None else serving.min_canary_samples

    judge: CanaryJudgeConfig = Field(
        default_factory=CanaryJudgeConfig,
        description="the canary judge (canary.judge.*): per-metric tests, tolerance bands, weighted groups",
    )
    alarms: CanaryAlarmsConfig = Field(
        default_factory=CanaryAlarmsConfig,
        description="alarms of a rollout (canary.alarms.*): error rate, p99 latency and score limits per "
        "arm over the last window; a breach rolls back at once",
    )


class HooksConfig(_Section):
    """Registry webhook receiver (`churn hooks serve`)."""

    host: str = Field("127.0.0.1", description="bind address of `churn hooks serve` (the webhook receiver)")
    port: int = Field(8090, ge=1, le=65535, description="port of `churn hooks serve`")
    secret: str | None = Field(None, description="webhook HMAC secret; env CHURN_HOOKS__SECRET")
    max_age_seconds: int = Field(300, ge=1, description="older deliveries are rejected as replays")
    max_body_bytes: int = Field(
        1_048_576, ge=1, le=1 << 30,
        description="larger deliveries get 413 before any signature or JSON work (at most 1 GiB)"
    )
    max_header_bytes: int = _max_header_bytes("webhook receiver")
    max_headers: int = _max_headers("webhook receiver")
    read_timeout_seconds: float = _read_timeout_seconds("webhook receiver")
    alert_url: str | None = Field(
        None, description="deprecated: read as alerts.alertmanager_url when that is unset (an Alertmanager "
        "/api/v2/alerts URL; docs/alerts.md)"
    )
    reconcile_seconds: float = Field(
        60, ge=1, le=86_400, description="the receiver looks for versions left without a gate decision "
        "(a missed delivery, a gate failed for an outage) at start and then every this many seconds"
    )
    reconcile_backoff_seconds: float = Field(
        60, gt=0, le=86_400, description="wait after a reconcile gate's first failure for an outage before "
        "it runs again; doubled after each further failure, up to reconcile_backoff_max_seconds"
    )
    reconcile_backoff_max_seconds: float = Field(
        3600, gt=0, le=604_800, description="longest wait between two attempts of a reconcile gate"
    )
    max_gate_attempts: int = Field(
        5, ge=1, le=1000, description="a reconcile gate that failed this many times for an outage raises "
        "one alert (ChurnGateGaveUp through the alert outbox, the log, /metrics "
        "churn_hooks_gate_gave_up_total) and is not retried until a new delivery of that version or "
        "`churn hooks reconcile --once`; the alert resolves when the version is gated"
    )


class RegistryConfig(_Section):
    """Registry protection: the guard plugin (`mlflow server --app-name churn-guard`), approvals
    and what the webhook receiver does about unguarded moves (see mlflow_churn.registry.promotion)."""

    protected_aliases: list[str] = Field(
        default_factory=lambda: ["champion"],
        description="aliases that only move to a version that may be promoted (gate passed and canary "
        "says promote, a rollback to the previous champion, or an override tag); [] = none",
    )
    require_approval: bool = Field(
        False, description="a promotion also needs tag approved_by on the version (set by a person)"
    )
    guard_auth: Literal["basic-auth"] | None = Field(
        None, description="the guard also wraps MLflow's basic-auth app, so who moved an alias is known"
    )
    revert_unguarded: bool = Field(
        False, description="the webhook receiver moves an unguarded protected-alias move back"
    )
    audit_experiment: str = Field(
        "churn-registry-audit", description="MLflow experiment of the registry's audit runs"
    )
    signing_key_file: Path | None = Field(
        None, description="Ed25519 private key (0600) the project's processes sign decisions with "
        "(`churn registry keygen`); None = <workspace>/keys/signing.key, made on first use")
    verify_key_file: Path | None = Field(
        None, description="public keys (one a line; several while a key is rotated) the guard, "
        "`churn serve` and `churn registry verify` check signatures with; None = <workspace>/keys/verify.pub")
    extra_verify_key_files: list[Path] = Field(
        default_factory=list, description="more verify-key files (e.g. another team's signer)")
    override_users: list[str] = Field(
        default_factory=list, description="under basic-auth: users who may set the promotion_override "
        "tag (users with MANAGE on the model may too); without auth only `churn canary promote --force` "
        "(signed) overrides")
    approvers: list[str] = Field(
        default_factory=list, description="under basic-auth with require_approval: users who may approve "
        "(tag approved_by) a promotion; never the one who promotes")
    require_signed_models: bool = Field(
        True, description="`churn serve` loads a champion / canary only when its files match the digest "
        "its signed gate decision names")


class MlflowServerConfig(_Section):
    """The MLflow tracking server: how long a client waits on it, and (``churn demo --server``)
    the backend the demo's own server uses.

    ``setup_mlflow`` exports the three ``http_*`` keys as ``MLFLOW_HTTP_REQUEST_MAX_RETRIES``,
    ``MLFLOW_HTTP_REQUEST_TIMEOUT`` and ``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR`` unless the user
    set those variables. MLflow's own defaults (7 retries, back-off factor 2, 120 s timeout)
    stall a command for minutes on a dead server; these fail it in seconds. Worst case of one
    request to a server that refuses connections: about ``backoff_factor * (2 + 4 + ...)`` over
    the retries (plus up to 1 s jitter each); to one that accepts but never answers:
    ``(http_max_retries + 1) * http_timeout_seconds`` more.
    """

    # --- server mode of the demo (churn demo --server) ---
    server_backend_uri: str | None = Field(
        None, description="--backend-store-uri of the demo's `mlflow server`: a PostgreSQL URL "
        "(postgresql://user@host:5432/db, opened with psycopg 3; a new database is created on "
        "that server per run), env CHURN_MLFLOW_BACKEND_URI; None = a SQLite file in the workspace")
    http_max_retries: int = Field(
        3, ge=0, le=10, description="retries of one MLflow HTTP request (connection errors, timeouts, "
        "408/429/5xx) -> MLFLOW_HTTP_REQUEST_MAX_RETRIES"
    )
    http_timeout_seconds: int = Field(
        10, ge=1, description="seconds one MLflow HTTP request may wait on a connect or a read "
        "-> MLFLOW_HTTP_REQUEST_TIMEOUT"
    )
    http_backoff_factor: int = Field(
        1, ge=0, le=120, description="exponential back-off between retries, seconds (0, 2f, 4f, ...) "
        "-> MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"
    )


#: an http(s) URL with a host (the alert outlets)
_HTTP_URL = r"^https?://[^/\s?#]+(/\S*)?$"


class AlertsConfig(_Section):
    """Alerts that reach a person (mlflow_churn.alerts, docs/alerts.md): where they go and how
    they are delivered. With no outlet set, alerts are only recorded in the outbox."""

    alertmanager_url: str | None = Field(
        None, pattern=_HTTP_URL, description="Alertmanager to POST alerts to: its base URL "
        "(http://alertmanager:9093) or its /api/v2/alerts URL; it groups, deduplicates, routes and "
        "resolves. None = hooks.alert_url (deprecated), else no Alertmanager outlet"
    )
    webhook_url: str | None = Field(
        None, pattern=_HTTP_URL, description="plain webhook POSTed Alertmanager's webhook payload "
        "({version: '4', status, alerts: [...]}): one firing message per condition and one resolved "
        "message when it clears"
    )
    outbox: Path | None = Field(None, description="SQLite outbox of conditions and attempts; None = "
                                "<workspace>/alerts.db")
    timeout_seconds: float = Field(5.0, gt=0, le=300, description="one POST to an outlet waits this long")
    retry_initial_seconds: float = Field(
        2.0, gt=0, le=3600, description="wait after a failed attempt; doubled after each further failure"
    )
    retry_max_seconds: float = Field(300.0, gt=0, le=86_400, description="longest wait between two attempts")
    give_up_hours: float = Field(
        24.0, gt=0, le=8760, description="a message still failing this long after it was due is given up "
        "(recorded and logged)"
    )
    repeat_seconds: float = Field(
        600.0, ge=1, le=86_400, description="a running sender re-posts a firing alert to Alertmanager this "
        "often (Alertmanager deduplicates it); the webhook is never re-sent"
    )
    hold_hours: float = Field(
        72.0, gt=0, le=8760, description="each Alertmanager post says endsAt = now + this: an alert no churn "
        "process re-posts for this long is resolved by Alertmanager itself"
    )
    flush_wait_seconds: float = Field(
        10.0, ge=0, le=600, description="a process that raised alerts waits at most this long at exit to "
        "deliver them; what is left stays in the outbox for the next churn process"
    )
    poll_seconds: float = Field(
        5.0, gt=0, le=3600, description="a running sender looks for due rows (other processes') this often"
    )
    keep_days: float = Field(30.0, gt=0, description="delivered, resolved conditions are kept this long")

    @model_validator(mode="after")
    def _sense(self) -> AlertsConfig:
        if self.hold_hours * 3600 <= self.repeat_seconds:
            raise ValueError(f"hold_hours {self.hold_hours:g} must be longer than repeat_seconds "
                             f"{self.repeat_seconds:g}, or Alertmanager resolves a firing alert "
                             "between two posts")
        return self


#: the scheduler's job store: SQLite (a file) or PostgreSQL (e.g. the tracking server's)
_JOB_STORE_URL = r"^(sqlite:///\S+|(postgresql|postgresql\+psycopg2?|postgres)://\S+)$"


class SchedulerJobConfig(_Section):
    """One job of ``churn scheduler``: whether it runs and how often."""

    enabled: bool = Field(True, description="run this job on its interval")
    every_minutes: float = Field(60.0, gt=0, le=525_600, description="interval between two runs (minutes)")
    every_seconds: float | None = Field(
        None, gt=0, le=31_536_000, description="interval in seconds; wins over every_minutes when set"
    )

    @property
    def interval_seconds(self) -> float:
        return float(self.every_seconds) if self.every_seconds is not None else self.every_minutes * 60.0


class SchedulerConfig(_Section):
    """``churn scheduler`` (mlflow_churn.scheduler, docs/scheduler.md): the jobs, their intervals
    and where their state lives (it survives a restart)."""

    job_store: str | None = Field(
        None, pattern=_JOB_STORE_URL, description="SQLAlchemy URL of the job store and its runs table: "
        "sqlite:///path or postgresql://user@host/db (e.g. the tracking server's); None = "
        "sqlite:///<workspace>/scheduler.db"
    )
    misfire_grace_seconds: float | None = Field(
        None, gt=0, description="a run missed (scheduler down) by more than this is skipped; None = a "
        "missed run always runs, once, however late"
    )
    shutdown_wait_seconds: float = Field(
        60.0, ge=0, le=86_400, description="on Ctrl-C / SIGTERM, wait this long for a running job"
    )
    materialize: SchedulerJobConfig = Field(
        default_factory=lambda: SchedulerJobConfig(every_minutes=60.0),
        description="`churn features materialize` at the newest data (skipped when nothing is new)")
    freshness: SchedulerJobConfig = Field(
        default_factory=lambda: SchedulerJobConfig(every_minutes=15.0),
        description="serving batch older than features.freshness_sla_hours fires freshness:<backend>")
    monitor: SchedulerJobConfig = Field(
        default_factory=lambda: SchedulerJobConfig(every_minutes=1440.0),
        description="`churn monitor` of the champion; its decision alerts")
    retrain: SchedulerJobConfig = Field(
        default_factory=lambda: SchedulerJobConfig(every_minutes=1440.0),
        description="`churn retrain`: acts on the newest monitoring decision")
    canary: SchedulerJobConfig = Field(
        default_factory=lambda: SchedulerJobConfig(enabled=False, every_minutes=1.0),
        description="`churn canary run --once`: one tick of the rollout controller (canary.steps); off by "
        "default (it moves aliases): enable it or run `churn canary run`")


class ChurnConfig(_Section):
    """The whole configuration."""

    workspace: Path = Field(DEFAULT_WORKSPACE, description="data, online store, MLflow store")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI (see module doc)")
    simulation: SimulationConfig = Field(default_factory=SimulationConfig)
    features: FeaturesConfig = Field(default_factory=FeaturesConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    monitoring: MonitoringConfig = Field(default_factory=MonitoringConfig)
    serving: ServingConfig = Field(default_factory=ServingConfig)
    canary: CanaryConfig = Field(default_factory=CanaryConfig, description="promotion of the canary")
    hooks: HooksConfig = Field(default_factory=HooksConfig)
    mlflow: MlflowServerConfig = Field(
        default_factory=MlflowServerConfig,
        description="MLflow tracking server: client waits, demo server backend",
    )
    registry: RegistryConfig = Field(
        default_factory=RegistryConfig, description="protected aliases, approvals, the guard plugin"
    )
    alerts: AlertsConfig = Field(
        default_factory=AlertsConfig, description="alert outlets (Alertmanager, webhook), retries, outbox"
    )
    scheduler: SchedulerConfig = Field(
        default_factory=SchedulerConfig, description="`churn scheduler`: jobs, intervals, job store"
    )

    @property
    def data_dir(self) -> Path:
        """Where the raw tables (Parquet) live."""
        return self.workspace / "data"

    @property
    def mlflow_tracking_uri(self) -> str:
        """``MLFLOW_TRACKING_URI`` if set, else the configured one, else the workspace's."""
        env = os.environ.get("MLFLOW_TRACKING_URI")
        if env:
            return env
        if self.tracking_uri:
            return self.tracking_uri
        return f"sqlite:///{self.workspace.resolve() / 'mlflow.db'}"

    @property
    def feature_snapshot_dir(self) -> Path:
        """Where materialize writes its offline snapshots (:mod:`mlflow_churn.features.snapshots`)."""
        return self.workspace / "feature-snapshots"

    @property
    def compiled_cache_dir(self) -> Path:
        """Where ``serving.predictor: compiled`` keeps its compiled models."""
        return self.serving.compiled_cache_dir or self.workspace / "compiled"

    @property
    def online_store_path(self) -> Path:
        """SQLite online store file."""
        return self.workspace / "online.db"

    @property
    def scheduler_store_url(self) -> str:
        """SQLAlchemy URL of ``churn scheduler``'s job store (``scheduler.job_store`` or a SQLite
        file in the workspace)."""
        return self.scheduler.job_store or f"sqlite:///{self.workspace.resolve() / 'scheduler.db'}"

    @property
    def prediction_log_url(self) -> str:
        """Where the serving app logs predictions (SQLite path or PostgreSQL URL)."""
        return self.serving.prediction_log or str(self.workspace / "predictions.db")

    @property
    def artifact_root(self) -> Path:
        """Artifact root for experiments we create in the default store."""
        return self.workspace.resolve() / "mlartifacts"


#: the values each trigger metric can take (None: unbounded); ``psi`` and its kin are >= 0,
#: KS D, JS distance (base 2) and the chi-square p-value lie in [0, 1], AUC and recall drops in
#: [-1, 1]; a trigger that always or never fires on this range is refused at load
METRIC_RANGES: dict[str, tuple[float | None, float | None]] = {
    "psi": (0.0, None), "score_psi": (0.0, None), "segment_psi": (0.0, None),
    "ks": (0.0, 1.0), "js": (0.0, 1.0), "chi2_p": (0.0, 1.0),
    "auc_drop": (-1.0, 1.0), "early_auc_drop": (-1.0, 1.0), "estimated_auc_drop": (-1.0, 1.0),
    "recall_drop": (-1.0, 1.0), "lift_drop": (None, None),
}


def _trigger_problem(metric: str, op: str, value: float) -> str | None:
    """Why ``metric op value`` always or never fires on the metric's range, or None."""
    lo, hi = METRIC_RANGES.get(metric, (None, None))
    always = never = False
    if op == ">":
        always, never = lo is not None and value < lo, hi is not None and value >= hi
    elif op == ">=":
        always, never = lo is not None and value <= lo, hi is not None and value > hi
    elif op == "<":
        always, never = hi is not None and value > hi, lo is not None and value <= lo
    elif op == "<=":
        always, never = hi is not None and value >= hi, lo is not None and value < lo
    if not (always or never):
        return None
    span = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
    return (f"trigger '{metric} {op} {value:g}' {'always' if always else 'never'} fires ({metric} lies in "
            f"{span}); choose a value inside that range")


def _sense_problem(cfg: ChurnConfig) -> tuple[str, str] | None:
    """(dotted key, message) of the first setting that can never work, or None."""
    policy = cfg.monitoring.policy
    pairs = [("monitoring.policy.persistence", policy.persistence)]
    for i, t in enumerate(policy.triggers):
        key = f"monitoring.policy.triggers.{i}"
        if t.value is not None:
            why = _trigger_problem(t.metric, t.op, t.value)
            if why:
                return f"{key}.value", why
        if t.persistence is not None:
            pairs.append((f"{key}.persistence", t.persistence))
    for key, p in pairs:
        if p.required > p.windows:
            return (f"{key}.required", f"required {p.required} is more than windows {p.windows}, so it "
                    "never fires; make required <= windows")
    if policy.combine == "k_of_n" and policy.k > len(policy.triggers):
        return ("monitoring.policy.k", f"k {policy.k} is more than the {len(policy.triggers)} trigger(s), "
                "so the policy never fires; lower k or add triggers")
    if cfg.monitoring.early_label_days > cfg.features.label_horizon_days:
        return ("monitoring.early_label_days",
                f"the early label horizon {cfg.monitoring.early_label_days} is longer than "
                f"features.label_horizon_days {cfg.features.label_horizon_days}; make it shorter")
    return None


#: what :func:`masked` shows instead of a secret
MASK = "***"
#: config keys (last dotted part) that hold a secret: tokens, secrets, passwords, keys
_SECRET_KEY = re.compile(r"(^|_)(token|secret|password|passwd|api_key|private_key)$")
#: ``scheme://user:password@host`` in any string value (PostgreSQL, Redis, MLflow URLs)
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/@:\s]*:)(?P<pw>[^@/\s]+)(?P<at>@)")
_QUERY_PASSWORD = re.compile(r"(?P<head>[?&](?:password|passwd|pwd|token|secret)=)(?P<pw>[^&\s]+)", re.I)


#: the URL schemes of PostgreSQL, with or without a SQLAlchemy driver part
_PG_SCHEMES = ("postgresql", "postgres")
#: the SQLAlchemy driver the package uses for PostgreSQL (psycopg 3; psycopg2 is not a dependency)
PG_DRIVER = "postgresql+psycopg"


def is_postgres_url(url: str) -> bool:
    """True for ``postgresql://``, ``postgres://`` and ``postgresql+<driver>://`` URLs."""
    scheme = url.split("://", 1)[0] if "://" in url else ""
    return scheme.split("+", 1)[0].lower() in _PG_SCHEMES


def sqlalchemy_url(url: str) -> str:
    """``url`` as SQLAlchemy (and ``mlflow server --backend-store-uri``) should open it here:
    a PostgreSQL URL with psycopg 3 (``postgresql://``, ``postgres://`` or
    ``postgresql+psycopg2://`` -> ``postgresql+psycopg://``); any other URL unchanged."""
    if not is_postgres_url(url):
        return url
    return f"{PG_DRIVER}://{url.split('://', 1)[1]}"


def libpq_url(url: str) -> str:
    """A PostgreSQL URL as libpq / ``psycopg.connect`` take it (``postgresql://``, the
    SQLAlchemy driver part dropped); any other URL unchanged."""
    if not is_postgres_url(url):
        return url
    return f"postgresql://{url.split('://', 1)[1]}"


def mask_text(text: str) -> str:
    """``text`` with the password of every URL in it (``user:PASSWORD@``, ``?password=``) masked."""
    text = _URL_PASSWORD.sub(lambda m: f"{m['head']}{MASK}{m['at']}", text)
    return _QUERY_PASSWORD.sub(lambda m: f"{m['head']}{MASK}", text)


def masked(data: Any, key: str = "") -> Any:
    """A copy of a JSON-able config dump with secrets shown as ``***``: every value under a key
    named like a token, secret or password (``serving.admin_token``, ``serving.api_token``,
    ``features.api_token``, ``hooks.secret``, ...) that is set, and the password of any URL
    (``postgresql://user:pw@host/db``, ``redis://:pw@host``) in any string."""
    if isinstance(data, dict):
        return {k: masked(v, str(k)) for k, v in data.items()}
    if isinstance(data, list):
        return [masked(v, key) for v in data]
    if _SECRET_KEY.search(key.lower()) and data not in (None, ""):
        return MASK
    if isinstance(data, str):
        return mask_text(data)
    return data


def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += _known_keys(ann, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key '{dotted}': '{part}' is a value, not a section")
    node[parts[-1]] = value


#: short environment names of nested keys (besides ``CHURN_<SECTION>__<KEY>``); the long name
#: wins when both are set
ENV_ALIASES = {"CHURN_MLFLOW_BACKEND_URI": "mlflow.server_backend_uri",
               "CHURN_ADMIN_TOKEN": "serving.admin_token"}
#: ``CHURN_*`` variables that are not config keys
ENV_OTHER = ("CHURN_CONFIG",)


def env_name(dotted: str) -> str:
    """The environment variable of a dotted config key (``training.window_days`` ->
    ``CHURN_TRAINING__WINDOW_DAYS``)."""
    return ENV_PREFIX + dotted.upper().replace(".", "__")


class _EnvView(BaseSettings):
    """The fields of :class:`ChurnConfig` as pydantic-settings reads them from ``CHURN_*``."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter="__",
                                      case_sensitive=False, extra="ignore")


class _EnvironSource(EnvSettingsSource):
    """pydantic-settings' environment source reading an explicit mapping, not ``os.environ``."""

    def __init__(self, environ: dict[str, str]) -> None:
        self._environ = environ
        view = create_model("ChurnEnv", __base__=_EnvView, **{  # type: ignore[call-overload]
            name: (field.annotation | None, None) for name, field in ChurnConfig.model_fields.items()})
        super().__init__(view)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return parse_env_vars(self._environ, self.case_sensitive, self.env_ignore_empty,
                              self.env_parse_none_str)


def _unknown_env(environ: dict[str, str]) -> None:
    """A one-line :class:`ConfigError` for the first ``CHURN_*`` variable that names no config
    key, with the nearest known variable (difflib)."""
    known = [env_name(key) for key in _known_keys(ChurnConfig)]
    allowed = set(known) | set(ENV_ALIASES) | set(ENV_OTHER)
    for name in sorted(environ):
        if name.startswith(ENV_PREFIX) and name not in allowed:
            near = difflib.get_close_matches(name, known + list(ENV_ALIASES), n=1, cutoff=0.6)
            hint = f"; did you mean {near[0]}?" if near else "; see docs/configuration.md for the keys"
            raise ConfigError(f"unknown environment variable {name}{hint}")


def _env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    """The ``CHURN_*`` variables of ``environ`` as a tree of raw values (pydantic-settings:
    ``__`` nests, lists and mappings are JSON); validation happens on the merged tree."""
    _unknown_env(environ)
    env = {k: v for k, v in environ.items() if k.startswith(ENV_PREFIX) and k not in ENV_OTHER}
    for alias, dotted in ENV_ALIASES.items():
        long_name = env_name(dotted)
        if alias in env:
            env.setdefault(long_name, env[alias])
            del env[alias]
    for name, raw in env.items():
        if raw.lstrip().startswith(("[", "{")):
            try:
                json.loads(raw)
            except ValueError as exc:
                raise ConfigError(f"environment variable {name} is not valid JSON: {first_line(exc)}"
                                  ) from None
    try:
        return _EnvironSource(env)()
    except SettingsError as exc:
        raise ConfigError(f"a CHURN_* variable cannot be read: {first_line(exc)}") from None


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


class _NoAliasLoader(yaml.SafeLoader):
    """PyYAML's safe loader without aliases (``*name``): a configuration has no use for them,
    and nested aliases expand exponentially (a "billion laughs" file hangs whoever walks it)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, f"YAML aliases (*{event.anchor}) are not "
                                              "allowed in a configuration; write the value out",
                                              event.start_mark)
        return super().compose_node(parent, index)


def safe_yaml(text: str) -> Any:
    """``text`` parsed as YAML with the safe loader, aliases refused (:class:`_NoAliasLoader`)."""
    return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    try:
        data = safe_yaml(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "parse error"
        raise ConfigError(f"config file {path} is not valid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, not {data!r}")
    return data


def _validate(tree: dict[str, Any], source: str) -> ChurnConfig:
    try:
        cfg = ChurnConfig.model_validate(tree)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            raise ConfigError(
                f"unknown config key '{key}' in {source}; known keys: {', '.join(_known_keys(ChurnConfig))}"
            ) from None
        msg = " ".join(str(err["msg"]).split())
        raise ConfigError(
            f"bad value for config key '{key}' in {source}: {msg} (got {err.get('input')!r})"
        ) from None
    problem = _sense_problem(cfg)
    if problem is not None:
        raise ConfigError(f"bad value for config key '{problem[0]}' in {source}: {problem[1]}")
    return cfg


def load_config(
    path: str | Path | None = None,
    workspace: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> ChurnConfig:
    """Load the configuration from defaults, YAML, ``CHURN_*`` variables and overrides.

    ``overrides`` maps dotted keys (``"training.window_days"``) to values; ``None``
    values are ignored so CLI options left unset keep the configured value.
    """
    env = dict(os.environ if environ is None else environ)
    tree: dict[str, Any] = {}
    sources = ["defaults"]
    cfg_path = Path(path) if path else (Path(env["CHURN_CONFIG"]) if env.get("CHURN_CONFIG") else None)
    if cfg_path is None and Path("churn.yaml").is_file():
        cfg_path = Path("churn.yaml")
    if cfg_path is not None:
        if not cfg_path.is_file():
            raise ConfigError(f"config file {cfg_path} does not exist; check --config / CHURN_CONFIG")
        tree = _read_yaml(cfg_path)
        sources.append(str(cfg_path))
        _validate(tree, str(cfg_path))
    env_tree = _env_overrides(env)
    if env_tree:
        tree = _merge(tree, env_tree)
        sources.append("CHURN_* environment")
    flat = dict(overrides or {})
    if workspace not in (None, ""):
        flat["workspace"] = workspace
    for dotted, value in flat.items():
        if value is not None:
            _set_dotted(tree, dotted, value)
    return _validate(tree, " + ".join(sources + (["overrides"] if flat else [])))
