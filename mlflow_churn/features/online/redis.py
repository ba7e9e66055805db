"""Redis backend of the online store: one hash per batch, an atomic flip of the serving batch."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import pandas as pd

from mlflow_churn.config import mask_text
from mlflow_churn.errors import ChurnError
from mlflow_churn.features.online import base
from mlflow_churn.features.online.base import (
    RETAINED_BATCHES,
    BatchInfo,
    ChunkCallback,
    OnlineRow,
    StoreUnavailable,
    check_features,
    check_ids,
    check_order,
    decode_pairs,
    encode_rows,
    finish_batch,
    frame_from_payloads,
    lost_batch,
    split_payload,
)
from mlflow_churn.features.writer_lock import RedisWriterLock

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


def write_payloads(client: Any, rows_key: str, rows: Sequence[tuple[int, str]],
                   on_chunk: ChunkCallback | None = None) -> int:
    """HSET ``rows`` (customer id, payload) into ``rows_key`` in pipelines of
    :data:`~mlflow_churn.features.online.base.CHUNK_ROWS`; returns how many (the local writer
    and each Spark partition use it)."""
    for start in range(0, len(rows), base.CHUNK_ROWS):
        chunk = rows[start:start + base.CHUNK_ROWS]
        pipe = client.pipeline(transaction=False)
        for i in range(0, len(chunk), 5000):
            pipe.hset(rows_key, mapping=dict(chunk[i:i + 5000]))
        pipe.execute()
        if on_chunk:
            on_chunk(min(start + base.CHUNK_ROWS, len(rows)))
    return len(rows)


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
        return self.write_batch_by(
            info, lambda key: finish_batch(info, self._write_rows(key, frame, info, on_chunk)), allow_older)

    def rows_key(self, batch_id: str) -> str:
        """The hash holding ``batch_id``'s rows (customer id -> payload)."""
        return self._k("rows", batch_id)

    def write_batch_by(self, info: BatchInfo, write_rows: Callable[[str], BatchInfo],
                       allow_older: bool = False) -> BatchInfo:
        """:meth:`write_batch` with the rows written by ``write_rows(rows_key)`` (e.g. Spark
        executors, each with its own connection), which returns the info to record
        (:func:`~mlflow_churn.features.online.base.finish_batch`): the same lock,
        order check, staging and atomic flip. If it raises, the batch's rows are dropped and
        the serving batch is unchanged."""
        r, lock = self._r, self._lock
        with lock:
            check_order(self.current_batch(), info.as_of, allow_older, self.location)
            self._drop_abandoned()
            r.hset(self._k("writers"), info.batch_id, lock.value)
            rows_key = self.rows_key(info.batch_id)
            try:
                done = write_rows(rows_key)
                if done.batch_id != info.batch_id:
                    raise ChurnError(f"rows of batch {info.batch_id} were recorded as {done.batch_id}")
                payload = done.to_json()
                flipped = r.eval(_FLIP, 6, lock.key, self._k("writers"), self._k("batch", done.batch_id),
                                 self._k("current"), self._k("current_info"), self._k("history"),
                                 lock.value, done.batch_id, payload)
                if flipped != 1:
                    raise lost_batch(done.batch_id, self.location)
            except BaseException:
                self._abandon(info.batch_id)
                raise
            for old in r.lrange(self._k("history"), RETAINED_BATCHES, RETAINED_BATCHES + 4):
                r.unlink(self._k("rows", old.decode()))
            return done

    def _write_rows(self, rows_key: str, frame: pd.DataFrame, info: BatchInfo,
                    on_chunk: ChunkCallback | None) -> int:
        return write_payloads(self._r, rows_key, encode_rows(frame, info.features), on_chunk)

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
        ids = check_ids(ids)
        info = self.current_batch() if batch_id is None else self._known(batch_id)
        if info is None:
            return {}
        check_features(info.features, features)
        return decode_pairs(self._fetch(info, ids), info.features, features)

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
        return {cid: split_payload(p) for cid, p in self._fetch(self._known(batch_id), check_ids(ids))}

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
        return frame_from_payloads(pairs, info.features)

    def customer_ids(self, batch_id: str | None = None) -> list[int]:
        if self._batch(batch_id) is None:
            return []
        key, _ = self._rows_key(batch_id)
        return sorted(int(k) for k in self._r.hkeys(key))

    def close(self) -> None:
        self._r.close()


# --------------------------------------------------------------------------- factory
