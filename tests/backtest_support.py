"""Shared settings of the backtest tests (tests/test_monitoring_backtest*.py: two files, so
that two xdist workers share the replays under ``--dist loadfile``)."""

from __future__ import annotations

from pathlib import Path

from mlflow_churn.config import load_config

# first training at day 104 (60-day feature window + 30-day horizon + 7-day holdout + 7),
# onset two windows later, five weekly windows in all; small trees: the loop is under test
KW = {"customers": 1500, "warmup_days": 7, "onset_day": 118, "n_trials": 1, "fast": True}
DAYS = 139


def split_windows(res):
    """(windows ending at or before the onset, windows after it)."""
    return ([w for w in res.windows if not w.post_onset], [w for w in res.windows if w.post_onset])


def backtest_cfg(ws: Path, **over):
    return load_config(workspace=ws, environ={}, overrides={"monitoring.min_segment_size": 50,
                                                            "training.max_estimators": 80, **over})
