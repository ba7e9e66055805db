"""Served data (issue 23 item 1): the prediction log keeps the served feature values (sampled,
size-bounded, old logs migrated), monitoring builds its window from them (`--source`), and the
serving-skew check compares them with an offline recomputation; a stale online store is caught.

The end-to-end test runs a real `churn serve` (uvicorn over a socket) and `churn monitor` in
subprocesses on a champion trained on simulated data."""

from __future__ import annotations

import json
import os
import sqlite3
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import httpx
import pandas as pd
import pytest

from mlflow_churn.config import load_config
from mlflow_churn.errors import ChurnError
from mlflow_churn.features.offline import compute_latest
from mlflow_churn.features.registry import registry_for
from mlflow_churn.monitoring.frames import window_frame
from mlflow_churn.monitoring.policy import WindowStats, decide
from mlflow_churn.monitoring.served import (
    ServedRows,
    choose_source,
    read_served,
    served_frame,
    serving_skew,
    skew_instants,
)
from mlflow_churn.serving.log_writer import LogWriter
from mlflow_churn.serving.prediction_log import (
    OMITTED,
    FeatureSampler,
    PredictionLog,
    PredictionRecord,
    served_values,
)
from mlflow_churn.web.metrics import Metrics

T0 = datetime(2026, 3, 20, tzinfo=UTC)
VALUES = {"plan": "premium", "num_lines": 2, "monthly_charge": 71.25, "usage_trend": None}


def _records(n: int, values: dict | None = VALUES, version: str = "1", as_of: datetime = T0,
             status: str = "ok") -> list[PredictionRecord]:
    return [PredictionRecord(f"r{i}", i, version, "champion", 0.2, 1.0, status, T0 + timedelta(seconds=i),
                             as_of, values, T0) for i in range(n)]


# --------------------------------------------------------------------------- the log
def test_sampler_keeps_the_configured_share_of_rows_and_their_values(tmp_path: Path) -> None:
    log = PredictionLog(tmp_path / "p.db", FeatureSampler(rate=0.3, seed=1))
    log.write(_records(4000) + _records(10, values=None, status="not_found"))
    counts = log.feature_counts()
    assert counts["rows"] == 4010 and counts["omitted"] == 0
    assert abs(counts["with_features"] / 4000 - 0.3) < 0.03  # binomial sd 0.007; no values: never kept
    kept = log.read(only_with_features=True)
    assert len(kept) == counts["with_features"] and (kept["status"] == "ok").all()
    assert served_values(kept)[0] == VALUES  # str, int, float and null come back as served
    assert kept["features_as_of"].iloc[0] == T0
    assert "features" not in log.read().columns  # the heavy column only on request
    log.close()
    for rate, expect in ((0.0, 0), (1.0, 50)):
        log = PredictionLog(tmp_path / f"p{rate}.db", FeatureSampler(rate=rate))
        log.write(_records(50))
        assert log.feature_counts()["with_features"] == expect
        log.close()
    with pytest.raises(ChurnError, match="serving.log_features_sample_rate must lie in"):
        FeatureSampler(rate=1.5)


def test_values_over_the_size_bound_leave_a_marker_and_are_counted(tmp_path: Path) -> None:
    url = str(tmp_path / "p.db")
    metrics = Metrics()
    writer = LogWriter(url, metrics, sampler=FeatureSampler(max_bytes=120))
    writer.start()
    writer.submit(_records(3, {**VALUES, "payment_method": "x" * 200}) + _records(2))
    writer.close()
    assert "churn_prediction_log_features_omitted_total 3" in metrics.render([])
    log = PredictionLog(url)
    assert log.feature_counts() == {"rows": 5, "with_features": 2, "omitted": 3}
    markers = [json.loads(t) for t in log.read(with_features=True)["features"] if OMITTED in t]
    assert len(markers) == 3 and markers[0][OMITTED] == "size" and markers[0]["bytes"] > 120
    assert len(log.read(only_with_features=True)) == 2
    log.close()
    served = read_served(url, T0, 7)
    assert len(served.rows) == 2 and served.counts["omitted"] == 3
    with pytest.raises(ChurnError, match=r"only 2 served row.*3 row\(s\) had values over "
                                         r"serving.log_features_max_bytes"):
        choose_source("served", served, "1", 100)


_OLD_SCHEMA = """CREATE TABLE predictions (
    request_id TEXT NOT NULL, customer_id BIGINT NOT NULL, model_version TEXT, route TEXT NOT NULL,
    score DOUBLE PRECISION, latency_ms DOUBLE PRECISION, status TEXT NOT NULL, served_at {ts} NOT NULL,
    as_of {ts} NOT NULL)"""


def _check_migration(url: str) -> None:
    log = PredictionLog(url)  # opens the old log: columns added, nothing lost
    old = log.read(with_features=True)
    assert len(old) == 3 and list(old["score"]) == [0.1, 0.2, 0.3]
    assert old["features"].isna().all() and old["features_as_of"].isna().all()
    log.write(_records(2))
    log.close()
    log = PredictionLog(url)  # a second open finds the columns there
    assert log.count() == 5 and log.feature_counts()["with_features"] == 2
    assert served_values(log.read(only_with_features=True)) == [VALUES, VALUES]
    log.close()


def test_a_sqlite_log_of_the_old_schema_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    con = sqlite3.connect(path)
    con.execute(_OLD_SCHEMA.format(ts="TEXT"))
    con.executemany("INSERT INTO predictions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [(f"o{i}", i, "1", "champion", i / 10, 1.0, "ok", T0.isoformat(), T0.isoformat())
                     for i in (1, 2, 3)])
    con.commit()
    con.close()
    _check_migration(str(path))


@pytest.mark.postgres
def test_a_postgres_log_of_the_old_schema_is_migrated(postgres_url: str) -> None:
    import psycopg

    con = psycopg.connect(postgres_url)
    with con.cursor() as cur:
        cur.execute(_OLD_SCHEMA.format(ts="TIMESTAMPTZ"))
        cur.executemany("INSERT INTO predictions VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                        [(f"o{i}", i, "1", "champion", i / 10, 1.0, "ok", T0, T0) for i in (1, 2, 3)])
    con.commit()
    con.close()
    _check_migration(postgres_url)


# --------------------------------------------------------------------------- the source
def _served(n: int, version: str = "1") -> ServedRows:
    rows = pd.DataFrame({"customer_id": range(n), "model_version": version, "status": "ok", "score": 0.2,
                         "as_of": pd.Timestamp(T0), "values": [{}] * n})
    return ServedRows(rows, {"rows": n, "with_features": n, "omitted": 0})


def test_auto_takes_the_served_rows_only_when_there_are_enough() -> None:
    assert choose_source("auto", _served(1000), "1", 1000)[0] == "served"
    source, why = choose_source("auto", _served(999), "1", 1000)
    assert source == "offline" and "only 999 served row(s)" in why and "min_served_rows 1000" in why
    assert choose_source("auto", _served(5000, version="2"), "1", 1000)[0] == "offline"  # another model's
    assert choose_source("offline", _served(5000), "1", 1000)[0] == "offline"
    with pytest.raises(ChurnError, match=r"--source served: only 999 served row\(s\).*lower "
                                         r"monitoring.min_served_rows, or use --source offline"):
        choose_source("served", _served(999), "1", 1000)
    with pytest.raises(ChurnError, match="--source must be one of auto, served, offline, got 'both'"):
        choose_source("both", _served(5), "1", 1)


def test_an_unreachable_log_is_an_error_not_an_empty_window() -> None:
    with pytest.raises(ChurnError, match="cannot open the prediction log at postgresql://") as err:
        read_served("postgresql://churn:secret@127.0.0.1:1/none", T0, 7)
    assert "secret" not in str(err.value)  # the URL's password is masked


def test_churn_monitor_refuses_an_unknown_source(churn_main, tmp_path: Path) -> None:
    res = churn_main(["--workspace", str(tmp_path), "monitor", "--source", "both", "--as-of", "2026-04-01"])
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "error: --source must be one of auto, served, offline, got 'both'"], res.stderr


@pytest.fixture
def small_cfg(small_data: Path, tmp_path: Path):
    ws = tmp_path / "ws"
    ws.mkdir()
    os.symlink(small_data, ws / "data")
    return load_config(workspace=ws, environ={})


def _truth_rows(cfg, at: datetime, n: int) -> list[tuple[int, dict]]:
    fs = registry_for(cfg).feature_set(cfg.features.feature_set)
    frame = compute_latest(cfg.data_dir, fs.features, at, with_event_time=False).frame.head(n)
    return [(int(r.pop("customer_id")), r) for r in frame.to_dict("records")]


def test_served_frame_has_the_offline_frame_shape(small_cfg) -> None:
    fs = registry_for(small_cfg).feature_set(small_cfg.features.feature_set)
    as_of = T0
    served_at = as_of - timedelta(days=2) + timedelta(hours=3)  # counts for the cutoff as_of - 1 day
    truth = _truth_rows(small_cfg, served_at, 50)
    rows = pd.DataFrame({
        "customer_id": [c for c, _ in truth] + [truth[0][0], 999_999, -1, -1],
        "model_version": ["1"] * 51 + ["2", "1", "1"],  # 999_999: another version's
        "status": "ok", "score": [0.1] * 50 + [0.9, 0.5, 0.3, 0.3],
        "as_of": [served_at] * 50 + [served_at + timedelta(hours=1), served_at, served_at, served_at],
        "served_at": pd.Timestamp(T0),
        "values": [v for _, v in truth] + [truth[0][1], truth[1][1], truth[2][1], truth[3][1]]})
    frame, scores = served_frame(ServedRows(rows), fs, "1", as_of, 7)
    offline = window_frame(small_cfg.data_dir, fs, [as_of - timedelta(days=1)], 30)
    assert list(frame.columns) == list(offline.columns) and frame.dtypes.equals(offline.dtypes)
    assert (frame["customer_id"] == -1).sum() == 2  # records without an id: each one counts
    assert len(frame) == 52 and (frame["cutoff"] == as_of - timedelta(days=1)).all()
    assert scores[(frame["customer_id"] == truth[0][0]).to_numpy()][0] == 0.9  # served twice: the newest
    served = dict(zip(frame["customer_id"], frame["monthly_usage"], strict=True))
    assert all(served[c] == pytest.approx(v["monthly_usage"]) for c, v in truth)  # the served values


# --------------------------------------------------------------------------- the skew check
def _rows(truth: list[tuple[int, dict]], as_of: datetime, computed: datetime | None) -> ServedRows:
    rows = pd.DataFrame({"customer_id": [c for c, _ in truth], "model_version": "1", "status": "ok",
                         "score": 0.2, "as_of": pd.Timestamp(as_of),
                         "features_as_of": pd.Timestamp(computed) if computed else pd.NaT,
                         "values": [dict(v) for _, v in truth]})
    return ServedRows(rows, {"rows": len(rows), "with_features": len(rows), "omitted": 0})


def test_serving_skew_finds_wrong_and_stale_values_and_blocks(small_cfg) -> None:
    truth = _truth_rows(small_cfg, T0, 300)
    fresh = serving_skew(small_cfg, _rows(truth, T0, T0))
    rep = fresh.report
    assert rep.compared == 300 and rep.sampled == 300 and rep.mismatches == []
    assert set(rep.mismatch_rate) >= {"tenure_days", "monthly_usage", "plan"}
    assert max(rep.mismatch_rate.values()) == 0 and max(rep.psi.values()) < 1e-6
    # values served half a day after their batch, within features.freshness_sla_hours: checked at
    # the batch's instant, so still equal
    later = serving_skew(small_cfg, _rows(truth, T0 + timedelta(hours=12), T0))
    assert max(later.report.mismatch_rate.values()) == 0 and later.values_age_hours == 12
    # 40 customers served a wrong monthly_usage: that feature only, those customers named
    tampered = [(c, {**v, "monthly_usage": v["monthly_usage"] + 50}) if i < 40 else (c, v)
                for i, (c, v) in enumerate(truth)]
    wrong = serving_skew(small_cfg, _rows(tampered, T0, T0)).report
    assert wrong.mismatch_rate["monthly_usage"] == pytest.approx(40 / 300)
    assert {k for k, v in wrong.mismatch_rate.items() if v} == {"monthly_usage"}
    assert {m.customer_id for m in wrong.mismatches} == {c for c, _ in tampered[:40]}
    m = wrong.mismatches[0]
    assert m.online == m.offline + 50 and m.at == T0.isoformat()
    # a stale store: values computed at T0 still served 5 days later; the truth moved on
    stale = serving_skew(small_cfg, _rows(truth, T0 + timedelta(days=5), T0))
    assert stale.values_age_hours == 120
    assert stale.report.mismatch_rate["tenure_days"] == 1.0  # everyone is 5 days older
    assert stale.report.compared + stale.report.not_recomputed == 300  # churned since: not alive
    stats = WindowStats(as_of=T0 + timedelta(days=5), serving_mismatch_rate=stale.report.mismatch_rate,
                        serving_skew_psi=stale.report.psi, serving_skew_rows=stale.report.compared,
                        serving_values_age_hours=stale.values_age_hours)
    policy = small_cfg.monitoring.policy
    decision = decide([stats], policy, stats.as_of)
    assert decision.action == "blocked" and "tenure_days" in decision.features
    (reason,) = [r for r in decision.reasons if "serving skew" in r]
    assert "tenure_days 100%" in reason and "5.0 days before their requests" in reason
    warn = decide([stats], policy.model_copy(update={"integrity": "warn"}), stats.as_of)
    assert warn.action != "blocked"
    assert any(r.startswith("integrity warning: serving skew") for r in warn.reasons)
    ok = WindowStats(as_of=T0, serving_mismatch_rate=rep.mismatch_rate, serving_skew_psi=rep.psi,
                     serving_skew_rows=rep.compared)
    assert decide([ok], policy, T0).action == "ok"


def test_skew_instants_follow_the_freshness_sla() -> None:
    rows = pd.DataFrame({"as_of": pd.to_datetime([T0 + timedelta(hours=h) for h in (0, 20, 30, 5)], utc=True),
                         "features_as_of": pd.to_datetime([T0, T0, T0, None], utc=True)})
    at = skew_instants(rows, sla_hours=26)
    assert list(at) == [pd.Timestamp(T0), pd.Timestamp(T0), rows["as_of"][2], rows["as_of"][3]]


# --------------------------------------------------------------------------- end to end
TRAIN_AS_OF = datetime(2026, 4, 20, tzinfo=UTC)
SERVE_FROM = datetime(2026, 5, 1, tzinfo=UTC)  # a week materialized daily, then a week without
TOKEN = "served-test-admin"
ENV = {"CHURN_REGISTRY__REQUIRE_SIGNED_MODELS": "false", "CHURN_SERVING__ADMIN_TOKEN": TOKEN,
       "CHURN_SERVING__LOG_FEATURES_SAMPLE_RATE": "0.8", "CHURN_MONITORING__MIN_SEGMENT_SIZE": "100",
       "CHURN_MONITORING__EARLY_MIN_CHURNERS": "5"}


@pytest.fixture(scope="module")
def champion(tmp_path_factory: pytest.TempPathFactory):
    from mlflow import MlflowClient

    from mlflow_churn.data.simulator import SimulationSpec, simulate
    from mlflow_churn.registry.aliases import move_alias
    from mlflow_churn.training.train import train

    ws = tmp_path_factory.mktemp("served") / "ws"
    simulate(SimulationSpec(customers=2000, days=150, start=date(2026, 1, 1), seed=5), ws / "data")
    cfg = load_config(workspace=ws, environ={}, overrides={
        "training.n_trials": 1, "monitoring.min_segment_size": 100, "monitoring.early_min_churners": 5})
    res = train(cfg, TRAIN_AS_OF, n_trials=1, progress=False)
    move_alias(MlflowClient(cfg.mlflow_tracking_uri, cfg.mlflow_tracking_uri), cfg.training.model_name,
               "champion", res.version)
    return cfg, str(res.version)


def _serve_week(url: str, cfg, start: datetime, materialize_daily: bool) -> None:
    """Each day of the week: (materialize at that day,) then score 250 customers with the day as the
    requests' business time."""
    from serving_support import wait_ready

    from mlflow_churn.features.materialize import materialize
    from mlflow_churn.features.online import open_store

    with httpx.Client(base_url=url, timeout=60) as client:
        wait_ready(client, timeout=180)
        for k in range(7):
            day = start + timedelta(days=k)
            if materialize_daily:
                materialize(cfg, day)
            store = open_store(cfg)
            ids = store.customer_ids()[k * 7 % 300:][:250]
            store.close()
            for i in range(0, len(ids), 125):
                res = client.post("/predict", json={"customer_ids": ids[i:i + 125], "as_of": day.isoformat()},
                                  headers={"Authorization": f"Bearer {TOKEN}"})
                assert res.status_code == 200, res.text


@pytest.mark.slow
def test_served_data_monitoring_on_a_log_written_by_churn_serve(champion) -> None:
    """A real `churn serve` logs what it served (80% of rows keep their values); `churn monitor
    --source served` builds its window from that log and says so; the serving-skew check finds
    nothing while the store is materialized daily, and blocks the first window after
    materialization stopped, naming the features and the values' age."""
    from mlflow import MlflowClient
    from serving_support import ServeProcess, run_cli

    from mlflow_churn.monitoring.monitor import monitor

    cfg, version = champion
    with ServeProcess(cfg, **ENV) as srv:
        _serve_week(srv.url, cfg, SERVE_FROM, materialize_daily=True)
        healthy_end = SERVE_FROM + timedelta(days=6)
        res = run_cli(cfg, ["monitor", "--as-of", healthy_end.isoformat(), "--source", "served",
                            "--no-report", "--no-progress", "--json"], **ENV)
        assert res.returncode == 0, res.stderr[-3000:]
        healthy = json.loads(res.stdout)
        # materialization stops: the service keeps serving the last batch while the data moves on
        _serve_week(srv.url, cfg, SERVE_FROM + timedelta(days=7), materialize_daily=False)
        stale_end = SERVE_FROM + timedelta(days=13)
        res = run_cli(cfg, ["monitor", "--as-of", stale_end.isoformat(), "--source", "served", "--no-report",
                            "--no-progress"], **ENV)
        assert res.returncode == 0, res.stderr[-3000:]
        out = res.stdout
    log = PredictionLog(cfg.prediction_log_url)
    counts = log.feature_counts()
    log.close()
    assert counts["rows"] == 14 * 250 and abs(counts["with_features"] / counts["rows"] - 0.8) < 0.05
    stats = healthy["stats"]
    assert stats["source"] == "served" and f"of version {version}" in stats["source_reason"]
    assert healthy["rows"] > 1000  # 7 days x 250 customers x 0.8 of them with values
    assert stats["serving_skew_rows"] > 400 and max(stats["serving_mismatch_rate"].values()) == 0
    assert not any("serving skew" in r for r in healthy["decision"]["reasons"])
    # the stale week: caught in the first window after the stop
    assert "source: served (" in out and "serving skew: " in out and "feature(s) differ" in out
    assert "decision: blocked" in out and "materialization running?" in out, out
    run_id = out.split("MLflow run: ")[1].split()[0]
    client = MlflowClient(cfg.mlflow_tracking_uri, cfg.mlflow_tracking_uri)
    run = client.get_run(run_id)
    assert run.data.params["source"] == "served" and run.data.tags["monitor.source"] == "served"
    assert run.data.tags["monitor.action"] == "blocked" and "tenure_days" in run.data.tags["monitor.features"]
    assert run.data.metrics["serving_skew.mismatch_rate.tenure_days"] > 0.5
    assert run.data.metrics["serving_skew.values_age_hours"] == 7 * 24
    names = {a.path for a in client.list_artifacts(run_id)}
    assert {"serving_skew.json", "serving_skew.png"} <= names
    skew = json.loads(Path(client.download_artifacts(run_id, "serving_skew.json")).read_text())
    assert skew["mismatches_total"] > 0 and {"customer_id", "feature", "online", "offline", "at"} <= set(
        skew["mismatches"][0])
    # a window without served rows: source served refuses, naming the count and the fixes (the CLI
    # prints that one line with exit 2, as for --source both); auto falls back to offline, saying so
    early = SERVE_FROM - timedelta(days=8)
    with pytest.raises(ChurnError, match=r"only 0 served row\(s\) with feature values of version .*"
                                         r"--source offline"):
        monitor(cfg, early, source="served", report=False, log=False)
    auto = monitor(cfg, early, report=False, log=False)
    assert auto.stats.source == "offline" and auto.stats.source_reason.startswith("only 0 served row(s)")
