"""Start and stop a real ``mlflow server`` as a child process (the demo's server mode, tests).

:func:`start_tracking_server` runs ``python -m mlflow server`` on 127.0.0.1 and a free port
with ``--backend-store-uri`` (PostgreSQL, or a SQLite file) and ``--artifacts-destination``
(artifacts proxied by the server: clients never touch the directory), waits until
``/health`` answers and returns a :class:`TrackingServer` that stops it (terminate, then
kill) on :meth:`TrackingServer.stop` or on leaving a ``with`` block.

Webhooks are enabled in the child's environment (:func:`_webhook_env`): an encryption key
for webhook secrets, and loopback receivers allowed (``http``, private IPs), which is what
a receiver on the same machine needs.

:func:`create_database` / :func:`drop_database` make and remove a PostgreSQL database for
one server (a new database per demo run or test session).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import psycopg

from mlflow_churn.config import libpq_url, mask_text, sqlalchemy_url
from mlflow_churn.errors import ChurnError, Conflict, first_line

LOOPBACK = "127.0.0.1"
READY_TIMEOUT_S = 120.0
_PORT_TRIES = 5


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that was free on ``host`` a moment ago (the OS picks it). A child that
    binds it later can still lose a race: :func:`start_tracking_server` retries."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _webhook_env(encryption_key: str | None = None) -> dict[str, str]:
    """Environment for an ``mlflow server`` that delivers webhooks to a receiver on this
    machine: ``MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY`` (a new Fernet key unless given),
    ``http`` allowed, private IPs allowed, and a 1 s webhook cache so a new webhook fires at
    once."""
    if encryption_key is None:
        from cryptography.fernet import Fernet  # a dependency of mlflow

        encryption_key = Fernet.generate_key().decode()
    return {
        "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": encryption_key,
        "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
        "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
        "MLFLOW_WEBHOOK_CACHE_TTL": "1",
    }


def server_env() -> dict[str, str]:
    """A server's environment: ours without the client-side MLflow run variables, webhooks
    for loopback receivers (:func:`_webhook_env`), and MLflow's job runner off unless set
    (``MLFLOW_SERVER_ENABLE_JOB_EXECUTION``: eight more processes for GenAI jobs the loop
    does not use; webhooks are delivered from the server's own thread pool)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID")}
    env.update(_webhook_env())
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    return env


@dataclass
class TrackingServer:
    """A running ``mlflow server`` child process."""

    url: str
    backend_uri: str
    artifacts_dir: Path
    process: subprocess.Popen
    log_path: Path
    env: dict[str, str] = field(repr=False, default_factory=dict)

    @property
    def port(self) -> int:
        return int(urlsplit(self.url).port or 0)

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 15.0) -> None:
        """Terminate the server (and its workers), kill it after ``timeout`` seconds."""
        stop_process(self.process, timeout)

    def __enter__(self) -> TrackingServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def stop_process(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """Terminate ``proc``'s process group (it was started in its own session), then kill."""
    stop_processes([proc], timeout)


def stop_processes(procs: Sequence[subprocess.Popen], timeout: float = 15.0) -> None:
    """Stop several children at once: SIGTERM to each one's process group (each was started in
    its own session), then SIGKILL to the groups still there ``timeout`` seconds later; waits
    for the leaders. At most about ``2 * timeout`` in all, however many there are."""
    live = [p for p in procs if p.poll() is None]
    for proc in live:
        _signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in live:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    stuck = [p for p in live if p.poll() is None]
    for proc in stuck:
        _signal_group(proc, signal.SIGKILL)
    for proc in stuck:
        proc.wait(timeout)
    for proc in live:  # the leader is gone; its workers (same group) get the same end
        _signal_group(proc, signal.SIGKILL)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        if proc.poll() is None:
            proc.send_signal(sig)


def port_taken(host: str, port: int) -> bool:
    """True when a process listens on ``host:port`` already (a bind with ``SO_REUSEADDR``, as
    servers do, fails); a port in TIME_WAIT counts as free."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def check_ports(ports: Mapping[str, int | None], host: str = LOOPBACK) -> None:
    """One-line ChurnErrors for the ports chosen by options (option name -> port, None = a free
    one will be picked): out of 1..65535, one port given twice, or a port another process
    listens on (named with its option)."""
    given = {option: port for option, port in ports.items() if port is not None}
    for option, port in given.items():
        if not 1 <= port <= 65535:
            raise ChurnError(f"{option} must be a TCP port 1..65535, got {port}")
    seen: dict[int, str] = {}
    for option, port in given.items():
        if port in seen:
            raise ChurnError(f"{seen[port]} and {option} are both {port}; give them different ports")
        seen[port] = option
    for option, port in given.items():
        check_port(host, port, option)


class PortInUse(Conflict):
    """The port asked for is taken by another process (the message names it)."""


def check_port(host: str, port: int, option: str | None = None) -> None:
    """A one-line :class:`PortInUse` naming the port (and the ``option`` that chose it) when
    ``port`` on ``host`` is taken (see :func:`port_taken`)."""
    if not port_taken(host, port):
        return
    if option:
        raise PortInUse(f"{option} {port}: {host}:{port} is already in use; pick another port or leave "
                         f"{option} out for a free one")
    raise PortInUse(f"port {port} on {host} is already in use")


def wait_http(url: str, proc: subprocess.Popen, timeout: float, log_path: Path | None = None) -> None:
    """Poll ``url`` until it answers 200; ChurnError when ``proc`` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:] if log_path and log_path.exists() else ""
            raise ChurnError(f"{url}: the process exited with code {proc.returncode} before answering"
                             + (f"; its log ends with: {tail}" if tail else ""))
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise ChurnError(f"{url} did not answer within {timeout:.0f} s"
                     + (f" (log: {log_path})" if log_path else ""))


def address_in_use(log_path: Path) -> bool:
    """Whether the log of a child server that did not come up says its port was taken (the
    child's own words: it is another process, there is no exception of ours to look at)."""
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return False
    return "address already in use" in text.lower() or "errno 98" in text.lower()


def start_tracking_server(
    backend_uri: str,
    artifacts_dir: Path | str,
    *,
    app_name: str | None = None,
    host: str = LOOPBACK,
    port: int | None = None,
    env: Mapping[str, str] | None = None,
    log_path: Path | str | None = None,
    workers: int = 1,
    ready_timeout: float = READY_TIMEOUT_S,
    cwd: Path | str | None = None,
) -> TrackingServer:
    """Start ``mlflow server`` and wait for ``/health``.

    - ``backend_uri``: ``postgresql://...`` (opened with psycopg 3: ``postgresql+psycopg://``)
      or ``sqlite:///...`` (webhooks need a SQL store);
    - ``artifacts_dir``: ``--artifacts-destination`` (created; proxied by the server);
    - ``app_name``: ``--app-name`` (an ``mlflow.app`` entry point, e.g. ``churn-guard``);
    - ``env``: the child's environment (default :func:`server_env`);
    - ``port``: None picks a free one (retried when another process takes it first); a given
      port that is taken is a one-line ChurnError naming it.

    Raises ChurnError, with the end of the server's log, when it does not come up. Interrupted
    (KeyboardInterrupt) while it waits, it stops the child before the interrupt goes on.
    """
    backend_uri = sqlalchemy_url(backend_uri)
    artifacts = Path(artifacts_dir).resolve()
    artifacts.mkdir(parents=True, exist_ok=True)
    child_env = dict(server_env() if env is None else env)
    child_env.setdefault("PYTHONUNBUFFERED", "1")
    log = Path(log_path) if log_path else artifacts.parent / f"mlflow-server-{uuid.uuid4().hex[:8]}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    tries = 1 if port else _PORT_TRIES
    if port:
        check_port(host, port)
    for attempt in range(tries):
        chosen = port or free_port(host)
        args = [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(chosen),
                "--backend-store-uri", backend_uri, "--artifacts-destination", str(artifacts),
                "--workers", str(workers)]
        if app_name:
            args += ["--app-name", app_name]
        with log.open("w") as out:
            proc = subprocess.Popen(args, env=child_env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, cwd=cwd, start_new_session=True)
        url = f"http://{host}:{chosen}"
        try:
            wait_http(f"{url}/health", proc, ready_timeout, log)
        except BaseException as exc:  # a ChurnError, or Ctrl-C / SIGTERM while it starts
            stop_process(proc, 5.0)
            if isinstance(exc, ChurnError) and address_in_use(log):
                if attempt + 1 < tries:
                    continue
                if port:
                    raise PortInUse(f"mlflow server could not listen on {host}:{port}: the port is already "
                                     "in use") from None
            raise
        return TrackingServer(url=url, backend_uri=backend_uri, artifacts_dir=artifacts, process=proc,
                              log_path=log, env=child_env)
    raise ChurnError(f"mlflow server could not find a free port on {host}")  # pragma: no cover


# ------------------------------------------------------------------ PostgreSQL databases
def _admin_connect(url: str) -> psycopg.Connection:
    """A psycopg 3 connection in autocommit to the server of ``url`` (its database)."""
    parts = urlsplit(libpq_url(url))
    return psycopg.connect(host=parts.hostname or LOOPBACK, port=parts.port or 5432,
                           user=parts.username or None, password=parts.password or None,
                           dbname=(parts.path or "/").lstrip("/") or "postgres", autocommit=True)


def _admin_execute(url: str, sql: str) -> None:
    """Run one statement in autocommit on the PostgreSQL server of ``url`` (as its database);
    ChurnError naming the server (password masked) when it cannot be reached."""
    try:
        conn = _admin_connect(url)
    except psycopg.Error as exc:  # OperationalError (down, refused, no such role) and friends
        raise ChurnError(f"cannot connect to PostgreSQL at {mask_text(url)} ({first_line(exc)}); start it or "
                         "fix mlflow.server_backend_uri / CHURN_MLFLOW_BACKEND_URI") from None
    with conn:
        conn.execute(sql)


def create_database(admin_url: str, name: str | None = None) -> str:
    """Create database ``name`` (default ``churn_<random>``) on the PostgreSQL server of
    ``admin_url`` (any existing database there, e.g. ``postgresql://postgres@127.0.0.1/test``)
    and return the URL of the new one, in ``admin_url``'s scheme."""
    name = name or f"churn_{uuid.uuid4().hex[:12]}"
    if not name.replace("_", "").isalnum():
        raise ChurnError(f"database name must be letters, digits and _, got '{name}'")
    _admin_execute(admin_url, f'CREATE DATABASE "{name}"')
    parts = urlsplit(admin_url)
    return urlunsplit(parts._replace(path=f"/{name}"))


def drop_database(url: str) -> None:
    """Drop the database of ``url`` (connecting to its server's ``postgres`` database)."""
    parts = urlsplit(url)
    name = (parts.path or "/").lstrip("/")
    if name:
        admin = urlunsplit(parts._replace(path="/postgres"))
        _admin_execute(admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
