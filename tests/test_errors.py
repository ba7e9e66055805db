"""The error kinds (issue 26 item 1): one table gives each kind its HTTP status and exit code;
the CLI (real processes) and the HTTP apps answer by it; an outage is 503 / exit 3 naming
the dependency; only an outage opens a circuit breaker."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from ports import ServerThread, free_port

from mlflow_churn.config import load_config
from mlflow_churn.errors import (
    ANSWERS,
    BadInput,
    ChurnError,
    ConfigError,
    Conflict,
    NotFound,
    Unavailable,
    exit_code,
    http_status,
    is_missing,
    outage,
)

CHURN = [sys.executable, "-m", "mlflow_churn.cli"]


def test_one_table_gives_each_kind_its_status_and_exit_code() -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE, RESOURCE_DOES_NOT_EXIST

    from mlflow_churn.features.online import StoreUnavailable
    from mlflow_churn.tracking import TrackingUnavailable

    expected = {BadInput: (422, 2), ChurnError: (422, 2), ConfigError: (422, 2), NotFound: (404, 2),
                Conflict: (409, 2), Unavailable: (503, 3), TrackingUnavailable: (503, 3),
                StoreUnavailable: (503, 3)}
    for cls, (status, code) in expected.items():
        exc = cls("x")
        assert (http_status(exc), exit_code(exc)) == (status, code), cls
    assert set(ANSWERS) == {ChurnError, BadInput, NotFound, Conflict, Unavailable}
    assert TrackingUnavailable("x").dependency == "tracking server"
    assert StoreUnavailable("x").dependency == "online store"
    assert Unavailable("x", "Redis").dependency == "Redis"
    # a library's connection failure is an outage naming its dependency; a bug is not
    import redis

    down = outage(redis.ConnectionError("Connection refused"))
    assert down is not None and down.dependency == "Redis" and "Redis" in str(down)
    assert outage(ConnectionRefusedError(111, "refused"), "the online store").dependency == "the online store"
    assert outage(KeyError("x")) is None and outage(ValueError("x")) is None
    # "does not exist" only by MLflow's error code
    assert is_missing(MlflowException("gone", error_code=RESOURCE_DOES_NOT_EXIST))
    assert not is_missing(MlflowException("boom", error_code=INTERNAL_ERROR))
    assert not is_missing(MlflowException("bad", error_code=INVALID_PARAMETER_VALUE))
    assert is_missing(MlflowException("bad", error_code=INVALID_PARAMETER_VALUE), or_invalid=True)
    assert not is_missing(KeyError("RESOURCE_DOES_NOT_EXIST"))


@pytest.mark.slow  # five real processes (in parallel)
def test_cli_exit_codes_by_kind_real_processes(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    port = free_port()  # nothing listens there
    base = {k: v for k, v in os.environ.items() if not k.startswith(("CHURN_", "MLFLOW_"))}
    cases = {  # name: (extra env, args, exit code, needle)
        "bad input": ({}, ["simulate", "--segment", "nope"], 2, "--segment must look like"),
        "not found": ({}, ["compress", "--version", "7", "--as-of", "2026-04-01"], 2, "has no version '7'"),
        "conflict": ({}, ["canary", "promote", "--reason", "x"], 2, "has no canary to promote"),
        "tracking server down": ({"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"},
                                 ["registry", "verify"], 3, "tracking server"),
        "Redis down": ({"CHURN_FEATURES__ONLINE_BACKEND": "redis",
                        "CHURN_FEATURES__REDIS_URL": f"redis://127.0.0.1:{port}/0"},
                       ["features", "history"], 3, "Redis"),
    }
    procs = {}
    for name, (env, args, _, _) in cases.items():
        wd = tmp_path / name.replace(" ", "-")
        wd.mkdir()
        procs[name] = subprocess.Popen([*CHURN, "--workspace", str(wd / "ws"), *args], env={**base, **env},
                                       cwd=wd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        _, _, code, needle = cases[name]
        lines = err.strip().splitlines()
        assert proc.returncode == code, (name, proc.returncode, err[-2000:])
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], (name, err[-2000:])
        assert "Traceback" not in err


def test_the_shared_handler_answers_each_kind_with_its_status() -> None:
    from mlflow_churn.web import errors as web_errors

    app = FastAPI()
    web_errors.install(app, 1000, "test.max_body_bytes")
    kinds = {"bad": ChurnError("bad value"), "config": ConfigError("bad key"), "missing": NotFound("no v9"),
             "conflict": Conflict("no canary"), "down": Unavailable("no answer", "PostgreSQL")}

    def route(exc: ChurnError):
        def raise_it() -> None:
            raise exc
        return raise_it

    for path, exc in kinds.items():
        app.get(f"/{path}")(route(exc))
    with TestClient(app) as client:
        got = {path: (r.status_code, r.json()["detail"])
               for path in kinds for r in [client.get(f"/{path}")]}
    assert got == {"bad": (422, "bad value"), "config": (422, "bad key"), "missing": (404, "no v9"),
                   "conflict": (409, "no canary"), "down": (503, "PostgreSQL unavailable: no answer")}


def test_an_outage_during_admin_promote_answers_503_not_409(workspace: Path) -> None:
    """The tracking server not answering is no conflict: 503 naming it (it was 409)."""
    from mlflow_churn.serving.app import create_app

    cfg = load_config(workspace=workspace, environ={}, overrides={
        "tracking_uri": f"http://127.0.0.1:{free_port()}", "serving.admin_token": "tok",
        "mlflow.http_max_retries": 0, "mlflow.http_timeout_seconds": 5})
    with ServerThread(create_app(cfg, start_background=False)) as srv, \
            httpx.Client(base_url=srv.url, timeout=60) as client:
        res = client.post("/admin/promote", headers={"Authorization": "Bearer tok"}, json={"reason": "x"})
    assert res.status_code == 503, res.text
    assert "tracking server" in res.json()["detail"] and "Traceback" not in res.text


def test_only_an_outage_opens_a_breaker() -> None:
    """A KeyError (a bug) or bad input never counts; a connection failure does. The two
    services' breakers use that default test."""
    import redis

    from mlflow_churn.features.api import FeatureService
    from mlflow_churn.web.breaker import CircuitBreaker, is_outage

    breaker = CircuitBreaker("the store", lambda: None, failures=2, probe_seconds=60)
    try:
        for exc in (KeyError("customer"), ChurnError("bad"), NotFound("no batch"), KeyError("again")):
            def fail(e: BaseException = exc) -> None:
                raise e
            with pytest.raises(type(exc)):
                breaker.call(fail)
        assert not breaker.is_open
        for _ in range(2):
            with pytest.raises(redis.ConnectionError):
                breaker.call(lambda: (_ for _ in ()).throw(redis.ConnectionError("refused")))
        assert breaker.is_open
    finally:
        breaker.stop()
    cfg = load_config(workspace=Path("/nonexistent-ws"), environ={})
    svc = FeatureService(cfg)
    try:
        assert svc.breaker._is_failure is is_outage
    finally:
        svc.breaker.stop()


def test_the_receiver_retries_any_outage_not_a_bug() -> None:
    """A gate that failed on any unavailable dependency is an outage (run again); a bug or
    bad input is an error (running it again changes nothing)."""
    import redis

    from mlflow_churn.features.online import StoreUnavailable
    from mlflow_churn.hooks.deliveries import ERROR, OUTAGE, failure_kind
    from mlflow_churn.tracking import TrackingUnavailable

    for exc in (TrackingUnavailable("x"), StoreUnavailable("x"), Unavailable("x", "PostgreSQL"),
                redis.ConnectionError("refused")):
        assert failure_kind(exc) == OUTAGE, exc
    for exc in (KeyError("x"), ChurnError("bad"), NotFound("no v3"), Conflict("no canary")):
        assert failure_kind(exc) == ERROR, exc
