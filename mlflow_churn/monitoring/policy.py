"""The multi-trigger retraining policy: configured (``cfg.monitoring.policy``), not coded.

Input: the history of monitoring windows (:class:`WindowStats`, oldest first, the window
being decided last) and the policy config. Output: a :class:`PolicyDecision` with the
action (:class:`PolicyAction`: ``ok | investigate | retrain | blocked``), the reasons, the
features that moved, the segments whose performance dropped (``segments``, with
``segment_drops``: each one's AUC, baseline, drop and standard error) and the segments whose
inputs drifted (``drift_segments``).

Rules, in order:

1. **Integrity** (``integrity: block``): a feature missing from the current window, a day of
   the window without source rows, a null rate above the reference's by more than
   max(``max_null_increase``, its sampling noise recorded by monitoring), or serving skew (a
   feature whose sampled served values differ from their offline recomputation in more than
   ``max_serving_mismatch_rate`` of rows or with a PSI above ``max_serving_skew_psi``) -> ``blocked``
   (never retrain on broken data). Null rates are those of the model's features *and* of
   the raw source columns per day (:mod:`mlflow_churn.data.sources`: a sum over a
   column that turned null only shrinks, it does not go null). With ``integrity: warn`` it
   is only a reason.
2. **Triggers** ``metric op value`` on each window. Feature-level metrics (``psi``, ``ks``
   = KS D against the reference sample, ``js`` = Jensen-Shannon distance and ``chi2_p`` =
   chi-square p-value of the categorical features, ``segment_psi``) take ``feature`` = a
   name or ``*`` (any). For ``>`` / ``>=`` on ``psi``, ``ks``, ``segment_psi``,
   ``score_psi``, ``auc_drop`` and ``early_auc_drop`` the threshold is max(value, the
   size-aware noise level monitoring recorded for that value). A performance metric missing
   in a window (labels not matured) does not fire.
3. **Hysteresis**: once a trigger fires, it stays active until its metric falls below
   ``value x clear_below_fraction`` (above ``value / fraction`` for ``<`` / ``<=``).
4. **Persistence**: a trigger counts when it is active in at least ``required`` of the
   last ``windows`` windows (the policy's, or the trigger's own ``persistence``).
5. **Combine** the persistent triggers: ``any`` | ``all`` | ``k_of_n`` (``k``).
6. **Action**: alarm with a performance trigger (auc_drop, early_auc_drop,
   estimated_auc_drop, recall_drop, lift_drop) among the persistent ones -> ``retrain``;
   alarm on drift triggers alone -> ``drift_alone`` (``investigate`` by default, so
   PSI(monthly_usage) = 0.35 with AUC steady gives ``investigate`` naming the segments
   that moved).
7. **Segment rule** (performance): a segment whose AUC drop (``segment_auc_drop``: once
   labels mature, its realised AUC below the one of the version's first window that measured
   it; before, the label-free estimate below the segment's baseline estimate; see
   :mod:`mlflow_churn.stats.performance`) exceeds max(``segment_min_drop``, its noise level
   ``z x SE`` recorded by monitoring, ``z`` Bonferroni over the window's tested segments at
   ``monitoring.segment_alpha``) in ``required`` of the last ``windows`` windows (the policy's
   persistence, per segment, with the same hysteresis) is named in ``segments`` (the decision
   also carries its drop and SE in ``segment_drops``) and gives ``segment_action``
   (``retrain`` by default: a retrain targeted at those segments). Drift alone never names a
   segment: a segment whose PSI exceeds max(smallest PSI trigger value, its size-aware
   threshold), persistent per segment, is context (``drift_segments``); with no alarm it
   gives ``investigate``, never ``retrain``.
8. **Refresh** (``refresh_after_drift``): a version trained because performance dropped
   learnt from labels that predate the drop (labels mature ``label_horizon_days`` +
   ``holdout_days`` after their cutoff); its ``refresh_due`` tag (set by
   :mod:`mlflow_churn.monitoring.retrain`) asks for one more ``retrain`` once the training
   window holds only data from after the drop was seen.
9. **Cooldown**: a ``retrain`` within ``cooldown_days`` of the last retrain becomes
   ``investigate`` with the reason.

A stricter preset is one config line, e.g.
``triggers: [{metric: psi, value: 0.15}, {metric: auc_drop, value: 0.03}]``.

The decision is a payload monitoring writes (``decision.json``) and retrain, the alerts and
the scheduler read: it is written by :func:`decision_to_dict` and read by
:func:`decision_from_dict` only, with a ``schema_version`` (:data:`DECISION_SCHEMA_VERSION`);
a dict without one (written before it existed) is version 1, a newer version than this
release knows is a ChurnError.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Literal

from mlflow_churn.config import MonitoringConfig, PersistenceConfig, PolicyConfig, TriggerConfig
from mlflow_churn.errors import ChurnError


class PolicyAction(StrEnum):
    """What the policy asks for: ``ok`` (nothing), ``investigate`` (a person looks: drift alone,
    a cooldown), ``retrain`` (a performance trigger or the segment rule fired) or ``blocked``
    (an integrity fault: never act on broken data). A StrEnum: it equals (and is written as)
    its string, so ``monitor.action`` tags and ``decision.json`` keep their values."""

    OK = "ok"
    INVESTIGATE = "investigate"
    RETRAIN = "retrain"
    BLOCKED = "blocked"


Action = PolicyAction
#: the ``schema_version`` :func:`decision_to_dict` writes; a dict without one is version 1
DECISION_SCHEMA_VERSION = 1
PERFORMANCE_METRICS = ("auc_drop", "early_auc_drop", "estimated_auc_drop", "recall_drop", "lift_drop",
                       "segment_auc_drop")
#: the ``fired`` entry of the segment rule: ``segment_auc_drop[region=pacific] > 0.05``
SEGMENT_RULE = "segment_auc_drop"
#: the ``fired`` entry of a decision that retrains because a refresh is due
REFRESH = "refresh_after_drift"
KEYED_METRICS = ("psi", "ks", "js", "chi2_p", "segment_psi")
#: a ks trigger without a value (a PolicyConfig built outside MonitoringConfig) uses this
KS_DEFAULT = float(MonitoringConfig.model_fields["ks_threshold"].default)
_OPS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}


@dataclass
class WindowStats:
    """What monitoring measured in one window (JSON-able; stored in the run's window_stats.json).

    Per feature: ``psi`` / ``psi_threshold`` (size-aware noise level), ``ks`` (D against the
    reference sample) / ``ks_threshold``, and for categoricals ``js`` (Jensen-Shannon
    distance), ``chi2`` / ``chi2_p`` (on distinct-customer counts); per segment key
    ``column=value``: ``segment_psi`` (max PSI over the segment's features and scores),
    ``segment_threshold`` (of that feature's bin count), ``segment_features`` (the features
    that moved most); ``segment_auc_drop`` (segment baseline - AUC, realised else estimated),
    ``segment_auc_drop_threshold`` (its noise level z x SE) and ``segment_performance`` (per
    segment the :class:`~mlflow_churn.stats.performance.SegmentPerformance` as a dict: AUC,
    recall@k, revenue lift, the estimate, each with its SE, the baseline, or why a number is
    missing). Performance drops are absolute (e.g. val_auc - realised AUC), ``None``
    when not measurable yet; ``*_threshold`` are their noise levels. Integrity: feature
    ``null_rate`` / ``ref_null_rate`` / ``null_threshold`` (noise of the rise) and the same
    for the raw ``source_*`` columns (highest daily null rate of the window), ``missing_days``.
    """

    as_of: datetime
    psi: dict[str, float] = field(default_factory=dict)
    ks: dict[str, float] = field(default_factory=dict)
    js: dict[str, float] = field(default_factory=dict)
    chi2: dict[str, float] = field(default_factory=dict)
    chi2_p: dict[str, float] = field(default_factory=dict)
    psi_threshold: dict[str, float] = field(default_factory=dict)
    ks_threshold: dict[str, float] = field(default_factory=dict)
    score_psi: float | None = None
    score_psi_threshold: float | None = None
    segment_psi: dict[str, float] = field(default_factory=dict)
    segment_threshold: dict[str, float] = field(default_factory=dict)
    segment_features: dict[str, list[str]] = field(default_factory=dict)
    auc_drop: float | None = None
    early_auc_drop: float | None = None
    estimated_auc_drop: float | None = None
    recall_drop: float | None = None
    lift_drop: float | None = None
    realised_auc: float | None = None
    realised_auc_unseen: float | None = None
    auc_baseline: float | None = None
    auc_baseline_se: float | None = None
    auc_drop_threshold: float | None = None
    early_auc: float | None = None
    early_auc_baseline: float | None = None
    early_auc_drop_threshold: float | None = None
    segment_auc_drop: dict[str, float] = field(default_factory=dict)
    segment_auc_drop_threshold: dict[str, float] = field(default_factory=dict)
    segment_performance: dict[str, dict[str, Any]] = field(default_factory=dict)
    null_rate: dict[str, float] = field(default_factory=dict)
    ref_null_rate: dict[str, float] = field(default_factory=dict)
    null_threshold: dict[str, float] = field(default_factory=dict)
    source_null_rate: dict[str, float] = field(default_factory=dict)
    ref_source_null_rate: dict[str, float] = field(default_factory=dict)
    source_null_threshold: dict[str, float] = field(default_factory=dict)
    missing_days: list[str] = field(default_factory=list)
    missing_features: list[str] = field(default_factory=list)
    #: where the window's rows came from (served: the prediction log; offline: recomputed) and why
    source: str = "offline"
    source_reason: str = ""
    #: serving-skew check (monitoring.served): per feature the share of sampled served values that
    #: differ from their offline recomputation, and the PSI served vs recomputed; rows compared;
    #: the oldest checked values' age (hours between their computation and the request)
    serving_mismatch_rate: dict[str, float] = field(default_factory=dict)
    serving_skew_psi: dict[str, float] = field(default_factory=dict)
    serving_skew_rows: int | None = None
    serving_values_age_hours: float | None = None
    model_version: str | None = None
    retrained: bool = False

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["as_of"] = self.as_of.isoformat()
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WindowStats:
        d = dict(data)
        d["as_of"] = datetime.fromisoformat(d["as_of"]) if isinstance(d["as_of"], str) else d["as_of"]
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class TriggerStatus:
    """One trigger in the newest window: ``fired`` (persistent, counts for the decision),
    ``pending`` (active now, not yet in enough windows) or ``quiet``."""

    trigger: str
    state: Literal["fired", "pending", "quiet"]
    hits: int  # windows of the persistence span in which it was active
    windows: int  # the span looked at (<= persistence.windows: fewer in a short history)
    required: int
    values: dict[str, float]  # the newest window's values (active keys, else the largest), top 5
    limits: dict[str, float]  # their effective thresholds (max(value, recorded noise))


@dataclass
class SegmentDrop:
    """A segment the segment rule named: its AUC in the newest window against its baseline."""

    segment: str  # column=value
    source: str  # "realised" (matured labels) | "estimated" (label-free CBPE, before labels mature)
    auc: float
    baseline: float  # what the AUC is compared with (the reference of the stats' segment_performance)
    #: realised: "first window" (its AUC in the version's first window that measured it);
    #: estimated: "training estimate" or "first window estimate"
    baseline_source: str
    drop: float  # baseline - auc
    se: float  # standard error of the drop
    z: float  # the noise level is z x se (Bonferroni over the window's tested segments)
    limit: float  # what it exceeded: max(policy.segment_min_drop, z x se)
    hits: int  # windows of the persistence span in which it was beyond
    windows: int


@dataclass
class PolicyDecision:
    """The policy's verdict on the newest window."""

    action: Action
    reasons: list[str]
    features: list[str]
    segments: list[str]
    fired: list[str]
    as_of: datetime
    triggers: list[TriggerStatus] = field(default_factory=list)
    #: segments beyond their threshold now but not yet in enough windows -> PSI now
    pending_segments: dict[str, float] = field(default_factory=dict)
    #: the segments of ``segments`` (same order): AUC, baseline, drop and its standard error
    segment_drops: list[SegmentDrop] = field(default_factory=list)
    #: segments whose PSI moved beyond their threshold in enough windows (context, never named)
    drift_segments: list[str] = field(default_factory=list)
    #: segments whose AUC dropped beyond their noise now, not yet in enough windows -> drop now
    pending_drops: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """:func:`decision_to_dict` of this decision."""
        return decision_to_dict(self)


def decision_to_dict(decision: PolicyDecision) -> dict[str, Any]:
    """The JSON-able payload of ``decision`` (``as_of`` in ISO 8601, ``schema_version``
    :data:`DECISION_SCHEMA_VERSION`): the one way a policy decision is written."""
    out = asdict(decision)
    out["as_of"] = decision.as_of.isoformat()
    out["schema_version"] = DECISION_SCHEMA_VERSION
    return out


def decision_from_dict(data: Mapping[str, Any]) -> PolicyDecision:
    """The :class:`PolicyDecision` of a payload :func:`decision_to_dict` wrote: the one way a
    policy decision is read. A payload without ``schema_version`` is version 1 (written
    before the field existed); lists and nested records missing from it are empty. ChurnError
    on a newer schema version than this release knows, a missing ``action`` or ``as_of``, or
    an unknown action."""
    version = data.get("schema_version", 1)
    if not isinstance(version, int) or version < 1:
        raise ChurnError(f"policy decision: schema_version {version!r} is not a positive integer")
    if version > DECISION_SCHEMA_VERSION:
        raise ChurnError(f"policy decision has schema_version {version}, newer than the "
                         f"{DECISION_SCHEMA_VERSION} this release reads; upgrade mlflow-churn")
    missing = [k for k in ("action", "as_of") if data.get(k) is None]
    if missing:
        raise ChurnError(f"policy decision lacks {', '.join(missing)}; not a decision.json 'decision'")
    try:
        action = PolicyAction(data["action"])
    except ValueError:
        raise ChurnError(f"policy decision: unknown action {data['action']!r}; expected one of "
                         f"{', '.join(PolicyAction)}") from None
    as_of = data["as_of"]
    return PolicyDecision(
        action=action,
        reasons=list(data.get("reasons") or []),
        features=list(data.get("features") or []),
        segments=list(data.get("segments") or []),
        fired=list(data.get("fired") or []),
        as_of=datetime.fromisoformat(as_of) if isinstance(as_of, str) else as_of,
        triggers=[TriggerStatus(**t) for t in data.get("triggers") or []],
        pending_segments=dict(data.get("pending_segments") or {}),
        segment_drops=[SegmentDrop(**d) for d in data.get("segment_drops") or []],
        drift_segments=list(data.get("drift_segments") or []),
        pending_drops=dict(data.get("pending_drops") or {}),
    )


def _trigger_name(t: TriggerConfig) -> str:
    """``metric[feature] op value`` (stable, for reasons and MLflow tags)."""
    feat = f"[{t.feature}]" if t.metric in KEYED_METRICS else ""
    return f"{t.metric}{feat} {t.op} {t.value:g}"


def _keyed(w: WindowStats, metric: str) -> tuple[dict[str, float], dict[str, float]]:
    """(values, recorded noise thresholds) of a feature-level metric."""
    return {
        "psi": (w.psi, w.psi_threshold), "ks": (w.ks, w.ks_threshold), "js": (w.js, {}),
        "chi2_p": (w.chi2_p, {}), "segment_psi": (w.segment_psi, w.segment_threshold),
    }[metric]


#: scalar metric -> the WindowStats field holding its recorded noise threshold
_SCALAR_NOISE = {"score_psi": "score_psi_threshold", "auc_drop": "auc_drop_threshold",
                 "early_auc_drop": "early_auc_drop_threshold"}


def _values(w: WindowStats, t: TriggerConfig) -> dict[str, tuple[float, float]]:
    """key -> (metric value, effective threshold) for trigger ``t`` in window ``w``."""
    raising = t.op in (">", ">=")
    value = float(t.value if t.value is not None else KS_DEFAULT)
    if t.metric in KEYED_METRICS:
        table, thr = _keyed(w, t.metric)
        if t.feature == "*":
            keys = list(table)
        elif t.metric == "segment_psi":
            keys = [k for k in table if k == t.feature or k.split("=")[0] == t.feature]
        else:
            keys = [t.feature] if t.feature in table else []
        out = {}
        for k in keys:
            v = table[k]
            if v is None or v != v:
                continue
            limit = max(value, thr.get(k, value)) if raising else value
            out[k] = (float(v), float(limit))
        return out
    v = getattr(w, t.metric)
    noise = getattr(w, _SCALAR_NOISE[t.metric]) if t.metric in _SCALAR_NOISE else None
    limit = max(value, noise) if raising and noise is not None else value
    return {} if v is None or v != v else {t.metric: (float(v), float(limit))}


def _cleared(value: float, limit: float, op: str, fraction: float) -> bool:
    if op in (">", ">="):
        return value < limit * fraction
    return value > limit / fraction


def _active_keys(history: Sequence[WindowStats], t: TriggerConfig, fraction: float) -> list[dict[str, float]]:
    """Per window, the keys for which trigger ``t`` is active (with hysteresis) -> value."""
    return _active_per_window(history, lambda w: _values(w, t), t.op, fraction)


def _active_per_window(history: Sequence[WindowStats],
                       values: Callable[[WindowStats], dict[str, tuple[float, float]]], op: str,
                       fraction: float) -> list[dict[str, float]]:
    """Per window, the keys whose ``values(window)`` (key -> (value, limit)) are beyond their
    limit by ``op``, or still are by hysteresis (active before and not cleared) -> value."""
    compare = _OPS[op]
    active: dict[str, float] = {}
    out = []
    for w in history:
        now: dict[str, float] = {}
        for key, (v, limit) in values(w).items():
            if compare(v, limit) or (key in active and not _cleared(v, limit, op, fraction)):
                now[key] = v
        active = now
        out.append(dict(now))
    return out


def _null_faults(w: WindowStats, cfg: PolicyConfig) -> dict[str, str]:
    """column -> fault text for null rates risen beyond max(max_null_increase, noise)."""
    out = {}
    for rates, refs, noise, what in ((w.null_rate, w.ref_null_rate, w.null_threshold, "feature"),
                                     (w.source_null_rate, w.ref_source_null_rate,
                                      w.source_null_threshold, "source column")):
        for col, rate in sorted(rates.items()):
            ref = refs.get(col, 0.0)
            allowed = max(cfg.max_null_increase, noise.get(col, 0.0))
            if rate - ref > allowed:
                out[col] = (f"null rate of {what} '{col}' rose from {ref:.1%} to {rate:.1%} "
                            f"(> +{allowed:.1%}: policy.max_null_increase or sampling noise)")
    return out


def _serving_skew_faults(w: WindowStats, cfg: PolicyConfig) -> tuple[list[str], list[str]]:
    """(fault texts, features) of served values that differ from their offline recomputation."""
    rate, psi = w.serving_mismatch_rate, w.serving_skew_psi
    bad = sorted((f for f in set(rate) | set(psi) if rate.get(f, 0.0) > cfg.max_serving_mismatch_rate
                  or psi.get(f, 0.0) > cfg.max_serving_skew_psi), key=lambda f: (-rate.get(f, 0.0), f))
    if not bad:
        return [], []
    shown = ", ".join(f"{f} {rate.get(f, 0.0):.0%} (PSI {psi.get(f, 0.0):.2f})" for f in bad[:5])
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    age = w.serving_values_age_hours
    why = (f"; the served values were computed up to {age / 24:.1f} days before their requests: is "
           "materialization running?" if age is not None and age > 24 else "")
    return [f"serving skew: {len(bad)} feature(s) served with values that differ from their offline "
            f"recomputation in {w.serving_skew_rows} sampled rows: {shown}{more} (limits: "
            f"policy.max_serving_mismatch_rate {cfg.max_serving_mismatch_rate:.1%}, "
            f"policy.max_serving_skew_psi {cfg.max_serving_skew_psi:g}){why}"], bad


def _integrity(w: WindowStats, cfg: PolicyConfig) -> tuple[list[str], list[str]]:
    """(fault texts, columns at fault) of window ``w``."""
    nulls = _null_faults(w, cfg)
    skew, skewed = _serving_skew_faults(w, cfg)
    faults = [f"feature '{f}' missing from the current window" for f in w.missing_features]
    faults += [f"no source rows on {d}" for d in w.missing_days]
    faults += list(nulls.values()) + skew
    cols = sorted(set(w.missing_features) | set(skewed)
                  | {c.split(".", 1)[-1] if c.startswith("activity.") else c for c in nulls})
    return faults, cols


def _last_retrain(history: Sequence[WindowStats], last_retrain: datetime | None) -> datetime | None:
    times = [w.as_of for w in history if w.retrained]
    if last_retrain is not None:
        times.append(last_retrain)
    return max(times) if times else None


def decide(
    history: Sequence[WindowStats | Mapping[str, Any]],
    policy_cfg: PolicyConfig,
    as_of: datetime,
    last_retrain: datetime | None = None,
    refresh_due: datetime | None = None,
) -> PolicyDecision:
    """Decide on the newest window of ``history`` (oldest first) at ``as_of`` (UTC).

    ``last_retrain``: time of the last retrain when the history does not show it (e.g. the
    model version's training as_of). ``refresh_due``: the version's ``refresh_due`` tag.
    See the module doc for the rules.
    """
    if not history:
        raise ChurnError("policy needs at least one monitoring window in the history")
    if as_of.tzinfo is None:
        raise ChurnError(f"as_of must be timezone-aware (UTC), got {as_of.isoformat()}")
    wins = [w if isinstance(w, WindowStats) else WindowStats.from_dict(w) for w in history]
    cur = wins[-1]
    reasons: list[str] = []

    faults, fault_cols = _integrity(cur, policy_cfg)
    if faults and policy_cfg.integrity == "block":
        return PolicyDecision(PolicyAction.BLOCKED, [f"integrity: {f}" for f in faults], fault_cols, [], [],
                              as_of)
    reasons += [f"integrity warning: {f}" for f in faults]

    frac = policy_cfg.hysteresis.clear_below_fraction
    persistent: list[TriggerConfig] = []
    features: set[str] = set()
    statuses: list[TriggerStatus] = []
    for t in policy_cfg.triggers:
        per_window = _active_keys(wins, t, frac)[-_persistence(t, policy_cfg).windows:]
        hits = sum(1 for keys in per_window if keys)
        now = per_window[-1]
        required = _persistence(t, policy_cfg).required
        statuses.append(_status(cur, t, now, hits, len(per_window), required))
        if hits >= required and now:
            persistent.append(t)
            shown = ", ".join(f"{k}={v:.3f}" for k, v in sorted(now.items(), key=lambda kv: -kv[1])[:5])
            reasons.append(f"{_trigger_name(t)} in {hits} of the last {len(per_window)} windows ({shown})")
            if t.metric in ("psi", "ks", "js", "chi2_p"):
                features |= set(now)
        elif now:
            reasons.append(
                f"{_trigger_name(t)} fired but only in {hits} of the last "
                f"{len(per_window)} windows (need {required})"
            )

    moved, pending_segments, seg_reasons = _moved_segments(wins, policy_cfg)
    reasons += seg_reasons
    for key in moved:
        features |= set(cur.segment_features.get(key, [])[:3])
    drops, pending_drops, drop_reasons = _dropped_segments(wins, policy_cfg)
    reasons += drop_reasons

    k = {"any": 1, "all": len(policy_cfg.triggers), "k_of_n": policy_cfg.k}[policy_cfg.combine]
    alarm = len(persistent) >= max(k, 1) and bool(policy_cfg.triggers)
    drift_list = [s for s, _ in sorted(moved.items(), key=lambda kv: -kv[1])]
    seg_list = [d.segment for d in drops]
    fired = [_trigger_name(t) for t in persistent]
    if not alarm:
        if persistent:
            reasons.append(f"{len(persistent)} trigger(s) persistent, combine={policy_cfg.combine} needs {k}")
        action = PolicyAction.INVESTIGATE if (drift_list or faults) else PolicyAction.OK
        if drift_list:
            reasons.append("segments drifted (PSI) beyond their size-aware threshold, their performance not "
                           "shown to drop (context, not the segment rule): " + ", ".join(drift_list[:5]))
    elif any(t.metric in PERFORMANCE_METRICS for t in persistent):
        action = PolicyAction.RETRAIN
    else:
        action = PolicyAction(policy_cfg.drift_alone)
        reasons.append(f"drift without evidence of lost performance -> {action} (policy.drift_alone)")
    if drops:
        fired += [f"{SEGMENT_RULE}[{d.segment}] > {policy_cfg.segment_min_drop:g}" for d in drops]
        if action != PolicyAction.RETRAIN:
            action = PolicyAction(policy_cfg.segment_action)
        reasons.append(f"segment rule: performance dropped beyond noise in {', '.join(seg_list[:5])} -> "
                       f"{policy_cfg.segment_action} (policy.segment_action)")
    refresh_now = policy_cfg.refresh_after_drift and refresh_due is not None and as_of >= refresh_due
    if action != PolicyAction.RETRAIN and refresh_now:
        action = PolicyAction.RETRAIN
        fired.append(REFRESH)
        reasons.append(f"refresh due since {refresh_due.isoformat()}: this version learnt from labels "
                       "before the performance drop; the training window now holds only later data "
                       "(policy.refresh_after_drift)")
    if action == PolicyAction.RETRAIN:
        last = _last_retrain(wins[:-1], last_retrain)
        if last is not None and as_of - last < timedelta(days=policy_cfg.cooldown_days):
            reasons.append(
                f"cooldown: last retrain {last.isoformat()} is within "
                f"{policy_cfg.cooldown_days} days -> investigate"
            )
            action = PolicyAction.INVESTIGATE
    return PolicyDecision(action, reasons or ["no trigger fired"], sorted(features), seg_list, fired, as_of,
                          statuses, pending_segments, drops, drift_list, pending_drops)


def _status(w: WindowStats, t: TriggerConfig, now: dict[str, float], hits: int, windows: int,
            required: int) -> TriggerStatus:
    """What trigger ``t`` looks like in window ``w`` (the values shown: the active keys, else the
    largest values, so a quiet trigger still says how far it is from firing)."""
    vals = _values(w, t)
    raising = t.op in (">", ">=")
    keys = sorted(now, key=lambda k: -now[k]) if now else sorted(
        vals, key=lambda k: -vals[k][0] if raising else vals[k][0])
    keys = keys[:5]
    state = "fired" if now and hits >= required else ("pending" if now else "quiet")
    return TriggerStatus(_trigger_name(t), state, hits, windows, required,
                         {k: vals[k][0] for k in keys if k in vals},
                         {k: vals[k][1] for k in keys if k in vals})


def _persistence(t: TriggerConfig, cfg: PolicyConfig) -> PersistenceConfig:
    return t.persistence or cfg.persistence


def psi_floor(cfg: PolicyConfig) -> float:
    """The smallest PSI / segment-PSI trigger value (0.2 without one): the level a segment must
    exceed (besides its noise threshold) to count as moved."""
    return min((t.value for t in cfg.triggers if t.metric in ("psi", "segment_psi") and t.value is not None),
               default=0.2)


def _moved_segments(
    wins: Sequence[WindowStats], cfg: PolicyConfig
) -> tuple[dict[str, float], dict[str, float], list[str]]:
    """Segments whose PSI exceeds max(smallest PSI trigger value, their noise threshold) with
    hysteresis and, per segment, the policy's persistence -> (moved: key -> PSI now, pending:
    key -> PSI now, reasons). Pending segments make one reason per persistence count, naming
    the top movers and how many more, not one clause per segment."""
    rule = TriggerConfig(metric="segment_psi", feature="*", op=">", value=psi_floor(cfg))
    per_window = _active_keys(wins, rule, cfg.hysteresis.clear_below_fraction)[-cfg.persistence.windows:]
    moved, pending, by_hits = {}, {}, {}
    for key, value in per_window[-1].items():
        hits = sum(1 for keys in per_window if key in keys)
        if hits >= cfg.persistence.required:
            moved[key] = value
        else:
            pending[key] = value
            by_hits.setdefault(hits, []).append(key)
    reasons = []
    for hits, keys in sorted(by_hits.items()):
        keys.sort(key=lambda k: -pending[k])
        top = ", ".join(f"{k} moved (PSI {pending[k]:.3f})" for k in keys[:5])
        more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
        reasons.append(f"{len(keys)} segment(s) moved but only in {hits} of the last {len(per_window)} "
                       f"windows (need {cfg.persistence.required}): {top}{more}")
    return moved, pending, reasons


def _segment_drop_values(w: WindowStats, min_drop: float) -> dict[str, tuple[float, float]]:
    """segment -> (AUC drop, limit = max(min_drop, its recorded noise level)) in window ``w``."""
    out = {}
    for key, drop in w.segment_auc_drop.items():
        if drop is None or not math.isfinite(drop):
            continue
        noise = w.segment_auc_drop_threshold.get(key)
        limit = max(min_drop, noise) if noise is not None and math.isfinite(noise) else min_drop
        out[key] = (float(drop), float(limit))
    return out


def _segment_drop(w: WindowStats, key: str, hits: int, windows: int, cfg: PolicyConfig) -> SegmentDrop:
    """The :class:`SegmentDrop` of segment ``key`` in window ``w`` (from its recorded performance)."""
    perf = w.segment_performance.get(key, {})
    drop, limit = _segment_drop_values(w, cfg.segment_min_drop)[key]
    source = perf.get("source") or "realised"
    auc = perf.get("auc" if source == "realised" else "estimated_auc")
    base = perf.get("reference")
    nan = float("nan")
    return SegmentDrop(segment=key, source=source, auc=nan if auc is None else float(auc),
                       baseline=nan if base is None else float(base),
                       baseline_source=perf.get("reference_source") or "", drop=drop,
                       se=float(perf.get("drop_se") or nan), z=float(perf.get("z") or nan), limit=limit,
                       hits=hits, windows=windows)


def _drop_text(d: SegmentDrop) -> str:
    """``region=pacific: realised AUC 0.712 vs 0.795 (first window), drop 0.083 (SE 0.021)``."""
    return (f"{d.segment}: {d.source} AUC {d.auc:.3f} vs {d.baseline:.3f} ({d.baseline_source}), "
            f"drop {d.drop:.3f} (SE {d.se:.3f})")


def _dropped_segments(
    wins: Sequence[WindowStats], cfg: PolicyConfig
) -> tuple[list[SegmentDrop], dict[str, float], list[str]]:
    """The segment rule (module doc, rule 7): segments whose AUC drop exceeds max(
    ``segment_min_drop``, its noise level) with hysteresis and, per segment, the policy's
    persistence -> (named, largest drop first; pending: key -> drop now; reasons)."""
    per_window = _active_per_window(wins, lambda w: _segment_drop_values(w, cfg.segment_min_drop), ">",
                                    cfg.hysteresis.clear_below_fraction)[-cfg.persistence.windows:]
    named: list[SegmentDrop] = []
    pending: dict[str, float] = {}
    for key, value in sorted(per_window[-1].items(), key=lambda kv: -kv[1]):
        hits = sum(1 for keys in per_window if key in keys)
        if hits >= cfg.persistence.required:
            named.append(_segment_drop(wins[-1], key, hits, len(per_window), cfg))
        else:
            pending[key] = value
    reasons = [f"segment {_drop_text(d)} > {d.limit:.3f} (the larger of policy.segment_min_drop "
               f"{cfg.segment_min_drop:g} and {d.z:.2f} x SE) in {d.hits} of the last {d.windows} windows"
               for d in named]
    if pending:
        cur, n = wins[-1], len(per_window)
        shown = ", ".join(_drop_text(_segment_drop(cur, k, 1, n, cfg)) for k in list(pending)[:5])
        more = f" and {len(pending) - 5} more" if len(pending) > 5 else ""
        reasons.append(f"{len(pending)} segment(s) dropped beyond noise but not yet in "
                       f"{cfg.persistence.required} of the last {len(per_window)} windows: {shown}{more}")
    return named, pending, reasons
