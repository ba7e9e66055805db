"""The served requests' input warnings in the monitor run: counts per feature.

The scoring service writes each scored row's input warnings
(:mod:`mlflow_churn.serving.input_checks`, ``serving.on_invalid=flag``) into the prediction
log's ``input_warnings`` column. :func:`log_input_warnings` counts those of the rows the
monitored version scored whose ``as_of`` lies in the monitoring window
``(as_of - window_days, as_of]`` and logs into the active MLflow run:

- metrics ``input_invalid.<feature>.<kind>`` and ``input_invalid.<feature>`` (invalid values
  per feature and kind, and over the kinds), ``input_checked_rows`` (scored rows in the
  window), ``input_flagged_rows`` (rows with at least one warning);
- tag ``monitor.input_warnings``: ``counted`` | ``no prediction log`` (nothing served with
  this workspace's log) | ``unavailable: <why>`` (the log could not be read: no counts are
  logged rather than zeros);
- ``input_warnings.png`` when some row had a warning (:func:`warnings_figure`: invalid values
  per feature, by kind, as a share of the checked rows).

Requests answered 422 under ``serving.on_invalid=reject`` were never scored, so they are not
in the log: their counts are in the service's ``/metrics`` (``churn_input_invalid_total``).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from mlflow_churn.config import ChurnConfig, is_postgres_url, mask_text
from mlflow_churn.errors import ChurnError, first_line
from mlflow_churn.serving.input_checks import KINDS, WarningCounts, served_warning_counts
from mlflow_churn.serving.prediction_log import PredictionLog

TAG = "monitor.input_warnings"
_TICK = timedelta(microseconds=1)


def window_input_warnings(cfg: ChurnConfig, as_of: datetime, version: str) -> WarningCounts | None:
    """Counts of model ``version``'s rows in the window ending at ``as_of`` (UTC); None when
    there is no prediction log (an SQLite log file that does not exist). Raises ChurnError when
    the log cannot be read."""
    url = cfg.prediction_log_url
    if not is_postgres_url(url) and not Path(url).exists():
        return None
    since = as_of - timedelta(days=cfg.monitoring.window_days) + _TICK
    log = PredictionLog(url)  # ChurnError when it cannot be opened
    try:
        return served_warning_counts(log, since, as_of + _TICK, version)
    except ChurnError:
        raise
    except Exception as exc:  # sqlite3 / psycopg errors reading it
        raise ChurnError(mask_text(f"cannot read the prediction log: {first_line(exc)}")) from None
    finally:
        log.close()


def log_input_warnings(cfg: ChurnConfig, as_of: datetime, version: str) -> WarningCounts | None:
    """Log the window's counts into the active MLflow run (see the module doc); returns them
    (None when there is no log or it could not be read: the tag says which)."""
    import mlflow

    try:
        counts = window_input_warnings(cfg, as_of, version)
    except ChurnError as exc:
        mlflow.set_tag(TAG, f"unavailable: {exc}"[:500])
        return None
    if counts is None:
        mlflow.set_tag(TAG, "no prediction log")
        return None
    mlflow.set_tag(TAG, "counted")
    mlflow.log_metrics(counts.metrics())
    if counts.flagged_rows:
        mlflow.log_figure(warnings_figure(counts, f"served input warnings, v{version}, window to "
                                                  f"{as_of:%Y-%m-%d}"), "input_warnings.png")
    return counts


def warnings_figure(counts: WarningCounts, title: str) -> Any:
    """Horizontal bars: per feature (most invalid first), its invalid values by kind as a share
    of the window's checked rows."""
    from matplotlib.figure import Figure

    features = sorted({f for f, _ in counts.counts}, key=lambda f: -sum(
        n for (g, _), n in counts.counts.items() if g == f))
    fig = Figure(figsize=(8, 0.35 * len(features) + 1.6))
    ax = fig.subplots()
    left = [0.0] * len(features)
    rows = max(counts.rows, 1)
    for kind, color in zip(KINDS, ("tab:orange", "tab:red", "tab:purple"), strict=True):
        share = [counts.counts.get((f, kind), 0) / rows for f in features]
        ax.barh(features, share, left=left, color=color, label=kind)
        left = [a + b for a, b in zip(left, share, strict=True)]
    ax.invert_yaxis()
    ax.set_xlabel(f"share of the {counts.rows} checked rows")
    ax.legend(fontsize=7)
    ax.set_title(f"{title}: {counts.flagged_rows} row(s) with a warning", fontsize=9)
    fig.tight_layout()
    return fig
