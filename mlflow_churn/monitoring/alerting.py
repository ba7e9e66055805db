"""A monitoring decision as an alert (docs/alerts.md): ``investigate``, ``retrain`` and
``blocked`` fire the condition ``monitor:<model>``; ``ok`` resolves it. One condition per
model, so a window that decides the same thing again sends nothing new, and a new action
(``investigate`` -> ``retrain``) starts a new episode with its own labels.

The ``churn monitor`` command and the demo pass :func:`alert_decision` as ``monitor``'s
``on_decision``; replays (backtests) do not, so a replay of old windows alerts nobody.
"""

from __future__ import annotations

from mlflow_churn.alerts import fire, resolve
from mlflow_churn.config import ChurnConfig
from mlflow_churn.monitoring.policy import PolicyAction
from mlflow_churn.monitoring.runs import MonitorResult

ALERT_NAME = "ChurnMonitorDecision"
ALERTING_ACTIONS = (PolicyAction.INVESTIGATE, PolicyAction.RETRAIN, PolicyAction.BLOCKED)


def alert_key(model: str) -> str:
    return f"monitor:{model}"


def alert_decision(cfg: ChurnConfig, result: MonitorResult) -> str:
    """Fire or resolve ``monitor:<model>`` for ``result``'s decision; returns ``fired`` |
    ``resolved`` (an alert never fails the monitoring that raised it: the outbox logs what it
    cannot write)."""
    model = cfg.training.model_name
    d = result.decision
    if d.action not in ALERTING_ACTIONS:
        resolve(cfg, alert_key(model))
        return "resolved"
    severity = "critical" if d.action == PolicyAction.BLOCKED else "warning"
    labels = {"alertname": ALERT_NAME, "severity": severity,
              "model": model, "decision": d.action}
    notes = {"summary": f"{model} v{result.model_version}: monitoring decided {d.action} for the window "
                        f"{result.window_start:%Y-%m-%d} .. {result.as_of:%Y-%m-%d}",
             "description": "; ".join(d.reasons)[:2000], "run_id": result.run_id or "",
             "model_version": result.model_version,
             "segments": ", ".join(f"{x.segment} (AUC drop {x.drop:.3f}, SE {x.se:.3f})"
                                   for x in d.segment_drops),
             "drift_segments": ", ".join(d.drift_segments), "features": ", ".join(d.features)}
    fire(cfg, alert_key(model), labels, notes, starts_at=result.as_of)
    return "fired"


__all__ = ["ALERTING_ACTIONS", "ALERT_NAME", "alert_decision", "alert_key"]
