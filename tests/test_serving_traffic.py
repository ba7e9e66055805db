"""`churn traffic`: realistic POST /predict traffic to the running service, over real sockets."""

from __future__ import annotations

import json

import pytest
from fastapi import FastAPI, Header
from fastapi.responses import JSONResponse
from ports import ServerThread
from serving_support import log_rows, run_cli, serving_config, two_versions

from mlflow_churn.errors import ChurnError
from mlflow_churn.serving.traffic import draw_customers, loopback_url, send_traffic


def test_traffic_reaches_both_routes_and_is_logged(config, register_version) -> None:
    from mlflow_churn.serving.app import create_app

    champ, canary = two_versions(config, register_version)
    cfg = serving_config(config, canary_fraction=0.5)
    ids = draw_customers(cfg.data_dir, 300, seed=1)
    assert len(set(ids.tolist())) == 300
    ticks: list[int] = []
    with ServerThread(create_app(cfg)) as srv:
        res = send_traffic(srv.url, ids, batch=10, on_request=ticks.append)
        assert res.requests == 30 and sum(ticks) == 300 and res.failed_requests == 0 and not res.stopped
        assert res.customers == 300 and set(res.routes) == {"champion", "canary"}
        # never-churned customers only: the store serves them (bar a few who sign up after its as_of)
        assert res.statuses.get("ok", 0) >= 270, res.statuses
        assert set(res.versions) <= {champ, canary, "None"}
        # the CLI: JSON for scripts, the same service
        out = run_cli(cfg, ["traffic", "--customers", "50", "--url", srv.url, "--json", "--no-progress",
                            "--seed", "2"])
        assert out.returncode == 0, out.stderr[-2000:]
        assert json.loads(out.stdout)["customers"] == 50
    assert log_rows(cfg) == 350


def test_only_loopback_and_clear_errors(config) -> None:
    for url in ("http://10.0.0.1:8080", "https://127.0.0.1:8080", "http://example.com", "ftp://localhost"):
        with pytest.raises(ChurnError, match="--url"):
            loopback_url(url)
    assert loopback_url("http://localhost:8080/") == ("localhost", 8080, "")
    assert loopback_url("http://[::1]:9000/api") == ("::1", 9000, "/api")
    with pytest.raises(ChurnError, match="churn simulate"):
        draw_customers(config.data_dir, 10)
    res = run_cli(config, ["traffic", "--customers", "10", "--url", "http://192.0.2.1:8080"])
    assert res.returncode == 2 and "not a loopback address" in res.stderr and "Traceback" not in res.stderr
    with pytest.raises(ChurnError, match="not ready after 0.5 s: no service"):
        # nothing listens on this port (ServerThread closed it): a clear answer, not a hang
        with ServerThread(FastAPI()) as srv:
            url = srv.url
        send_traffic(url, [1], wait_seconds=0.5)


def _stub(token: str | None) -> FastAPI:
    """A service with the /predict contract that checks an optional bearer token."""
    app = FastAPI()

    @app.get("/ready")
    def ready() -> dict:
        return {"ready": True}

    @app.post("/predict")
    def predict(body: dict, authorization: str | None = Header(None)) -> JSONResponse:
        if token and authorization != f"Bearer {token}":
            return JSONResponse({"detail": "missing or wrong bearer token"}, status_code=401)
        return JSONResponse({"predictions": [
            {"customer_id": c, "route": "champion", "model_version": "1", "status": "ok",
             "churn_probability": 0.1} for c in body["customer_ids"]]})

    return app


def test_token_rate_and_time_bound() -> None:
    with ServerThread(_stub("s3cret")) as srv:
        with pytest.raises(ChurnError, match="401.*--token"):
            send_traffic(srv.url, [1, 2, 3])
        assert send_traffic(srv.url, [1, 2, 3], batch=2, token="s3cret").customers == 3
        # an injected clock that moves only when the sender sleeps: at 0.5 requests/s the
        # requests go at 0, 2, ..., 10 s and --max-seconds 12 stops the run after 6 of 100
        now, slept = [0.0], []

        def sleep(seconds: float) -> None:
            slept.append(seconds)
            now[0] += seconds

        res = send_traffic(srv.url, list(range(100)), batch=1, rate=0.5, max_seconds=12, token="s3cret",
                           clock=lambda: now[0], sleep=sleep)
        assert res.stopped == "--max-seconds 12 reached" and res.customers == res.requests == 6
        assert slept == [2.0] * 5
    for bad in ({"batch": 0}, {"rate": 0}, {"max_seconds": 0}):
        with pytest.raises(ChurnError):
            send_traffic("http://127.0.0.1:1", [1], **bad)
