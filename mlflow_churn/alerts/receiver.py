"""A local alert receiver: what the demo starts to show an alert reaching its outlet, and
what the tests receive alerts with.

It listens on loopback and takes the POSTs of both outlets (Alertmanager's webhook payload
``{"version": "4", "status", "alerts": [...]}`` on any path, and API v2's plain list of alerts
on ``/api/v2/alerts``), answers 200, keeps each body in :attr:`AlertReceiver.messages` and,
with ``log_path``, appends it as one JSON line. :meth:`AlertReceiver.wait_for` waits on an
event (never on a sleep) until a predicate holds.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from mlflow_churn.alerts.outlets import API_PATH

LOOPBACK = "127.0.0.1"


class AlertReceiver:
    """A receiver on ``127.0.0.1:<port>`` (0 = a free one); a context manager. ``url`` is its
    webhook endpoint (``alerts.webhook_url``), ``api_url`` its Alertmanager API v2 endpoint."""

    def __init__(self, port: int = 0, log_path: Path | str | None = None) -> None:
        receiver = self
        self.messages: list[Any] = []
        self.received = threading.Event()
        self.log_path = Path(log_path) if log_path else None
        self._lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    body = json.loads(raw)
                except ValueError:
                    self.send_response(400)
                    self.end_headers()
                    return
                receiver._keep(body)
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer((LOOPBACK, port), Handler)
        self.port = int(self.server.server_address[1])
        self.url = f"http://{LOOPBACK}:{self.port}/alerts"
        self.api_url = f"http://{LOOPBACK}:{self.port}{API_PATH}"
        self._thread = threading.Thread(target=self.server.serve_forever, name="alert-receiver", daemon=True)
        self._thread.start()

    def _keep(self, body: Any) -> None:
        with self._lock:
            self.messages.append(body)
            if self.log_path is not None:
                self.log_path.parent.mkdir(parents=True, exist_ok=True)
                with self.log_path.open("a") as out:
                    out.write(json.dumps(body, sort_keys=True) + "\n")
        self.received.set()

    @property
    def alerts(self) -> list[dict[str, Any]]:
        """Every alert received, in order, each with the ``status`` of its message (a webhook
        message's, or the alert's own ``endsAt`` reading for API v2 lists)."""
        out = []
        for body in list(self.messages):
            if isinstance(body, dict):
                status = body.get("status", "")
                out += [{**a, "status": a.get("status", status)} for a in body.get("alerts", [])]
            elif isinstance(body, list):
                out += [dict(a) for a in body]
        return out

    def wait_for(self, predicate: Callable[[AlertReceiver], Any], timeout: float) -> Any:
        """Wait until ``predicate(self)`` is truthy (its value) or ``timeout`` seconds passed
        (None)."""
        deadline = time.monotonic() + timeout
        while True:
            self.received.clear()
            found = predicate(self)
            if found:
                return found
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.received.wait(min(left, 1.0))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> AlertReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["AlertReceiver"]
