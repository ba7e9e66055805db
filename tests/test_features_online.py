"""One contract suite for the online store, run against SQLite (WAL file) and the real Redis."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest

from mlflow_churn.config import ChurnConfig, load_config
from mlflow_churn.errors import ChurnError
from mlflow_churn.features import online
from mlflow_churn.features.materialize import materialize, run_every, served_features
from mlflow_churn.features.offline import compute_latest, data_bounds
from mlflow_churn.features.online import BatchInfo, OnlineStore, RedisStore, SqliteStore, open_store
from mlflow_churn.features.skew import check_skew, same_value

T1 = datetime(2026, 3, 20, tzinfo=UTC)
T2 = datetime(2026, 3, 27, tzinfo=UTC)
T3 = datetime(2026, 4, 3, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "redis"])
def backend(request: pytest.FixtureRequest) -> dict:
    """Config overrides of one backend (redis: a unique prefix on the machine's Redis)."""
    if request.param == "redis":
        request.applymarker(pytest.mark.redis)
        return {"features.online_backend": "redis",
                "features.redis_url": request.getfixturevalue("redis_url"),
                "features.redis_prefix": request.getfixturevalue("redis_prefix")}
    return {"features.online_backend": "sqlite"}


@pytest.fixture
def cfg(workspace: Path, small_data: Path, backend: dict) -> ChurnConfig:
    (workspace / "data").symlink_to(small_data, target_is_directory=True)
    return load_config(workspace=workspace, overrides=backend, environ={})


@pytest.fixture
def store(cfg: ChurnConfig) -> OnlineStore:
    s = open_store(cfg, must_exist=False)
    yield s
    s.close()


def _expected(cfg: ChurnConfig, as_of: datetime, ids: list[int] | None = None) -> pd.DataFrame:
    return compute_latest(cfg.data_dir, served_features(cfg), as_of, customer_ids=ids).frame.set_index(
        "customer_id")


def _assert_rows_equal(rows: dict, expected: pd.DataFrame) -> None:
    assert set(rows) == set(expected.index)
    for cid, row in rows.items():
        exp = expected.loc[cid]
        assert row.event_time == exp["event_time"].to_pydatetime()
        for name, value in row.values.items():
            want = exp[name].item() if hasattr(exp[name], "item") else exp[name]
            assert same_value(value, want), (cid, name, value, want)


def test_missing_store_names_the_fix(cfg: ChurnConfig) -> None:
    with pytest.raises(ChurnError, match="no online store at .*churn features materialize"):
        open_store(cfg, must_exist=True)


def test_materialize_serves_every_version_with_offline_values(cfg: ChurnConfig, store: OnlineStore) -> None:
    assert store.current_batch() is None and store.history() == []
    info = materialize(cfg, T1, store=store)
    names = set(info.features)
    assert {"monthly_usage", "monthly_usage_v2", "plan", "tenure_days"} <= names and len(names) >= 15
    expected = _expected(cfg, T1)
    assert info.rows == len(expected) and info.mode == "full" and info.updated_rows == info.rows
    assert info.watermark == expected["event_time"].max().to_pydatetime() <= T1
    assert info.duration_s is not None and info.finished_at >= info.started_at
    assert store.current_batch() == info and store.history() == [info]
    ids = [int(i) for i in expected.index[:40]] + [10**9]
    rows = store.get(ids)
    assert 10**9 not in rows
    _assert_rows_equal(rows, expected.loc[ids[:40]])
    some = store.get(ids[:3], features=["monthly_usage_v2", "plan"])
    assert all(list(r.values) == ["monthly_usage_v2", "plan"] for r in some.values())
    assert isinstance(some[ids[0]].values["plan"], str)
    with pytest.raises(ChurnError, match="not in this batch"):
        store.get(ids[:3], features=["monthly_usage_v7"])
    with pytest.raises(ChurnError, match="not an integer"):
        store.get(["7"])  # type: ignore[list-item]
    scanned = store.scan().set_index("customer_id")
    assert list(scanned.index) == sorted(expected.index)
    assert store.customer_ids() == sorted(int(i) for i in expected.index)
    # the store reopens from its location (another process, the API) and sees the same batch
    again = open_store(cfg, must_exist=True)
    assert again.current_batch() == info
    again.close()


def test_swap_history_and_retention(cfg: ChurnConfig, store: OnlineStore) -> None:
    a = materialize(cfg, T1, store=store)
    b = materialize(cfg, T2, store=store)
    c = materialize(cfg, T3, store=store)
    assert [h.batch_id for h in store.history()] == [c.batch_id, b.batch_id, a.batch_id]
    assert store.history(1) == [c]
    assert store.current_batch() == c
    cid = store.customer_ids()[0]
    assert store.get([cid])[cid].event_time == c.watermark
    # the previous batch keeps its rows (readers that saw the old pointer), older ones do not
    assert cid in store.get([cid], batch_id=b.batch_id)
    with pytest.raises(ChurnError, match="no longer keeps|has no rows"):
        store.get([cid], batch_id=a.batch_id)


def test_exception_mid_batch_leaves_previous_batch_serving(
    cfg: ChurnConfig, store: OnlineStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = materialize(cfg, T1, store=store)
    before = store.get(store.customer_ids()[:5])
    monkeypatch.setattr(online, "CHUNK_ROWS", 500)
    latest = compute_latest(cfg.data_dir, served_features(cfg), T2)
    info = BatchInfo(online.new_batch_id(T2), T2, latest.watermark, len(latest.frame),
                     first.features, datetime.now(UTC))
    written: list[int] = []

    def crash(n: int) -> None:
        written.append(n)
        raise RuntimeError("writer died")

    with pytest.raises(RuntimeError, match="writer died"):
        store.write_batch(latest.frame, info, on_chunk=crash)
    assert written == [500]
    assert store.current_batch() == first and store.history() == [first]
    assert store.get(list(before)) == before
    # the next batch succeeds and the half-written one leaves nothing behind
    monkeypatch.setattr(online, "CHUNK_ROWS", 50_000)
    second = materialize(cfg, T2, store=store)
    assert store.history() == [second, first]
    _assert_half_written_batch_dropped(store, info.batch_id)


def _assert_half_written_batch_dropped(store: OnlineStore, batch_id: str) -> None:
    if isinstance(store, SqliteStore):
        con = store._con()
        state = con.execute("SELECT seq, state FROM batches WHERE batch_id = ?", (batch_id,)).fetchone()
        assert state[1] == "failed"
        assert con.execute("SELECT count(*) FROM sqlite_master WHERE name = ?",
                           (f"rows_{state[0]}",)).fetchone()[0] == 0
    else:
        assert isinstance(store, RedisStore)
        assert not store._r.exists(store._k("rows", batch_id))
        assert not store._r.sismember(store._k("writing"), batch_id)


_WRITER = """
import sys, time
from datetime import UTC, datetime
from mlflow_churn.config import load_config
from mlflow_churn.features import online
from mlflow_churn.features.materialize import served_features
from mlflow_churn.features.offline import compute_latest
cfg = load_config(workspace=sys.argv[1], overrides=__import__("json").loads(sys.argv[2]), environ={})
online.CHUNK_ROWS = 300
store = online.open_store(cfg, must_exist=True)
as_of = datetime(2026, 3, 27, tzinfo=UTC)
latest = compute_latest(cfg.data_dir, served_features(cfg), as_of)
info = online.BatchInfo(online.new_batch_id(as_of), as_of, latest.watermark, len(latest.frame),
                        tuple(store.current_batch().features), datetime.now(UTC))
print(info.batch_id, flush=True)
def tick(n):
    print("chunk", n, flush=True)
    time.sleep(60)
store.write_batch(latest.frame, info, on_chunk=tick)
"""


@pytest.mark.slow
def test_killed_writer_leaves_previous_batch_serving(cfg: ChurnConfig, store: OnlineStore,
                                                     backend: dict) -> None:
    first = materialize(cfg, T1, store=store)
    ids = store.customer_ids()[:20]
    before = store.get(ids)
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(cfg.workspace), json.dumps(backend)],
                            stdout=subprocess.PIPE, text=True, cwd=cfg.workspace)
    try:
        batch_id = proc.stdout.readline().strip()
        assert proc.stdout.readline().startswith("chunk 300")  # rows are being written
        os.kill(proc.pid, signal.SIGKILL)  # crash mid-batch
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    fresh = open_store(cfg, must_exist=True)
    try:
        assert fresh.current_batch() == first
        assert fresh.get(ids) == before
        assert [h.batch_id for h in fresh.history()] == [first.batch_id]
        second = materialize(cfg, T2, store=fresh)
        assert fresh.current_batch() == second
        _assert_half_written_batch_dropped(fresh, batch_id)
    finally:
        fresh.close()


def test_incremental_recomputes_customers_with_new_events(cfg: ChurnConfig, store: OnlineStore) -> None:
    full = materialize(cfg, T1, store=store)
    inc = materialize(cfg, T1 + timedelta(days=1), incremental=True, store=store)
    assert inc.mode == "incremental" and inc.parent_batch_id == full.batch_id
    assert inc.watermark == T1 + timedelta(days=1)
    expected = _expected(cfg, T1 + timedelta(days=1))
    # customers alive at the new as_of are served; those who churned since are gone
    assert store.customer_ids() == sorted(int(i) for i in expected.index)
    assert 0 < inc.updated_rows <= inc.rows == len(expected)
    sample = [int(i) for i in expected.index[::97]]
    _assert_rows_equal(store.get(sample), expected.loc[sample])
    with pytest.raises(ChurnError, match="not after"):
        materialize(cfg, T1, incremental=True, store=store)


def test_check_skew_finds_no_skew_then_a_rewritten_partition(cfg: ChurnConfig, store: OnlineStore,
                                                            tmp_path: Path) -> None:
    materialize(cfg, T1, store=store)
    report = check_skew(cfg, sample=150, seed=3, store=store)
    assert report.ok and report.compared == 150 and report.mismatch_rate == 0.0
    # late data: yesterday's partition is rewritten after the batch (minutes doubled)
    data = tmp_path / "data-late"
    import shutil
    shutil.copytree(cfg.data_dir, data)
    part = data / "activity" / f"date={(T1 - timedelta(days=1)).date()}" / "part-0.parquet"
    frame = pd.read_parquet(part)
    frame["minutes_used"] = frame["minutes_used"] * 2 + 1
    frame.to_parquet(part, index=False)
    late_cfg = cfg.model_copy(update={"workspace": tmp_path / "late-ws"})
    (tmp_path / "late-ws").mkdir()
    (tmp_path / "late-ws" / "data").symlink_to(data, target_is_directory=True)
    report = check_skew(late_cfg, sample=150, seed=3, store=store)
    assert not report.ok
    by = report.by_feature()
    assert by["monthly_usage"] == report.compared and by["minutes_7d"] == report.compared
    assert "plan" not in by and "sessions_30d" not in by
    first = report.mismatches[0]
    assert not same_value(first.online, first.offline)


def test_run_every_writes_then_waits_for_new_data(cfg: ChurnConfig, store: OnlineStore) -> None:
    naps: list[float] = []
    seen: list[str] = []
    written = run_every(cfg, timedelta(hours=1), incremental=True, max_runs=3, store=store,
                        sleep=naps.append, on_run=lambda info, why: seen.append(why))
    assert len(written) == 1 and written[0].as_of == data_bounds(cfg.data_dir).last_event
    assert seen[0] == "written" and all(w.startswith("no data after") for w in seen[1:])
    assert len(naps) == 2 and all(0 < n <= 3600 for n in naps)
    with pytest.raises(ChurnError, match="--every"):
        run_every(cfg, timedelta(0), store=store)


def test_non_finite_values_round_trip(tmp_path: Path) -> None:
    """DuckDB writes NaN / Infinity literals for non-finite doubles; the fast parser falls back."""
    frame = pd.DataFrame({"customer_id": [1, 2], "event_time": [pd.Timestamp(T1)] * 2,
                          "x": [float("nan"), float("inf")], "y": [1.5, -2.0]})
    store = SqliteStore(tmp_path / "online.db")
    info = BatchInfo(batch_id=online.new_batch_id(T1), as_of=T1, watermark=T1, rows=2,
                     features=("x", "y"), started_at=datetime.now(UTC))
    store.write_batch(frame, info)
    rows = store.get([1, 2])
    assert rows[1].values == {"x": None, "y": 1.5}  # pandas NaN is SQL NULL in DuckDB
    assert rows[2].values == {"x": float("inf"), "y": -2.0}
    assert online.loads_payloads('[{"a":1.25}]') == [{"a": 1.25}]
    store.close()
