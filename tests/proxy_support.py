"""Loopback HTTP proxies in front of a real server: an outage of one route
(:class:`FlakyProxy`, for the tests of what an outage must never be taken for), or a server
that dies at a known point of a client's work (:class:`TripwireProxy`)."""

from __future__ import annotations

import http.client
import http.server
import threading
from collections.abc import Callable
from urllib.parse import urlsplit


class ForwardingProxy:
    """Forwards every request to ``target``; :meth:`intercept` may answer a request itself
    (a status code) instead. A request the server does not take (it is down) gets its
    connection dropped, as from a dead server."""

    timeout = 60.0
    protocol_version = "HTTP/1.0"

    def __init__(self, target: str) -> None:
        host = urlsplit(target)
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = proxy.protocol_version

            def log_message(self, *args: object) -> None:  # quiet
                pass

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status = proxy.intercept(self.command, self.path.split("?", 1)[0], body)
                if status is not None:
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                try:
                    conn = http.client.HTTPConnection(host.hostname, host.port, timeout=proxy.timeout)
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    conn.close()
                except OSError:  # the server is gone: so is the answer
                    self.close_connection = True
                    return
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def intercept(self, method: str, path: str, body: bytes) -> int | None:
        return None

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class FlakyProxy(ForwardingProxy):
    """Answers 503 to every ``fail_method`` request whose path ends with ``fail_path`` from its
    ``fail_from``-th occurrence on (1-based)."""

    def __init__(self, target: str) -> None:
        self.fail_path: str | None = None
        self.fail_method = "POST"
        self.fail_from = 1
        self.seen = 0
        super().__init__(target)

    def fail(self, path: str | None, from_nth: int = 1, method: str = "POST") -> None:
        self.fail_path, self.fail_from, self.fail_method, self.seen = path, from_nth, method, 0

    def intercept(self, method: str, path: str, body: bytes) -> int | None:
        if self.fail_path and path.endswith(self.fail_path) and method == self.fail_method:
            self.seen += 1
            if self.seen >= self.fail_from:
                return 503
        return None


class TripwireProxy(ForwardingProxy):
    """Calls ``trip()`` (e.g. SIGKILL the server) when the first request matching
    ``when(method, path, body)`` arrives, before forwarding it. ``tripped`` is set once it
    fired."""

    timeout = 120.0
    protocol_version = "HTTP/1.1"

    def __init__(self, target: str, when: Callable[[str, str, bytes], bool],
                 trip: Callable[[], object]) -> None:
        self.when, self.trip = when, trip
        self.tripped = threading.Event()
        self._lock = threading.Lock()
        super().__init__(target)

    def intercept(self, method: str, path: str, body: bytes) -> int | None:
        with self._lock:
            if not self.tripped.is_set() and self.when(method, path, body):
                self.trip()
                self.tripped.set()
        return None
