"""One writer at a time per online store: a file lock (SQLite) or a Redis lease.

- :class:`FileWriterLock`: a file lock (``filelock``, ``flock`` underneath) on a lock file
  beside the SQLite file, the holder's JSON beside it; the kernel releases it when the holder
  exits, however it dies.
- :class:`RedisWriterLock`: redis-py's :class:`redis.lock.Lock` (``SET <key> <token> NX PX
  <ttl>``, token-checked renew and release), renewed by a heartbeat thread every ``ttl / 3``
  while held; a writer that dies stops renewing and its lease
  expires after at most ``ttl`` seconds. A writer whose lease lapsed (stalled longer than
  ``ttl``) loses it: :meth:`RedisWriterLock.owned` turns False and the store refuses its flip.

Both are re-entrant within one object (``materialize`` holds the lock from reading the
serving batch to the flip, ``write_batch`` takes it again) and are context managers. A
second writer gets a ChurnError naming the holder (pid, host, start) at once, not a wait.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from mlflow_churn.errors import ChurnError


def _holder_text() -> str:
    """JSON naming this writer: a unique token, pid, host and start time (UTC)."""
    return json.dumps({"token": uuid.uuid4().hex, "pid": os.getpid(), "host": socket.gethostname(),
                       "since": datetime.now(UTC).isoformat(timespec="seconds")})


def _busy(location: str, holder: str | bytes | None, tail: str) -> ChurnError:
    try:
        h = json.loads(holder or "{}")
        who = f" (pid {h['pid']} on {h['host']}, since {h['since']})"
    except (ValueError, KeyError, TypeError):
        who = ""
    return ChurnError(f"another `churn features materialize` is writing to {location}{who}; "
                      f"wait for it to finish, then re-run{tail}")


class WriterLock:
    """A re-entrant writer lock (base of both): ``_take`` / ``_drop`` run at depth 0 only."""

    def __init__(self) -> None:
        self._depth = 0

    def acquire(self) -> None:
        """Take the lock (no-op if this object holds it); ChurnError if another writer does."""
        if self._depth == 0:
            self._take()
        self._depth += 1

    def release(self) -> None:
        """Undo one :meth:`acquire`; the last one frees the lock."""
        if self._depth == 0:
            return
        self._depth -= 1
        if self._depth == 0:
            self._drop()

    @property
    def held(self) -> bool:
        return self._depth > 0

    def __enter__(self) -> WriterLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def owned(self) -> bool:  # pragma: no cover - overridden
        """True while this writer still holds the lock."""
        raise NotImplementedError

    def _take(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def _drop(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


class FileWriterLock(WriterLock):
    """A file lock (``filelock``) on ``path``, taken without waiting; the holder's JSON in
    ``<path>.holder`` (the lock file itself is filelock's)."""

    def __init__(self, path: Path, location: str) -> None:
        super().__init__()
        self.path, self.location = Path(path), location
        self.holder_path = self.path.with_name(self.path.name + ".holder")
        self._file_lock = FileLock(self.path, thread_local=False)

    def _take(self) -> None:
        try:
            self._file_lock.acquire(blocking=False)
        except Timeout:
            try:
                holder = self.holder_path.read_text()
            except OSError:
                holder = None
            raise _busy(self.location, holder, "") from None
        self.holder_path.write_text(_holder_text())

    def _drop(self) -> None:
        if self._file_lock.is_locked:
            self.holder_path.unlink(missing_ok=True)
            self._file_lock.release()

    def owned(self) -> bool:
        """True while this object holds the lock (a file lock cannot be lost while held)."""
        return self._file_lock.is_locked


class RedisWriterLock(WriterLock):
    """A Redis lease at ``key``, renewed every ``ttl_s / 3`` seconds while held."""

    def __init__(self, client: Any, key: str, location: str, ttl_s: float = 30.0) -> None:
        super().__init__()
        if ttl_s <= 0:
            raise ChurnError(f"writer lock ttl must be > 0 s, got {ttl_s}")
        self._r, self.key, self.location, self.ttl_s = client, key, location, ttl_s
        self.value: str | None = None
        self._lease: Any = None  # redis.lock.Lock while held
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def _take(self) -> None:
        value = _holder_text()
        lock = self._r.lock(self.key, timeout=self.ttl_s, blocking=False, thread_local=False)
        if not lock.acquire(token=value):
            holder, left = self._r.get(self.key), self._r.pttl(self.key)
            tail = f" (if it died, its lease expires in {max(left, 0) / 1000:.0f} s)" if left > 0 else ""
            raise _busy(self.location, holder, tail)
        self._lease, self.value = lock, value
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._renew, name="writer-lock-heartbeat", daemon=True)
        self._beat.start()

    def _renew(self) -> None:
        from redis.exceptions import LockNotOwnedError

        stop, lease = self._stop, self._lease
        while not stop.wait(self.ttl_s / 3):
            try:
                lease.reacquire()  # the TTL starts again, only while the token is still ours
            except LockNotOwnedError:
                return  # lease lapsed and was taken: owned() is False from now on
            except Exception:  # noqa: BLE001 - a blip; the next beat retries before the lease ends
                continue

    def _drop(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
            self._beat = None
        lease, self._lease, self.value = self._lease, None, None
        if lease is not None:
            try:
                lease.release()
            except Exception:  # noqa: BLE001 - not ours any more, or Redis unreachable: it expires by itself
                pass

    def owned(self) -> bool:
        """True while the lease at ``key`` is still this writer's."""
        return self._lease is not None and bool(self._lease.owned())


__all__ = ["FileWriterLock", "RedisWriterLock", "WriterLock"]
