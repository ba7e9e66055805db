"""SQLite (WAL) backend of the online store: the default, one file in the workspace."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from mlflow_churn.errors import ChurnError
from mlflow_churn.features.online import base
from mlflow_churn.features.writer_lock import FileWriterLock


class SqliteStore:
    """Online store in one SQLite file (WAL): table ``rows_<seq>`` per batch."""

    def __init__(self, path: str | Path, busy_timeout_s: float = 30.0) -> None:
        self.path = Path(path)
        self.location = f"sqlite:{self.path}"
        self.busy_timeout_s = float(busy_timeout_s)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._tables: dict[str, tuple[str, tuple[str, ...]]] = {}
        self._info_cache: tuple[str, base.BatchInfo] | None = None
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

    def write_batch(self, frame: pd.DataFrame, info: base.BatchInfo,
                    on_chunk: base.ChunkCallback | None = None, allow_older: bool = False) -> base.BatchInfo:
        with self._lock:
            con = self._con()
            base.check_order(self.current_batch(), info.as_of, allow_older, self.location)
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

    def _write_rows(self, con: sqlite3.Connection, seq: int, frame: pd.DataFrame, info: base.BatchInfo,
                    on_chunk: base.ChunkCallback | None) -> base.BatchInfo:
        table = f"rows_{seq}"
        con.execute(f"CREATE TABLE {table} (customer_id INTEGER PRIMARY KEY, payload TEXT NOT NULL)")
        rows = base.encode_rows(frame, info.features)
        con.execute("BEGIN")
        try:
            for start in range(0, len(rows), base.CHUNK_ROWS):
                con.executemany(f"INSERT INTO {table} VALUES (?, ?)", rows[start:start + base.CHUNK_ROWS])
                if on_chunk:
                    on_chunk(min(start + base.CHUNK_ROWS, len(rows)))
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        return base.finish_batch(info, len(rows))

    def _flip(self, con: sqlite3.Connection, seq: int, done: base.BatchInfo) -> None:
        """Make batch ``seq`` current, only if it is still this writer's 'writing' batch."""
        con.execute("BEGIN IMMEDIATE")
        try:
            ours = con.execute("UPDATE batches SET state = 'current', info = ? WHERE seq = ? AND "
                               "state = 'writing'", (done.to_json(), seq)).rowcount == 1
            table = con.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                                (f"rows_{seq}",)).fetchone()
            if not (ours and table and self._lock.owned()):
                raise base.lost_batch(done.batch_id, self.location)
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
        for (seq,) in keep[base.RETAINED_BATCHES:]:
            con.execute("UPDATE batches SET state = 'done' WHERE seq = ?", (seq,))
            con.execute(f"DROP TABLE IF EXISTS rows_{int(seq)}")
        self._tables.clear()

    def current_batch(self) -> base.BatchInfo | None:
        row = self._con().execute("SELECT info FROM current WHERE id = 1").fetchone()
        if row is None:
            return None
        cached = self._info_cache
        if cached is not None and cached[0] == row[0]:
            return cached[1]
        info = base.BatchInfo.from_dict(json.loads(row[0]))
        self._info_cache = (row[0], info)
        return info

    def _resolve(self, batch_id: str | None) -> str | None:
        if batch_id is not None:
            return batch_id
        info = self.current_batch()
        return info.batch_id if info else None

    def get(self, ids: Sequence[int], features: Sequence[str] | None = None,
            batch_id: str | None = None) -> dict[int, base.OnlineRow]:
        ids = base.check_ids(ids)
        bid = self._resolve(batch_id)
        if bid is None or not ids:
            return {}
        return base.decode_pairs(self._pairs(bid, ids), self._table(bid)[1], features)

    def get_raw(self, ids: Sequence[int], batch_id: str) -> dict[int, tuple[int | None, str]]:
        """``{id: (event_time_ms, values JSON object text)}`` of the ids found in the batch."""
        self._table(batch_id)
        ids = base.check_ids(ids)
        return {cid: base.split_payload(p) for cid, p in self._pairs(batch_id, ids)} if ids else {}

    def _pairs(self, batch_id: str, ids: list[int]) -> list[tuple[int, str]]:
        """(customer_id, payload) of the ``ids`` found in the batch; ChurnError when the batch's
        rows were dropped since this store looked it up (retired by a writer elsewhere)."""
        table, _ = self._table(batch_id)
        marks = ",".join("?" * len(ids))
        try:
            return self._con().execute(
                f"SELECT customer_id, payload FROM {table} WHERE customer_id IN ({marks})", ids).fetchall()
        except sqlite3.OperationalError:
            # SQLite gives "no such table" no error code of its own (SQLITE_ERROR): ask the
            # schema instead of reading the message; any other failure propagates
            gone = self._con().execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                                       (table,)).fetchone() is None
            if not gone:
                raise
            self._tables.pop(batch_id, None)
            raise ChurnError(f"batch {batch_id} no longer keeps its rows in {self.location} (only the "
                             "current and the previous batch keep theirs)") from None

    def history(self, n: int = 20) -> list[base.BatchInfo]:
        rows = self._con().execute(
            "SELECT info FROM batches WHERE state IN ('current', 'retained', 'done') "
            "ORDER BY seq DESC LIMIT ?", (int(n),)).fetchall()
        return [base.BatchInfo.from_dict(json.loads(r[0])) for r in rows]

    def scan(self, batch_id: str | None = None) -> pd.DataFrame:
        bid = self._resolve(batch_id)
        if bid is None:
            raise ChurnError(f"{self.location} has no batch yet; run `churn features materialize`")
        table, names = self._table(bid)
        return base.frame_from_payloads(
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
