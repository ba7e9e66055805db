"""A canary verdict as an alert (docs/alerts.md), condition ``canary:<model>``:

- ``rollback`` fires it: the canary should be rolled back (``warning``), or was rolled back
  by ``--auto`` (then it clears itself after ``ROLLED_BACK_TTL_S``: an event a person should
  see, not a condition left to fix);
- ``promote`` resolves it (the canary is healthy, or was promoted);
- ``wait`` leaves it as it is.

``churn canary evaluate`` / ``auto`` call :func:`alert_canary` with the evaluation and the
transition it made, if any.
"""

from __future__ import annotations

from mlflow_churn.alerts import fire, resolve
from mlflow_churn.config import ChurnConfig
from mlflow_churn.registry.vocab import CanaryVerdict
from mlflow_churn.serving.canary import CanaryEvaluation
from mlflow_churn.serving.transitions import TransitionResult

ALERT_NAME = "ChurnCanaryVerdict"
ROLLED_BACK_TTL_S = 3600.0


def alert_key(model: str) -> str:
    return f"canary:{model}"


def alert_canary(cfg: ChurnConfig, evaluation: CanaryEvaluation,
                 transition: TransitionResult | None = None) -> str | None:
    """Fire, resolve or leave ``canary:<model>`` for ``evaluation``; returns ``fired`` |
    ``resolved`` | None (wait)."""
    model = evaluation.model_name
    if evaluation.verdict == CanaryVerdict.PROMOTE:
        resolve(cfg, alert_key(model))
        return "resolved"
    if evaluation.verdict != CanaryVerdict.ROLLBACK:
        return None
    done = transition is not None and transition.action == "rollback" and not transition.noop
    what = "was rolled back" if done else "should be rolled back (`churn canary rollback --reason ...`)"
    labels = {"alertname": ALERT_NAME, "severity": "warning", "model": model,
              "verdict": evaluation.verdict, "canary_version": evaluation.canary_version or ""}
    notes = {"summary": f"{model}: canary v{evaluation.canary_version} {what}",
             "description": "; ".join(evaluation.reasons)[:2000], "run_id": evaluation.run_id or "",
             "champion_version": evaluation.champion_version or ""}
    fire(cfg, alert_key(model), labels, notes, starts_at=evaluation.as_of,
         ttl_seconds=ROLLED_BACK_TTL_S if done else None)
    return "fired"


__all__ = ["ALERT_NAME", "alert_canary", "alert_key"]
