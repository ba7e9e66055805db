"""monitor(): a real trained champion, real MLflow store, segment_shift data."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
from mlflow import MlflowClient

from mlflow_churn.config import load_config
from mlflow_churn.data.simulator import SimulationSpec, simulate
from mlflow_churn.errors import ChurnError
from mlflow_churn.monitoring.monitor import latest_decision, monitor, read_history
from mlflow_churn.monitoring.runs import window_step
from mlflow_churn.registry.aliases import move_alias
from mlflow_churn.training.train import train

AS_OF = datetime(2026, 4, 20, tzinfo=UTC)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    ws = tmp_path_factory.mktemp("mon") / "ws"
    simulate(SimulationSpec(customers=3000, days=150, start=date(2026, 1, 1), seed=3,
                            scenario="segment_shift", onset_day=110), ws / "data")
    cfg = load_config(workspace=ws, environ={}, overrides={
        "training.n_trials": 1, "monitoring.min_segment_size": 100})
    res = train(cfg, AS_OF, n_trials=1, progress=False)
    move_alias(MlflowClient(cfg.mlflow_tracking_uri, cfg.mlflow_tracking_uri), cfg.training.model_name,
               "champion", res.version)
    return cfg, res


def test_monitor_logs_a_run_with_evidence_and_reads_history(trained) -> None:
    cfg, res = trained
    first = monitor(cfg, AS_OF, report=True, report_rows=3000)
    assert first.model_version == res.version
    assert first.rows > 0 and first.run_id
    assert first.decision.action in ("ok", "investigate")
    client = MlflowClient(cfg.mlflow_tracking_uri, cfg.mlflow_tracking_uri)
    run = client.get_run(first.run_id)
    assert run.data.tags["monitor.action"] == first.decision.action
    assert "psi.monthly_usage" in run.data.metrics and "score_psi" in run.data.metrics
    hist = client.get_metric_history(first.run_id, "daily_psi.monthly_usage")
    assert sorted(m.step for m in hist) == list(range(cfg.monitoring.window_days))
    names = {a.path for a in client.list_artifacts(first.run_id)}
    assert {"decision.json", "window_stats.json", "psi_heatmap.png", "psi_timeline.png",
            "drift_report.html"} <= names
    # categorical drift, KS thresholds and the raw sources' null rates are logged too
    metrics = run.data.metrics
    assert {"js.plan", "chi2_p.plan", "ks.monthly_usage",
            "source_null_rate.activity.data_used_mb"} <= set(metrics)
    assert first.stats.ks_threshold["monthly_usage"] > 0
    seg_hist = client.get_metric_history(first.run_id, "daily_segment_psi.region.pacific")
    assert sorted(m.step for m in seg_hist) == list(range(cfg.monitoring.window_days))
    nulls = client.get_metric_history(first.run_id, "daily_null_rate.activity.data_used_mb")
    assert len(nulls) == cfg.monitoring.window_days and all(m.value == 0 for m in nulls)
    # the pre-onset window is quiet: population PSI small
    assert first.population_psi_max < 0.2
    # per window (step = days since 1970 of its end): feature PSI, the per-segment estimate, and
    # the per-segment plot; labels have not matured since training (same day): estimates only
    step = window_step(AS_OF)
    assert [m.step for m in client.get_metric_history(first.run_id, "psi.monthly_usage")] == [step]
    basic = first.performance.segments["plan=basic"]
    assert basic.auc is None and basic.reason == "labels not matured yet"
    # 3,000 customers: training's reference rows held too few churners of plan=basic for a
    # baseline, so its first measured window (this one) is
    assert basic.estimated_auc is not None and basic.baseline_source == "first window"
    assert basic.drop == 0.0 and basic.source == "estimated"
    assert basic.reference_source == "first window estimate"
    (est,) = client.get_metric_history(first.run_id, "segment_estimated_auc.plan.basic")
    assert est.step == step and est.value == pytest.approx(basic.estimated_auc)
    assert "segment_performance.png" in names
    assert first.stats.segment_performance["plan=basic"]["estimated_auc_se"] > 0

    # 4 and 5 weeks after onset: pacific moved (in 2 of the last 3 windows), the population barely
    late = AS_OF + timedelta(days=35)
    middle = monitor(cfg, late - timedelta(days=7), report=False)
    assert middle.decision.drift_segments == []  # once is not persistent
    assert any("region=pacific moved" in r and "only in 1" in r for r in middle.decision.reasons)
    second = monitor(cfg, late, report=False)
    back = read_history(cfg, cfg.training.model_name, res.version, late + timedelta(days=1))
    assert [w.as_of for w in back] == [AS_OF, late - timedelta(days=7), late]
    assert second.stats.segment_psi["region=pacific"] == max(second.stats.segment_psi.values())
    assert second.decision.drift_segments[0] == "region=pacific" and second.decision.segments == []
    # labels of the cutoffs after training have matured: this first realised AUC of each segment is
    # its baseline from now on (drop 0); training's AUC and the scores' CBPE expectation beside it
    assert "val_segment_auc.contract.month-to-month" in client.get_run(res.run_id).data.metrics
    mtm = second.performance.segments["contract=month-to-month"]
    assert (mtm.source, mtm.baseline_source, mtm.reference_source) == ("realised", "first window",
                                                                        "first window")
    assert mtm.drop == 0.0 and mtm.reference == mtm.auc and mtm.drop_se > 0 and mtm.threshold > 0
    assert mtm.training_auc > 0.5 and mtm.expected_auc > 0.5
    assert second.stats.segment_auc_drop["contract=month-to-month"] == pytest.approx(mtm.drop)
    assert second.decision.action == "investigate"
    assert second.population_psi_max < 0.1
    latest = latest_decision(cfg)
    assert latest["run_id"] == second.run_id
    assert latest["decision"]["action"] == second.decision.action
    decision = json.loads(Path(client.download_artifacts(second.run_id, "decision.json")).read_text())
    assert decision["stats"]["segment_psi"]["region=pacific"] > 0


def test_monitor_errors_name_the_fix(trained) -> None:
    cfg, _ = trained
    with pytest.raises(ChurnError, match="no alias 'canary'"):
        monitor(cfg, AS_OF, alias="canary", log=False)
    with pytest.raises(ChurnError, match="timezone"):
        monitor(cfg, datetime(2026, 4, 20), log=False)
    with pytest.raises(ChurnError):
        monitor(cfg, AS_OF + timedelta(days=400), log=False)


def test_monitor_decisions_reach_a_person_and_clear(trained, tmp_path: Path) -> None:
    """`churn monitor`'s decision as an alert: `investigate` fires `monitor:<model>` to a real
    webhook receiver (failing its first attempt), once; a later quiet window (`ok`) sends its
    `resolved` message. Replays without `on_decision` alert nobody."""
    from test_alerts import Receiver

    from mlflow_churn.alerts import flush
    from mlflow_churn.monitoring.alerting import alert_decision

    cfg, _res = trained
    rx = Receiver(fail_first=1)
    try:
        acfg = load_config(workspace=cfg.workspace, environ={}, overrides={
            "training.n_trials": 1, "monitoring.min_segment_size": 100,
            "alerts.webhook_url": rx.url("/hook"), "alerts.outbox": str(tmp_path / "alerts.db"),
            "alerts.retry_initial_seconds": 0.2, "alerts.retry_max_seconds": 1.0})
        late = AS_OF + timedelta(days=35)
        before = monitor(acfg, late - timedelta(days=7), report=False, log=False, history=[])
        assert flush(acfg, timeout=5) == 0 and rx.messages("/hook") == []  # no on_decision: no alert
        now = monitor(acfg, late, report=False, log=False, history=[before.stats],
                      on_decision=lambda r: alert_decision(acfg, r))
        assert now.decision.action == "investigate", now.decision.reasons
        assert flush(acfg, timeout=60) == 0
        (firing,) = [body for _, body in rx.messages("/hook")]
        assert firing["status"] == "firing"
        labels = firing["alerts"][0]["labels"]
        assert labels == {"alertname": "ChurnMonitorDecision", "severity": "warning",
                          "model": acfg.training.model_name, "decision": "investigate"}
        # the segment moved (PSI) without a performance drop: drift context, not the segment rule
        notes = firing["alerts"][0]["annotations"]
        assert "region=pacific" in notes["drift_segments"] and notes["segments"] == ""
        again = monitor(acfg, late, report=False, log=False, history=[before.stats],
                        on_decision=lambda r: alert_decision(acfg, r))
        assert again.decision.action == "investigate" and flush(acfg, timeout=10) == 0
        assert len(rx.messages("/hook")) == 1  # the same condition again: nothing new
        quiet = monitor(acfg, AS_OF, report=False, log=False, history=[],
                        on_decision=lambda r: alert_decision(acfg, r))
        assert quiet.decision.action == "ok", quiet.decision.reasons
        assert flush(acfg, timeout=60) == 0
        statuses = [body["status"] for _, body in rx.messages("/hook")]
        assert statuses == ["firing", "resolved"], statuses
    finally:
        rx.stop()
