"""Alarms of a canary rollout: hard limits on the last few minutes of each arm's traffic.

The judge (:mod:`mlflow_churn.serving.judge`) decides slowly and carefully, once a step has
baked; an alarm is the fast guard beside it. On every controller tick
(:func:`mlflow_churn.serving.rollout.tick`) of a running or paused rollout,
:func:`check_rollout` reads the prediction log **once** (the rows served, wall clock, in the
last ``canary.alarms.window``), splits it into the champion arm (route ``champion``, the
champion's version) and the canary arm (route ``canary``, or ``shadow`` in shadow mode, the
canary's version: :func:`~mlflow_churn.serving.canary.arm_routes`; forced test requests in
neither), and :func:`check_alarms` (pure) compares them:

- ``error_rate``: the canary's (rows with status ``error`` / its rows) above
  ``max_error_rate`` and above the champion's + ``error_rate_margin``;
- ``p99_latency_ms``: the canary's above ``max_p99_ms`` and above ``max_p99_ratio`` x the
  champion's;
- ``mean_score``: the canary's mean P(churn) outside ``[score_min_mean, score_max_mean]``
  (either bound optional);
- ``score_psi``: the PSI of the canary's scores against the champion's
  (:func:`mlflow_churn.stats.drift.psi`) above ``max_score_psi`` + the PSI the gate measured
  between the two versions (:func:`~mlflow_churn.serving.canary.gate_score_psi`), and never
  below the PSI sampling noise alone gives at these counts
  (:func:`mlflow_churn.stats.drift.psi_threshold`).

An alarm may fire only when the canary arm served ``min_requests`` rows in the window (the
score PSI needs that many scored rows in both arms): with fewer it is ``nodata``, which is
never a breach. A champion arm without rows leaves only the absolute limits (nothing says the
host is at fault). A breach rolls the canary back at once (the controller, no bake, no judge)
and raises the alert ``ChurnCanaryAlarm`` (:func:`raise_alarm`, condition
``canary_alarm:<model>``, labels model, version, metric) on the project's alert path
(:mod:`mlflow_churn.alerts`); it is resolved (:func:`clear_alarm`) when the model's next
rollout starts or a rollout ends in a promotion.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

import numpy as np
import pandas as pd
from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

from mlflow_churn.alerts import fire, outbox_path, resolve
from mlflow_churn.config import ChurnConfig
from mlflow_churn.jsonable import jsonable
from mlflow_churn.registry.aliases import CANARY, CHAMPION, alias_version
from mlflow_churn.registry.vocab import CanaryVerdict
from mlflow_churn.serving.canary import (
    CanaryEvaluation,
    RouteStats,
    _route_stats,
    _served_by,
    arm_routes,
    gate_score_psi,
    registry_client,
)
from mlflow_churn.serving.prediction_log import PredictionLog
from mlflow_churn.stats.drift import psi, psi_threshold
from mlflow_churn.times import utc

ALERT_NAME = "ChurnCanaryAlarm"
#: the metrics an alarm watches, in the order they are checked
METRICS = ("error_rate", "p99_latency_ms", "mean_score", "score_psi")

State = Literal["breach", "ok", "nodata", "off"]


@dataclass
class Alarm:
    """One metric's alarm: its state (``breach`` | ``ok`` | ``nodata`` | ``off``), the
    canary's value, the limit it was held to (the effective one, after the champion and the
    noise), the champion's value (NaN when none) and why, in words."""

    metric: str
    state: State
    value: float
    limit: float
    champion: float
    reason: str


@dataclass
class AlarmCheck:
    """The alarms of one tick: the window, what each arm served in it, every alarm."""

    model_name: str
    champion_version: str | None
    canary_version: str
    window_start: datetime
    window_end: datetime
    arms: dict[str, RouteStats]
    alarms: list[Alarm] = field(default_factory=list)
    score_psi: float = float("nan")

    @property
    def breaches(self) -> list[Alarm]:
        return [a for a in self.alarms if a.state == "breach"]

    @property
    def rows(self) -> dict[str, int]:
        return {arm: st.rows for arm, st in self.arms.items()}

    def summary(self) -> str:
        """One line: the breaches (or every alarm's state) and the arm counts."""
        counts = ", ".join(f"{arm} {n}" for arm, n in self.rows.items())
        if self.breaches:
            return "; ".join(a.reason for a in self.breaches) + f" (rows in the window: {counts})"
        shown = [f"{a.metric} {a.state}"
                 + (f" ({a.value:.4g}, limit {a.limit:.4g})" if a.state == "ok" else "") for a in self.alarms]
        return ", ".join(shown) + f" (rows in the window: {counts})"

    def metrics(self) -> dict[str, float]:
        """MLflow metrics: ``alarm_<metric>_value`` / ``_limit`` / ``_breach``, the arms' rows."""
        out: dict[str, float] = {f"alarm_{arm}_rows": float(n) for arm, n in self.rows.items()}
        for arm, st in self.arms.items():
            out[f"alarm_{arm}_errors"] = float(st.errors)
        for a in self.alarms:
            out[f"alarm_{a.metric}_breach"] = float(a.state == "breach")
            for key, value in (("value", a.value), ("limit", a.limit), ("champion", a.champion)):
                if math.isfinite(value):
                    out[f"alarm_{a.metric}_{key}"] = float(value)
        return out

    def evidence(self, as_of: datetime) -> CanaryEvaluation:
        """The check as the canary analysis a transition carries as its evidence (verdict
        ``rollback`` on a breach, else ``wait``): the rollback run records what each arm served."""
        verdict = CanaryVerdict.ROLLBACK if self.breaches else CanaryVerdict.WAIT
        reasons = [f"alarm: {a.reason}" for a in self.breaches] or [self.summary()]
        return CanaryEvaluation(verdict=verdict, reasons=reasons, model_name=self.model_name,
                                champion_version=self.champion_version, canary_version=self.canary_version,
                                as_of=utc(as_of), since=self.window_start, routes=dict(self.arms),
                                score_psi=self.score_psi)

    def to_dict(self) -> dict[str, Any]:
        return jsonable({"model_name": self.model_name, "champion_version": self.champion_version,
                         "canary_version": self.canary_version, "window_start": self.window_start.isoformat(),
                         "window_end": self.window_end.isoformat(), "rows": self.rows,
                         "arms": {arm: asdict(st) for arm, st in self.arms.items()},
                         "score_psi": self.score_psi,
                         "alarms": [asdict(a) for a in self.alarms],
                         "breaches": [a.metric for a in self.breaches]})


# --------------------------------------------------------------------------- the check (pure)
def check_alarms(cfg: ChurnConfig, champion: pd.DataFrame, canary: pd.DataFrame,
                 expected_psi: float = 0.0) -> tuple[dict[str, RouteStats], list[Alarm], float]:
    """The alarms of ``cfg.canary.alarms`` on what each arm served (prediction-log rows of the
    window, one frame per arm): ``(arm stats, alarms in METRICS order, score PSI)``. Pure: no
    MLflow, no I/O. ``expected_psi``: the PSI the gate measured between the two versions."""
    al = cfg.canary.alarms
    stats = {arm: _route_stats(arm, None, rows) for arm, rows in (("champion", champion), ("canary", canary))}
    champ, can = stats["champion"], stats["canary"]
    need = al.min_requests
    nodata = can.rows < need
    short = f"canary served {can.rows} rows in the window, fewer than canary.alarms.min_requests={need}"
    alarms: list[Alarm] = []

    # error rate: absolute and above the champion's by the margin (a champion without rows: absolute only)
    champ_rate = champ.error_rate if champ.rows else float("nan")
    limit = al.max_error_rate if not math.isfinite(champ_rate) else max(al.max_error_rate,
                                                                        champ_rate + al.error_rate_margin)
    if nodata:
        alarms.append(Alarm("error_rate", "nodata", can.error_rate, limit, champ_rate, short))
    else:
        breach = can.error_rate > limit
        vs = (f"champion {champ_rate:.4f} + canary.alarms.error_rate_margin {al.error_rate_margin}"
              if math.isfinite(champ_rate) else "no champion rows in the window")
        alarms.append(Alarm("error_rate", "breach" if breach else "ok", can.error_rate, limit, champ_rate,
                            f"canary error rate {can.error_rate:.4f} ({can.errors} of {can.rows}) "
                            f"{'>' if breach else '<='} {limit:.4f} (canary.alarms.max_error_rate "
                            f"{al.max_error_rate}; {vs})"))

    # p99 latency: absolute and max_p99_ratio x the champion's
    champ_p99 = champ.p99_latency_ms
    limit = al.max_p99_ms if not math.isfinite(champ_p99) else max(al.max_p99_ms,
                                                                    al.max_p99_ratio * champ_p99)
    if nodata or not math.isfinite(can.p99_latency_ms):
        alarms.append(Alarm("p99_latency_ms", "nodata", can.p99_latency_ms, limit, champ_p99, short))
    else:
        breach = can.p99_latency_ms > limit
        vs = (f"{al.max_p99_ratio} x champion p99 {champ_p99:.1f} ms" if math.isfinite(champ_p99)
              else "no champion rows in the window")
        alarms.append(Alarm("p99_latency_ms", "breach" if breach else "ok", can.p99_latency_ms, limit,
                            champ_p99,
                            f"canary p99 latency {can.p99_latency_ms:.1f} ms {'>' if breach else '<='} "
                            f"{limit:.1f} ms (canary.alarms.max_p99_ms {al.max_p99_ms:g}; {vs})"))

    # mean score within [score_min_mean, score_max_mean]
    champ_scores = _scores(champion)
    can_scores = _scores(canary)
    champ_mean = float(champ_scores.mean()) if champ_scores.size else float("nan")
    if al.score_min_mean is None and al.score_max_mean is None:
        alarms.append(Alarm("mean_score", "off", can.mean_score, float("nan"), champ_mean,
                            "no canary.alarms.score_min_mean / score_max_mean"))
    elif can_scores.size < need:
        alarms.append(Alarm("mean_score", "nodata", can.mean_score, float("nan"), champ_mean,
                            f"canary scored {can_scores.size} rows in the window, fewer than "
                            f"canary.alarms.min_requests={need}"))
    else:
        low, high = al.score_min_mean, al.score_max_mean
        if low is not None and can.mean_score < low:
            alarms.append(Alarm("mean_score", "breach", can.mean_score, low, champ_mean,
                                f"canary mean score {can.mean_score:.4f} < canary.alarms.score_min_mean "
                                f"{low} "
                                f"(champion {champ_mean:.4f})"))
        elif high is not None and can.mean_score > high:
            alarms.append(Alarm("mean_score", "breach", can.mean_score, high, champ_mean,
                                f"canary mean score {can.mean_score:.4f} > canary.alarms.score_max_mean "
                                f"{high} "
                                f"(champion {champ_mean:.4f})"))
        else:
            alarms.append(Alarm("mean_score", "ok", can.mean_score, high if high is not None else low,
                                champ_mean, f"canary mean score {can.mean_score:.4f} within "
                                f"[{low}, {high}]"))

    # score PSI canary vs champion (the champion the reference), beyond the gate's and the noise
    score_psi = float("nan")
    if champ_scores.size and can_scores.size:
        score_psi = psi(champ_scores, can_scores, bins=cfg.monitoring.bins,
                        epsilon=cfg.monitoring.psi_epsilon)
    if al.max_score_psi is None:
        alarms.append(Alarm("score_psi", "off", score_psi, float("nan"), float("nan"),
                            "canary.alarms.max_score_psi is None"))
    else:
        limit = psi_threshold(al.max_score_psi + expected_psi, champ_scores.size, can_scores.size,
                              cfg.monitoring.bins)
        if min(champ_scores.size, can_scores.size) < need:
            alarms.append(Alarm("score_psi", "nodata", score_psi, limit, float("nan"),
                                f"scored rows in the window: champion {champ_scores.size}, canary "
                                f"{can_scores.size}; the score PSI needs canary.alarms.min_requests={need} "
                                "in both"))
        else:
            breach = score_psi > limit
            alarms.append(Alarm("score_psi", "breach" if breach else "ok", score_psi, limit, float("nan"),
                                f"score PSI canary vs champion {score_psi:.3f} {'>' if breach else '<='} "
                                f"{limit:.3f} (canary.alarms.max_score_psi {al.max_score_psi} + the gate's "
                                f"{expected_psi:.3f}, at least the sampling noise of {champ_scores.size} / "
                                f"{can_scores.size} scores)"))
    return stats, alarms, score_psi


def _scores(rows: pd.DataFrame) -> np.ndarray:
    if not len(rows):
        return np.empty(0)
    return rows.loc[rows["status"] == "ok", "score"].dropna().to_numpy(dtype="float64")


# --------------------------------------------------------------------------- one read a tick
def window_rows(cfg: ChurnConfig, now: datetime) -> tuple[pd.DataFrame, datetime]:
    """The prediction log's rows served (wall clock) in ``(now - canary.alarms.window, now]``,
    from one read of the window's rows (the ``served_at`` index), and the window's start."""
    now = utc(now, "now")
    start = now - timedelta(seconds=cfg.canary.alarms.window_seconds)
    log = PredictionLog(cfg.prediction_log_url)
    try:
        frame = log.read(served_since=start)
    finally:
        log.close()
    if len(frame):
        served = frame["served_at"]
        frame = frame[(served > pd.Timestamp(start)) & (served <= pd.Timestamp(now))]
    return frame, start


def check_rollout(cfg: ChurnConfig, client: MlflowClient, canary: ModelVersion, now: datetime) -> AlarmCheck:
    """The alarms of canary version ``canary`` at wall-clock time ``now``: one read of the
    prediction log, the arms split by route and version (the champion's version read from the
    registry), :func:`check_alarms`. A registry or prediction-log outage raises."""
    name = canary.name
    champion = alias_version(client, name, CHAMPION)
    frame, start = window_rows(cfg, now)
    arms = arm_routes(cfg)  # the canary's arm: its canary rows, or its shadow rows in shadow mode
    canary_rows = _served_by(frame, arms["canary"], canary)
    champion_rows = _served_by(frame, arms["champion"], champion)
    stats, alarms, score_psi = check_alarms(cfg, champion_rows, canary_rows,
                                            gate_score_psi(canary, champion))
    stats["champion"].version = str(champion.version) if champion is not None else None
    stats["canary"].version = str(canary.version)
    return AlarmCheck(name, stats["champion"].version, str(canary.version), start, utc(now), stats, alarms,
                      score_psi)


def current_alarms(cfg: ChurnConfig, now: datetime) -> AlarmCheck | None:
    """The alarms of the configured model's canary at ``now`` (what the controller's next tick
    checks; ``churn canary status`` shows them); None when no version has alias canary."""
    client = registry_client(cfg)
    canary = alias_version(client, cfg.training.model_name, CANARY)
    return check_rollout(cfg, client, canary, now) if canary is not None else None


# --------------------------------------------------------------------------- the alert
def alarm_key(model: str) -> str:
    """The alert condition of a model's canary alarms (one at a time: one canary at a time)."""
    return f"canary_alarm:{model}"


def raise_alarm(cfg: ChurnConfig, check: AlarmCheck, run_id: str | None = None,
                rollback_run_id: str | None = None) -> None:
    """Fire ``ChurnCanaryAlarm`` for the breaches of ``check`` (labels model, version, metric:
    the first breached; every breach in the description). Never raises for the alert path."""
    breaches = check.breaches
    if not breaches:
        return
    first = breaches[0]
    labels = {"alertname": ALERT_NAME, "severity": "critical", "model": check.model_name,
              "version": check.canary_version, "metric": first.metric}
    notes = {"summary": f"{check.model_name}: canary v{check.canary_version} rolled back by its "
                        f"{', '.join(a.metric for a in breaches)} alarm",
             "description": check.summary()[:2000], "value": f"{first.value:g}", "limit": f"{first.limit:g}",
             "champion_version": check.champion_version or "", "run_id": run_id or "",
             "rollback_run_id": rollback_run_id or ""}
    fire(cfg, alarm_key(check.model_name), labels, notes, starts_at=check.window_end)


def clear_alarm(cfg: ChurnConfig, model: str) -> None:
    """Resolve the model's canary alarm, if one fires (nothing to do without an outbox)."""
    if outbox_path(cfg).exists():
        resolve(cfg, alarm_key(model))


__all__ = ["ALERT_NAME", "METRICS", "Alarm", "AlarmCheck", "alarm_key", "check_alarms",
           "check_rollout", "clear_alarm", "current_alarms", "raise_alarm", "window_rows"]
