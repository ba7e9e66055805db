"""A durable log of every online prediction: SQLite (WAL) by default, PostgreSQL optional.

One row per scored customer: request id, customer, model version, route, score (P(churn),
0..1), latency (ms), status, the wall-clock time it was served (``served_at``) and the
business time its features describe (``as_of``; equal to ``served_at`` unless a replay
or simulation says otherwise). Labels are joined later on ``as_of`` (see
:func:`attach_labels`) and feed canary analysis and monitoring.

Each :meth:`PredictionLog.write` is one committed transaction. What a crash of the
scoring service can lose depends on ``serving.prediction_log_mode``
(:mod:`mlflow_churn.serving.log_writer`): ``sync`` (default) commits a request's rows
before its response is sent, so even ``kill -9`` loses nothing answered; ``async``
commits in the background at least every 0.2 s, so a hard kill loses the rows not
committed yet (SIGTERM flushes them). A graceful restart loses nothing in either mode.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import astuple, dataclass
from datetime import datetime, timedelta
from pathlib import Path

import pandas as pd

from mlflow_churn.config import mask_text
from mlflow_churn.errors import ChurnError, first_line

COLUMNS = ("request_id", "customer_id", "model_version", "route", "score", "latency_ms",
           "status", "served_at", "as_of")


@dataclass(frozen=True)
class PredictionRecord:
    """One scored customer. Times are tz-aware UTC; ``score`` None when not scored."""

    request_id: str
    customer_id: int
    model_version: str
    route: str
    score: float | None
    latency_ms: float
    status: str
    served_at: datetime
    as_of: datetime


class PredictionLog:
    """Append and read prediction rows; thread-safe; ``url`` is a path or ``postgresql://``."""

    def __init__(self, url: str | Path) -> None:
        self.url = str(url)
        self._lock = threading.Lock()
        self._pg = self.url.startswith(("postgresql://", "postgres://"))
        try:
            if self._pg:
                import psycopg2

                self._con = psycopg2.connect(self.url)
                self._con.autocommit = False
            else:
                Path(self.url).parent.mkdir(parents=True, exist_ok=True)
                self._con = sqlite3.connect(self.url, check_same_thread=False, isolation_level=None)
                self._con.execute("PRAGMA journal_mode=WAL")
                self._con.execute("PRAGMA synchronous=NORMAL")
                self._con.execute("PRAGMA busy_timeout=5000")
        except Exception as exc:  # sqlite3 / psycopg2 errors differ
            first = f"cannot open the prediction log at {self.url}: {first_line(exc)}"
            raise ChurnError(mask_text(first)) from None
        self._ph = "%s" if self._pg else "?"
        ts = "TIMESTAMPTZ" if self._pg else "TEXT"
        self._execute(
            f"""CREATE TABLE IF NOT EXISTS predictions (
                  request_id TEXT NOT NULL, customer_id BIGINT NOT NULL, model_version TEXT,
                  route TEXT NOT NULL, score DOUBLE PRECISION, latency_ms DOUBLE PRECISION,
                  status TEXT NOT NULL, served_at {ts} NOT NULL, as_of {ts} NOT NULL)"""
        )
        self._execute("CREATE INDEX IF NOT EXISTS predictions_as_of ON predictions (as_of)")

    def _execute(self, sql: str, params: Sequence = ()) -> None:
        with self._lock:
            cur = self._con.cursor()
            cur.execute(sql, params)
            if self._pg:
                self._con.commit()

    def write(self, records: Sequence[PredictionRecord]) -> None:
        """Append ``records`` in one committed transaction."""
        if not records:
            return
        rows = [self._row(r) for r in records]
        sql = f"INSERT INTO predictions VALUES ({', '.join([self._ph] * len(COLUMNS))})"
        with self._lock:
            if self._pg and self._con.closed:  # the server went away earlier: reconnect
                import psycopg2

                self._con = psycopg2.connect(self.url)
            cur = self._con.cursor()
            try:
                if self._pg:
                    cur.executemany(sql, rows)
                    self._con.commit()
                else:
                    cur.execute("BEGIN")
                    cur.executemany(sql, rows)
                    cur.execute("COMMIT")
            except Exception:
                self._abort()  # leave no half-open transaction behind for the next write
                raise

    def _abort(self) -> None:
        try:
            if self._pg:
                if not self._con.closed:
                    self._con.rollback()
            elif self._con.in_transaction:
                self._con.execute("ROLLBACK")
        except Exception:  # the connection is gone: the next write reconnects (PostgreSQL)
            pass

    def _row(self, r: PredictionRecord) -> tuple:
        row = list(astuple(r))
        if not self._pg:
            row[7], row[8] = r.served_at.isoformat(), r.as_of.isoformat()
        return tuple(row)

    def read(self, since: datetime | None = None, until: datetime | None = None) -> pd.DataFrame:
        """Rows with ``since <= as_of < until`` (either bound optional), oldest first."""
        where, params = [], []
        if since is not None:
            where.append(f"as_of >= {self._ph}")
            params.append(since if self._pg else since.isoformat())
        if until is not None:
            where.append(f"as_of < {self._ph}")
            params.append(until if self._pg else until.isoformat())
        sql = "SELECT * FROM predictions" + (" WHERE " + " AND ".join(where) if where else "")
        with self._lock:
            cur = self._con.cursor()
            cur.execute(sql + " ORDER BY as_of, served_at", params)
            rows = cur.fetchall()
        frame = pd.DataFrame(rows, columns=list(COLUMNS))
        for col in ("served_at", "as_of"):
            frame[col] = pd.to_datetime(frame[col], utc=True, format="ISO8601")
        return frame

    def newest_as_of(self) -> datetime | None:
        """The latest business time (``as_of``, UTC) logged, None for an empty log."""
        with self._lock:
            cur = self._con.cursor()
            cur.execute("SELECT max(as_of) FROM predictions")
            value = cur.fetchone()[0]
        if value is None:
            return None
        return pd.Timestamp(value).tz_convert("UTC").to_pydatetime()

    def count(self) -> int:
        """Number of rows logged."""
        with self._lock:
            cur = self._con.cursor()
            cur.execute("SELECT count(*) FROM predictions")
            return int(cur.fetchone()[0])

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._con.close()


def attach_labels(
    predictions: pd.DataFrame, churn_events: pd.DataFrame, horizon_days: int, as_of: datetime
) -> pd.DataFrame:
    """Add ``label`` (1 = churned within ``horizon_days`` after the prediction's ``as_of``).

    Only predictions whose horizon has passed by ``as_of`` are mature; the others are
    dropped. ``churn_events`` needs ``customer_id`` and ``event_timestamp`` (UTC).
    """
    horizon = timedelta(days=horizon_days)
    mature = predictions[predictions["as_of"] + horizon <= as_of].copy()
    events = churn_events[churn_events["event_timestamp"] <= as_of]
    churned = events.groupby("customer_id")["event_timestamp"].min()
    when = mature["customer_id"].map(churned)
    mature["label"] = ((when > mature["as_of"]) & (when <= mature["as_of"] + horizon)).astype("int8")
    return mature
