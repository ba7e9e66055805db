"""Hardening of the HTTP apps: closed by default, tokens, request limits, input
validation, bounded waits on a stalled Redis, secrets masked. Real sockets, real
subprocesses, a real (stalled) TCP peer in place of Redis."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import select
import socket
import stat
import threading
import time
from pathlib import Path

import httpx
import pytest
from serving_support import (
    BATCH_AS_OF,
    ServeProcess,
    ServerThread,
    rss_kb,
    run_cli,
    serving_config,
    signed_gate,
    wait_ready,
)
from wait_support import wait_until

from mlflow_churn.config import ChurnConfig, load_config
from mlflow_churn.errors import ChurnError
from mlflow_churn.features.materialize import materialize
from mlflow_churn.features.online import open_store
from mlflow_churn.serving.app import create_app
from mlflow_churn.web.auth import check_exposure, is_loopback, token_file

#: what an exception's text looks like in a body (none may show one)
EXCEPTION_TEXT = re.compile(r"Traceback \(most recent|File \"|\b\w+(Error|Exception): ")


class StalledPeer:
    """A TCP server that accepts connections and never answers (a stalled Redis)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.conns: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def _accept(self) -> None:
        self.sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.conns.append(conn)  # held open, never read, never answered

    def __enter__(self) -> StalledPeer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        for c in self.conns:
            c.close()
        self.sock.close()


def _timed_get(client: httpx.Client, path: str, **kw: object) -> tuple[httpx.Response, float]:
    t0 = time.monotonic()
    res = client.get(path, **kw)
    return res, time.monotonic() - t0


def _no_internals(res: httpx.Response) -> None:
    assert not EXCEPTION_TEXT.search(res.text), res.text


# --------------------------------------------------------------------------- tokens
def test_token_file_is_private_and_stable(tmp_path: Path) -> None:
    path = tmp_path / "ws" / "secrets" / "admin_token"
    token = token_file(path)
    assert len(token) >= 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert token_file(path) == token  # a restart keeps the same token
    path.chmod(0o644)
    assert token_file(path) == token and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert token_file(tmp_path / "other") != token


def test_exposure_rule() -> None:
    for host in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "10.0.0.5", "example.org"):
        assert not is_loopback(host), host
    check_exposure("127.0.0.1", "churn serve", {"serving.api_token": None})
    check_exposure("0.0.0.0", "churn serve", {"serving.api_token": "t"})
    with pytest.raises(ChurnError, match="serving.api_token"):
        check_exposure("0.0.0.0", "churn serve", {"serving.api_token": None})


@pytest.mark.slow  # subprocesses / a trained version: 10-25 s on a busy machine
def test_cli_refuses_open_network_bind(config: ChurnConfig) -> None:
    for args in (["serve", "--host", "0.0.0.0", "--port", "1"],
                 ["features", "serve", "--host", "0.0.0.0", "--port", "1"]):
        res = run_cli(config, args, timeout=120)
        assert res.returncode == 2, res.stderr
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "api_token" in lines[0], res.stderr
    assert not (config.workspace / "secrets").exists()  # refused before anything was written


@pytest.mark.slow  # subprocesses / a trained version: 10-25 s on a busy machine
def test_churn_serve_creates_a_private_admin_token(config: ChurnConfig) -> None:
    path = config.workspace / "secrets" / "admin_token"
    with ServeProcess(config) as srv, httpx.Client(base_url=srv.url, timeout=10) as client:
        deadline = time.monotonic() + 120
        while True:
            try:
                if client.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert srv.proc.poll() is None and time.monotonic() < deadline, "churn serve did not start"
            time.sleep(0.2)
        token = path.read_text().strip()
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        res = client.get("/admin/status")
        assert res.status_code == 401 and "serving.admin_token" in res.json()["detail"]
        res = client.post("/admin/promote", json={"reason": "x"}, headers={"Authorization": "Bearer nope"})
        assert res.status_code == 403
        res = client.get("/admin/status", headers={"Authorization": f"Bearer {token}"})
        assert res.status_code == 200 and res.json()["champion"] is None
        _, out = srv.stop()  # stdout and stderr of the process
    assert str(path) in out  # says where the token is ...
    assert token not in out  # ... never the token itself


def test_admin_routes_closed_without_a_token(config: ChurnConfig) -> None:
    cfg = serving_config(config, reload_seconds=60)
    assert cfg.serving.admin_token is None
    with ServerThread(create_app(cfg)) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        for path in ("/admin/promote", "/admin/rollback", "/admin/reload"):
            res = client.post(path, json={"reason": "x"}, headers={"Authorization": "Bearer anything"})
            assert res.status_code == 403 and "serving.admin_token" in res.json()["detail"], res.text
        assert client.get("/admin/status").status_code == 403
        assert client.get("/health").status_code == 200


def test_circuit_breaker_opens_answers_at_once_and_a_probe_closes_it() -> None:
    from mlflow_churn.web.breaker import CircuitBreaker, Unavailable

    up = threading.Event()

    def probe() -> None:
        if not up.is_set():
            raise ConnectionError("still down")

    def down() -> None:
        raise TimeoutError("no answer")

    breaker = CircuitBreaker("the store", probe, failures=2, probe_seconds=0.05,
                             is_failure=lambda exc: not isinstance(exc, KeyError))
    with pytest.raises(KeyError):  # an answer, not a failure: does not count
        breaker.call(lambda: {}["x"])
    for _ in range(2):
        with pytest.raises(TimeoutError):
            breaker.call(down)
    assert breaker.is_open
    calls = []
    t0 = time.monotonic()
    with pytest.raises(Unavailable, match="the store is unavailable.*TimeoutError"):
        breaker.call(lambda: calls.append(1))
    assert not calls and time.monotonic() - t0 < 0.05  # not called at all
    up.set()
    wait_until(lambda: not breaker.is_open, 5, "the breaker to close", interval=0.01)
    assert breaker.call(lambda: 7) == 7
    breaker.stop()


# --------------------------------------------------------------------------- scoring: bad input
@pytest.mark.slow  # subprocesses / a trained version: 10-25 s on a busy machine
def test_scoring_bad_input_tokens_and_limits(config: ChurnConfig, register_version) -> None:
    champ = signed_gate(config, register_version(config, quality="good", alias="champion", seed=0))
    materialize(config, BATCH_AS_OF)
    cfg = serving_config(config, canary_fraction=0.0, admin_token="adm", api_token="api",
                         max_body_bytes=100_000)
    store = open_store(cfg)
    cid = store.customer_ids()[0]
    values = dict(store.get([cid])[cid].values)
    store.close()
    admin, api = {"Authorization": "Bearer adm"}, {"Authorization": "Bearer api"}
    with ServerThread(create_app(cfg)) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        wait_ready(client, expect=401)  # /ready needs the api token too
        wait_ready(httpx.Client(base_url=srv.url, headers=api, timeout=30))
        assert client.get("/health").status_code == 200  # open
        assert client.post("/predict", json={"customer_ids": [cid]}).status_code == 401
        assert client.post("/predict", json={"customer_ids": [cid]},
                           headers={"Authorization": "Bearer x"}).status_code == 403
        for headers in (api, admin):  # the admin token works on the read routes too
            res = client.post("/predict", json={"customer_ids": [cid]}, headers=headers)
            assert res.status_code == 200 and res.json()["predictions"][0]["model_version"] == champ
        assert client.get("/metrics").status_code == 401
        cases = [  # (body, status, words the detail must hold)
            ({"customer_ids": [9223372036854775808]}, 422, ["customer_ids.0", "9223372036854775808"]),
            ({"customer_ids": [-1]}, 422, ["customer_ids.0", "-1"]),
            ({"records": [{"customer_id": 2**64}]}, 422, ["records.0.customer_id"]),
            ({"records": [{"customer_id": -1}]}, 422, ["records.0.customer_id"]),
            ({"customer_ids": [cid], "as_of": "0001-01-01T00:00:00Z"}, 403, ["as_of", "admin"]),
        ]
        for body, code, words in cases:
            res = client.post("/predict", json=body, headers=api)
            assert res.status_code == code, (body, res.text)
            for word in words:
                assert word in res.json()["detail"], (word, res.text)
            _no_internals(res)
        res = client.post("/predict", json={"customer_ids": [cid], "as_of": "2026-03-26T00:00:00Z"},
                          headers=admin)
        assert res.status_code == 200 and res.json()["as_of"].startswith("2026-03-26")
        # a numeric feature far beyond float range: 422 naming it, not a 503 from the model
        record = json.dumps({"records": [{**values, "age": 12345}]}).replace("12345", "1e400")
        res = client.post("/predict", content=record.encode(),
                          headers={**api, "content-type": "application/json"})
        assert res.status_code == 422 and "age" in res.json()["detail"], res.text
        _no_internals(res)
        # admin transitions: a malformed version is 422, an unknown one 404, never a 503
        for version, code in (("", 422), ("abc", 422), ("-1", 422), ("99", 404)):
            for path in ("/admin/rollback", "/admin/promote"):
                res = client.post(path, json={"reason": "x", "version": version}, headers=admin)
                assert res.status_code == code, (path, version, res.text)
                assert "version" in res.json()["detail"]
                _no_internals(res)
        res = client.post("/admin/rollback", json={"reason": "x"}, headers=admin)
        assert res.status_code == 409 and "no canary" in res.json()["detail"]
        # body limit: from Content-Length, and while a body without one streams in
        big = b'{"customer_ids": [' + b"1," * 60_000 + b"1]}"
        res = client.post("/predict", content=big, headers={**api, "content-type": "application/json"})
        assert res.status_code == 413 and "serving.max_body_bytes" in res.json()["detail"]

        def chunks():
            for i in range(0, len(big), 8192):
                yield big[i:i + 8192]

        res = client.post("/predict", content=chunks(), headers={**api, "content-type": "application/json"})
        assert res.status_code == 413 and "serving.max_body_bytes" in res.json()["detail"]
        assert client.post("/predict", json={"customer_ids": [cid]}, headers=api).status_code == 200
        assert client.get("/nope").status_code == 404 and "/nope" in client.get("/nope").json()["detail"]


# --------------------------------------------------------------------------- feature API ids
def test_feature_api_ids_are_ascii_int64(workspace: Path, small_data: Path) -> None:
    from mlflow_churn.features.api import create_app as features_app

    (workspace / "data").symlink_to(small_data, target_is_directory=True)
    cfg = load_config(workspace=workspace, environ={}, overrides={"features.api_token": "ft"})
    materialize(cfg, BATCH_AS_OF)
    auth = {"Authorization": "Bearer ft"}
    with ServerThread(features_app(cfg)) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        assert client.get("/features", params={"ids": "12"}).status_code == 401
        assert client.get("/features", params={"ids": "12"}, headers=auth).status_code == 200
        for ids in ("\u0661\u0662", "1\u0662", "\uff11\uff12", "9223372036854775808",
                    "99999999999999999999999"):
            res = client.get("/features", params={"ids": ids}, headers=auth)
            assert res.status_code == 400, (ids, res.text)
            detail = res.json()["detail"]
            assert "ids" in detail and (ids in detail or ids[:19] in detail), detail
        assert client.get("/health").status_code in (200, 503)  # open, answers freshness
        assert client.get("/metrics").status_code == 401


# --------------------------------------------------------------------------- stalled Redis
def _hammer(url: str, path: str, n: int, results: list, stop: threading.Event, **kw: object) -> None:
    with httpx.Client(base_url=url, timeout=30) as c:
        while not stop.is_set() and n:
            n -= 1
            t0 = time.monotonic()
            res = c.request(kw.get("method", "GET"), path, params=kw.get("params"), json=kw.get("json"))
            results.append((res.status_code, time.monotonic() - t0, res.text))


#: seconds a request may take while the store stalls: far below a hang (the client's 30 s)
STALL_BOUND_S = 5.0


@pytest.mark.redis
def test_stalled_redis_answers_503_fast_and_health_stays_fast(config: ChurnConfig, register_version,
                                                             redis_prefix: str) -> None:
    from mlflow_churn.features.api import create_app as features_app

    signed_gate(config, register_version(config, quality="good", alias="champion", seed=0))
    with StalledPeer() as peer:
        over = {"features.online_backend": "redis", "features.redis_url": peer.url,
                "features.redis_prefix": redis_prefix, "features.breaker_probe_seconds": 0.2}
        cfg = load_config(workspace=config.workspace, environ={},
                          overrides={**over, "serving.canary_fraction": 0})
        for app, path, kw, fast in (
            (features_app(cfg), "/features", {"params": {"ids": "1,2,3"}}, ("/health", "/metrics")),
            (create_app(cfg), "/predict", {"method": "POST", "json": {"customer_ids": [1, 2]}},
             ("/health", "/metrics", "/openapi.json")),
        ):
            with ServerThread(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
                if path == "/predict":
                    wait_ready(client)
                results: list = []
                stop = threading.Event()
                workers = [threading.Thread(target=_hammer, args=(srv.url, path, 25, results, stop),
                                            kwargs=kw) for _ in range(4)]
                for w in workers:
                    w.start()
                side = []
                t_end = time.monotonic() + 1.5
                while time.monotonic() < t_end:
                    for p in fast:
                        res, took = _timed_get(client, p)
                        side.append((p, res.status_code, took))
                stop.set()
                for w in workers:
                    w.join(30)
                assert results and all(code == 503 for code, _, _ in results), results[:3]
                # a stalled store must not hold a request (the peer never answers: without the store
                # timeout and the breaker each would wait the client's 30 s); the bound leaves a busy
                # machine room (1.06 s was seen under load), it is not a latency target
                assert max(t for _, t, _ in results) < STALL_BOUND_S, max(t for _, t, _ in results)
                for _, _, text in results:
                    assert "store" in json.loads(text)["detail"]
                    assert not EXCEPTION_TEXT.search(text), text
                assert side and max(t for _, _, t in side) < STALL_BOUND_S, max(side, key=lambda s: s[2])
                assert {c for p, c, _ in side if p != "/health"} == {200}
                metrics = client.get("/metrics").text
                assert re.search(r"(feature_store|churn_online_store)_circuit_open 1", metrics), metrics


# --------------------------------------------------------------------------- webhook receiver
def _big_post(port: int, total: int, chunked: bool) -> int:
    """POST ``total`` bytes to /webhook unsigned; the status the receiver answered."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {total}"
    s.sendall(f"POST /webhook HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
              f"{framing}\r\n\r\n".encode())
    piece = b"7" * 65536
    frame = f"{len(piece):x}\r\n".encode() + piece + b"\r\n" if chunked else piece
    sent, answer = 0, b""
    try:
        while sent < total:
            if select.select([s], [], [], 0)[0]:
                break  # the receiver has answered: stop sending
            s.sendall(frame)
            sent += len(piece)
        else:
            if chunked:
                s.sendall(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass
    try:
        while b"\r\n\r\n" not in answer:
            data = s.recv(65536)
            if not data:
                break
            answer += data
    except ConnectionResetError:
        pass
    s.close()
    m = re.match(rb"HTTP/1\.1 (\d{3})", answer)
    assert m, f"no HTTP answer after {sent} bytes: {answer[:200]!r}"
    return int(m.group(1))


def test_receiver_refuses_100_mb_unsigned_posts_in_bounded_memory(config: ChurnConfig,
                                                                    tmp_path: Path) -> None:

    from serving_support import churn_app

    log = tmp_path / "hooks.log"
    with churn_app(config, ["hooks", "serve"], log, CHURN_HOOKS__SECRET="s3cret") as (port, proc):
        before = rss_kb(proc.pid)
        total = 100 * 2**20
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            codes = list(pool.map(lambda chunked: _big_post(port, total, chunked), (False, True, True)))
        assert codes == [413, 413, 413]
        grown_mb = (rss_kb(proc.pid) - before) / 1024
        assert grown_mb < 20, f"receiver RSS grew {grown_mb:.1f} MB"
        res = httpx.post(f"http://127.0.0.1:{port}/webhook", content=b"{}", timeout=10)
        assert res.status_code == 401  # still serving; small bodies reach the signature check
        assert "hooks.max_body_bytes" not in res.text
    assert "Traceback" not in log.read_text()


def test_secrets_never_logged(config: ChurnConfig) -> None:
    """The token comparisons and error answers never echo a token."""
    cfg = serving_config(config, admin_token="adm-XYZ-secret", api_token="api-XYZ-secret", reload_seconds=60)
    with ServerThread(create_app(cfg)) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        for headers in ({}, {"Authorization": "Bearer adm-XYZ-secreT"},
                        {"Authorization": "Bearer api-XYZ-secret"}):
            for method, path in (("POST", "/admin/promote"), ("POST", "/predict"), ("GET", "/ready")):
                res = client.request(method, path, headers=headers, json={})
                assert "XYZ" not in res.text
    os.environ.pop("CHURN_SERVING__ADMIN_TOKEN", None)
