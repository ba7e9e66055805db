"""A circuit breaker for a dependency an HTTP app reads on the request path (Redis).

Closed: calls go through; ``failures`` consecutive dependency failures open it (only outages:
:func:`is_outage`; a bug such as a KeyError, or an answer about the data, never does).
Open: calls fail at once with :class:`Unavailable` (no request waits on a dead or
stalled dependency); a background thread runs ``probe`` every ``probe_seconds`` and
closes the breaker on the first success.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from mlflow_churn import errors

T = TypeVar("T")
log = logging.getLogger("mlflow_churn.web")


class Unavailable(errors.Unavailable):
    """The breaker is open: the dependency failed recently and is not called (503)."""


def is_outage(exc: BaseException) -> bool:
    """A failure of the dependency itself, which counts towards opening a breaker: an
    :class:`mlflow_churn.errors.Unavailable` (not the breaker's own answer), a connection-type
    failure (:func:`mlflow_churn.errors.outage`), or SQLite's OperationalError (a file store's
    busy timeout). Anything else (bad input, "not found", a KeyError bug) is not."""
    if isinstance(exc, Unavailable):
        return False
    return errors.outage(exc) is not None or isinstance(exc, sqlite3.OperationalError)


class CircuitBreaker:
    """See the module doc. ``is_failure(exc)`` (default :func:`is_outage`) tells a dependency
    failure (counts) from an answer the caller must handle or a bug (does not count)."""

    def __init__(self, name: str, probe: Callable[[], object], failures: int = 3,
                 probe_seconds: float = 1.0,
                 is_failure: Callable[[BaseException], bool] = is_outage) -> None:
        self.name, self._probe, self.threshold = name, probe, max(1, int(failures))
        self.probe_seconds, self._is_failure = float(probe_seconds), is_failure
        self._lock = threading.Lock()
        self._failures = 0
        self._open_since: float | None = None
        self._last_error = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.opened_total = 0

    @property
    def is_open(self) -> bool:
        return self._open_since is not None

    def detail(self) -> str:
        since = self._open_since
        ago = f"{time.monotonic() - since:.1f} s ago" if since is not None else "now"
        return (f"{self.name} is unavailable (failed {ago}: {self._last_error}); answering at once "
                f"until a background probe (every {self.probe_seconds:g} s) reaches it again")

    def call(self, fn: Callable[[], T]) -> T:
        """``fn()``, or :class:`Unavailable` at once while open. Failures are re-raised."""
        if self._open_since is not None:
            raise Unavailable(self.detail(), self.name)
        try:
            out = fn()
        except BaseException as exc:
            if self._is_failure(exc):
                self.failure(exc)
            raise
        if self._failures:
            with self._lock:
                self._failures = 0
        return out

    def failure(self, exc: BaseException) -> None:
        with self._lock:
            self._failures += 1
            self._last_error = _describe(exc)
            if self._open_since is not None or self._failures < self.threshold:
                return
            self._open_since = time.monotonic()
            self.opened_total += 1
            log.warning("%s: circuit open after %d failures (%s)", self.name, self._failures,
                        self._last_error)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._probe_loop, name=f"probe-{self.name}",
                                                daemon=True)
                self._thread.start()

    def _probe_loop(self) -> None:
        while not self._stop.wait(self.probe_seconds):
            try:
                self._probe()
            except Exception as exc:  # still down: stay open
                self._last_error = _describe(exc)
                continue
            with self._lock:
                self._open_since, self._failures = None, 0
            log.warning("%s: circuit closed, the probe reached it", self.name)
            return

    def stop(self) -> None:
        self._stop.set()


def _describe(exc: BaseException) -> str:
    """The exception's type only (its text may hold internals such as addresses)."""
    return type(exc).__name__


__all__ = ["CircuitBreaker", "Unavailable", "is_outage"]
