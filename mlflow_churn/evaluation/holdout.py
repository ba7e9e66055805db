"""The holdout window the gate scores: matured labels that neither model trained on.

Cutoffs are daily UTC midnights ``c`` with

- ``c + horizon_days <= as_of`` (the label ``churn in (c, c + horizon]`` is known at ``as_of``);
- ``c > window_end`` of every compared model (its newest training cutoff), so no model saw
  those rows' labels as training targets;
- ``c > as_of - horizon_days - holdout_days`` (the newest ``evaluation.holdout_days`` matured
  days: recent enough to say how the model does now; training leaves exactly these out).

Rows: only the holdout customers (:mod:`mlflow_churn.data.groups`), whom no model trained
or validated on. Later cutoffs alone are not enough: their label periods overlap the
newest training labels of the same customers, which favours the most recently trained
model by memory, not skill.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

import pandas as pd

from mlflow_churn.config import ChurnConfig
from mlflow_churn.data.groups import holdout_rows
from mlflow_churn.errors import ChurnError
from mlflow_churn.features.offline import build_training_frame, daily_cutoffs
from mlflow_churn.features.registry import FeatureSet
from mlflow_churn.times import midnight, utc


def parse_tag_time(value: str | None, what: str) -> datetime:
    """A version tag holding an ISO time (e.g. ``window_end``) as UTC; ChurnError if absent/bad."""
    if not value:
        raise ChurnError(f"{what} is missing; was the version registered by `churn train`?")
    try:
        return utc(datetime.fromisoformat(value), what)
    except ValueError:
        raise ChurnError(f"{what} must be an ISO time, got '{value}'") from None


def holdout_cutoffs(as_of: datetime, cfg: ChurnConfig,
                    train_window_end: datetime | Sequence[datetime]) -> list[datetime]:
    """Daily holdout cutoffs (oldest first) for models whose newest training cutoffs are
    ``train_window_end`` (one datetime or one per model; the latest counts).

    Raises ChurnError naming the dates when the window is empty (e.g. the challenger was
    trained on data up to the newest matured day: move ``as_of`` later or retrain earlier).
    """
    as_of = utc(as_of, "as_of")
    ends = [train_window_end] if isinstance(train_window_end, datetime) else list(train_window_end)
    if not ends:
        raise ChurnError("holdout needs the training window_end of at least one model")
    ends = [utc(e, "window_end") for e in ends]
    horizon = cfg.features.label_horizon_days
    last = midnight((as_of - timedelta(days=horizon)).date())
    if last + timedelta(days=horizon) > as_of:
        last -= timedelta(days=1)
    after = max(max(ends), last - timedelta(days=cfg.evaluation.holdout_days))
    cutoffs = [c for c in daily_cutoffs(after, last, 1) if c > after]
    if not cutoffs:
        raise ChurnError(
            f"empty holdout: labels are known up to cutoff {last.date()} (as_of {as_of.date()} minus "
            f"{horizon} days horizon) but the models trained up to {max(ends).date()}; "
            f"evaluate with an as_of after {(max(ends) + timedelta(days=horizon + 1)).date()}"
        )
    return cutoffs


def holdout_frame(cfg: ChurnConfig, fs: FeatureSet, cutoffs: Sequence[datetime],
                  label_as_of: datetime | None = None) -> pd.DataFrame:
    """Point-in-time rows of the holdout customers at ``cutoffs`` with their labels
    (``label_as_of``: hide churn events after it, as in a backtest)."""
    frame = build_training_frame(cfg.data_dir, fs, cutoffs, cfg.features.label_horizon_days,
                                 label=True, label_as_of=label_as_of)
    return holdout_rows(frame, cfg)
