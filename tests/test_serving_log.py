"""Sticky canary routing, the durable prediction log (SQLite and real PostgreSQL) and its
writer: bounded while the database is locked (async), failing loudly then reconnecting (sync)."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mlflow_churn.errors import ChurnError
from mlflow_churn.serving.log_writer import LogWriter, PredictionLogUnavailable
from mlflow_churn.serving.prediction_log import PredictionLog, PredictionRecord, attach_labels
from mlflow_churn.serving.routing import bucket, route, routes
from mlflow_churn.web.metrics import Metrics

T0 = datetime(2026, 3, 1, tzinfo=UTC)


def test_split_fraction_and_stickiness() -> None:
    ids = np.arange(1, 20001)
    canary = routes(ids, 0.1, salt="v7")
    assert abs(canary.mean() - 0.1) < 0.01  # binomial sd is 0.002
    assert all(route(int(i), 0.1, "v7") == ("canary" if c else "champion")
               for i, c in zip(ids[:500], canary[:500], strict=True))
    assert (routes(ids, 0.1, salt="v7") == canary).all()  # sticky
    wider = routes(ids, 0.3, salt="v7")
    assert (wider | ~canary).all()  # ramping up only adds canary customers
    other = routes(ids, 0.1, salt="v8")
    assert 0.05 < (other & canary).sum() / canary.sum() < 0.2  # a new salt draws a new sample
    assert not routes(ids, 0.0).any() and 0.0 <= bucket(5) < 1.0


def _records(n: int, version: str = "3") -> list[PredictionRecord]:
    return [
        PredictionRecord(f"r{i}", i, version, "canary" if i % 2 else "champion", i / (n + 1), 1.5,
                         "ok", T0 + timedelta(seconds=i), T0 + timedelta(days=i % 3))
        for i in range(1, n + 1)
    ]


def _roundtrip(url: str) -> None:
    log = PredictionLog(url)
    log.write(_records(10))
    log.close()
    log = PredictionLog(url)  # a restart keeps every row
    assert log.count() == 10
    rows = log.read(since=T0 + timedelta(days=1))
    assert len(rows) == 7 and rows["as_of"].min() == T0 + timedelta(days=1)
    assert str(rows["as_of"].dt.tz) == "UTC"
    assert set(rows.columns) >= {"request_id", "customer_id", "model_version", "route", "score"}
    log.close()


def test_sqlite_log_survives_restart(tmp_path: Path) -> None:
    _roundtrip(str(tmp_path / "predictions.sqlite"))


@pytest.mark.postgres
def test_postgres_log_survives_restart(postgres_url: str) -> None:
    _roundtrip(postgres_url)


def test_unopenable_log_is_named(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(ChurnError, match="prediction log"):
        PredictionLog(tmp_path / "f" / "log.sqlite")


def test_attach_labels_uses_only_mature_predictions() -> None:
    preds = pd.DataFrame({
        "customer_id": [1, 2, 3, 4],
        "as_of": pd.to_datetime([T0, T0, T0, T0 + timedelta(days=20)], utc=True),
    })
    events = pd.DataFrame({
        "customer_id": [1, 2, 4],
        "event_timestamp": pd.to_datetime(
            [T0 + timedelta(days=10), T0 + timedelta(days=40), T0 + timedelta(days=25)], utc=True),
    })
    out = attach_labels(preds, events, 30, T0 + timedelta(days=31))
    assert list(out["customer_id"]) == [1, 2, 3]  # customer 4's horizon has not passed
    assert list(out["label"]) == [1, 0, 0]


def test_async_writer_is_bounded_while_the_database_is_locked(tmp_path: Path) -> None:
    url = str(tmp_path / "predictions.sqlite")
    metrics = Metrics()
    writer = LogWriter(url, metrics, mode="async", max_pending=25)
    writer.start()
    blocker = sqlite3.connect(url, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # another process holds the write lock: nothing commits
    try:
        for start in range(0, 50, 5):
            writer.submit(_records(50)[start:start + 5])
        assert writer.pending() == 25 and writer.dropped() == 25  # bounded, the excess counted
        text = metrics.render([])
        assert "churn_prediction_log_dropped_total 25" in text
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert writer.flush(timeout=60)  # the lock is gone: the kept rows are retried and committed
    writer.close()
    log = PredictionLog(url)
    assert log.count() == 25 and writer.pending() == 0
    assert sorted(log.read()["customer_id"]) == list(range(1, 26))
    log.close()


@pytest.mark.postgres
def test_sync_writer_fails_loudly_then_reconnects(postgres_url: str) -> None:
    import psycopg

    writer = LogWriter(postgres_url, Metrics(), mode="sync")
    writer.start()
    writer.submit(_records(3))  # committed when submit returns
    admin = psycopg.connect(postgres_url, autocommit=True)
    with admin.cursor() as cur:  # the server drops the writer's session
        cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()")
    admin.close()
    with pytest.raises(PredictionLogUnavailable, match="cannot write the prediction log"):
        writer.submit(_records(2))
    writer.submit(_records(4))  # a new session
    writer.close()
    log = PredictionLog(postgres_url)
    assert log.count() == 7 and log.newest_as_of() == T0 + timedelta(days=2)
    log.close()


def _held_submits(tmp_path: Path,
                  n: int) -> tuple[LogWriter, list[str], list[object], list, sqlite3.Connection]:
    """``n`` threads each submit one request's rows to a sync writer while another connection
    holds SQLite's write lock: the first leads (blocked in its commit), the rest queue."""
    import threading
    import time

    url = str(tmp_path / "predictions.sqlite")
    writer = LogWriter(url, Metrics(), mode="sync")
    writer.start()
    statements: list[str] = []
    writer._log._con.set_trace_callback(statements.append)  # what the writer's connection runs
    blocker = sqlite3.connect(url, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    outcomes: list[object] = []

    def submit(i: int) -> None:
        try:
            writer.submit(_records(n)[i:i + 1])
            outcomes.append("ok")
        except PredictionLogUnavailable as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(writer._group) < n - 1:  # the leader took its own row; the others wait for the next
        assert time.monotonic() < deadline, f"only {len(writer._group)} requests queued"
        time.sleep(0.01)
    return writer, statements, outcomes, threads, blocker


def test_sync_requests_arriving_together_share_one_commit(tmp_path: Path) -> None:
    writer, statements, outcomes, threads, blocker = _held_submits(tmp_path, 8)
    blocker.execute("ROLLBACK")  # the lock goes: the leader commits, then the 7 queued at once
    blocker.close()
    for t in threads:
        t.join(60)
    assert outcomes == ["ok"] * 8  # every submit returned only after its rows were committed
    assert [s for s in statements if s == "COMMIT"] == ["COMMIT", "COMMIT"]  # 2 transactions, not 8
    assert sorted(writer._log.read()["customer_id"]) == list(range(1, 9))
    writer.close()


def test_a_failed_group_commit_fails_every_request_of_the_group(tmp_path: Path) -> None:
    writer, statements, outcomes, threads, blocker = _held_submits(tmp_path, 4)
    for t in threads:  # the lock outlasts busy_timeout (5 s) for both groups
        t.join(60)
    blocker.execute("ROLLBACK")
    blocker.close()
    assert len(outcomes) == 4 and all(isinstance(o, PredictionLogUnavailable) for o in outcomes)
    assert all("database is locked" in str(o) for o in outcomes)
    assert writer.metrics.counter("churn_prediction_log_failures_total") == 4
    writer.submit(_records(2))  # the next request leads a new commit
    assert writer._log.count() == 2 and "COMMIT" in statements
    writer.close()
