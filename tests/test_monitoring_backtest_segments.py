"""Short backtests of the segment rule (fast mode: no per-window runs): ``segment_concept``
names its segment by performance once its labels mature, with the drop and its SE; the
scenario's population properties and its reproducibility are in tests/test_simulator.py.
Settings shared with the other backtest files in tests/backtest_support.py."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import pytest
from backtest_support import KW, backtest_cfg

from mlflow_churn.data.simulator import HazardParams
from mlflow_churn.monitoring.backtest import backtest

#: inside month-to-month contracts (55% of customers, most churners) behaviour stops driving
#: churn at all and price drives it harder than the scenario's defaults: a segment and a drop
#: big enough to measure with 3,000 customers; 14-day labels mature in the replay (baselines:
#: each segment's first measured window, since training's are 30-day ones); a 10% chance per
#: window that noise names a segment (the default is 1%: bench/bench_segments.py measures it
#: at scale); the rule investigates instead of retraining (the targeted retrain is tested with
#: churn retrain), so the replay stays short
SEGMENT = {"simulation.segment_column": "contract", "simulation.segment_value": "month-to-month",
           "monitoring.label_delay_days": 14, "monitoring.segment_alpha": 0.1,
           "monitoring.policy.segment_action": "investigate"}


@pytest.mark.slow
def test_backtest_segment_concept_names_the_segment_by_performance(workspace: Path) -> None:
    cfg = backtest_cfg(workspace, **SEGMENT)
    res = backtest(cfg, "segment_concept", 160, **{**KW, "customers": 3000, "onset_day": 125},
                   hazard=HazardParams(segment_concept_keep=0.0, segment_concept_price=1.5))
    assert res.segment == "contract=month-to-month"
    pre = [w for w in res.windows if not w.post_onset]
    assert pre and not any(w.named_segments for w in pre), [(w.as_of, w.named_segments) for w in pre]
    assert res.segment_named, [(w.as_of, w.segment_drop, w.segment_drop_limit) for w in res.windows]
    assert res.labels_matured == (datetime.fromisoformat(res.onset) + timedelta(days=14)).isoformat()
    assert res.segment_delay_windows is not None and res.segment_delay_windows <= 2
    first = next(w for w in res.windows if "contract=month-to-month" in w.named_segments)
    assert first.segment_source == "realised"
    assert first.segment_drop > first.segment_drop_limit > 0 and first.segment_drop_se > 0
    assert res.segment_drop_at_detection == first.segment_drop
    # the decision says so, with the drop and its SE
    assert any("segment contract=month-to-month: realised AUC" in r and "SE" in r for r in first.reasons)
    assert first.action == "investigate" and any("policy.segment_action" in r for r in first.reasons)
    # other segments hold month-to-month customers too (55% of each plan and region): if named as
    # well, with a smaller drop, after the segment itself
    assert first.named_segments[0] == "contract=month-to-month"
