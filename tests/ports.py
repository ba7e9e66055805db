"""The one way the tests get a port (never a fixed one).

- In-process servers: :func:`bound_socket` binds 127.0.0.1:0 and the socket itself is handed
  to uvicorn (:class:`ServerThread`: ``Server.run(sockets=[sock])``), so the port is held from
  the moment it is chosen: no bind-close-rebind window in which another process takes it.
- Subprocess servers bind the port themselves, so between :func:`free_port` and their bind
  another process may take it: :func:`start_on_free_port` starts them, waits until the port
  accepts connections, and starts them again on another port when they exit complaining that
  the address is in use.
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvicorn

ADDRESS_IN_USE = ("address already in use", "errno 98", "eaddrinuse", "only one usage of each socket")


def bound_socket(host: str = "127.0.0.1") -> socket.socket:
    """A TCP socket bound to a free port of ``host`` (not listening yet: the server does that)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    return sock


def free_port() -> int:
    """A port free at this instant, for a process that binds it itself (see the module doc:
    start servers with :func:`start_on_free_port`; a port nothing binds, e.g. an unreachable
    tracking URI, needs nothing more)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def accepts(port: int, host: str = "127.0.0.1") -> bool:
    """True when something listens on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def start_on_free_port(
    start: Callable[[int], tuple[subprocess.Popen, Path]], attempts: int = 3, timeout: float = 120.0
) -> tuple[int, subprocess.Popen, Path]:
    """``start(port)`` -> (process, file its stderr goes to); returns (port, process, log) once the
    port accepts connections, or once the process exited for another reason than an address in
    use (the caller's assertions then see the exit and the log). An address in use -> try again
    on another port, at most ``attempts`` times."""
    for _ in range(attempts):
        port = free_port()
        proc, log = start(port)
        deadline = time.monotonic() + timeout
        while proc.poll() is None and not accepts(port) and time.monotonic() < deadline:
            time.sleep(0.1)
        text = log.read_text(errors="replace").lower()
        if proc.poll() is None or not any(s in text for s in ADDRESS_IN_USE):
            return port, proc, log
    raise RuntimeError(f"no free port after {attempts} attempts: {log.read_text()[-2000:]}")


class ServerThread:
    """uvicorn serving ``app`` in a thread on a socket bound before it starts (lifespan included)."""

    def __init__(self, app: Any) -> None:
        self.sock = bound_socket()
        self.port = int(self.sock.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()
