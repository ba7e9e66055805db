"""Training window from as_of (no rows outside it) and the time-based validation split."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mlflow_churn.config import ChurnConfig, load_config
from mlflow_churn.data.groups import holdout_mask, validation_mask
from mlflow_churn.errors import ChurnError
from mlflow_churn.training.train import prepare_window
from mlflow_churn.training.window import training_cutoffs, training_window

AS_OF = datetime(2026, 5, 1, tzinfo=UTC)  # small_data: 120 days from 2026-01-01


def _cfg(workspace: Path, small_data: Path, **overrides: object) -> ChurnConfig:
    (workspace / "data").symlink_to(small_data, target_is_directory=True)
    return load_config(workspace=workspace, environ={}, overrides=dict(overrides))


def test_window_ends_before_horizon_and_holdout(workspace: Path, small_data: Path) -> None:
    cfg = _cfg(workspace, small_data, **{"training.window_days": 21})
    win = training_window(AS_OF, cfg)
    lag = timedelta(days=cfg.features.label_horizon_days + cfg.evaluation.holdout_days)
    assert win.window_end == AS_OF - lag  # 2026-03-25: labels matured, holdout unseen
    assert win.window_end + timedelta(days=cfg.features.label_horizon_days) <= AS_OF - timedelta(
        days=cfg.evaluation.holdout_days)
    assert list(win.cutoffs) == [datetime(2026, 3, d, tzinfo=UTC) for d in (11, 18, 25)]
    assert win.window_start == datetime(2026, 3, 11, tzinfo=UTC)
    assert win.history_cutoffs == () and win.dropped == ()
    assert training_cutoffs(AS_OF, cfg) == list(win.cutoffs)
    assert all(b - a == timedelta(days=cfg.training.cutoff_every_days)
               for a, b in zip(win.cutoffs, win.cutoffs[1:], strict=False))


def test_history_cutoffs_are_weighted_and_early_ones_dropped(workspace: Path, small_data: Path) -> None:
    cfg = _cfg(workspace, small_data, **{"training.window_days": 14, "training.history_days": 28,
                                         "training.history_weight": 0.25})
    win = training_window(AS_OF, cfg)
    # window (03-11, 03-25]; history (02-11, 03-11]; data has full 60-day feature history from 03-02
    assert win.production_cutoffs == (datetime(2026, 3, 18, tzinfo=UTC), datetime(2026, 3, 25, tzinfo=UTC))
    assert win.history_cutoffs == (datetime(2026, 3, 4, tzinfo=UTC), datetime(2026, 3, 11, tzinfo=UTC))
    assert [c.date().isoformat() for c in win.dropped] == ["2026-02-18", "2026-02-25"]
    assert win.weight(win.history_cutoffs[0]) == 0.25 and win.weight(win.window_end) == 1.0
    assert win.to_params()["dropped_cutoffs"] == "2026-02-18,2026-02-25"


def test_frame_has_no_rows_outside_the_window(workspace: Path, small_data: Path) -> None:
    cfg = _cfg(workspace, small_data, **{"training.window_days": 14, "training.history_days": 14,
                                         "training.history_weight": 0.5})
    win = training_window(AS_OF, cfg)
    prep = prepare_window(cfg, AS_OF)
    frame = prep.frame
    assert len(frame) > 1000
    assert set(frame["cutoff"]) == set(pd.to_datetime(list(win.cutoffs), utc=True))
    assert frame["cutoff"].min() >= pd.Timestamp(win.history_start)
    assert frame["cutoff"].max() <= pd.Timestamp(win.window_end)
    # every label has matured by as_of - holdout: cutoff + horizon <= as_of - holdout
    horizon = pd.Timedelta(days=cfg.features.label_horizon_days)
    matured_by = pd.Timestamp(AS_OF - timedelta(days=cfg.evaluation.holdout_days))
    assert (frame["cutoff"] + horizon <= matured_by).all()
    history = frame["cutoff"].isin(pd.to_datetime(list(win.history_cutoffs), utc=True))
    assert history.any() and (~history).any()
    assert (frame.loc[history, "weight"] == 0.5).all() and (frame.loc[~history, "weight"] == 1.0).all()
    assert prep.params["window_end"] == win.window_end.isoformat()


def test_validation_is_the_newest_slice_of_unseen_customers(workspace: Path, small_data: Path) -> None:
    cfg = _cfg(workspace, small_data, **{"training.window_days": 28})
    prep = prepare_window(cfg, AS_OF)
    assert prep.valid["cutoff"].nunique() == 1  # round(0.25 * 4 cutoffs) = the newest one
    assert prep.valid["cutoff"].min() == pd.Timestamp("2026-03-25", tz="UTC")
    assert prep.valid["cutoff"].min() == prep.train["cutoff"].max()  # training keeps the newest data
    assert set(prep.train["label"]) == {0, 1} and set(prep.valid["label"]) == {0, 1}
    # no customer is in both: a customer's rows a week apart share most of their label period
    train_ids, valid_ids = set(prep.train["customer_id"]), set(prep.valid["customer_id"])
    assert not train_ids & valid_ids
    # holdout customers (the gate's) are in neither, and the groups are stable across runs
    ids = prep.frame["customer_id"].to_numpy()
    assert not holdout_mask(ids, cfg).any() and validation_mask(prep.valid["customer_id"], cfg).all()
    everyone = np.arange(1, 20_001)
    share = holdout_mask(everyone, cfg).mean(), validation_mask(everyone, cfg).mean()
    assert abs(share[0] - 0.2) < 0.02 and abs(share[1] - 0.8 * 0.2) < 0.02
    assert prep.data_hash == prepare_window(cfg, AS_OF).data_hash


@pytest.mark.parametrize(
    ("as_of", "needles"),
    [
        (datetime(2027, 1, 1, tzinfo=UTC),
         ["2027-01-01", "after the newest data", "valid as_of: 2026-04-08 .. 2026-05-01"]),
        (datetime(2026, 3, 20, tzinfo=UTC), ["holds no cutoff", "valid as_of: 2026-04-08 .. 2026-05-01"]),
    ],
)
def test_as_of_outside_the_data_names_the_valid_range(workspace: Path, small_data: Path, as_of: datetime,
                                                     needles: list[str]) -> None:
    cfg = _cfg(workspace, small_data)
    with pytest.raises(ChurnError) as err:
        training_window(as_of, cfg)
    for needle in needles:
        assert needle in str(err.value)


def test_a_single_cutoff_cannot_be_split_by_time(workspace: Path, small_data: Path) -> None:
    cfg = _cfg(workspace, small_data, **{"training.window_days": 5})
    with pytest.raises(ChurnError, match="too few for a time-based validation split"):
        prepare_window(cfg, AS_OF)


def test_too_little_data_says_how_many_days_are_needed(workspace: Path, small_data: Path) -> None:
    """No valid as_of at all: the error names the days training needs and the days there are,
    not an empty range like "valid as_of: 2026-05-08 .. 2026-05-01"."""
    cfg = _cfg(workspace, small_data, **{"evaluation.holdout_days": 60})
    bounds_days = (date(2026, 5, 1) - date(2026, 1, 1)).days  # small_data: 2026-01-01 .. 2026-04-30
    with pytest.raises(ChurnError) as err:
        training_window(datetime(2026, 4, 30, tzinfo=UTC), cfg)
    text = str(err.value)
    assert "no as_of is valid" in text and "valid as_of: 2026" not in text, text
    assert f"the data has {bounds_days} " in text and "training needs 150 days" in text, text
    assert "60-day feature window + 30-day label horizon + 60-day holdout" in text, text
