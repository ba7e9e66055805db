"""The multi-trigger retraining policy: configured (``cfg.monitoring.policy``), not coded.

Input: the history of monitoring windows (:class:`WindowStats`, oldest first, the window
being decided last) and the policy config. Output: a :class:`PolicyDecision` with the
action ``ok | investigate | retrain | blocked``, the reasons, and the features and
segments that moved.

Rules, in order:

1. **Integrity** (``integrity: block``): a feature missing from the current window, or a
   null rate above the reference's by more than ``max_null_increase`` -> ``blocked``
   (never retrain on broken data). With ``integrity: warn`` it is only a reason.
2. **Triggers** ``metric op value`` on each window. Feature-level metrics (``psi``, ``ks``,
   ``segment_psi``) take ``feature`` = a name or ``*`` (any). For PSI metrics and ``>``
   / ``>=``, the threshold is the size-aware one recorded by monitoring
   (max(value, noise quantile), :func:`mlflow_churn.monitoring.drift.psi_threshold`).
   A performance metric missing in a window (labels not matured) does not fire; for
   ``auc_drop`` the threshold is likewise max(value, the noise level of the AUC
   difference recorded by monitoring, ``auc_drop_threshold``).
3. **Hysteresis**: once a trigger fires, it stays active until its metric falls below
   ``value x clear_below_fraction`` (above ``value / fraction`` for ``<`` / ``<=``).
4. **Persistence**: a trigger counts when it is active in at least ``required`` of the
   last ``windows`` windows.
5. **Combine** the persistent triggers: ``any`` | ``all`` | ``k_of_n`` (``k``).
6. **Action**: alarm with a performance trigger (auc_drop, estimated_auc_drop,
   recall_drop, lift_drop) among the persistent ones -> ``retrain``; alarm on drift
   triggers alone -> ``drift_alone`` (``investigate`` by default, so PSI(monthly_usage)
   = 0.35 with AUC steady gives ``investigate`` naming the segments that moved).
7. **Cooldown**: a ``retrain`` within ``cooldown_days`` of the last retrain becomes
   ``investigate`` with the reason.

A stricter preset is one config line, e.g.
``triggers: [{metric: psi, value: 0.15}, {metric: auc_drop, value: 0.03}]``.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from mlflow_churn.config import PolicyConfig, TriggerConfig
from mlflow_churn.errors import ChurnError

Action = Literal["ok", "investigate", "retrain", "blocked"]
PERFORMANCE_METRICS = ("auc_drop", "estimated_auc_drop", "recall_drop", "lift_drop")
KEYED_METRICS = ("psi", "ks", "segment_psi")
_OPS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}


@dataclass
class WindowStats:
    """What monitoring measured in one window (JSON-able; stored in the run's decision.json).

    ``psi`` / ``ks`` / ``psi_threshold``: per feature; ``segment_psi`` /
    ``segment_threshold``: per segment key ``column=value`` (max PSI over the segment's
    features and scores); performance drops are absolute (e.g. val_auc - realised AUC),
    ``None`` when not measurable yet. ``segment_features`` names the features that moved
    most in each segment.
    """

    as_of: datetime
    psi: dict[str, float] = field(default_factory=dict)
    ks: dict[str, float] = field(default_factory=dict)
    psi_threshold: dict[str, float] = field(default_factory=dict)
    score_psi: float | None = None
    score_psi_threshold: float | None = None
    segment_psi: dict[str, float] = field(default_factory=dict)
    segment_threshold: dict[str, float] = field(default_factory=dict)
    segment_features: dict[str, list[str]] = field(default_factory=dict)
    auc_drop: float | None = None
    estimated_auc_drop: float | None = None
    recall_drop: float | None = None
    lift_drop: float | None = None
    realised_auc: float | None = None
    auc_baseline: float | None = None
    auc_drop_threshold: float | None = None
    null_rate: dict[str, float] = field(default_factory=dict)
    ref_null_rate: dict[str, float] = field(default_factory=dict)
    missing_features: list[str] = field(default_factory=list)
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
class PolicyDecision:
    """The policy's verdict on the newest window."""

    action: Action
    reasons: list[str]
    features: list[str]
    segments: list[str]
    fired: list[str]
    as_of: datetime

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["as_of"] = self.as_of.isoformat()
        return out


def trigger_name(t: TriggerConfig) -> str:
    """``metric[feature] op value`` (stable, for reasons and MLflow tags)."""
    feat = f"[{t.feature}]" if t.metric in KEYED_METRICS else ""
    return f"{t.metric}{feat} {t.op} {t.value:g}"


def _values(w: WindowStats, t: TriggerConfig) -> dict[str, tuple[float, float]]:
    """key -> (metric value, effective threshold) for trigger ``t`` in window ``w``."""
    raising = t.op in (">", ">=")
    if t.metric in ("psi", "ks", "segment_psi"):
        table = {"psi": w.psi, "ks": w.ks, "segment_psi": w.segment_psi}[t.metric]
        thr = {"psi": w.psi_threshold, "segment_psi": w.segment_threshold}.get(t.metric, {})
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
            limit = max(t.value, thr.get(k, t.value)) if raising else t.value
            out[k] = (float(v), float(limit))
        return out
    if t.metric == "score_psi":
        if w.score_psi is None:
            return {}
        limit = max(t.value, w.score_psi_threshold or t.value) if raising else t.value
        return {"score": (float(w.score_psi), float(limit))}
    value = getattr(w, t.metric)
    limit = t.value
    if t.metric == "auc_drop" and raising and w.auc_drop_threshold is not None:
        limit = max(t.value, w.auc_drop_threshold)
    return {} if value is None else {t.metric: (float(value), float(limit))}


def _cleared(value: float, limit: float, t: TriggerConfig, fraction: float) -> bool:
    if t.op in (">", ">="):
        return value < limit * fraction
    return value > limit / fraction


def _active_keys(history: Sequence[WindowStats], t: TriggerConfig, fraction: float) -> list[dict[str, float]]:
    """Per window, the keys for which trigger ``t`` is active (with hysteresis) -> value."""
    op = _OPS[t.op]
    active: dict[str, float] = {}
    out = []
    for w in history:
        vals = _values(w, t)
        now: dict[str, float] = {}
        for key, (v, limit) in vals.items():
            if op(v, limit) or (key in active and not _cleared(v, limit, t, fraction)):
                now[key] = v
        active = now
        out.append(dict(now))
    return out


def _integrity(w: WindowStats, cfg: PolicyConfig) -> list[str]:
    faults = [f"feature '{f}' missing from the current window" for f in w.missing_features]
    for f, rate in sorted(w.null_rate.items()):
        ref = w.ref_null_rate.get(f, 0.0)
        if rate - ref > cfg.max_null_increase:
            faults.append(f"null rate of '{f}' rose from {ref:.1%} to {rate:.1%} "
                          f"(> +{cfg.max_null_increase:.1%})")
    return faults


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
) -> PolicyDecision:
    """Decide on the newest window of ``history`` (oldest first) at ``as_of`` (UTC).

    ``last_retrain``: time of the last retrain when the history does not show it (e.g. the
    model version's training as_of). See the module doc for the rules.
    """
    if not history:
        raise ChurnError("policy needs at least one monitoring window in the history")
    if as_of.tzinfo is None:
        raise ChurnError(f"as_of must be timezone-aware (UTC), got {as_of.isoformat()}")
    wins = [w if isinstance(w, WindowStats) else WindowStats.from_dict(w) for w in history]
    cur = wins[-1]
    reasons: list[str] = []

    faults = _integrity(cur, policy_cfg)
    if faults and policy_cfg.integrity == "block":
        return PolicyDecision(
            "blocked",
            [f"integrity: {f}" for f in faults],
            sorted(
                set(cur.missing_features)
                | {
                    f
                    for f, r in cur.null_rate.items()
                    if r - cur.ref_null_rate.get(f, 0.0) > policy_cfg.max_null_increase
                }
            ),
            [],
            [],
            as_of,
        )
    reasons += [f"integrity warning: {f}" for f in faults]

    n, required = policy_cfg.persistence.windows, policy_cfg.persistence.required
    frac = policy_cfg.hysteresis.clear_below_fraction
    persistent: list[TriggerConfig] = []
    features: set[str] = set()
    segments: dict[str, float] = {}
    for t in policy_cfg.triggers:
        per_window = _active_keys(wins, t, frac)[-n:]
        hits = sum(1 for keys in per_window if keys)
        now = per_window[-1]
        if hits >= required and now:
            persistent.append(t)
            shown = ", ".join(f"{k}={v:.3f}" for k, v in sorted(now.items(), key=lambda kv: -kv[1])[:5])
            reasons.append(f"{trigger_name(t)} in {hits} of the last {len(per_window)} windows ({shown})")
            if t.metric in ("psi", "ks"):
                features |= set(now)
            if t.metric == "segment_psi":
                segments.update(now)
        elif now:
            reasons.append(
                f"{trigger_name(t)} fired but only in {hits} of the last "
                f"{len(per_window)} windows (need {required})"
            )

    # the segments that moved (beyond their noise level and the smallest PSI trigger value),
    # whatever trigger fired: the evidence behind investigate
    floor = min((t.value for t in policy_cfg.triggers if t.metric in ("psi", "segment_psi")), default=0.2)
    for key, v in cur.segment_psi.items():
        if v is not None and v == v and v > max(floor, cur.segment_threshold.get(key, float("inf"))):
            segments.setdefault(key, v)
    for key in segments:
        features |= set(cur.segment_features.get(key, [])[:3])

    k = {"any": 1, "all": len(policy_cfg.triggers), "k_of_n": policy_cfg.k}[policy_cfg.combine]
    alarm = len(persistent) >= max(k, 1) and bool(policy_cfg.triggers)
    seg_list = [s for s, _ in sorted(segments.items(), key=lambda kv: -kv[1])]
    fired = [trigger_name(t) for t in persistent]
    if not alarm:
        if persistent:
            reasons.append(f"{len(persistent)} trigger(s) persistent, combine={policy_cfg.combine} needs {k}")
        action: Action = "investigate" if (seg_list and not faults) else "ok"
        if action == "investigate":
            reasons.append("segments moved beyond their size-aware threshold: " + ", ".join(seg_list[:5]))
        if faults:
            action = "investigate"
        return PolicyDecision(
            action, reasons or ["no trigger fired"], sorted(features), seg_list, fired, as_of
        )

    perf = [t for t in persistent if t.metric in PERFORMANCE_METRICS]
    if perf:
        action = "retrain"
    else:
        action = policy_cfg.drift_alone
        reasons.append(f"drift without evidence of lost performance -> {action} (policy.drift_alone)")
    if action == "retrain":
        last = _last_retrain(wins[:-1], last_retrain)
        if last is not None and as_of - last < timedelta(days=policy_cfg.cooldown_days):
            reasons.append(
                f"cooldown: last retrain {last.isoformat()} is within "
                f"{policy_cfg.cooldown_days} days -> investigate"
            )
            action = "investigate"
    return PolicyDecision(action, reasons, sorted(features), seg_list, fired, as_of)
