"""The cross-process lock of a model's aliases, held by every promote / rollback."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
from filelock import FileLock, Timeout

from mlflow_churn.config import ChurnConfig, is_postgres_url, libpq_url
from mlflow_churn.errors import ChurnError


@contextmanager
def registry_lock(cfg: ChurnConfig, timeout_s: float = 120.0) -> Iterator[str]:
    """Hold the cross-process lock of the model's aliases; yields a description of it.

    PostgreSQL tracking store: ``pg_advisory_lock`` on a key derived from the model name
    (every machine using that store is serialised); otherwise an exclusive file lock
    (``filelock``) on ``<workspace>/locks/transitions/registry-<model>.lock`` (processes sharing the
    workspace). Not the file the guard of a server on this workspace locks per request
    (``<workspace>/locks``): a transition holds its lock across requests to that server, so
    sharing the file would block the server's check of the transition's own move forever.
    """
    with model_lock(cfg.mlflow_tracking_uri, cfg.training.model_name, cfg.workspace / "locks" / "transitions",
                    timeout_s) as held:
        yield held


@contextmanager
def model_lock(store_uri: str, name: str, lock_dir: Path, timeout_s: float = 120.0,
               namespace: str = "mlflow-churn") -> Iterator[str]:
    """The lock of model ``name``'s aliases on the store at ``store_uri``: a PostgreSQL
    advisory lock (key from ``namespace`` and the model name) when it is PostgreSQL, across
    every process and machine using it; else a file lock (``filelock``) on
    ``<lock_dir>/registry-<model>.lock``. Either way a holder that keeps it longer than
    ``timeout_s`` makes this a one-line :class:`ChurnError` after ``timeout_s``, never a wait
    without end. The guard holds it from its check to MLflow's write (and its alias-history
    record), across the server's workers; the alias history of an embedded store takes it in its
    own ``namespace`` / ``lock_dir`` (:func:`mlflow_churn.registry.history.history_lock`)."""
    busy = (f"the lock of model '{name}' is held by another promote / rollback / guard for more "
            f"than {timeout_s:g} s")
    if is_postgres_url(store_uri):
        key = int.from_bytes(hashlib.blake2b(f"{namespace}:{name}".encode(), digest_size=8).digest(),
                             "big", signed=True)
        with psycopg.connect(libpq_url(store_uri), autocommit=True) as con:
            wait_ms = max(1, int(timeout_s * 1000))  # lock_timeout 0 would mean "wait for ever"
            con.execute("SELECT set_config('lock_timeout', %s, false)", (f"{wait_ms}ms",))
            try:
                con.execute("SELECT pg_advisory_lock(%s)", (key,))
            except psycopg.errors.LockNotAvailable:
                raise ChurnError(f"{busy} (pg_advisory_lock({key})); retry when it is done") from None
            try:
                yield f"pg_advisory_lock({key})"
            finally:
                con.execute("SELECT pg_advisory_unlock(%s)", (key,))
        return
    lock_dir.mkdir(parents=True, exist_ok=True)
    path = lock_dir / f"registry-{''.join(c if c.isalnum() or c in '-_' else '_' for c in name)}.lock"
    lock = FileLock(path, timeout=timeout_s)
    try:
        lock.acquire()
    except Timeout:
        raise ChurnError(f"{busy} ({path}); retry when it is done") from None
    try:
        yield f"flock({path})"
    finally:
        lock.release()


__all__ = ["model_lock", "registry_lock"]
