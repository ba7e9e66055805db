"""Sticky canary routing and the durable prediction log (SQLite and real PostgreSQL)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mlflow_churn.errors import ChurnError
from mlflow_churn.serving.prediction_log import PredictionLog, PredictionRecord, attach_labels
from mlflow_churn.serving.routing import bucket, route, routes

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
