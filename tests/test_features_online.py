"""One contract suite for the online store, run against SQLite (WAL file) and the real Redis:
values, swap and retention, crashes, concurrent writers, incremental batches, the scheduler."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from wait_support import wait_until

from mlflow_churn.config import ChurnConfig, load_config
from mlflow_churn.data.bounds import data_bounds
from mlflow_churn.errors import ChurnError
from mlflow_churn.features import online
from mlflow_churn.features.materialize import materialize, run_every, served_features
from mlflow_churn.features.offline import compute_latest
from mlflow_churn.features.online import BatchInfo, OnlineStore, RedisStore, SqliteStore, open_store
from mlflow_churn.features.skew import check_skew, same_value

T1 = datetime(2026, 3, 20, tzinfo=UTC)
T2 = datetime(2026, 3, 27, tzinfo=UTC)
T3 = datetime(2026, 4, 3, tzinfo=UTC)


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def backend(request: pytest.FixtureRequest) -> dict:
    """Config overrides of one backend (redis: a unique prefix on the machine's Redis)."""
    if request.param == "redis":
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
    monkeypatch.setattr(online.base, "CHUNK_ROWS", 500)
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
    monkeypatch.setattr(online.base, "CHUNK_ROWS", 50_000)
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
online.base.CHUNK_ROWS = 300
online.RedisStore.LOCK_TTL_S = float(sys.argv[3])
store = online.open_store(cfg, must_exist=True)
as_of = datetime(2026, 3, 27, tzinfo=UTC)
latest = compute_latest(cfg.data_dir, served_features(cfg), as_of)
info = online.BatchInfo(online.new_batch_id(as_of), as_of, latest.watermark, len(latest.frame),
                        tuple(store.current_batch().features), datetime.now(UTC))
print(info.batch_id, flush=True)
def tick(n):
    print("chunk", n, flush=True)
    if n == 300:
        sys.stdin.readline()  # hold the writer lock mid-batch until the test says go on
store.write_batch(latest.frame, info, on_chunk=tick)
print("flipped", flush=True)
"""


def _start_writer(cfg: ChurnConfig, backend: dict, lock_ttl_s: float = 30.0) -> tuple[subprocess.Popen, str]:
    """A writer process stopped mid-batch (its first chunk written, the lock held)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(cfg.workspace), json.dumps(backend), str(lock_ttl_s)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=cfg.workspace)
    batch_id = proc.stdout.readline().strip()
    assert proc.stdout.readline().startswith("chunk 300")  # rows are being written
    return proc, batch_id


def _wait_for_lock_release(store: OnlineStore) -> None:
    """A killed Redis writer's lease runs out after its TTL (a file lock goes with the process)."""
    if isinstance(store, RedisStore):
        wait_until(lambda: not store._r.exists(store.writer().key), 60, "the dead writer's lease to expire")


@pytest.mark.slow
def test_killed_writer_leaves_previous_batch_serving(cfg: ChurnConfig, store: OnlineStore,
                                                     backend: dict) -> None:
    first = materialize(cfg, T1, store=store)
    ids = store.customer_ids()[:20]
    before = store.get(ids)
    proc, batch_id = _start_writer(cfg, backend, lock_ttl_s=1.0)
    try:
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
        _wait_for_lock_release(fresh)
        second = materialize(cfg, T2, store=fresh)
        assert fresh.current_batch() == second
        _assert_half_written_batch_dropped(fresh, batch_id)
    finally:
        fresh.close()


@pytest.mark.slow
def test_second_writer_is_refused_while_one_writes(cfg: ChurnConfig, store: OnlineStore,
                                                   backend: dict) -> None:
    """Two materialize runs at once (real processes): the second fails at once, naming the
    first; the first's batch goes live intact; the previous batch serves meanwhile."""
    first = materialize(cfg, T1, store=store)
    ids = store.customer_ids()[:30]
    before = store.get(ids)
    proc, batch_id = _start_writer(cfg, backend)
    try:
        with pytest.raises(ChurnError, match=f"another `churn features materialize`.*pid {proc.pid}"):
            materialize(cfg, T3, store=store)
        with pytest.raises(ChurnError, match="another `churn features materialize`"):
            materialize(cfg, T3)  # its own store object, as another process would open it
        assert store.current_batch() == first and store.get(ids) == before
        proc.stdin.write("go on\n")
        proc.stdin.flush()
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and "flipped" in out
    assert store.current_batch().batch_id == batch_id
    _assert_rows_equal(store.get(ids), _expected(cfg, T2, ids))  # the writer's values, all there
    assert [h.batch_id for h in store.history()] == [batch_id, first.batch_id]
    third = materialize(cfg, T3, store=store)  # the lock was released
    assert store.current_batch() == third


def _take_over(store: OnlineStore, cfg: ChurnConfig) -> BatchInfo | None:
    """What another writer does after this one lost its lock (Redis: the lease ran out while
    the writer stalled; SQLite: a writer that ignores the lock cleans up 'writing' batches)."""
    if isinstance(store, RedisStore):
        store._r.delete(store.writer().key)  # the lease expires
        return materialize(cfg, T3)  # a new writer takes the lock and drops the stalled batch
    con = store._con()
    con.execute("UPDATE batches SET state = 'failed' WHERE state = 'writing'")
    return None


def test_writer_that_lost_its_batch_cannot_flip(cfg: ChurnConfig, store: OnlineStore) -> None:
    first = materialize(cfg, T1, store=store)
    latest = compute_latest(cfg.data_dir, served_features(cfg), T2)
    info = BatchInfo(online.new_batch_id(T2), T2, latest.watermark, len(latest.frame), first.features,
                     datetime.now(UTC))
    taken: list[BatchInfo | None] = []
    with pytest.raises(ChurnError, match="lost its writer lock or was cleaned up"):
        store.write_batch(latest.frame, info, on_chunk=lambda n: taken.append(_take_over(store, cfg)))
    winner = taken[0] or first
    assert store.current_batch() == winner  # no flip to the stalled writer's batch
    ids = store.customer_ids()[:25]
    _assert_rows_equal(store.get(ids), _expected(cfg, winner.as_of, ids))  # lookups still work
    assert info.batch_id not in [h.batch_id for h in store.history()]
    _assert_half_written_batch_dropped(store, info.batch_id)
    assert materialize(cfg, T3 + timedelta(days=1), store=store).rows > 0  # the store is usable


def test_older_as_of_is_refused_unless_forced(cfg: ChurnConfig, store: OnlineStore) -> None:
    newer = materialize(cfg, T2, store=store)
    with pytest.raises(ChurnError, match="older than that of the serving batch.*--force"):
        materialize(cfg, T1, store=store)
    assert store.current_batch() == newer and store.history() == [newer]
    again = materialize(cfg, T2, store=store)  # the same as_of may be recomputed
    older = materialize(cfg, T1, store=store, force=True)
    assert store.current_batch() == older and store.history() == [older, again, newer]


@pytest.mark.redis
def test_redis_lease_is_renewed_while_held(redis_url: str, redis_prefix: str) -> None:
    ttl = 3.0
    store = RedisStore(redis_url, redis_prefix, lock_ttl_s=ttl)
    other = RedisStore(redis_url, redis_prefix)
    try:
        with store.writer() as lock:
            # Watch the lease instead of sleeping a fixed time: its remaining time only goes up
            # when the heartbeat renews it. Held past its first term after two renewals = kept.
            taken, renewals, last = time.monotonic(), 0, store._r.pttl(lock.key)
            while renewals < 2 or time.monotonic() - taken <= ttl * 1.2:
                assert time.monotonic() - taken < 60, f"{renewals} renewals in 60 s"
                left = store._r.pttl(lock.key)
                assert left > 0, "the lease expired while held"
                renewals += left > last + 100
                last = left
                time.sleep(0.05)
            assert lock.owned()
            with pytest.raises(ChurnError, match="another `churn features materialize`.*expires in"):
                other.writer().acquire()
        assert not store._r.exists(lock.key)  # released on exit
        with other.writer():
            pass
    finally:
        store.close()
        other.close()


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
    assert inc.feature_hashes == full.feature_hashes == {f.full_name: f.hash for f in served_features(cfg)}
    with pytest.raises(ChurnError, match="not after"):
        materialize(cfg, inc.as_of, incremental=True, store=store)


def _silence(data: Path, ids: set[int], since: datetime) -> None:
    """Remove the activity of ``ids`` from the day ``since`` on (they stop using the service)."""
    for part in sorted((data / "activity").glob("date=*/part-0.parquet")):
        if datetime.fromisoformat(part.parent.name.split("=")[1]).replace(tzinfo=UTC) >= since:
            table = pq.read_table(part)
            keep = ~pd.Series(table.column("customer_id").to_numpy()).isin(ids).to_numpy()
            pq.write_table(table.filter(keep), part, compression="zstd")


def test_incremental_equals_a_full_batch_when_customers_go_quiet(
    workspace: Path, small_data: Path, backend: dict
) -> None:
    """Customers without new events: their windows slide and tenure_days moves with as_of.
    (The simulator writes a row for every live customer every day, so this needs quiet ones.)"""
    shutil.copytree(small_data, workspace / "data")
    cfg = load_config(workspace=workspace, overrides=backend, environ={})
    quiet = set(range(1, 301))  # no activity at all in the longest window of both batches
    stopping = set(range(301, 601))  # active inside the window, nothing after March 10
    _silence(cfg.data_dir, quiet, datetime(2026, 1, 10, tzinfo=UTC))
    _silence(cfg.data_dir, stopping, datetime(2026, 3, 10, tzinfo=UTC))
    store = open_store(cfg, must_exist=False)
    try:
        full = materialize(cfg, T1, store=store)
        inc = materialize(cfg, T2, incremental=True, store=store)
        assert inc.mode == "incremental" and inc.parent_batch_id == full.batch_id
        assert 0 < inc.updated_rows < inc.rows  # the quiet customers were carried over
        expected = _expected(cfg, T2)
        assert inc.rows == len(expected) and inc.watermark == expected["event_time"].max().to_pydatetime()
        _assert_rows_equal(store.get([int(i) for i in expected.index]), expected)
        report = check_skew(cfg, sample=inc.rows, store=store)
        assert report.ok and report.compared == inc.rows, report.by_feature()
        carried = [i for i in quiet if i in expected.index][:5]
        old, new = store.get(carried, batch_id=full.batch_id), store.get(carried)
        assert carried and all(new[i].values["tenure_days"] == old[i].values["tenure_days"] + 7
                               for i in carried)
    finally:
        store.close()


def test_incremental_refuses_a_parent_under_other_definitions(cfg: ChurnConfig, store: OnlineStore) -> None:
    full = materialize(cfg, T1, store=store)
    latest = compute_latest(cfg.data_dir, served_features(cfg), T1)
    hashes = dict(full.feature_hashes, monthly_usage="0" * 64)
    for recorded, why in ((hashes, "definition of monthly_usage changed"),
                          (None, "does not record its definition hashes")):
        info = BatchInfo(online.new_batch_id(T1), T1, latest.watermark, len(latest.frame), full.features,
                         datetime.now(UTC), feature_hashes=recorded)
        store.write_batch(latest.frame, info)
        with pytest.raises(ChurnError, match=why):
            materialize(cfg, T2, incremental=True, store=store)


def test_batch_info_reads_older_and_newer_records() -> None:
    info = BatchInfo("b-1", T1, T1, 3, ("a", "b"), T1, feature_hashes={"a": "1", "b": "2"})
    assert BatchInfo.from_dict(json.loads(info.to_json())) == info
    old = info.to_dict()
    del old["feature_hashes"]  # written before hashes were recorded
    assert BatchInfo.from_dict(old).feature_hashes is None
    assert BatchInfo.from_dict(old).definition_conflicts({"a": "x"}) == []
    assert BatchInfo.from_dict({**info.to_dict(), "from_a_newer_writer": 1}) == info
    assert info.definition_conflicts({"a": "1", "b": "9", "c": None}) == ["b"]


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


class _Proxy:
    """A TCP forwarder to the machine's Redis that the test can cut and restore (a real
    connection failure, not a mock)."""

    def __init__(self, port: int = 0) -> None:
        self._socks: list[socket.socket] = []
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", port))
        self.listener.listen()
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", 6379))
            self._socks += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() (Linux)
        except OSError:
            pass
        self.listener.close()
        for s in self._socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


@pytest.mark.redis
def test_run_every_survives_a_lost_redis_connection(workspace: Path, small_data: Path,
                                                   redis_prefix: str) -> None:
    proxy = _Proxy()
    overrides = {"features.online_backend": "redis", "features.redis_prefix": redis_prefix,
                 "features.redis_url": f"redis://127.0.0.1:{proxy.port}/0"}
    (workspace / "data").symlink_to(small_data, target_is_directory=True)
    cfg = load_config(workspace=workspace, overrides=overrides, environ={})
    store = open_store(cfg, must_exist=False)
    seen: list[str] = []
    state = {"proxy": proxy}

    def nap(_seconds: float) -> None:
        if len(seen) == 1:
            state["proxy"].close()  # Redis becomes unreachable before the second run
        elif len(seen) == 2:
            state["proxy"] = _Proxy(proxy.port)  # and comes back before the third

    try:
        written = run_every(cfg, timedelta(hours=1), max_runs=3, store=store, sleep=nap,
                            on_run=lambda info, why: seen.append(why))
    finally:
        store.close()
        state["proxy"].close()
    assert len(written) == 1 and seen[0] == "written"
    assert seen[1].startswith("error: ConnectionError") and "retrying at the next run" in seen[1]
    assert seen[2].startswith("no data after")  # the schedule went on and reached Redis again


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
