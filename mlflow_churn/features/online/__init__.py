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

Backends: :mod:`.sqlite` (default) and :mod:`.redis`, each implementing
:class:`~mlflow_churn.features.online.base.OnlineStore` (:mod:`.base`); :func:`open_store`
opens the configured one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlflow_churn.errors import ChurnError
from mlflow_churn.features.online.base import (
    CHUNK_ROWS,
    RETAINED_BATCHES,
    BatchInfo,
    OnlineRow,
    OnlineStore,
    StoreUnavailable,
    check_features,
    check_order,
    encode_rows,
    loads_payloads,
    new_batch_id,
    split_payload,
)
from mlflow_churn.features.online.redis import RedisStore
from mlflow_churn.features.online.sqlite import SqliteStore


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
    "CHUNK_ROWS", "RETAINED_BATCHES", "BatchInfo", "OnlineRow", "OnlineStore", "RedisStore", "SqliteStore",
    "StoreUnavailable", "check_features", "check_order", "encode_rows", "loads_payloads", "new_batch_id",
    "open_store", "split_payload",
]
