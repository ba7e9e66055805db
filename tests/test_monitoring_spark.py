"""Drift on Spark: the window's counts as Spark aggregations give the local engine's statistics."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mlflow_churn.config import load_config
from mlflow_churn.features.offline import build_training_frame
from mlflow_churn.features.registry import load_registry
from mlflow_churn.monitoring.monitor import window_cutoffs
from mlflow_churn.monitoring.spark_drift import spark_window_counts
from mlflow_churn.monitoring.window_drift import drift_from_counts, window_counts, window_drift
from mlflow_churn.training.profile import build_profile

AS_OF = datetime(2026, 4, 7, tzinfo=UTC)


def assert_same(a, b, where: str = "") -> None:
    """Equal structures, floats to 1e-9 relative (NaN equals NaN)."""
    if isinstance(a, dict):
        assert set(a) == set(b), f"{where}: keys {set(a) ^ set(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        if a is None or b is None:
            assert a is b, where
        elif math.isnan(a) or math.isnan(b):
            assert math.isnan(a) and math.isnan(b), f"{where}: {a} vs {b}"
        else:
            assert a == pytest.approx(b, rel=1e-9, abs=1e-12), f"{where}: {a} vs {b}"
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


@pytest.fixture(scope="module")
def window(small_data: Path):
    fs = load_registry().feature_set("churn_default")
    ref = build_training_frame(small_data, fs, [datetime(2026, 3, 10, tzinfo=UTC)], 30, label=False)
    rng = np.random.default_rng(0)
    profile = build_profile(ref, fs, rng.beta(1, 8, len(ref)), segments=["plan", "region", "contract"])
    cur = build_training_frame(small_data, fs, window_cutoffs(AS_OF, 7), 30, label=False)
    # edge values: on an edge (right-closed bins), beyond the outer edges, +-inf, NaN, unseen category
    num = next(f for f, e in profile["features"].items() if e["kind"] == "numeric" and len(e["edges"]) > 2)
    cur[num] = cur[num].astype("float64")
    edges = profile["features"][num]["edges"]
    cur.loc[cur.index[:8], num] = [edges[0], edges[1], edges[-1], np.inf, -np.inf, np.nan, -0.0, 1e12]
    cat = next(f for f, e in profile["features"].items() if e["kind"] == "categorical")
    cur[cat] = cur[cat].astype("object")
    cur.loc[cur.index[8:10], cat] = ["never-seen", None]
    cfg = load_config(environ={}, overrides={"monitoring.min_segment_size": 100})
    return profile, cur, rng.beta(1, 8, len(cur)), cfg


@pytest.mark.spark
def test_spark_counts_give_the_local_statistics(spark, window) -> None:
    profile, cur, scores, cfg = window
    local = window_drift(cur, scores, profile, cfg)
    sdf = spark.createDataFrame(cur.assign(churn_probability=scores))
    counts = spark_window_counts(sdf, profile, cfg)
    mine = window_counts(cur, scores, profile, cfg)
    for name, arr in mine.per_day.items():  # the histograms themselves, integer for integer
        assert np.array_equal(arr, counts.per_day[name]), name
    assert mine.nulls == counts.nulls and mine.n_eff == counts.n_eff and mine.rows == counts.rows
    for name, (le, n) in mine.ks_le.items():
        assert n == counts.ks_le[name][1] and np.array_equal(le, counts.ks_le[name][0]), name
    remote = drift_from_counts(counts, profile, cfg)
    a, b = json.loads(json.dumps(local.stats.to_dict(), default=str)), \
        json.loads(json.dumps(remote.stats.to_dict(), default=str))
    assert_same(a, b, "stats")
    assert a["segment_psi"] and a["ks"] and a["chi2"] and a["js"]
    pd.testing.assert_frame_equal(local.daily, remote.daily, check_exact=False, rtol=1e-9, check_freq=False,
                                  check_index_type=False)
    pd.testing.assert_frame_equal(local.daily_segments.sort_index(axis=1),
                                  remote.daily_segments.sort_index(axis=1), check_exact=False, rtol=1e-9,
                                  check_freq=False, check_index_type=False)


SEGMENTS = ["plan", "region", "contract", "tenure_bucket"]


def perf_dicts(perfs) -> dict:
    """Every field of each segment's performance, as plain values."""
    return {k: asdict(p) for k, p in perfs.items()}


@pytest.fixture(scope="module")
def performance_rows(small_data: Path, window):
    """Raw rows of the window (tenure on the buckets' edges, missing, infinite; plans missing or
    unknown) and matured rows (30-day labels up to the window's end) with scores: one region
    only in the matured rows, one in 5 matured rows only. Returns (feature set, (raw window,
    its frame as the local builder coerces it, scores), (raw matured, frame, scores))."""
    from mlflow_churn.features.offline import coerce_frame

    _, cur, scores, _ = window
    fs = load_registry().feature_set("churn_default")
    matured = build_training_frame(small_data, fs, window_cutoffs(datetime(2026, 3, 8, tzinfo=UTC), 7), 30,
                                   label=True, label_as_of=AS_OF)
    rng = np.random.default_rng(1)
    m_scores = np.clip(rng.beta(1, 8, len(matured)) + 0.3 * matured["label"].to_numpy(), 0, 1)
    cur = cur.astype({c: "object" for c in fs.categorical})
    matured = matured.astype({c: "object" for c in fs.categorical})
    cur["tenure_days"] = cur["tenure_days"].astype("float64")
    cur.loc[cur.index[10:30], "tenure_days"] = [np.nan] * 10 + [-1.0, 0.0, 89.999, 90.0, 365.0, 729.0, 730.0,
                                                               1e9, np.inf, -np.inf]
    cur.loc[cur.index[30:40], "plan"] = [None] * 5 + ["not-a-plan"] * 5
    only_matured, few = fs.categorical["region"][-1], fs.categorical["region"][-2]
    other = fs.categorical["region"][0]
    cur.loc[cur["region"] == only_matured, "region"] = other
    rare = matured.index[matured["region"] == few][5:]
    matured.loc[rare, "region"] = other
    return (fs, (cur, coerce_frame(cur, fs, label=False), scores),
            (matured, coerce_frame(matured, fs, label=True), m_scores))


def _as_spark_rows(spark, raw: pd.DataFrame, scores: np.ndarray):
    """Raw rows and their scores as a Spark DataFrame (missing categories null)."""
    raw = raw.assign(churn_probability=scores)
    for col in raw.columns:
        if raw[col].dtype == object:
            raw[col] = raw[col].where(raw[col].notna(), None)
    return spark.createDataFrame(raw)


@pytest.mark.spark
@pytest.mark.parametrize("with_matured", [True, False])
def test_segment_performance_on_spark_is_the_local_one(spark, performance_rows, with_matured: bool) -> None:
    """The per-segment performance computed per segment on the executors equals the local
    function's on the whole frames, field for field."""
    from mlflow_churn.monitoring.spark_performance import spark_segment_performance
    from mlflow_churn.stats.performance import segment_performance

    fs, (cur_raw, cur, scores), (mat_raw, matured, m_scores) = performance_rows
    cfg = load_config(environ={})
    kwargs = {"calibration": {"method": "platt", "a": 1.3, "b": 0.2}, "min_rows": 40, "min_churners": 5}
    local = segment_performance(SEGMENTS, cur, scores, cfg.evaluation,
                                matured=matured if with_matured else None,
                                matured_scores=m_scores if with_matured else None, **kwargs)
    remote = spark_segment_performance(
        SEGMENTS, _as_spark_rows(spark, cur_raw, scores), fs, cfg.evaluation,
        matured=_as_spark_rows(spark, mat_raw, m_scores) if with_matured else None, **kwargs)
    assert list(remote) == list(local)
    assert_same(perf_dicts(local), perf_dicts(remote), "segments")
    assert {k.partition("=")[0] for k in local} == set(SEGMENTS)
    assert "plan=not-a-plan" not in local
    regions = fs.categorical["region"]
    if with_matured:  # the edge cases are reached
        assert local[f"region={regions[-1]}"].estimate_reason == "no rows of this segment in the window"
        assert local[f"region={regions[-2]}"].rows == 5
        assert local[f"region={regions[-2]}"].reason.startswith("too few rows")
        assert sum(p.auc is not None for p in local.values()) >= 5
        assert all(p.auc_se is not None and math.isfinite(p.auc_se) for p in local.values() if p.auc)
    else:
        assert {p.reason for p in local.values()} == {"labels not matured yet"}
        assert sum(p.estimated_auc is not None for p in local.values()) >= 5


@pytest.mark.spark
def test_segment_performance_on_spark_refuses_a_lacking_column(spark, performance_rows) -> None:
    from mlflow_churn.errors import ChurnError
    from mlflow_churn.monitoring.spark_performance import spark_segment_performance

    fs, (cur_raw, _, scores), _ = performance_rows
    with pytest.raises(ChurnError, match="segment column.*no_such_column"):
        spark_segment_performance(["plan", "no_such_column"], _as_spark_rows(spark, cur_raw, scores), fs,
                                  load_config(environ={}).evaluation)


TRAIN_AS_OF = datetime(2026, 4, 20, tzinfo=UTC)
#: 38 days after training: the window's matured (30-day) and early labels are after it
MONITOR_AS_OF = datetime(2026, 5, 28, tzinfo=UTC)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    """A trained champion on segment_shift data (the drift and segment rules have work to do)."""
    from datetime import date

    from mlflow import MlflowClient

    from mlflow_churn.data.simulator import SimulationSpec, simulate
    from mlflow_churn.registry.aliases import move_alias
    from mlflow_churn.training.train import train

    ws = tmp_path_factory.mktemp("monspark") / "ws"
    simulate(SimulationSpec(customers=3000, days=150, start=date(2026, 1, 1), seed=3,
                            scenario="segment_shift", onset_day=110), ws / "data")
    cfg = load_config(workspace=ws, environ={}, overrides={
        "training.n_trials": 1, "monitoring.min_segment_size": 100})
    res = train(cfg, TRAIN_AS_OF, n_trials=1, progress=False)
    move_alias(MlflowClient(cfg.mlflow_tracking_uri, cfg.mlflow_tracking_uri), cfg.training.model_name,
               "champion", res.version)
    return cfg


@pytest.fixture(scope="module")
def local_result(trained):
    """The local engine's monitor of the window (no run), for both engines' comparisons."""
    from mlflow_churn.monitoring.monitor import monitor

    return monitor(trained, MONITOR_AS_OF, report=False, log=False, source="offline")


@pytest.mark.spark
@pytest.mark.slow
def test_monitor_engine_spark_same_decision_and_metrics(spark, trained, local_result, tmp_path: Path) -> None:
    from mlflow_churn.monitoring.monitor import SparkEngine, monitor
    from mlflow_churn.monitoring.runs import _segment_metrics, _window_metrics

    cfg, local = trained, local_result
    # logged with the report: the Spark engine reads every column of the window back for it
    remote = monitor(cfg, MONITOR_AS_OF, report=True, log=True, history=[], source="offline", engine="spark",
                     spark=SparkEngine("local[2]", str(tmp_path), spark))
    assert remote.run_id
    assert remote.decision.action == local.decision.action and remote.decision.fired == local.decision.fired
    assert remote.rows == local.rows
    metrics = [_window_metrics(r) | _segment_metrics(r) for r in (local, remote)]
    assert_same(*metrics, "metrics")
    assert_same(json.loads(json.dumps(local.stats.to_dict(), default=str)),
                json.loads(json.dumps(remote.stats.to_dict(), default=str)), "stats")
    assert local.stats.psi and local.stats.segment_psi
    # every segment's performance figure (realised, estimated, the baselines and the drops)
    assert_same(perf_dicts(local.performance.segments), perf_dicts(remote.performance.segments), "segments")
    assert local.performance.matured_rows and local.performance.auc and local.performance.early
    assert any(p.auc is not None for p in local.performance.segments.values())
    assert any(p.estimated_auc is not None for p in local.performance.segments.values())
    assert remote.performance.segment_z == local.performance.segment_z
    overall = [{k: v for k, v in asdict(r.performance).items() if k != "segments"} for r in (local, remote)]
    assert_same(*overall, "performance")
    assert not list(tmp_path.iterdir())  # the staged window is removed


@pytest.mark.spark
@pytest.mark.slow
def test_materialize_and_monitor_on_a_standalone_cluster(trained, local_result, redis_url: str,
                                                          redis_prefix: str, tmp_path: Path) -> None:
    """``churn features materialize`` and ``churn monitor`` with ``--engine spark`` against a
    real standalone master + worker (the pyspark wheel's daemons): executors write the online
    batch to Redis; the monitor stages on a directory both sides read and gives the local
    engine's decision."""
    import subprocess
    import sys

    import redis
    from spark_cluster_support import spark_env, standalone_cluster

    ws = trained.workspace
    staging = tmp_path / "staging"
    staging.mkdir()
    env = spark_env(tmp_path) | {  # the fixture's config, and the online store in Redis
        "CHURN_MONITORING__MIN_SEGMENT_SIZE": "100", "CHURN_FEATURES__ONLINE_BACKEND": "redis",
        "CHURN_FEATURES__REDIS_URL": redis_url, "CHURN_FEATURES__REDIS_PREFIX": redis_prefix}
    churn = [sys.executable, "-m", "mlflow_churn.cli", "--workspace", str(ws)]
    with standalone_cluster(tmp_path) as master:
        mat = subprocess.run(
            [*churn, "features", "materialize", "--engine", "spark", "--spark-master", master,
             "--as-of", MONITOR_AS_OF.isoformat()], env=env, capture_output=True, text=True, timeout=600)
        assert mat.returncode == 0, mat.stderr[-3000:]
        mon = subprocess.run(
            [*churn, "monitor", "--engine", "spark", "--spark-master", master, "--staging", str(staging),
             "--no-report", "--no-progress", "--source", "offline", "--as-of", MONITOR_AS_OF.isoformat(),
             "--json"], env=env, capture_output=True, text=True, timeout=600)
    assert mon.returncode == 0, mon.stderr[-3000:]
    client = redis.Redis.from_url(redis_url)
    try:
        assert next(client.scan_iter(match=f"{redis_prefix}*", count=1000), None) is not None
    finally:
        client.close()
    remote = json.loads(mon.stdout[mon.stdout.index("{"):])
    assert remote["decision"]["action"] == local_result.decision.action
    assert_same(remote["stats"]["psi"], local_result.stats.psi, "psi")
    assert not list(staging.iterdir())


@pytest.mark.spark
def test_spark_counts_with_many_segment_values_and_customers_moving(spark) -> None:
    """Segment columns of 70 values (two 63-value words of the distinct count's bit sets) and
    of 306 (with the 70, a joint table too big for one ``bincount``: the counting splits them;
    quotes, backslashes, empty and non-ASCII text among them),
    customers whose values change from day to day, values the profile lacks and nulls: the
    Spark counts equal the local engine's, and the session's settings are left as they were."""
    from mlflow_churn.monitoring.spark_drift import BYPASS_PARTIAL, _joints

    rng = np.random.default_rng(5)
    n, days = 3000, pd.date_range("2026-03-01", periods=3, freq="D", tz="UTC")
    odd = ["", "it's", "back\\slash", "new\nline", "`tick`", "ünï ☃"]  # text the SQL must keep
    tiers = sorted([*(f"t{v:03d}" for v in range(300)), *odd])
    values = {"grp": [f"g{v:02d}" for v in range(70)], "tier": tiers}
    frame = pd.concat([pd.DataFrame({
        "customer_id": np.arange(n, dtype="int64"), "cutoff": day,
        "x": np.where(rng.random(n) < 0.05, np.nan, rng.normal(0.0, 1.0, n)),
        "grp": rng.choice([*values["grp"], "g99", None], n),
        "tier": rng.choice([*values["tier"], "t999", None], n),
    }) for day in days], ignore_index=True)
    scores = rng.beta(1, 8, len(frame))
    sample = np.sort(rng.normal(0.0, 1.0, 500))
    numeric = {"kind": "numeric", "edges": [-1.0, 0.0, 1.0], "shares": [0.15, 0.35, 0.35, 0.15], "sample":
               sample.tolist(), "count": 1000, "null_rate": 0.0}
    entry = {"count": 50, "features": {"x": numeric}, "score": numeric}
    profile = {"rows": 1000, "features": {"x": numeric},
               "score": {"kind": "numeric", "edges": [0.1, 0.2], "shares": [0.6, 0.3, 0.1], "count": 1000},
               "segments": {col: dict.fromkeys(vals, entry) for col, vals in values.items()}}
    cfg = load_config(environ={}, overrides={"monitoring.segments": ["grp", "tier"],
                                             "monitoring.min_segment_size": 10})
    assert len(_joints([70, 306], len(days) * 5)) == 2  # a batch holding every day: two tables
    keys = ["spark.sql.execution.arrow.maxRecordsPerBatch", BYPASS_PARTIAL]
    before = [spark.conf.get(k, None) for k in keys]
    counts = spark_window_counts(spark.createDataFrame(frame.assign(churn_probability=scores)).repartition(3),
                                 profile, cfg)
    assert [spark.conf.get(k, None) for k in keys] == before
    mine = window_counts(frame, scores, profile, cfg)
    assert list(counts.days) == list(mine.days) and counts.rows == mine.rows and counts.n_eff == mine.n_eff
    assert mine.nulls == counts.nulls
    for name, arr in mine.per_day.items():
        assert np.array_equal(arr, counts.per_day[name]), name
    assert np.array_equal(mine.ks_le["x"][0], counts.ks_le["x"][0])
    assert mine.ks_le["x"][1] == counts.ks_le["x"][1]
    for col, vals in values.items():
        local, remote = mine.segments[col], counts.segments[col]
        assert remote.values == vals
        for i, value in enumerate(local.values):
            if value in vals:
                j = vals.index(value)
                assert local.distinct[i] == remote.distinct[j], value
                for name in local.per_day:
                    assert np.array_equal(local.per_day[name][i], remote.per_day[name][j]), (value, name)
        assert sum(remote.distinct) < 3 * n and max(remote.distinct) > 0
