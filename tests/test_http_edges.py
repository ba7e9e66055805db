"""The connection edges of the HTTP apps (issue 25 item 4): request head size and count limits,
slow clients dropped, signature headers bounded, no query strings in access logs, a port in use
refused in one line. Real `churn ... serve` subprocesses over real sockets."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
from ports import bound_socket
from serving_support import churn_app, cli_env, rss_kb
from wait_support import wait_until

from mlflow_churn.config import ChurnConfig
from mlflow_churn.hooks.app import DELIVERY_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, sign

SECRET = "s3cret-edges"
CHURN = [sys.executable, "-m", "mlflow_churn.cli"]


def _answer(sock: socket.socket) -> tuple[int, dict]:
    """Status and JSON body of the answer on ``sock`` (read until the server closes)."""
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    m = re.match(rb"HTTP/1\.1 (\d{3})", data)
    assert m, f"no HTTP answer: {data[:200]!r}"
    head, _, body = data.partition(b"\r\n\r\n")
    return int(m.group(1)), (json.loads(body) if b"application/json" in head.lower() and body else {})


def _steadyrss_kb(pid: int, timeout: float = 60.0) -> int:
    """``pid``'s RSS once it has stopped growing: three samples 0.5 s apart within 512 kB
    (start-up work such as imports and the first registry poll still runs after /health answers)."""
    import time

    samples = [rss_kb(pid)]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.5)
        samples.append(rss_kb(pid))
        if len(samples) >= 3 and max(samples[-3:]) - min(samples[-3:]) < 512:
            break
    return samples[-1]


def _send_head(port: int, head: bytes, piece: int = 1 << 20) -> tuple[int, dict]:
    """Send ``head`` in pieces (stop when the server answers or closes); its answer."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    try:
        for at in range(0, len(head), piece):
            s.sendall(head[at:at + piece])
    except (BrokenPipeError, ConnectionResetError):
        pass
    try:
        return _answer(s)
    finally:
        s.close()


@pytest.fixture
def receiver(config: ChurnConfig, tmp_path: Path):
    """`churn hooks serve` (access log on) with a 1 s read timeout; yields (port, process, log)."""
    log = tmp_path / "hooks.log"
    with churn_app(config, ["hooks", "serve"], log, CHURN_HOOKS__SECRET=SECRET,
                   CHURN_HOOKS__READ_TIMEOUT_SECONDS="1") as (port, proc):
        yield port, proc, log


def test_receiver_head_limits_signature_bound_and_no_query_in_log(receiver) -> None:
    port, proc, log = receiver
    before = rss_kb(proc.pid)
    # a 100 MB header: 431 naming the key after at most the limit (+ one socket read) was read
    status, body = _send_head(port, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (100 << 20)
                              + b"\r\n\r\n")
    assert status == 431 and "hooks.max_header_bytes" in body["detail"]
    assert (rss_kb(proc.pid) - before) / 1024 < 20
    # a long head sent in one piece is measured too
    status, body = _send_head(port, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000
                              + b"\r\n\r\n")
    assert status == 431 and "hooks.max_header_bytes" in body["detail"]
    many = b"".join(b"X-H%d: 1\r\n" % i for i in range(150))
    status, body = _send_head(port, b"GET /health HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")
    assert status == 431 and "hooks.max_headers" in body["detail"]
    # a 50 MB signature is refused at the edge, at once, before any HMAC work
    status, body = _send_head(port, b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                              + SIGNATURE_HEADER.encode() + b": v1," + b"A" * (50 << 20) + b"\r\n\r\n{}")
    assert status == 431
    # one within the head limit but longer than any signature: 400 naming the header
    url = f"http://127.0.0.1:{port}"
    res = httpx.post(f"{url}/webhook", content=b"{}", headers={SIGNATURE_HEADER: "v1," + "A" * 5000})
    assert res.status_code == 400 and SIGNATURE_HEADER in res.json()["detail"]
    # a validly signed delivery with a 400-digit timestamp: 401, not 503
    did, stamp, payload = str(uuid.uuid4()), "9" * 400, '{"entity": "x", "action": "y", "data": {}}'
    res = httpx.post(f"{url}/webhook", content=payload, headers={
        DELIVERY_HEADER: did, TIMESTAMP_HEADER: stamp, SIGNATURE_HEADER: sign(SECRET, did, stamp, payload)})
    assert res.status_code == 401 and TIMESTAMP_HEADER in res.json()["detail"]
    # the access log has the path, never the query string
    assert httpx.get(f"{url}/deliveries?model=secret-query-value").status_code == 200
    text = wait_until(lambda: t if "/deliveries" in (t := log.read_text()) else None, 30,
                      "the access log line of GET /deliveries")
    assert "GET /deliveries HTTP/1.1" in text and "secret-query-value" not in text
    assert "Traceback" not in text
    _slow_clients_are_dropped(port)


def _slow_clients_are_dropped(port: int) -> None:
    """400 clients trickling a head (one byte at a time) are all closed by the read timeout
    (1 s here); a normal client is served meanwhile."""
    conns = []
    for _ in range(400):
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        conns.append(s)
    res = httpx.get(f"http://127.0.0.1:{port}/health", timeout=30)
    assert res.status_code == 200
    deadline = time.monotonic() + 120
    open_ = list(conns)
    answers = []
    while open_ and time.monotonic() < deadline:
        still = []
        for s in open_:
            try:
                s.sendall(b"a")  # trickle
                s.setblocking(False)
                try:
                    data = s.recv(65536)
                except BlockingIOError:
                    still.append(s)
                    continue
                finally:
                    s.setblocking(True)
                if data:
                    answers.append(data)
                    still.append(s) if not data.endswith(b"}") else s.close()
                else:
                    s.close()
            except (BrokenPipeError, ConnectionResetError):
                s.close()
        open_ = still
        time.sleep(0.2)
    for s in open_:
        s.close()
    assert not open_, f"{len(open_)} of 400 slow connections still held"
    assert all(a.startswith(b"HTTP/1.1 408") for a in answers)
    assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=30).status_code == 200


@pytest.mark.parametrize("command", [["serve"], ["features", "serve"], ["hooks", "serve"]])
def test_port_in_use_is_one_line_exit_2(config: ChurnConfig, command: list[str]) -> None:
    taken = bound_socket()
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        res = subprocess.run(CHURN + command + ["--port", str(port)], capture_output=True, text=True,
                             timeout=120, cwd=config.workspace,
                             env=cli_env(config, CHURN_HOOKS__SECRET=SECRET))
    finally:
        taken.close()
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2, res.stderr[-2000:]
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0] and "in use" in lines[0], res.stderr


@pytest.mark.parametrize(("command", "section"),
                         [(["serve"], "serving"), (["features", "serve"], "features")])
def test_scoring_service_and_feature_api_refuse_huge_heads_in_bounded_memory(
        config: ChurnConfig, tmp_path: Path, command: list[str], section: str) -> None:
    """Four 100 MB headers in parallel to GET /health: each 431 naming the app's key, the
    process grows by less than 20 MB (it was +180-200 MB per request)."""
    import concurrent.futures

    log = tmp_path / "serve.log"
    with churn_app(config, command, log, any_answer=True) as (port, proc):
        # warm-up: the 431 path once with a small oversized head (its first use imports and
        # allocates what every later refusal reuses), then the baseline
        small = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n\r\n"
        assert _send_head(port, small)[0] == 431
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=10)
        before = _steadyrss_kb(proc.pid)  # after start-up's own growth (imports, the first alias poll)
        head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (100 << 20) + b"\r\n\r\n"
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: _send_head(port, head), range(4)))
        assert all(status == 431 and f"{section}.max_header_bytes" in body["detail"]
                   for status, body in answers), answers
        assert (rss_kb(proc.pid) - before) / 1024 < 20
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code in (200, 503)
    assert "Traceback" not in log.read_text()
