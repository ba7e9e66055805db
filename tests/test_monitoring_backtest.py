"""Short backtests per scenario on small data (fast mode: no per-window runs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from mlflow_churn.config import load_config
from mlflow_churn.errors import ChurnError
from mlflow_churn.monitoring.backtest import backtest

# first training at day 104 (60-day feature window + 30-day horizon + 7-day holdout + 7),
# onset two windows later, five weekly windows in all; small trees: the loop is under test
KW = {"customers": 1500, "warmup_days": 7, "onset_day": 118, "n_trials": 1, "fast": True}
DAYS = 139


def _split(res):
    """(windows ending at or before the onset, windows after it)."""
    return ([w for w in res.windows if not w.post_onset], [w for w in res.windows if w.post_onset])


def _cfg(ws: Path, **over):
    return load_config(workspace=ws, environ={}, overrides={"monitoring.min_segment_size": 50,
                                                            "training.max_estimators": 80, **over})


@pytest.mark.slow
def test_backtest_usage_shift_is_detected(workspace: Path) -> None:
    cfg = _cfg(workspace)
    res = backtest(cfg, "usage_shift", DAYS, **KW)
    assert len(res.windows) == 5
    assert res.onset.startswith("2026-04-29")
    assert res.pre_onset_windows == 2
    assert res.detected
    # weekly windows: the first one after the onset has only a partial shift (PSI ~0.09), the
    # second fires, the default persistence (2 of 3) alarms on the third; monitoring daily
    # (bench/bench_detection.py) detects within two windows' time
    assert res.detection_delay_windows is not None and res.detection_delay_windows <= 3
    fired = [w for w in res.windows if w.post_onset and any("psi[*] > 0.2" in r for r in w.reasons)]
    assert fired and fired[0].index == 3
    first = next(w for w in res.windows if w.post_onset and w.action != "ok")
    assert first.top_feature in ("usage_trend", "minutes_7d", "monthly_usage")
    assert first.action == "investigate"  # drift alone
    # the run holds the evidence
    client = MlflowClient()
    names = {a.path for a in client.list_artifacts(res.run_id)}
    assert {"backtest.json", "backtest_timeline.png"} <= names
    data = json.loads(Path(client.download_artifacts(res.run_id, "backtest.json")).read_text())
    assert data["summary"]["detected"] is True and len(data["windows"]) == 5


@pytest.mark.slow
def test_backtest_segment_shift_names_the_segment_with_low_population_psi(workspace: Path) -> None:
    res = backtest(_cfg(workspace), "segment_shift", DAYS, **KW)
    _, post = _split(res)
    assert post
    assert res.attributed is True
    alarm = next(w for w in post if w.action != "ok")
    assert alarm.top_segment == "region=pacific"
    assert alarm.population_psi_max < 0.1
    assert alarm.action == "investigate"  # drift alone, performance not (yet) measured as lost


@pytest.mark.slow
def test_backtest_stable_and_concept_drift(workspace: Path, tmp_path: Path) -> None:
    stable = backtest(_cfg(workspace), "stable", DAYS, **KW)
    assert stable.pre_onset_windows == len(stable.windows) == 5
    assert stable.false_alarm_rate == stable.false_alarms / 5
    assert stable.false_alarms <= 1
    assert not stable.retrains
    # concept drift moves no feature: population PSI stays low, the estimate cannot see it
    ws2 = tmp_path / "ws2"
    concept = backtest(_cfg(ws2, **{"monitoring.label_delay_days": 7}), "concept_drift", DAYS, **KW)
    assert max(w.population_psi_max for w in concept.windows) < 0.2
    realised = [w.realised_auc for w in concept.windows if w.realised_auc is not None]
    assert realised, "7-day labels mature inside the replay"
    assert all(abs(w.estimated_auc - concept.windows[0].estimated_auc) < 0.05 for w in concept.windows)


def test_backtest_rejects_bad_input(workspace: Path) -> None:
    with pytest.raises(ChurnError, match="--scenario"):
        backtest(_cfg(workspace), "meteor", 200)
    with pytest.raises(ChurnError, match="--days must be at least"):
        backtest(_cfg(workspace), "stable", 50)


def test_cli_backtest_and_monitor_errors(workspace: Path) -> None:
    from mlflow_churn.cli import app

    runner = CliRunner()
    out = runner.invoke(
        app, ["--workspace", str(workspace), "backtest", "--scenario", "meteor", "--no-progress"]
    )
    assert out.exit_code != 0
    assert isinstance(out.exception, ChurnError) and "--scenario" in str(out.exception)
    out = runner.invoke(
        app, ["--workspace", str(workspace), "monitor", "--as-of", "yesterday", "--no-progress"]
    )
    assert isinstance(out.exception, ChurnError) and "--as-of" in str(out.exception)


@pytest.mark.slow
def test_backtest_data_outage_blocks_and_never_retrains(workspace: Path) -> None:
    res = backtest(_cfg(workspace), "data_outage", DAYS, **KW)
    pre, post = _split(res)
    assert pre and post
    assert all(w.action != "blocked" for w in pre)
    blocked = [w for w in post if w.action == "blocked"]
    assert blocked, [w.action for w in post]
    assert any("data_mb" in r or "null" in r for r in blocked[0].reasons), blocked[0].reasons
    assert not res.retrains  # integrity problems block, they never retrain


@pytest.mark.slow
def test_backtest_gradual_drift_is_caught_late_and_not_retrained(workspace: Path) -> None:
    # the usage factor ramps over 42 days: replay four more weeks than the other scenarios
    res = backtest(_cfg(workspace), "gradual", DAYS + 28, **KW)
    pre, post = _split(res)
    assert all(w.action == "ok" for w in pre)
    assert post[0].action == "ok"  # a week into the ramp nothing has moved beyond noise
    assert res.detected
    # later than the step change of usage_shift (third window), before the ramp ends
    assert res.detection_delay_windows is not None and 3 < res.detection_delay_windows <= 6
    assert post[-1].population_psi_max > 0.2 > post[0].population_psi_max
    assert post[-1].top_feature in ("usage_trend", "minutes_7d", "monthly_usage")
    assert not res.retrains  # drift alone: investigate
