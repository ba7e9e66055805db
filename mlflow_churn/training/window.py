"""Which point-in-time cutoffs a model trained at ``as_of`` learns from.

Time line, newest on the right (all UTC, days)::

    history_start     window_start              window_end             as_of
        |-- history --|----- production window ----|-- horizon + holdout --|
                      (window_days)                 (label_horizon_days + evaluation.holdout_days)

- ``window_end = as_of - label_horizon_days - holdout_days`` (floored to midnight): a cutoff's
  label looks ``label_horizon_days`` ahead, so every label in the window has matured by
  ``as_of - holdout_days``, and the newest ``holdout_days`` of matured cutoffs stay unseen
  for the evaluation gate.
- Production cutoffs: every ``cutoff_every_days`` from ``window_end`` back while
  ``cutoff > window_end - window_days``; weight 1.
- History cutoffs (optional ``history_days``): same spacing, in
  ``(window_end - window_days - history_days, window_end - window_days]``; weight
  ``history_weight``.

The recorded ``window_start`` / ``window_end`` are the oldest and newest production cutoffs
actually used (``history_start``: the oldest history cutoff).

Cutoffs earlier than the first one with a full feature window of data (the longest
activity window after the data start) are dropped and counted in ``dropped``; when none is
left, or ``as_of`` lies after the data, :class:`~mlflow_churn.errors.ChurnError` names the
dates and the valid ``as_of`` range.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from mlflow_churn.config import ChurnConfig
from mlflow_churn.data.bounds import data_bounds
from mlflow_churn.errors import ChurnError
from mlflow_churn.features.offline import daily_cutoffs, longest_window
from mlflow_churn.features.registry import registry_for
from mlflow_churn.times import midnight, utc


@dataclass(frozen=True)
class TrainingWindow:
    """The cutoffs a training run uses and the bounds it records (all UTC)."""

    as_of: datetime
    window_start: datetime
    window_end: datetime
    history_start: datetime | None
    cutoffs: tuple[datetime, ...]
    history_cutoffs: tuple[datetime, ...] = field(default=())
    history_weight: float = 1.0
    dropped: tuple[datetime, ...] = field(default=())

    @property
    def production_cutoffs(self) -> tuple[datetime, ...]:
        """Cutoffs of the production window (weight 1), oldest first."""
        hist = set(self.history_cutoffs)
        return tuple(c for c in self.cutoffs if c not in hist)

    def weight(self, cutoff: datetime) -> float:
        """Sample weight of rows at ``cutoff``: ``history_weight`` for history, else 1."""
        return self.history_weight if cutoff in set(self.history_cutoffs) else 1.0

    def to_params(self) -> dict[str, str]:
        """The bounds as MLflow params / tags (ISO UTC)."""
        return {
            "as_of": self.as_of.isoformat(),
            "window_start": self.window_start.isoformat(),
            "window_end": self.window_end.isoformat(),
            "history_start": self.history_start.isoformat() if self.history_start else "",
            "n_cutoffs": str(len(self.cutoffs)),
            "n_history_cutoffs": str(len(self.history_cutoffs)),
            "dropped_cutoffs": ",".join(c.date().isoformat() for c in self.dropped),
        }



def training_window(as_of: datetime, cfg: ChurnConfig, data_dir: Path | None = None) -> TrainingWindow:
    """The training cutoffs for a model trained at ``as_of`` (see the module doc).

    ``data_dir`` defaults to ``cfg.data_dir``. Raises ChurnError when ``as_of`` is after
    the newest data or the window holds no cutoff with a full feature history.
    """
    as_of = utc(as_of)
    data_dir = Path(data_dir) if data_dir is not None else cfg.data_dir
    t = cfg.training
    horizon = cfg.features.label_horizon_days
    holdout = cfg.evaluation.holdout_days
    features = registry_for(cfg).feature_set(cfg.features.feature_set).features
    bounds = data_bounds(data_dir)
    lag = timedelta(days=horizon + holdout)
    first_cutoff = bounds.first_event - timedelta(days=1) + timedelta(days=longest_window(features))
    first_as_of = first_cutoff + lag
    valid = f"valid as_of: {first_as_of.date()} .. {bounds.last_event.date()} (data {bounds.first_day} .. "\
            f"{bounds.last_day}, {horizon}-day label horizon + {holdout}-day holdout)"
    if first_as_of > bounds.last_event:  # no as_of at all: say how much data is missing
        needed = (first_as_of.date() - bounds.first_day).days
        have = (bounds.last_day - bounds.first_day).days + 1
        valid = (f"no as_of is valid: training needs {needed} days of data ({longest_window(features)}-day "
                 f"feature window + {horizon}-day label horizon + {holdout}-day holdout) and the data has "
                 f"{have} ({bounds.first_day} .. {bounds.last_day}); simulate at least {needed} days "
                 f"(churn simulate --days {needed}) or shorten the feature windows, "
                 "features.label_horizon_days or evaluation.holdout_days")
    if as_of > bounds.last_event:
        raise ChurnError(f"as_of {as_of.isoformat()} is after the newest data "
                         f"({bounds.last_event.isoformat()}); "
                         f"{valid}")
    window_end = midnight((as_of - lag).date())
    window_start = window_end - timedelta(days=t.window_days)  # exclusive
    history_start = window_start - timedelta(days=t.history_days) if t.history_days else None
    oldest = history_start or window_start
    wanted = [c for c in daily_cutoffs(oldest, window_end, t.cutoff_every_days) if c > oldest]
    kept = [c for c in wanted if c >= first_cutoff]
    dropped = tuple(c for c in wanted if c < first_cutoff)
    production = [c for c in kept if c > window_start]
    if not production:
        raise ChurnError(
            f"training window ({window_start.date()}, {window_end.date()}] for as_of {as_of.date()} holds no "
            f"cutoff with {longest_window(features)} days of feature history and matured labels; {valid}"
        )
    history = tuple(c for c in kept if c <= window_start)
    return TrainingWindow(
        as_of=as_of,
        window_start=production[0],
        window_end=kept[-1],
        history_start=history[0] if history else None,
        cutoffs=tuple(kept),
        history_cutoffs=history,
        history_weight=t.history_weight,
        dropped=dropped,
    )


def training_cutoffs(as_of: datetime, cfg: ChurnConfig) -> list[datetime]:
    """Every training cutoff (history first, then the production window), oldest first;
    :func:`training_window` also says which are history."""
    return list(training_window(as_of, cfg).cutoffs)


__all__ = ["TrainingWindow", "training_cutoffs", "training_window"]
