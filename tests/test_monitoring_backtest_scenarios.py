"""Short backtests per scenario on small data (fast mode: no per-window runs): stable and
concept drift, a data outage, gradual drift (the others: tests/test_monitoring_backtest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from backtest_support import DAYS, KW, backtest_cfg, split_windows

from mlflow_churn.monitoring.backtest import backtest


@pytest.mark.slow
def test_backtest_stable_and_concept_drift(workspace: Path, tmp_path: Path) -> None:
    stable = backtest(backtest_cfg(workspace), "stable", DAYS, **KW)
    assert stable.pre_onset_windows == len(stable.windows) == 5
    assert stable.false_alarm_rate == stable.false_alarms / 5
    assert stable.false_alarms <= 1
    assert not stable.retrains
    # concept drift moves no feature: population PSI stays low, the estimate cannot see it
    ws2 = tmp_path / "ws2"
    concept = backtest(backtest_cfg(ws2, **{"monitoring.label_delay_days": 7}), "concept_drift", DAYS, **KW)
    assert max(w.population_psi_max for w in concept.windows) < 0.2
    realised = [w.realised_auc for w in concept.windows if w.realised_auc is not None]
    assert realised, "7-day labels mature inside the replay"
    assert all(abs(w.estimated_auc - concept.windows[0].estimated_auc) < 0.05 for w in concept.windows)


@pytest.mark.slow
def test_backtest_data_outage_blocks_and_never_retrains(workspace: Path) -> None:
    res = backtest(backtest_cfg(workspace), "data_outage", DAYS, **KW)
    pre, post = split_windows(res)
    assert pre and post
    assert all(w.action != "blocked" for w in pre)
    blocked = [w for w in post if w.action == "blocked"]
    assert blocked, [w.action for w in post]
    assert any("data_mb" in r or "null" in r for r in blocked[0].reasons), blocked[0].reasons
    assert not res.retrains  # integrity problems block, they never retrain


@pytest.mark.slow
def test_backtest_gradual_drift_is_caught_late_and_not_retrained(workspace: Path) -> None:
    # the usage factor ramps over 42 days: replay four more weeks than the other scenarios
    res = backtest(backtest_cfg(workspace), "gradual", DAYS + 28, **KW)
    pre, post = split_windows(res)
    assert all(w.action == "ok" for w in pre)
    assert post[0].action == "ok"  # a week into the ramp nothing has moved beyond noise
    assert res.detected
    # later than the step change of usage_shift (third window), before the ramp ends
    assert res.detection_delay_windows is not None and 3 < res.detection_delay_windows <= 6
    assert post[-1].population_psi_max > 0.2 > post[0].population_psi_max
    assert post[-1].top_feature in ("usage_trend", "minutes_7d", "monthly_usage")
    assert not res.retrains  # drift alone: investigate
