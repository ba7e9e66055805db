"""Online feature store: the newest value of every feature per customer, swapped in by batch.

Two backends behind one :class:`OnlineStore` protocol:

- :class:`SqliteStore` (default): one file (``cfg.online_store_path``, WAL), one table of
  rows per batch, a ``current`` row naming the batch that serves;
- :class:`RedisStore`: one hash of rows per batch (``<prefix>:rows:<batch_id>``), a
  ``<prefix>:current`` pointer, a ``<prefix>:history`` list, every key under
  ``cfg.features.redis_prefix``.

A batch is written in full under a new batch id first; then one transaction (SQLite) or
one Lua script (Redis) flips the ``current`` pointer and records the batch in the history.
A crash while rows are written leaves the previous batch serving; its half-written rows are
dropped at once on an exception, or by the next writer when the process was killed. The
serving batch and the one before it keep their rows (a reader that looked up the pointer
just before a flip still finds its rows); older batches keep only their :class:`BatchInfo`
in the history. A failed batch is not in the history.

One writer at a time (:mod:`mlflow_churn.features.writer_lock`): a file lock beside the
SQLite file, a Redis lease with a token. A second writer gets a ChurnError at once. The
flip happens only while the writer still owns its lock and its batch is still marked
``writing``; a writer only cleans up ``writing`` batches of writers that no longer hold the
lock. A batch whose ``as_of`` is older than the serving one's is refused unless
``allow_older`` (``--force``): older values never replace newer ones by accident.

A row is stored as one text ``<event_time_ms>|<JSON object of the values>`` in the batch's
feature order; values are raw (strings for categoricals, numbers, null). The API splices
the stored object into its answer as is (:meth:`SqliteStore.get_raw`), so serving all
features of 100 customers parses and encodes no JSON.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from numbers import Integral
from pathlib import Path
from typing import Any, NamedTuple, Protocol, runtime_checkable

import duckdb
import orjson
import pandas as pd

from mlflow_churn.config import mask_text
from mlflow_churn.errors import ChurnError
from mlflow_churn.features.sandbox import lock_down
from mlflow_churn.features.writer_lock import FileWriterLock, RedisWriterLock, WriterLock

CHUNK_ROWS = 50_000
RETAINED_BATCHES = 2  # the serving batch and the one before it keep their rows

ChunkCallback = Callable[[int], None]


@dataclass(frozen=True)
class BatchInfo:
    """One materialized batch: what it holds and how long it took.

    ``as_of``: the point in time the values are computed at (UTC); ``watermark``: the
    newest event time among the rows (UTC; None for an empty batch); ``rows``: customers;
    ``features``: served feature names in storage order; ``duration_s``: seconds from the
    start of the computation to the flip; ``mode``: ``full`` or ``incremental``;
    ``updated_rows``: rows whose values were all recomputed (= rows for a full batch; see
    :mod:`mlflow_churn.features.materialize` for what an incremental batch carries over);
    ``feature_hashes``: feature name -> :attr:`FeatureDefinition.hash` of the definition
    the values were computed with (None for batches written before hashes were recorded).
    """

    batch_id: str
    as_of: datetime
    watermark: datetime | None
    rows: int
    features: tuple[str, ...]
    started_at: datetime
    finished_at: datetime | None = None
    duration_s: float | None = None
    mode: str = "full"
    updated_rows: int | None = None
    parent_batch_id: str | None = None
    feature_hashes: Mapping[str, str] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("as_of", "watermark", "started_at", "finished_at"):
            out[key] = out[key].isoformat() if out[key] is not None else None
        out["features"] = list(self.features)
        out["feature_hashes"] = dict(self.feature_hashes) if self.feature_hashes is not None else None
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BatchInfo:
        """Inverse of :meth:`to_dict`; keys it does not know (a newer writer's) are ignored."""
        d = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        for key in ("as_of", "watermark", "started_at", "finished_at"):
            d[key] = datetime.fromisoformat(d[key]) if d.get(key) else None
        d["features"] = tuple(d["features"])
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    def definition_conflicts(self, expected: Mapping[str, str | None]) -> list[str]:
        """Names of ``expected`` (feature name -> the reader's definition hash, None when the
        reader does not define it) whose values in this batch were computed under another
        definition. Empty when the batch records no hashes (written before they existed)."""
        if self.feature_hashes is None:
            return []
        return [n for n, h in expected.items() if n in self.feature_hashes and self.feature_hashes[n] != h]

    def conflict_detail(self, conflicts: Sequence[str], reader: str) -> str:
        """One-line explanation of :meth:`definition_conflicts` for ``reader`` (e.g. 'model
        version 3')."""
        return (f"feature(s) {', '.join(conflicts)} of batch {self.batch_id} were computed under "
                f"another definition than {reader} uses (edited without a version bump, or another "
                "features.definitions_file); materialize with the same definitions, or bump the "
                "feature's version")


class OnlineRow(NamedTuple):
    """One customer's stored values (feature name -> raw value) and the newest event time
    those values used (UTC)."""

    values: dict[str, Any]
    event_time: datetime | None = None


@runtime_checkable
class OnlineStore(Protocol):
    """What materialization writes to and the API reads from."""

    location: str

    def writer(self) -> WriterLock:
        """The store's writer lock: a re-entrant context manager (ChurnError if another
        writer holds it)."""

    def write_batch(self, frame: pd.DataFrame, info: BatchInfo,
                    on_chunk: ChunkCallback | None = None, allow_older: bool = False) -> BatchInfo:
        """Write ``frame`` (customer_id, event_time, ``info.features``) as a new batch and
        make it current atomically, under the writer lock; returns the recorded info
        (finished_at set). ChurnError when ``info.as_of`` is older than the serving batch's
        (unless ``allow_older``) or when the writer lost its lock or batch meanwhile."""

    def get(self, ids: Sequence[int], features: Sequence[str] | None = None,
            batch_id: str | None = None) -> dict[int, OnlineRow]:
        """Rows of ``ids`` found in the batch (default: current); absent ids are left out."""

    def get_raw(self, ids: Sequence[int], batch_id: str) -> dict[int, tuple[int | None, str]]:
        """``{id: (event_time_ms, JSON object text of every feature)}`` found in ``batch_id``
        (for the API, which splices the text into its answer)."""

    def current_batch(self) -> BatchInfo | None:
        """The batch that serves, or None before the first one."""

    def history(self, n: int = 20) -> list[BatchInfo]:
        """The last ``n`` completed batches, newest first."""

    def scan(self, batch_id: str | None = None) -> pd.DataFrame:
        """Every row of a retained batch: customer_id, event_time, its features."""

    def customer_ids(self, batch_id: str | None = None) -> list[int]:
        """Customer ids of a retained batch, ascending."""

    def close(self) -> None:
        """Release connections."""


def new_batch_id(as_of: datetime) -> str:
    """A unique, sortable-by-as_of batch id like ``20260301T000000Z-1a2b3c4d``."""
    return f"{as_of.astimezone(UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


def encode_rows(frame: pd.DataFrame, features: Sequence[str]) -> list[tuple[int, str]]:
    """(customer_id, payload ``<event_time_ms>|{"feature": value, ...}``) per row, encoded
    by DuckDB (vectorized, all cores)."""
    missing = [c for c in ("customer_id", "event_time", *features) if c not in frame.columns]
    if missing:
        raise ChurnError(f"batch frame lacks column(s) {', '.join(missing)}")
    if frame.empty:
        return []
    pairs = ", ".join(f"'{f}', \"{f}\"" for f in features)
    sel = frame[["customer_id", "event_time", *features]]
    con = lock_down(duckdb.connect(), (), {"TimeZone": "UTC"})  # no file access at all
    try:
        con.register("batch_frame", sel)
        rows = con.execute(
            "SELECT CAST(customer_id AS BIGINT), coalesce(CAST(epoch_ms(event_time) AS VARCHAR), '') "
            f"|| '|' || CAST(json_object({pairs}) AS VARCHAR) FROM batch_frame"
        ).fetchall()
    finally:
        con.close()
    return rows


_TIMES: dict[int, datetime] = {}


def _ms_to_dt(ms: int | None) -> datetime | None:
    """UTC datetime of epoch milliseconds (memoised: a batch holds few distinct times)."""
    if ms is None:
        return None
    hit = _TIMES.get(ms)
    if hit is None:
        if len(_TIMES) > 100_000:
            _TIMES.clear()
        hit = _TIMES[ms] = datetime.fromtimestamp(ms / 1000.0, tz=UTC)
    return hit


def split_payload(payload: str | bytes) -> tuple[int | None, str]:
    """``(event_time_ms or None, values JSON object text)`` of one stored payload."""
    if isinstance(payload, bytes):
        payload = payload.decode()
    ms, _, values = payload.partition("|")
    return (int(ms) if ms else None), values


def loads_payloads(text: str) -> Any:
    """Parse JSON text of stored payloads: orjson (4x faster than ``json`` on 100 rows x 21
    features), falling back to ``json`` for the ``NaN`` / ``Infinity`` literals DuckDB writes
    for non-finite doubles, which orjson rejects."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


def check_features(all_features: Sequence[str], wanted: Sequence[str] | None) -> None:
    """ChurnError naming requested features the batch does not hold."""
    if wanted is None:
        return
    have = set(all_features)
    absent = [w for w in wanted if w not in have]
    if absent:
        raise ChurnError(
            f"feature(s) {', '.join(absent)} are not in this batch; it holds {', '.join(all_features)}; "
            "run `churn features materialize` after defining them"
        )


def _decode(pairs: Sequence[tuple[int, str | bytes]], all_features: Sequence[str],
            wanted: Sequence[str] | None) -> dict[int, OnlineRow]:
    """Rows of ``(customer_id, payload)`` pairs, decoded with one JSON parse for all."""
    check_features(all_features, wanted)
    if not pairs:
        return {}
    split = [split_payload(p) for _, p in pairs]
    objects = loads_payloads("[" + ",".join(v for _, v in split) + "]")
    out: dict[int, OnlineRow] = {}
    if wanted is None:
        for (cid, _), (ms, _), obj in zip(pairs, split, objects, strict=True):
            out[int(cid)] = OnlineRow(obj, _ms_to_dt(ms))
    else:
        for (cid, _), (ms, _), obj in zip(pairs, split, objects, strict=True):
            out[int(cid)] = OnlineRow({w: obj[w] for w in wanted}, _ms_to_dt(ms))
    return out


def _frame_from_payloads(pairs: Iterable[tuple[int, str | bytes]], features: Sequence[str]) -> pd.DataFrame:
    ids, times, rows = [], [], []
    for cid, payload in pairs:
        ms, values = split_payload(payload)
        ids.append(int(cid))
        times.append(ms)
        rows.append(values)
    objects = loads_payloads("[" + ",".join(rows) + "]")
    frame = pd.DataFrame.from_records(objects, columns=list(features)) if objects else \
        pd.DataFrame(columns=list(features))
    frame.insert(0, "customer_id", pd.Series(ids, dtype="int64"))
    frame.insert(1, "event_time", pd.to_datetime(pd.Series(times, dtype="float64"), unit="ms", utc=True))
    return frame.sort_values("customer_id", ignore_index=True)


def _check_ids(ids: Sequence[int]) -> list[int]:
    out = []
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, Integral):
            raise ChurnError(f"customer id {i!r} is not an integer")
        out.append(int(i))
    return out


def _finish(info: BatchInfo, rows: int) -> BatchInfo:
    finished = datetime.now(UTC)
    return replace(info, features=tuple(info.features), rows=rows, finished_at=finished,
                   duration_s=(finished - info.started_at).total_seconds())


def check_order(current: BatchInfo | None, as_of: datetime, allow_older: bool, location: str) -> None:
    """ChurnError when ``as_of`` is older than the serving batch's, unless ``allow_older``."""
    if current is not None and as_of < current.as_of and not allow_older:
        raise ChurnError(
            f"as_of {as_of.isoformat()} is older than that of the serving batch {current.batch_id} "
            f"({current.as_of.isoformat()}) in {location}; older values would replace newer ones. "
            "Pass --force to roll back on purpose"
        )


class StoreUnavailable(ChurnError):
    """The online store's server cannot be reached (a 503 for the HTTP apps, not a 404)."""


def _lost(batch_id: str, location: str) -> ChurnError:
    return ChurnError(
        f"batch {batch_id} lost its writer lock or was cleaned up while it was written to {location} "
        "(another writer took over); the serving batch is unchanged; re-run `churn features materialize`"
    )


# --------------------------------------------------------------------------- SQLite


class SqliteStore:
    """Online store in one SQLite file (WAL): table ``rows_<seq>`` per batch."""

    def __init__(self, path: str | Path, busy_timeout_s: float = 30.0) -> None:
        self.path = Path(path)
        self.location = f"sqlite:{self.path}"
        self.busy_timeout_s = float(busy_timeout_s)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._tables: dict[str, tuple[str, tuple[str, ...]]] = {}
        self._info_cache: tuple[str, BatchInfo] | None = None
        self._lock = FileWriterLock(self.path.with_name(self.path.name + ".writer.lock"), self.location)
        con = self._con()
        con.execute("PRAGMA journal_mode=WAL")
        con.executescript("""
            CREATE TABLE IF NOT EXISTS batches (
                seq INTEGER PRIMARY KEY AUTOINCREMENT, batch_id TEXT UNIQUE NOT NULL,
                state TEXT NOT NULL, info TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS current (
                id INTEGER PRIMARY KEY CHECK (id = 1), batch_id TEXT NOT NULL, info TEXT NOT NULL);
        """)

    def _con(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:
            con = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None,
                                  check_same_thread=False)
            con.execute("PRAGMA synchronous=NORMAL")
            con.execute(f"PRAGMA busy_timeout={int(self.busy_timeout_s * 1000)}")
            self._local.con = con
            self._all = getattr(self, "_all", [])
            self._all.append(con)
        return con

    def _table(self, batch_id: str) -> tuple[str, tuple[str, ...]]:
        hit = self._tables.get(batch_id)
        if hit:
            return hit
        row = self._con().execute(
            "SELECT seq, state, info FROM batches WHERE batch_id = ?", (batch_id,)).fetchone()
        if row is None or row[1] not in ("current", "retained"):
            raise ChurnError(
                f"batch {batch_id} has no rows in {self.location} (only the current and the "
                "previous batch keep theirs)"
            )
        hit = (f"rows_{int(row[0])}", tuple(json.loads(row[2])["features"]))
        self._tables[batch_id] = hit
        return hit

    def writer(self) -> FileWriterLock:
        return self._lock

    def write_batch(self, frame: pd.DataFrame, info: BatchInfo,
                    on_chunk: ChunkCallback | None = None, allow_older: bool = False) -> BatchInfo:
        with self._lock:
            con = self._con()
            check_order(self.current_batch(), info.as_of, allow_older, self.location)
            self._drop_abandoned(con)
            seq = int(con.execute("INSERT INTO batches (batch_id, state, info) VALUES (?, 'writing', ?)",
                                  (info.batch_id, info.to_json())).lastrowid)
            try:
                done = self._write_rows(con, seq, frame, info, on_chunk)
                self._flip(con, seq, done)
            except BaseException:
                self._abandon(con, seq)
                raise
            self._retire(con)
            return done

    def _write_rows(self, con: sqlite3.Connection, seq: int, frame: pd.DataFrame, info: BatchInfo,
                    on_chunk: ChunkCallback | None) -> BatchInfo:
        table = f"rows_{seq}"
        con.execute(f"CREATE TABLE {table} (customer_id INTEGER PRIMARY KEY, payload TEXT NOT NULL)")
        rows = encode_rows(frame, info.features)
        con.execute("BEGIN")
        try:
            for start in range(0, len(rows), CHUNK_ROWS):
                con.executemany(f"INSERT INTO {table} VALUES (?, ?)", rows[start:start + CHUNK_ROWS])
                if on_chunk:
                    on_chunk(min(start + CHUNK_ROWS, len(rows)))
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        return _finish(info, len(rows))

    def _flip(self, con: sqlite3.Connection, seq: int, done: BatchInfo) -> None:
        """Make batch ``seq`` current, only if it is still this writer's 'writing' batch."""
        con.execute("BEGIN IMMEDIATE")
        try:
            ours = con.execute("UPDATE batches SET state = 'current', info = ? WHERE seq = ? AND "
                               "state = 'writing'", (done.to_json(), seq)).rowcount == 1
            table = con.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                                (f"rows_{seq}",)).fetchone()
            if not (ours and table and self._lock.owned()):
                raise _lost(done.batch_id, self.location)
            con.execute("UPDATE batches SET state = 'retained' WHERE state = 'current' AND seq != ?", (seq,))
            con.execute("INSERT OR REPLACE INTO current (id, batch_id, info) VALUES (1, ?, ?)",
                        (done.batch_id, done.to_json()))
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise

    def _abandon(self, con: sqlite3.Connection, seq: int) -> None:
        """Best effort after a failed write: drop the batch's rows and mark it failed."""
        try:
            if con.in_transaction:
                con.execute("ROLLBACK")
            con.execute(f"DROP TABLE IF EXISTS rows_{seq}")
            con.execute("UPDATE batches SET state = 'failed' WHERE seq = ? AND state = 'writing'", (seq,))
        except sqlite3.Error:
            pass  # the next writer drops it (it holds the lock, so this writer is gone)

    def _drop_abandoned(self, con: sqlite3.Connection) -> None:
        """Drop the rows of batches a dead writer left half-written (call with the lock held:
        every other 'writing' batch then belongs to a writer that is gone)."""
        for (seq,) in con.execute("SELECT seq FROM batches WHERE state = 'writing'").fetchall():
            con.execute(f"DROP TABLE IF EXISTS rows_{int(seq)}")
            con.execute("UPDATE batches SET state = 'failed' WHERE seq = ?", (seq,))

    def _retire(self, con: sqlite3.Connection) -> None:
        keep = con.execute("SELECT seq FROM batches WHERE state IN ('current', 'retained') "
                           "ORDER BY seq DESC").fetchall()
        for (seq,) in keep[RETAINED_BATCHES:]:
            con.execute("UPDATE batches SET state = 'done' WHERE seq = ?", (seq,))
            con.execute(f"DROP TABLE IF EXISTS rows_{int(seq)}")
        self._tables.clear()

    def current_batch(self) -> BatchInfo | None:
        row = self._con().execute("SELECT info FROM current WHERE id = 1").fetchone()
        if row is None:
            return None
        cached = self._info_cache
        if cached is not None and cached[0] == row[0]:
            return cached[1]
        info = BatchInfo.from_dict(json.loads(row[0]))
        self._info_cache = (row[0], info)
        return info

    def _resolve(self, batch_id: str | None) -> str | None:
        if batch_id is not None:
            return batch_id
        info = self.current_batch()
        return info.batch_id if info else None

    def get(self, ids: Sequence[int], features: Sequence[str] | None = None,
            batch_id: str | None = None) -> dict[int, OnlineRow]:
        ids = _check_ids(ids)
        bid = self._resolve(batch_id)
        if bid is None or not ids:
            return {}
        return _decode(self._pairs(bid, ids), self._table(bid)[1], features)

    def get_raw(self, ids: Sequence[int], batch_id: str) -> dict[int, tuple[int | None, str]]:
        """``{id: (event_time_ms, values JSON object text)}`` of the ids found in the batch."""
        self._table(batch_id)
        ids = _check_ids(ids)
        return {cid: split_payload(p) for cid, p in self._pairs(batch_id, ids)} if ids else {}

    def _pairs(self, batch_id: str, ids: list[int]) -> list[tuple[int, str]]:
        """(customer_id, payload) of the ``ids`` found in the batch; ChurnError when the batch's
        rows were dropped since this store looked it up (retired by a writer elsewhere)."""
        table, _ = self._table(batch_id)
        marks = ",".join("?" * len(ids))
        try:
            return self._con().execute(
                f"SELECT customer_id, payload FROM {table} WHERE customer_id IN ({marks})", ids).fetchall()
        except sqlite3.OperationalError as exc:
            if "no such table" not in str(exc):
                raise
            self._tables.pop(batch_id, None)
            raise ChurnError(f"batch {batch_id} no longer keeps its rows in {self.location} (only the "
                             "current and the previous batch keep theirs)") from None

    def history(self, n: int = 20) -> list[BatchInfo]:
        rows = self._con().execute(
            "SELECT info FROM batches WHERE state IN ('current', 'retained', 'done') "
            "ORDER BY seq DESC LIMIT ?", (int(n),)).fetchall()
        return [BatchInfo.from_dict(json.loads(r[0])) for r in rows]

    def scan(self, batch_id: str | None = None) -> pd.DataFrame:
        bid = self._resolve(batch_id)
        if bid is None:
            raise ChurnError(f"{self.location} has no batch yet; run `churn features materialize`")
        table, names = self._table(bid)
        return _frame_from_payloads(
            self._con().execute(f"SELECT customer_id, payload FROM {table}"), names)

    def customer_ids(self, batch_id: str | None = None) -> list[int]:
        bid = self._resolve(batch_id)
        if bid is None:
            return []
        table, _ = self._table(bid)
        return [r[0] for r in self._con().execute(f"SELECT customer_id FROM {table} ORDER BY 1")]

    def close(self) -> None:
        for con in getattr(self, "_all", []):
            try:
                con.close()
            except sqlite3.ProgrammingError:
                pass
        self._all = []
        self._local = threading.local()


# --------------------------------------------------------------------------- Redis

# The flip, atomic in Redis: only while the caller's lease (ARGV[1]) is the lock and its
# batch (ARGV[2]) is still registered as written by it. KEYS: lock, writers, batch info,
# current, current_info, history.
_FLIP = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if redis.call('HGET', KEYS[2], ARGV[2]) ~= ARGV[1] then return -1 end
redis.call('SET', KEYS[3], ARGV[3])
redis.call('SET', KEYS[4], ARGV[2])
redis.call('SET', KEYS[5], ARGV[3])
redis.call('LPUSH', KEYS[6], ARGV[2])
redis.call('HDEL', KEYS[2], ARGV[2])
return 1
"""


class RedisStore:
    """Online store in Redis: hash ``<prefix>:rows:<batch_id>`` (customer id -> payload)."""

    #: seconds a writer's lease lives without renewal (a killed writer blocks others this long)
    LOCK_TTL_S = 30.0

    def __init__(self, url: str, prefix: str, lock_ttl_s: float | None = None,
                 timeout_s: float | None = None) -> None:
        """``timeout_s``: connect and socket timeout of every command, without retries (the
        HTTP apps' fail-fast readers); None = 30 s / 5 s with redis-py's default retries."""
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self.url, self.prefix = url, prefix
        self.location = f"{mask_text(url)} (prefix {prefix})"
        fast = ({} if timeout_s is None else
                {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s,
                 "retry": Retry(NoBackoff(), 0)})
        try:
            self._r = redis.Redis.from_url(url, **{"socket_timeout": 30, "socket_connect_timeout": 5,
                                                   **fast})
            self._r.ping()
        except (redis.RedisError, ValueError) as exc:
            raise StoreUnavailable(f"Redis at {mask_text(url)} is not reachable ({type(exc).__name__}); "
                                   "start it or fix features.redis_url") from None
        self._info_cache: tuple[bytes, BatchInfo] | None = None
        self._infos: dict[str, BatchInfo] = {}  # batch infos never change once written
        self._lock = RedisWriterLock(self._r, self._k("writer_lock"), self.location,
                                     self.LOCK_TTL_S if lock_ttl_s is None else lock_ttl_s)

    def _k(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def exists(self) -> bool:
        return bool(self._r.exists(self._k("current_info")))

    def writer(self) -> RedisWriterLock:
        return self._lock

    def write_batch(self, frame: pd.DataFrame, info: BatchInfo,
                    on_chunk: ChunkCallback | None = None, allow_older: bool = False) -> BatchInfo:
        r, lock = self._r, self._lock
        with lock:
            check_order(self.current_batch(), info.as_of, allow_older, self.location)
            self._drop_abandoned()
            r.hset(self._k("writers"), info.batch_id, lock.value)
            rows_key = self._k("rows", info.batch_id)
            try:
                done = self._write_rows(rows_key, frame, info, on_chunk)
                payload = done.to_json()
                flipped = r.eval(_FLIP, 6, lock.key, self._k("writers"), self._k("batch", done.batch_id),
                                 self._k("current"), self._k("current_info"), self._k("history"),
                                 lock.value, done.batch_id, payload)
                if flipped != 1:
                    raise _lost(done.batch_id, self.location)
            except BaseException:
                self._abandon(info.batch_id)
                raise
            for old in r.lrange(self._k("history"), RETAINED_BATCHES, RETAINED_BATCHES + 4):
                r.unlink(self._k("rows", old.decode()))
            return done

    def _write_rows(self, rows_key: str, frame: pd.DataFrame, info: BatchInfo,
                    on_chunk: ChunkCallback | None) -> BatchInfo:
        rows = encode_rows(frame, info.features)
        for start in range(0, len(rows), CHUNK_ROWS):
            chunk = rows[start:start + CHUNK_ROWS]
            pipe = self._r.pipeline(transaction=False)
            for i in range(0, len(chunk), 5000):
                pipe.hset(rows_key, mapping=dict(chunk[i:i + 5000]))
            pipe.execute()
            if on_chunk:
                on_chunk(min(start + CHUNK_ROWS, len(rows)))
        return _finish(info, len(rows))

    def _abandon(self, batch_id: str) -> None:
        """Best effort after a failed write: drop the batch's rows unless it went live."""
        try:
            current = self._r.get(self._k("current"))
            if current is None or current.decode() != batch_id:
                self._r.unlink(self._k("rows", batch_id))
            self._r.hdel(self._k("writers"), batch_id)
        except Exception:  # noqa: BLE001 - the next writer drops it
            pass

    def _drop_abandoned(self) -> None:
        """Drop batches left 'writing' by writers that no longer hold the lock (call with the
        lock held)."""
        for batch_id, owner in self._r.hgetall(self._k("writers")).items():
            if owner.decode() != self._lock.value:
                self._r.unlink(self._k("rows", batch_id.decode()))
                self._r.hdel(self._k("writers"), batch_id)

    def current_batch(self) -> BatchInfo | None:
        raw = self._r.get(self._k("current_info"))
        if raw is None:
            return None
        cached = self._info_cache
        if cached is not None and cached[0] == raw:
            return cached[1]
        info = BatchInfo.from_dict(json.loads(raw))
        self._info_cache = (raw, info)
        return info

    def _batch(self, batch_id: str | None) -> BatchInfo | None:
        if batch_id is None:
            return self.current_batch()
        cur = self.current_batch()
        if cur is not None and cur.batch_id == batch_id:
            return cur
        raw = self._r.get(self._k("batch", batch_id))
        if raw is None:
            raise ChurnError(f"no batch {batch_id} in {self.location}")
        return BatchInfo.from_dict(json.loads(raw))

    def get(self, ids: Sequence[int], features: Sequence[str] | None = None,
            batch_id: str | None = None) -> dict[int, OnlineRow]:
        ids = _check_ids(ids)
        info = self.current_batch() if batch_id is None else self._known(batch_id)
        if info is None:
            return {}
        check_features(info.features, features)
        return _decode(self._fetch(info, ids), info.features, features)

    def _known(self, batch_id: str) -> BatchInfo:
        info = self._infos.get(batch_id)
        if info is None:
            info = self._infos[batch_id] = self._batch(batch_id)
        return info

    def _fetch(self, info: BatchInfo, ids: list[int]) -> list[tuple[int, bytes]]:
        if not ids:
            return []
        pipe = self._r.pipeline(transaction=False)
        pipe.hmget(self._k("rows", info.batch_id), ids)
        pipe.exists(self._k("rows", info.batch_id))
        values, present = pipe.execute()
        if not present and info.rows:
            raise ChurnError(f"batch {info.batch_id} no longer keeps its rows in {self.location} "
                             "(only the current and the previous batch keep theirs)")
        return [(cid, p) for cid, p in zip(ids, values, strict=True) if p is not None]

    def get_raw(self, ids: Sequence[int], batch_id: str) -> dict[int, tuple[int | None, str]]:
        """``{id: (event_time_ms, values JSON object text)}`` of the ids found in the batch."""
        return {cid: split_payload(p) for cid, p in self._fetch(self._known(batch_id), _check_ids(ids))}

    def history(self, n: int = 20) -> list[BatchInfo]:
        ids = [b.decode() for b in self._r.lrange(self._k("history"), 0, int(n) - 1)]
        if not ids:
            return []
        raws = self._r.mget([self._k("batch", i) for i in ids])
        return [BatchInfo.from_dict(json.loads(raw)) for raw in raws if raw is not None]

    def _rows_key(self, batch_id: str | None) -> tuple[str, BatchInfo]:
        info = self._batch(batch_id)
        if info is None:
            raise ChurnError(f"{self.location} has no batch yet; run `churn features materialize`")
        key = self._k("rows", info.batch_id)
        if info.rows and not self._r.exists(key):
            raise ChurnError(f"batch {info.batch_id} no longer keeps its rows in {self.location}")
        return key, info

    def scan(self, batch_id: str | None = None) -> pd.DataFrame:
        key, info = self._rows_key(batch_id)
        pairs = ((int(k), v) for k, v in self._r.hscan_iter(key, count=10_000))
        return _frame_from_payloads(pairs, info.features)

    def customer_ids(self, batch_id: str | None = None) -> list[int]:
        if self._batch(batch_id) is None:
            return []
        key, _ = self._rows_key(batch_id)
        return sorted(int(k) for k in self._r.hkeys(key))

    def close(self) -> None:
        self._r.close()


# --------------------------------------------------------------------------- factory


def open_store(cfg: Any, must_exist: bool = True, fail_fast: bool = False) -> OnlineStore:
    """The online store configured by ``cfg.features.online_backend``.

    ``must_exist=True`` (readers) raises ChurnError when nothing was materialized yet;
    ``must_exist=False`` (materialize) creates it. ``fail_fast=True`` (the HTTP apps):
    every read waits at most ``features.redis_timeout_ms`` (Redis, no retries) or
    ``features.sqlite_timeout_ms`` (SQLite busy timeout). StoreUnavailable when Redis
    cannot be reached.
    """
    backend = cfg.features.online_backend
    hint = "run `churn features materialize`"
    if backend == "sqlite":
        path = Path(cfg.online_store_path)
        if must_exist and not path.is_file():
            raise ChurnError(f"no online store at {path}; {hint}")
        return SqliteStore(path, cfg.features.sqlite_timeout_ms / 1000.0) if fail_fast else SqliteStore(path)
    if backend == "redis":
        store = RedisStore(cfg.features.redis_url, cfg.features.redis_prefix,
                           timeout_s=cfg.features.redis_timeout_ms / 1000.0 if fail_fast else None)
        if must_exist and not store.exists():
            store.close()
            raise ChurnError(f"no online store at {store.location}; {hint}")
        return store
    raise ChurnError(f"unknown features.online_backend '{backend}'; use sqlite or redis")


__all__ = [
    "BatchInfo", "OnlineRow", "OnlineStore", "RedisStore", "SqliteStore", "StoreUnavailable", "check_order",
    "encode_rows",
    "new_batch_id", "open_store", "split_payload",
]
