"""Shared fixtures: workspaces, simulated data, real PostgreSQL / Redis, MLflow stores.

Services: tests that need PostgreSQL or Redis skip with a reason when the service is not
reachable, except when ``CI=true``, where a missing service fails the test.
Every test gets its own database / Redis key prefix and cleans up after itself.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import pytest

from mlflow_churn.config import ChurnConfig, load_config
from mlflow_churn.data.simulator import SimulationSpec, simulate

PG_HOST, PG_PORT = "127.0.0.1", 5432
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
IN_CI = os.environ.get("CI", "").lower() == "true"


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _need(service: str, host: str, port: int) -> None:
    if _reachable(host, port):
        return
    msg = f"{service} is not reachable at {host}:{port}"
    if IN_CI:
        pytest.fail(f"{msg} (CI=true: a missing service is a failure, not a skip)")
    pytest.skip(msg)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for this test; dropped afterwards."""
    _need("PostgreSQL", PG_HOST, PG_PORT)
    import psycopg2

    name = f"churn_test_{uuid.uuid4().hex[:12]}"
    admin = psycopg2.connect(host=PG_HOST, port=PG_PORT, user="postgres", dbname="test")
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://postgres@{PG_HOST}:{PG_PORT}/{name}"
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A unique Redis key prefix; every key under it is deleted afterwards."""
    _need("Redis", REDIS_HOST, REDIS_PORT)
    import redis

    prefix = f"churn-test-{uuid.uuid4().hex[:12]}"
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT)
    try:
        yield prefix
    finally:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


@pytest.fixture
def redis_url() -> str:
    """URL of the machine's Redis (use with ``redis_prefix``)."""
    return f"redis://{REDIS_HOST}:{REDIS_PORT}/0"


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty workspace; MLFLOW_TRACKING_URI and CHURN_* variables cleared."""
    for name in list(os.environ):
        if name.startswith("CHURN_") or name in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID"):
            monkeypatch.delenv(name, raising=False)
    ws = tmp_path / "ws"
    ws.mkdir()
    return ws


@pytest.fixture
def config(workspace: Path) -> ChurnConfig:
    """The default configuration on the test's own workspace (MLflow store inside it)."""
    return load_config(workspace=workspace, environ={})


@pytest.fixture(scope="session")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only simulated dataset (stable, 3000 customers x 120 days); its data dir.

    Shared by the whole session: copy it before changing anything.
    """
    out = tmp_path_factory.mktemp("small") / "data"
    simulate(SimulationSpec(customers=3000, days=120, start=date(2026, 1, 1), seed=7), out)
    return out
