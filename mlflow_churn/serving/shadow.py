"""Shadow scoring off the response path: a bounded queue and one worker thread.

In ``canary.mode: shadow`` the scoring service answers every request with the champion and
hands the canary's scoring of the same rows to a :class:`ShadowExecutor` once the response
is built: :meth:`ShadowExecutor.submit` only puts a job on a queue (never blocks), so the
shadow adds nothing to the caller's latency. At most ``canary.shadow_queue`` jobs wait; a
job that finds the queue full is dropped and counted in ``churn_shadow_dropped_total`` (the
shadow is a sample for the judge: losing some of it under overload is better than slowing
the champion or growing memory without bound). A job that raises is logged and counted in
``churn_shadow_job_failures_total``; the job itself (the service's) records a failing shadow
model as ``route=shadow`` errors. :meth:`ShadowExecutor.stop` runs what is queued (bounded
by a timeout) so a graceful shutdown logs every accepted shadow score.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

from mlflow_churn.errors import first_line
from mlflow_churn.web.metrics import Metrics

log = logging.getLogger("mlflow_churn.serving")

DROPPED = "churn_shadow_dropped_total"
FAILED = "churn_shadow_job_failures_total"
METRICS = (
    (DROPPED, "counter", "shadow scorings dropped because canary.shadow_queue requests were waiting"),
    (FAILED, "counter", "shadow jobs that raised (a failing shadow model counts as route=shadow errors "
     "in churn_prediction_errors_total instead)"),
)


class ShadowExecutor:
    """Runs shadow jobs (callables) in one background thread from a queue of ``max_queued``."""

    def __init__(self, metrics: Metrics, max_queued: int) -> None:
        self.metrics = metrics
        for name, kind, text in METRICS:
            metrics.describe(name, kind, text)
            metrics.inc(name, {}, 0.0)  # exported (as 0) before the first event
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize=max_queued)
        self._thread = threading.Thread(target=self._run, name="shadow-scorer", daemon=True)
        self._pending = 0  # jobs accepted and not finished
        self._lock = threading.Lock()
        self._idle = threading.Event()
        self._idle.set()

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Callable[[], None]) -> bool:
        """Queue ``job``; False (dropped and counted) when the queue is full or stopped."""
        if not self._thread.is_alive():
            self.metrics.inc(DROPPED, {})
            return False
        with self._lock:
            try:
                self._queue.put_nowait(job)
            except queue.Full:
                self.metrics.inc(DROPPED, {})
                return False
            self._pending += 1
            self._idle.clear()
        return True

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                job()
            except Exception as exc:  # the worker outlives any job
                self.metrics.inc(FAILED, {})
                log.warning("shadow job failed: %s: %s", type(exc).__name__, first_line(exc))
            finally:
                with self._lock:
                    self._pending -= 1
                    if self._pending == 0:
                        self._idle.set()

    def pending(self) -> int:
        """Jobs accepted and not finished."""
        return self._pending

    def dropped(self) -> int:
        return int(self.metrics.counter(DROPPED))

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every accepted job has run (True) or ``timeout`` (s) passes."""
        return self._idle.wait(timeout)

    def stop(self, timeout: float = 30.0) -> None:
        """Run what is queued (at most ``timeout`` s), then end the thread."""
        if not self._thread.is_alive():
            return
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            log.error("shadow scorer: %d jobs still queued at shutdown, not run", self._pending)
            return
        self._thread.join(timeout)
