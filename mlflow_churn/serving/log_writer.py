"""How the scoring service hands its rows to the prediction log, and what survives a crash.

``serving.prediction_log_mode``:

- ``sync`` (default): :meth:`LogWriter.submit` returns only once the request's rows are
  committed, so the response is sent after its rows are durable. A killed process (even
  ``kill -9``) loses nothing it answered. A failed commit raises
  :class:`PredictionLogUnavailable` and the request is answered 503 instead of with
  unlogged predictions. **Group commit**: requests arriving together share one
  transaction. The first request to find no commit in progress leads: it commits its rows
  in its own thread (one request alone pays no hand-off). Requests arriving while a commit
  runs queue; when it ends, the first of them leads the next commit, of every row queued
  by then, and the others wait for it. A failed group commit fails every request of the
  group (none of their rows is in the log). SQLite WAL with ``synchronous=NORMAL``: no
  fsync, so an OS crash or power cut, not a process kill, may lose the last transactions;
  PostgreSQL: its own ``synchronous_commit``.
- ``async``: rows are queued and committed by a background thread in batches of up to
  ``BATCH_ROWS`` rows at least every ``MAX_WAIT_S`` (0.2) seconds while the database keeps
  up; SIGTERM (graceful shutdown) commits everything queued. A hard kill loses the rows
  not committed yet: normally those answered in the last 0.2 s, more while the database
  is slow or down, never more than ``serving.prediction_log_max_pending`` rows. Beyond
  that bound new rows are dropped (``churn_prediction_log_dropped_total``) rather than
  letting the queue grow without limit; a failed write is retried, keeping its rows.

The served feature values of a row are kept or not by the writer's
:class:`~mlflow_churn.serving.prediction_log.FeatureSampler` (``serving.log_features_sample_rate``,
``serving.log_features_max_bytes``), encoded when the row is written (async: off the request
thread); rows over the size bound are counted in ``churn_prediction_log_features_omitted_total``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Literal

from mlflow_churn.errors import ChurnError, Unavailable, first_line
from mlflow_churn.serving.prediction_log import FeatureSampler, PredictionLog, PredictionRecord
from mlflow_churn.web.metrics import Metrics

log = logging.getLogger("mlflow_churn.serving")

BATCH_ROWS = 512  # async: rows per transaction at most
MAX_WAIT_S = 0.2  # async: a queued row waits at most this long for its transaction (s)
RETRY_S = 0.5  # async: pause after a failed write before retrying (s)

WRITTEN, FAILURES, DROPPED = ("churn_prediction_log_written_total", "churn_prediction_log_failures_total",
                              "churn_prediction_log_dropped_total")
OMITTED = "churn_prediction_log_features_omitted_total"
METRICS = (
    (WRITTEN, "counter", "rows committed to the prediction log"),
    (FAILURES, "counter", "failed prediction log writes (sync: the request got 503; async: retried)"),
    (DROPPED, "counter", "async mode: rows dropped because max_pending rows were uncommitted"),
    ("churn_prediction_log_pending", "gauge", "rows handed to the prediction log, not committed yet"),
    (OMITTED, "counter", "rows whose served feature values were over serving.log_features_max_bytes "
     "(a size marker is stored instead)"),
)


class PredictionLogUnavailable(Unavailable):
    """Sync mode: the rows of a request could not be committed (503)."""

    default_dependency = "prediction log"


class _Pending:
    """Sync mode: one request's rows waiting for a group commit (module doc)."""

    __slots__ = ("records", "settled", "lead", "error")

    def __init__(self, records: list[PredictionRecord]) -> None:
        self.records = records
        self.settled = threading.Event()  # committed or failed by a leader, or made the leader
        self.lead = False
        self.error: str | None = None


class LogWriter:
    """Delivers prediction records to the :class:`PredictionLog` at ``url`` (see module doc)."""

    def __init__(self, url: str, metrics: Metrics, mode: Literal["sync", "async"] = "sync",
                 max_pending: int = 100_000, sampler: FeatureSampler | None = None) -> None:
        if mode not in ("sync", "async"):
            raise ChurnError(f"serving.prediction_log_mode must be sync or async, got '{mode}'")
        self.url, self.metrics, self.mode, self.max_pending = url, metrics, mode, max_pending
        self.sampler = sampler or FeatureSampler()
        for name, kind, text in METRICS:
            metrics.describe(name, kind, text)
            if kind == "counter":
                metrics.inc(name, {}, 0.0)  # exported (as 0) before the first event
        self._queue: queue.Queue[list[PredictionRecord] | None] = queue.Queue()
        self._log: PredictionLog | None = None
        self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
        self._batch: list[PredictionRecord] = []  # async: taken off the queue, not committed
        self._waiting = 0  # rows submitted and not yet committed
        self._count_lock = threading.Lock()
        self._idle = threading.Event()
        self._idle.set()
        self._group: list[_Pending] = []  # sync: requests waiting for the next group commit
        self._group_lock = threading.Lock()
        self._committing = False  # sync: a leader is committing a group

    def start(self) -> None:
        """Open the log (ChurnError naming it when it cannot be opened); async: start the thread."""
        self._log = PredictionLog(self.url, self.sampler)
        if self.mode == "async":
            self._thread.start()

    def submit(self, records: list[PredictionRecord]) -> None:
        """Sync: commit ``records`` now (PredictionLogUnavailable on failure). Async: queue
        them, or drop and count them when ``max_pending`` rows are already uncommitted."""
        if not records:
            return
        if self.mode == "sync":
            self._write_now(records)
            return
        with self._count_lock:
            if self._waiting + len(records) > self.max_pending:
                self.metrics.inc(DROPPED, {}, len(records))
                return
            self._waiting += len(records)
            self._idle.clear()
        self._queue.put(records)

    def _write_now(self, records: list[PredictionRecord]) -> None:
        """Sync: return once ``records`` are committed, in a group commit (module doc)."""
        if self._log is None:
            raise PredictionLogUnavailable(f"the prediction log at {self.url} is not open")
        mine = _Pending(records)
        with self._group_lock:
            self._group.append(mine)
            mine.lead = not self._committing
            self._committing = True
        if not mine.lead:
            mine.settled.wait()  # a leader commits these rows or hands this request the lead
        if mine.lead:
            self._lead()
        if mine.error is not None:
            raise PredictionLogUnavailable(mine.error)

    def _lead(self) -> None:
        """Commit every queued request's rows in one transaction, settle them, then hand the
        lead to the first request queued meanwhile (or end the commit run)."""
        with self._group_lock:
            group, self._group = self._group, []
        try:
            self._commit_group(group)
        finally:
            with self._group_lock:
                nxt = self._group[0] if self._group else None
                if nxt is None:
                    self._committing = False
                else:
                    nxt.lead = True
            for pending in group:
                pending.settled.set()
            if nxt is not None:
                nxt.settled.set()

    def _commit_group(self, group: list[_Pending]) -> None:
        rows = [r for pending in group for r in pending.records]
        error = None
        try:
            if self._log is None:
                error = f"the prediction log at {self.url} is not open"
            else:
                self._log.write(rows)
        except Exception as exc:  # sqlite3 / psycopg errors differ: each request of the group gets 503
            error = f"cannot write the prediction log at {self.url}: {first_line(exc)}"
        except BaseException:  # e.g. an interrupt in the leader's thread: the group is not logged
            for pending in group:
                pending.error = f"the prediction log write at {self.url} was interrupted"
            raise
        if error is not None:
            self.metrics.inc(FAILURES, {}, len(group))
            for pending in group:
                pending.error = error
            return
        self._count_written(len(rows))

    def _count_written(self, n: int) -> None:
        self.metrics.inc(WRITTEN, {}, n)
        if self._log is not None:
            omitted = self._log.take_omitted()
            if omitted:
                self.metrics.inc(OMITTED, {}, omitted)

    def pending(self) -> int:
        """Rows submitted and not committed yet (always 0 in sync mode)."""
        return self._waiting

    def dropped(self) -> int:
        """Rows dropped so far (async mode with ``max_pending`` uncommitted rows)."""
        return int(self.metrics.counter(DROPPED))

    # async: the background thread
    def _commit_batch(self) -> None:
        if not self._batch or self._log is None:
            return
        try:
            self._log.write(self._batch)
        except Exception as exc:  # keep the rows and retry: the log must not lose them
            self.metrics.inc(FAILURES, {})
            log.warning("prediction log write failed (%d rows kept): %s", len(self._batch), exc)
            time.sleep(RETRY_S)
            return
        self._count_written(len(self._batch))
        with self._count_lock:
            self._waiting -= len(self._batch)
            if self._waiting == 0:
                self._idle.set()
        self._batch = []

    def _take(self, item: list[PredictionRecord] | None) -> bool:
        """Add a queue item to the batch; False for the stop sentinel."""
        if item is None:
            return False
        self._batch.extend(item)
        return True

    def _run(self) -> None:
        stop = False
        while not stop or self._batch:
            deadline = time.monotonic() + MAX_WAIT_S
            while not stop and len(self._batch) < BATCH_ROWS:
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                stop = not self._take(item)
            if stop:  # drain what is left
                while True:
                    try:
                        self._take(self._queue.get_nowait())
                    except queue.Empty:
                        break
            self._commit_batch()
            if stop and self._batch and self._log is None:
                break

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every submitted record is committed (True) or ``timeout`` (s) passes."""
        return self._idle.wait(timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Commit everything still queued (waiting at most ``timeout`` s), then close the log.
        Rows still uncommitted after ``timeout`` (the database down) are counted as dropped."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout)
            if self._thread.is_alive():
                with self._count_lock:
                    lost, self._waiting = self._waiting, 0
                self.metrics.inc(DROPPED, {}, lost)
                log.error("prediction log: %d rows not committed at shutdown (%s)", lost, self.url)
        if self._log is not None:
            self._log.close()
            self._log = None
