"""A durable log of every online prediction: SQLite (WAL) by default, PostgreSQL optional.

One row per scored customer: request id, customer, model version, route, score (P(churn),
0..1), latency (ms), status, the wall-clock time it was served (``served_at``) and the
business time of the request (``as_of``: the client's ``as_of``, else the online batch's,
else ``served_at``). Labels are joined later on ``as_of`` (see :func:`attach_labels`) and
feed canary analysis and monitoring.

**Served features.** Next to them, ``features`` holds the feature values the model was
given for that row, as JSON text (an object: feature name -> raw value; TEXT in SQLite and
PostgreSQL alike), and ``features_as_of`` the instant those values were computed at (the
online batch's ``as_of``; NULL for values the client sent in ``records``). A row keeps its
values with probability ``serving.log_features_sample_rate`` (drawn per row; NULL when not
drawn, and for rows without values: not found, errors). A JSON text longer than
``serving.log_features_max_bytes`` is not stored: the row keeps the marker
``{"__omitted__": "size", "bytes": N}`` instead (counted in
``churn_prediction_log_features_omitted_total``), so a reader tells "too large" from "not
sampled". :func:`served_values` parses them back.

**Input warnings.** ``input_warnings`` holds the row's invalid feature values as JSON text
``{"feature": "kind", ...}`` (kind ``unknown_category`` | ``out_of_range`` | ``null``, see
:mod:`mlflow_churn.serving.input_checks`), NULL when there were none; the monitor run counts
them per feature.

**Stages and forced routes.** ``feature_ms`` is the request's feature fetch (the online
store read; ~0 for records a client sent) and ``model_ms`` the scoring time of the row's own
model over the request's rows (ms; NULL in rows written before they existed):
``latency_ms`` = parsing + ``feature_ms`` + ``model_ms``, so the canary judge can say which
stage a latency change comes from. ``forced`` is 1 for the rows of a test request whose
route the admin forced with the ``X-Churn-Route`` header (0 otherwise, NULL in older rows):
logged with their route, never counted in the canary judge's arms. A row with route
``shadow`` is the canary's score of a customer the champion answered (``canary.mode:
shadow``), never returned to the caller.

A log written before these columns existed is migrated when opened (``ALTER TABLE ... ADD
COLUMN``; the old rows keep everything they had and get NULL values). Rows are written and
read by column name, so columns added by a migration may sit in any order.

Each :meth:`PredictionLog.write` is one committed transaction. What a crash of the
scoring service can lose depends on ``serving.prediction_log_mode``
(:mod:`mlflow_churn.serving.log_writer`): ``sync`` (default) commits a request's rows
before its response is sent, so even ``kill -9`` loses nothing answered; ``async``
commits in the background at least every 0.2 s, so a hard kill loses the rows not
committed yet (SIGTERM flushes them). A graceful restart loses nothing in either mode.
"""

from __future__ import annotations

import json
import random
import sqlite3
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import psycopg

from mlflow_churn.config import is_postgres_url, libpq_url, mask_text
from mlflow_churn.errors import ChurnError, Unavailable, first_line, outage
from mlflow_churn.features.online import loads_payloads
from mlflow_churn.jsonable import dumps

#: the columns of the first schema, in table order
BASE_COLUMNS = ("request_id", "customer_id", "model_version", "route", "score", "latency_ms",
                "status", "served_at", "as_of")
#: columns added later: name -> (SQLite type, PostgreSQL type); an older log gets them by
#: ALTER TABLE ADD COLUMN when opened
ADDED_COLUMNS: dict[str, tuple[str, str]] = {
    "features": ("TEXT", "TEXT"),
    "features_as_of": ("TEXT", "TIMESTAMPTZ"),
    "input_warnings": ("TEXT", "TEXT"),
    "feature_ms": ("REAL", "DOUBLE PRECISION"),
    "model_ms": ("REAL", "DOUBLE PRECISION"),
    "forced": ("INTEGER", "INTEGER"),
}
COLUMNS = BASE_COLUMNS + tuple(ADDED_COLUMNS)
#: columns :meth:`PredictionLog.read` returns unless asked for the served values as well
LIGHT_COLUMNS = tuple(c for c in COLUMNS if c != "features")
_TIMES = ("served_at", "as_of", "features_as_of")
#: key of the marker stored instead of values over ``serving.log_features_max_bytes``
OMITTED = "__omitted__"
_OMITTED_LIKE = '{"' + OMITTED + '"%'


@dataclass(frozen=True)
class PredictionRecord:
    """One scored customer. Times are tz-aware UTC; ``score`` None when not scored.

    ``features``: the values the model was given (feature name -> raw value), None when
    there were none; ``features_as_of``: when those values were computed (the online batch's
    ``as_of``), None for values a client sent."""

    request_id: str
    customer_id: int
    model_version: str
    route: str
    score: float | None
    latency_ms: float
    status: str
    served_at: datetime
    as_of: datetime
    features: Mapping[str, Any] | None = None
    features_as_of: datetime | None = None
    #: the row's input warnings (serving.on_invalid=flag) as ``{"feature": "kind"}`` JSON text
    #: (:func:`mlflow_churn.serving.input_checks.encode_warnings`); None = none
    input_warnings: str | None = None
    #: the request's stages (ms): the feature fetch, and the scoring by this row's model
    feature_ms: float | None = None
    model_ms: float | None = None
    #: a test request whose route was forced (header ``X-Churn-Route``): never judged
    forced: bool = False


class FeatureSampler:
    """Which rows keep their served values, and their JSON text (see the module doc).

    ``rate``: share of rows kept (0..1, drawn per row); ``max_bytes``: longest JSON text
    stored (UTF-8 bytes), longer ones become the ``__omitted__`` marker; ``seed``: for
    reproducible draws (tests), None = fresh entropy."""

    def __init__(self, rate: float = 1.0, max_bytes: int = 16_384, seed: int | None = None) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ChurnError(f"serving.log_features_sample_rate must lie in [0, 1], got {rate}")
        if max_bytes < 2:
            raise ChurnError(f"serving.log_features_max_bytes must be >= 2, got {max_bytes}")
        self.rate, self.max_bytes = float(rate), int(max_bytes)
        self._rng = random.Random(seed)
        self.omitted = 0  # rows whose values were over max_bytes (read and reset by the writer)

    def encode(self, values: Mapping[str, Any] | None) -> str | None:
        """The JSON text to store for ``values``: None when absent or not drawn, the marker
        when over the bound."""
        if values is None or self.rate <= 0.0 or (self.rate < 1.0 and self._rng.random() >= self.rate):
            return None
        text = dumps(values if type(values) is dict else dict(values), indent=None)
        size = len(text.encode("utf-8"))
        if size > self.max_bytes:
            self.omitted += 1
            return json.dumps({OMITTED: "size", "bytes": size})
        return text


class PredictionLog:
    """Append and read prediction rows; thread-safe; ``url`` is a path or ``postgresql://``
    (psycopg 3).

    ``sampler`` decides which rows keep their served feature values (default: all rows,
    16 KiB each at most)."""

    def __init__(self, url: str | Path, sampler: FeatureSampler | None = None) -> None:
        self.url = str(url)
        self.sampler = sampler or FeatureSampler()
        self._lock = threading.Lock()
        self._pg = is_postgres_url(self.url)
        try:
            if self._pg:
                self._con = psycopg.connect(libpq_url(self.url), autocommit=False)
            else:
                Path(self.url).parent.mkdir(parents=True, exist_ok=True)
                self._con = sqlite3.connect(self.url, check_same_thread=False, isolation_level=None)
                self._con.execute("PRAGMA journal_mode=WAL")
                self._con.execute("PRAGMA synchronous=NORMAL")
                self._con.execute("PRAGMA busy_timeout=5000")
        except Exception as exc:  # sqlite3 / psycopg errors differ
            first = f"cannot open the prediction log at {self.url}: {first_line(exc)}"
            if outage(exc) is not None:  # its server down or unreachable: exit 3 / 503
                raise Unavailable(mask_text(first), "prediction log") from None
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
        self._execute("CREATE INDEX IF NOT EXISTS predictions_served_at ON predictions (served_at)")
        self._migrate()

    def _existing_columns(self) -> set[str]:
        with self._lock:
            cur = self._con.cursor()
            if self._pg:
                cur.execute("SELECT column_name FROM information_schema.columns "
                            "WHERE table_name = 'predictions' AND table_schema = current_schema()")
                names = {r[0] for r in cur.fetchall()}
                self._con.commit()
                return names
            cur.execute("PRAGMA table_info(predictions)")
            return {r[1] for r in cur.fetchall()}

    def _migrate(self) -> None:
        """Add the columns a log written by an older version lacks (its rows get NULL)."""
        have = self._existing_columns()
        for name, (lite, pg) in ADDED_COLUMNS.items():
            if name in have:
                continue
            try:
                if self._pg:
                    self._execute(f"ALTER TABLE predictions ADD COLUMN IF NOT EXISTS {name} {pg}")
                else:
                    self._execute(f"ALTER TABLE predictions ADD COLUMN {name} {lite}")
            except sqlite3.OperationalError as exc:
                # another process may have added it meanwhile: SQLite has no ADD COLUMN IF NOT
                # EXISTS nor an error code of its own for a duplicate column, so look again
                if name not in self._existing_columns():
                    raise ChurnError(mask_text(f"cannot add column {name} to the prediction log at "
                                               f"{self.url}: {first_line(exc)}")) from None
            except Exception as exc:  # psycopg errors
                self._abort()
                raise ChurnError(mask_text(f"cannot add column {name} to the prediction log at "
                                           f"{self.url}: {first_line(exc)}")) from None

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
        sql = (f"INSERT INTO predictions ({', '.join(COLUMNS)}) "
               f"VALUES ({', '.join([self._ph] * len(COLUMNS))})")
        with self._lock:  # the sampler's draws and counter too
            rows = [self._row(r) for r in records]
            if self._pg and self._con.closed:  # the server went away earlier: reconnect
                self._con = psycopg.connect(libpq_url(self.url), autocommit=False)
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
        values = {c: getattr(r, c) for c in COLUMNS}
        values["features"] = self.sampler.encode(r.features)
        values["forced"] = int(bool(r.forced))
        if not self._pg:
            for c in _TIMES:
                values[c] = values[c].isoformat() if values[c] is not None else None
        return tuple(values[c] for c in COLUMNS)

    def take_omitted(self) -> int:
        """Rows whose values were over the size bound since the last call."""
        n, self.sampler.omitted = self.sampler.omitted, 0
        return n

    def read(self, since: datetime | None = None, until: datetime | None = None,
             with_features: bool = False, only_with_features: bool = False,
             served_since: datetime | None = None) -> pd.DataFrame:
        """Rows with ``since <= as_of < until`` (either bound optional), oldest first;
        ``served_since``: only rows served (wall clock) at or after it (a rollout step's or an
        alarm window's traffic, read through the ``served_at`` index, not the whole log).

        ``with_features`` adds the ``features`` column (JSON text, see the module doc: it is
        left out by default, since it is by far the largest); ``only_with_features`` keeps only
        rows whose values were stored (sampled, within the bound)."""
        columns = COLUMNS if with_features or only_with_features else LIGHT_COLUMNS
        where, params = [], []
        if since is not None:
            where.append(f"as_of >= {self._ph}")
            params.append(since if self._pg else since.isoformat())
        if until is not None:
            where.append(f"as_of < {self._ph}")
            params.append(until if self._pg else until.isoformat())
        if served_since is not None:
            where.append(f"served_at >= {self._ph}")
            params.append(served_since if self._pg else served_since.isoformat())
        if only_with_features:
            where.append(f"features IS NOT NULL AND features NOT LIKE {self._ph}")
            params.append(_OMITTED_LIKE)
        sql = (f"SELECT {', '.join(columns)} FROM predictions"
               + (" WHERE " + " AND ".join(where) if where else ""))
        with self._lock:
            cur = self._con.cursor()
            cur.execute(sql + " ORDER BY as_of, served_at", params)
            rows = cur.fetchall()
            if self._pg:
                self._con.commit()  # end the read transaction (no snapshot held between reads)
        frame = pd.DataFrame(rows, columns=list(columns))
        for col in _TIMES:
            frame[col] = pd.to_datetime(frame[col], utc=True, format="ISO8601")
        return frame

    def feature_counts(self, since: datetime | None = None, until: datetime | None = None) -> dict[str, int]:
        """Rows with ``since <= as_of < until`` by what they hold: ``rows`` (all), ``with_features``
        (values stored), ``omitted`` (over the size bound)."""
        where, params = [], []
        for op, bound in ((">=", since), ("<", until)):
            if bound is not None:
                where.append(f"as_of {op} {self._ph}")
                params.append(bound if self._pg else bound.isoformat())
        sql = (f"SELECT count(*), count(features), "
               f"sum(CASE WHEN features LIKE {self._ph} THEN 1 ELSE 0 END) FROM predictions"
               + (" WHERE " + " AND ".join(where) if where else ""))
        params.insert(0, _OMITTED_LIKE)
        with self._lock:
            cur = self._con.cursor()
            cur.execute(sql, params)
            total, stored, omitted = cur.fetchone()
            if self._pg:
                self._con.commit()
        omitted = int(omitted or 0)
        return {"rows": int(total), "with_features": int(stored) - omitted, "omitted": omitted}

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


def served_values(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """The served values of ``frame``'s rows (read with ``with_features``), one dict per row
    (feature name -> raw value; empty for a row without stored values or over the bound)."""
    if "features" not in frame.columns:
        raise ChurnError("the rows were read without their served values; read them with "
                         "with_features=True")
    out = []
    for text in frame["features"]:
        value = loads_payloads(text) if isinstance(text, str) and text else None
        out.append(value if isinstance(value, dict) and OMITTED not in value else {})
    return out


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
