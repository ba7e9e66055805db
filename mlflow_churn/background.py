"""One background thread handling queued items in order: the gate worker of the webhook
receiver and its alias watcher are both one of these."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class QueueWorker(Generic[T]):
    """A daemon thread calling ``handle(item)`` for each submitted item, in order.

    ``handle`` records its own failures (an exception it lets through is logged by the
    thread and ends nothing but that item); a ``SystemExit`` / ``KeyboardInterrupt`` from it
    ends the thread quietly (the process is shutting down mid-item). :meth:`join` waits
    until every submitted item is handled; :meth:`stop` handles what is queued, then ends.
    """

    def __init__(self, name: str, handle: Callable[[T], object],
                 on_error: Callable[[T, Exception], None] | None = None) -> None:
        self._handle = handle
        self._on_error = on_error or (lambda _item, _exc: None)
        self._queue: queue.Queue[T | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def put(self, item: T) -> None:
        self._queue.put(item)

    def join(self) -> None:
        """Wait until every submitted item has been handled."""
        self._queue.join()

    def stop(self, timeout: float = 60.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                try:
                    self._handle(item)
                except (SystemExit, KeyboardInterrupt):
                    return
                except Exception as exc:  # keep the thread alive; on_error records the reason
                    self._on_error(item, exc)
            finally:
                self._queue.task_done()


__all__ = ["QueueWorker"]
