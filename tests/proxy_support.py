"""A loopback HTTP proxy in front of a real server that answers 503 to chosen requests:
an outage of one route, for the tests of what an outage must never be taken for."""

from __future__ import annotations

import http.client
import http.server
import threading
from urllib.parse import urlsplit


class FlakyProxy:
    """A loopback HTTP proxy in front of the real server that answers 503 to every
    ``fail_method`` request whose path ends with ``fail_path`` from its ``fail_from``-th
    occurrence on (1-based)."""

    def __init__(self, target: str) -> None:
        self.fail_path: str | None = None
        self.fail_method = "POST"
        self.fail_from = 1
        self.seen = 0
        target_host = urlsplit(target)
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # quiet
                pass

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                path = self.path.split("?", 1)[0]
                if proxy.fail_path and path.endswith(proxy.fail_path) and self.command == proxy.fail_method:
                    proxy.seen += 1
                    if proxy.seen >= proxy.fail_from:
                        self.send_response(503)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                conn = http.client.HTTPConnection(target_host.hostname, target_host.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()

            do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def fail(self, path: str | None, from_nth: int = 1, method: str = "POST") -> None:
        self.fail_path, self.fail_from, self.fail_method, self.seen = path, from_nth, method, 0

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
