"""QueueWorker: in order, failures recorded without killing the thread, shutdown quiet."""

from __future__ import annotations

import threading

from mlflow_churn.background import QueueWorker


def test_items_are_handled_in_order_and_a_failure_does_not_stop_the_thread() -> None:
    seen: list[int] = []
    failed: list[tuple[int, str]] = []

    def handle(item: int) -> None:
        if item == 2:
            raise ValueError("two")
        seen.append(item)

    worker: QueueWorker[int] = QueueWorker("test-worker", handle, lambda i, e: failed.append((i, str(e))))
    for i in range(5):
        worker.put(i)
    worker.join()
    assert seen == [0, 1, 3, 4]
    assert failed == [(2, "two")]
    worker.stop()
    assert not worker._thread.is_alive()


def test_system_exit_in_a_handler_ends_the_thread_quietly() -> None:
    hooks: list[threading.ExceptHookArgs] = []
    old = threading.excepthook
    threading.excepthook = hooks.append
    try:
        def handle(item: int) -> None:
            raise SystemExit(0)

        worker: QueueWorker[int] = QueueWorker("test-exit", handle)
        worker.put(1)
        worker.join()
        worker._thread.join(5)
        assert not worker._thread.is_alive()
        assert hooks == []  # no "Exception in thread" traceback
    finally:
        threading.excepthook = old
