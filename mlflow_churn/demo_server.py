"""`churn demo --server` / `make demo-server`: the demo's loop against a real tracking server.

What it starts, as child processes it owns and stops on every exit (normal end, error,
Ctrl-C, SIGTERM):

- ``mlflow server`` (:func:`mlflow_churn.tracking_server.start_tracking_server`) on 127.0.0.1
  and a free port (or ``--mlflow-port``), ``--backend-store-uri`` = a NEW database on the PostgreSQL server of
  ``mlflow.server_backend_uri`` / ``CHURN_MLFLOW_BACKEND_URI`` (``postgresql://user@host/db``
  or ``postgresql+psycopg://...``, opened with psycopg 3; ``db`` is only where to connect to create
  it), or, when
  none is given, a new SQLite file ``<workspace>/mlflow-server.db``;
  ``--artifacts-destination <workspace>/mlartifacts`` (proxied: this process never touches it);
  webhooks enabled for loopback receivers;
- the webhook receiver, ``churn hooks serve`` on a free port (or ``--hooks-port``) with a
  generated secret, and
  the webhook ``churn-gate`` registered on that server
  (:func:`mlflow_churn.registry.webhooks.register_webhook`).

Then the loop of ``churn demo`` runs with ``MLFLOW_TRACKING_URI`` = the server (HTTP only),
except that no gate is called in process: each training moves the ``challenger`` alias, the
server delivers ``model_version_alias.created`` to the receiver, the receiver runs the gate,
and the demo waits for that delivery's outcome (``GET /deliveries?version=`` then
``GET /deliveries/{id}``) and shows it. The summary ends with the server's UI address;
``keep_running`` keeps both servers up until Ctrl-C. The database (or SQLite file) and the
artifacts stay, so ``mlflow server --backend-store-uri <it> --artifacts-destination
<workspace>/mlartifacts`` shows the runs again later.

Ctrl-C / SIGTERM / SIGHUP (:class:`PromptStop`) end it within :data:`EXIT_DEADLINE_S` seconds
whatever step runs: the signal raises KeyboardInterrupt in the main thread (``finally``
blocks mark runs FAILED and stop the children; never inside xgboost's ctypes callbacks,
where it crashes or hangs the process), MLflow requests made after it get one attempt
of :data:`CLEANUP_HTTP_TIMEOUT_S` seconds, the children get :data:`CHILD_GRACE_S` seconds
after SIGTERM before SIGKILL, and a watchdog thread, woken by the signal itself (a wakeup fd:
also while the main thread is inside C code or a blocking call), stops every child process
after :data:`UNWIND_S` seconds and ends the process at :data:`EXIT_DEADLINE_S` if the clean-up
has not finished by then (what it could not write is what an abrupt stop leaves: runs
RUNNING, see :mod:`mlflow_churn.tracking`'s journal).
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from mlflow_churn.config import ChurnConfig, mask_text
from mlflow_churn.demo import DemoReport, DemoSpec, GateOutcome, console, demo_config, print_report, run_demo
from mlflow_churn.errors import ChurnError
from mlflow_churn.interrupt import SafeInterrupt
from mlflow_churn.registry.vocab import GateVerdict
from mlflow_churn.tags import GATE_TAG
from mlflow_churn.tracking_server import (
    LOOPBACK,
    PortInUse,
    TrackingServer,
    address_in_use,
    check_ports,
    create_database,
    free_port,
    server_env,
    start_tracking_server,
    stop_process,
    stop_processes,
    wait_http,
)

SQLITE_FILE = "mlflow-server.db"
DELIVERY_TIMEOUT_S = 120.0  # from the alias move to the delivery's arrival at the receiver
GATE_TIMEOUT_S = 1800.0  # from the delivery to the gate's decision
RECEIVER_READY_S = 120.0
#: after a stop signal: seconds the children get between SIGTERM and SIGKILL
CHILD_GRACE_S = 3.0
#: after a stop signal: seconds the main thread may clean up before the watchdog stops the children
UNWIND_S = 3.0
#: after a stop signal: the process ends by then (s), whatever is still running
EXIT_DEADLINE_S = 9.0
#: after a stop signal: the timeout (s) of an MLflow request, made once (no retries)
CLEANUP_HTTP_TIMEOUT_S = 2
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@dataclass
class ServerStack:
    """The two children: the tracking server and the webhook receiver."""

    tracking: TrackingServer
    receiver: subprocess.Popen
    receiver_url: str
    secret: str
    logs: Path

    @property
    def url(self) -> str:
        """The tracking server (and its UI)."""
        return self.tracking.url

    @property
    def backend_uri(self) -> str:
        return self.tracking.backend_uri

    def pids(self) -> list[int]:
        return [self.tracking.process.pid, self.receiver.pid]

    def check_alive(self) -> None:
        """ChurnError naming the child that exited, with its log file."""
        if not self.tracking.alive():
            raise ChurnError(f"the mlflow server exited (code {self.tracking.process.returncode}); "
                             f"see {self.tracking.log_path}")
        if self.receiver.poll() is not None:
            raise ChurnError(f"the webhook receiver exited (code {self.receiver.returncode}); "
                             f"see {self.logs / 'hooks.log'}")

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the receiver and the server at once: SIGTERM to each process group, SIGKILL to
        what is left ``timeout`` seconds later."""
        stop_processes([self.receiver, self.tracking.process], timeout)


def backend_store(cfg: ChurnConfig) -> str:
    """The ``--backend-store-uri`` for this run: a new database on the configured PostgreSQL
    server, else a new SQLite file in the workspace (an older one is replaced)."""
    given = (cfg.mlflow.server_backend_uri or "").strip()
    if not given:
        path = cfg.workspace.resolve() / SQLITE_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        for old in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            old.unlink(missing_ok=True)
        return f"sqlite:///{path}"
    scheme = given.split("://", 1)[0] if "://" in given else ""
    if scheme.split("+", 1)[0] in ("postgresql", "postgres"):
        return create_database(given)
    if scheme == "sqlite":
        return given
    raise ChurnError(f"mlflow.server_backend_uri / CHURN_MLFLOW_BACKEND_URI must be a PostgreSQL URL "
                     f"(postgresql://user@host:5432/db) or sqlite:///path, got '{given}'")


def start_receiver(cfg: ChurnConfig, tracking_url: str, secret: str, log_path: Path,
                   tries: int = 3, port: int | None = None) -> tuple[subprocess.Popen, str]:
    """``churn hooks serve`` on 127.0.0.1 and ``port`` (None: a free one, retried when taken
    meanwhile), in its own process group, against ``tracking_url``; its process and base URL
    once ``/health`` answers. A given port that is taken: a one-line ChurnError naming it."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID")}
    env.update({"MLFLOW_TRACKING_URI": tracking_url, "CHURN_HOOKS__SECRET": secret, "PYTHONUNBUFFERED": "1"})
    log_path.parent.mkdir(parents=True, exist_ok=True)
    tries = 1 if port else tries
    for attempt in range(tries):
        chosen = port or free_port()
        args = [sys.executable, "-m", "mlflow_churn.cli", "--workspace", str(cfg.workspace.resolve()),
                "hooks", "serve", "--host", LOOPBACK, "--port", str(chosen)]
        with log_path.open("w") as out:
            proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        url = f"http://{LOOPBACK}:{chosen}"
        try:
            wait_http(f"{url}/health", proc, RECEIVER_READY_S, log_path)
            return proc, url
        except BaseException as exc:  # a ChurnError, or Ctrl-C / SIGTERM while it starts
            stop_process(proc, 5.0)
            if isinstance(exc, ChurnError) and address_in_use(log_path):
                if attempt + 1 < tries:
                    continue
                if port:
                    raise PortInUse(f"--hooks-port {port}: the webhook receiver could not listen on "
                                    f"{LOOPBACK}:{port}, the port is already in use") from None
            raise
    raise ChurnError("the webhook receiver could not find a free port")  # pragma: no cover


def _fresh_delivery_log(workspace: Path) -> None:
    """The receiver's delivery ids belong to one store: a new store starts a new log."""
    for name in ("hooks.db", "hooks.db-wal", "hooks.db-shm"):
        (workspace / name).unlink(missing_ok=True)


def start_stack(cfg: ChurnConfig, say: Callable[[str], None] = console.print, *,
                mlflow_port: int | None = None, hooks_port: int | None = None) -> ServerStack:
    """Start the tracking server (on ``mlflow_port``, default a free one) and the receiver (on
    ``hooks_port``, default a free one) and register the webhook; stops what it started when
    a later part fails or is interrupted. Ports taken already: a one-line ChurnError first."""
    from mlflow_churn.registry.webhooks import register_webhook

    check_ports({"--mlflow-port": mlflow_port, "--hooks-port": hooks_port})
    logs = cfg.workspace.resolve() / "logs"
    backend = backend_store(cfg)
    artifacts = cfg.workspace.resolve() / "mlartifacts"
    from mlflow_churn.registry.signing import signer_for, verify_key_path

    signer = signer_for(cfg)  # the demo's processes sign; the server holds only the verify key
    env = dict(server_env())
    env["CHURN_REGISTRY__VERIFY_KEY_FILE"] = str(verify_key_path(cfg).resolve())
    env["CHURN_TRAINING__MODEL_NAME"] = cfg.training.model_name
    env["CHURN_WORKSPACE"] = str(cfg.workspace.resolve())
    say(f"starting mlflow server --app-name churn-guard on {mask_text(backend)} (artifacts {artifacts}; "
        f"decisions signed with key {signer.key_id}, the server holds only its verify key)")
    try:
        server = start_tracking_server(backend, artifacts, app_name="churn-guard", port=mlflow_port,
                                       log_path=logs / "mlflow-server.log", cwd=cfg.workspace.resolve(),
                                       env=env)
    except PortInUse:
        if mlflow_port:
            raise PortInUse(f"--mlflow-port {mlflow_port}: mlflow server could not listen on "
                            f"{LOOPBACK}:{mlflow_port}, the port is already in use") from None
        raise
    receiver = None
    try:
        secret = secrets.token_urlsafe(32)
        _fresh_delivery_log(cfg.workspace)
        receiver, receiver_url = start_receiver(cfg, server.url, secret, logs / "hooks.log", port=hooks_port)
        stack = ServerStack(server, receiver, receiver_url, secret, logs)
        hook_cfg = cfg.model_copy(update={"tracking_uri": server.url,
                                          "hooks": cfg.hooks.model_copy(update={"secret": secret})})
        with _tracking_env(server.url):
            hook = register_webhook(hook_cfg, f"{receiver_url}/webhook")
        say(f"mlflow server {server.url} (pid {server.process.pid}); webhook receiver {receiver_url} "
            f"(pid {receiver.pid}); webhook {hook.name} {hook.verb}")
        return stack
    except BaseException:
        stop_processes([p for p in (receiver, server.process) if p is not None], CHILD_GRACE_S)
        raise


def await_webhook_gate(stack: ServerStack, cfg: ChurnConfig, version: str,
                       delivery_timeout: float = DELIVERY_TIMEOUT_S,
                       gate_timeout: float = GATE_TIMEOUT_S,
                       say: Callable[[str], None] = console.print) -> GateOutcome:
    """Wait for the receiver to get the ``challenger`` delivery of ``version`` and for the gate
    it started to finish; its outcome, read back from the decision run on the server."""
    import mlflow
    from mlflow.tracking import MlflowClient

    name = cfg.training.model_name
    with httpx.Client(base_url=stack.receiver_url, timeout=10) as http:
        deadline = time.monotonic() + delivery_timeout
        found: dict | None = None
        while found is None:
            stack.check_alive()
            rows = http.get("/deliveries", params={"model": name, "version": version}).json()["deliveries"]
            if rows:
                found = rows[0]
                break
            if time.monotonic() > deadline:
                raise ChurnError(f"no webhook delivery for {name} version {version} reached the receiver "
                                 f"within {delivery_timeout:.0f} s; see {stack.tracking.log_path} and "
                                 f"{stack.logs / 'hooks.log'}")
            time.sleep(0.5)
        delivery_id = found["delivery_id"]
        say(f"webhook delivery {delivery_id}: {found['event']} challenger -> version {version}; the receiver "
            "runs the gate")
        deadline = time.monotonic() + gate_timeout
        row = found
        while row["status"] not in ("done", "failed"):
            stack.check_alive()
            if time.monotonic() > deadline:
                raise ChurnError(f"the gate of delivery {delivery_id} did not finish within "
                                 f"{gate_timeout:.0f} s (status {row['status']}); see "
                                 f"{stack.logs / 'hooks.log'}")
            time.sleep(1.0)
            row = http.get(f"/deliveries/{delivery_id}").json()
    if row["status"] == "failed":
        raise ChurnError(f"the gate started by webhook delivery {delivery_id} failed: {row['detail']}")
    run = MlflowClient().get_run(row["run_id"])
    try:
        reasons = list(mlflow.artifacts.load_dict(f"runs:/{row['run_id']}/decision.json").get("reasons", []))
    except Exception:  # the tags and metrics still tell the outcome
        reasons = []
    passed = run.data.tags.get(GATE_TAG) == GateVerdict.PASSED
    say(f"webhook delivery {delivery_id}: done, gate {'passed' if passed else 'rejected'} "
        f"(decision run {row['run_id']})")
    return GateOutcome(passed, reasons, row["run_id"], dict(run.data.metrics),
                       evidence=f"webhook delivery {delivery_id}")


@contextmanager
def _tracking_env(url: str) -> Iterator[None]:
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = url
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved


class PromptStop(SafeInterrupt):
    """While the block runs (main thread only; elsewhere a no-op): SIGINT, SIGTERM and SIGHUP
    end the command within :data:`EXIT_DEADLINE_S` seconds, children stopped.

    The first signal raises KeyboardInterrupt in the main thread (its ``finally`` blocks run:
    runs marked FAILED, children stopped) and, through a wakeup fd read by a daemon thread (so
    also while the main thread sits in C code, which delays Python's own handler), starts a
    watchdog at once: MLflow requests from then on are made once with a
    :data:`CLEANUP_HTTP_TIMEOUT_S` s timeout; after :data:`UNWIND_S` s the watchdog stops every
    child process of this process itself (SIGTERM to its process group, SIGKILL after
    :data:`CHILD_GRACE_S` s), and at :data:`EXIT_DEADLINE_S` s, if the process is still there
    (a clean-up or an interpreter-exit hook still waiting), it ends it with ``os._exit(130)``.
    Later signals are ignored: the watchdog is on it. When the block ends after a signal (by
    the KeyboardInterrupt, or normally: ``--keep-running`` ends on Ctrl-C) and
    ``exit_at_once``, the process ends there (``os._exit``: 130 and "interrupted" on stderr,
    or 0), without the interpreter's own exit; another error goes on to the caller.

    A signal that finds the main thread in one of :data:`FRAGILE_CALLBACKS` (Python code that
    C calls through ctypes, e.g. xgboost building its training matrix) is raised
    :data:`RETRY_INTERRUPT_S` s later instead, outside it. Python's own handler raises it right
    there, and xgboost then crashes or hangs: 24 of 30 Ctrl-C during ``XGBClassifier.fit``
    ended in an abort, a segfault or a hang (measured here), none of 30 with this.
    """

    def __init__(self, unwind_s: float = UNWIND_S, deadline_s: float = EXIT_DEADLINE_S,
                 grace_s: float = CHILD_GRACE_S, exit_at_once: bool = True) -> None:
        super().__init__(STOP_SIGNALS)
        self.unwind_s, self.deadline_s, self.grace_s = unwind_s, deadline_s, grace_s
        self.exit_at_once = exit_at_once
        self.fired = threading.Event()
        self.children_stopped = threading.Event()
        self._lock = threading.Lock()
        self._old_wakeup = -1
        self._pair: tuple[socket.socket, socket.socket] | None = None

    # ------------------------------------------------------------------ the block
    def __enter__(self) -> PromptStop:
        if threading.current_thread() is not threading.main_thread():
            return self
        reader, writer = socket.socketpair()
        reader.setblocking(True)
        writer.setblocking(False)
        self._pair = (reader, writer)
        self._old_wakeup = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        super().__enter__()
        listener = threading.Thread(target=self._listen, args=(reader,), name="prompt-stop", daemon=True)
        listener.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_exc: object) -> None:
        if not self._active:
            return
        super().__exit__()
        signal.set_wakeup_fd(self._old_wakeup)
        if self._pair is not None:
            reader, writer = self._pair
            try:
                reader.shutdown(socket.SHUT_RDWR)  # wakes the listener's recv with end-of-file
            except OSError:
                pass
            reader.close()
            writer.close()
        if not (self.fired.is_set() and self.exit_at_once):
            return
        if exc_type is None or issubclass(exc_type, KeyboardInterrupt):
            # the block's own clean-up is done; the interpreter's exit (exit hooks, the final
            # garbage collection: 15 s measured on a loaded machine) is not waited for
            code = 0 if exc_type is None else 130
            if code:
                sys.stderr.write("interrupted\n")
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    # ------------------------------------------------------------------ the signal
    def _handler(self, signum: int, frame: Any) -> None:
        self._fire()  # the listener has usually done it already
        self._interrupt(signum, frame)

    def _listen(self, reader: socket.socket) -> None:
        while True:
            try:
                data = reader.recv(16)
            except OSError:
                return
            if not data:  # the block ended
                return
            if any(b in STOP_SIGNALS for b in data):  # the wakeup fd carries every caught signal's number
                self._fire()
                return

    def _fire(self) -> None:
        with self._lock:
            if self.fired.is_set():
                return
            self.fired.set()
        quick_mlflow_requests()
        threading.Thread(target=self._watchdog, name="prompt-stop-watchdog", daemon=True).start()

    def _watchdog(self) -> None:
        start = time.monotonic()
        if not self.children_stopped.wait(self.unwind_s):
            stop_children(self.grace_s)
            self.children_stopped.set()
        time.sleep(max(0.0, self.deadline_s - (time.monotonic() - start)))
        try:  # still here: a clean-up or an exit hook is waiting on something; end it
            sys.stderr.write(f"interrupted: the clean-up did not finish within {self.deadline_s:.0f} s "
                             "of the signal; children stopped, exiting\n")
            sys.stderr.flush()
            sys.stdout.flush()
        finally:
            os._exit(130)


def quick_mlflow_requests() -> None:
    """From now on MLflow HTTP requests are made once, each waiting at most
    :data:`CLEANUP_HTTP_TIMEOUT_S` s (MLflow reads both variables per request)."""
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(CLEANUP_HTTP_TIMEOUT_S)


def _child_pids() -> list[int]:
    """The processes whose parent is this process (Linux ``/proc``)."""
    me, out = os.getpid(), []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return out
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as fh:
                fields = fh.read().rpartition(")")[2].split()
        except OSError:
            continue
        if len(fields) > 1 and fields[0] != "Z" and int(fields[1]) == me:
            out.append(int(name))
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def stop_children(grace_s: float = CHILD_GRACE_S) -> list[int]:
    """Stop every child process of this process and its process group (the demo starts each
    child in a session of its own): SIGTERM, SIGKILL after ``grace_s`` s to what is left.
    For the watchdog, which does not know which children a half-finished step started.
    Returns the children's pids."""
    pids = _child_pids()
    groups = {}
    for pid in pids:
        try:
            groups[pid] = os.getpgid(pid)
        except OSError:
            continue
    for pid, group in groups.items():
        _kill(pid, group, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_alive(pid) for pid in groups):
        time.sleep(0.05)
    for pid, group in groups.items():
        _kill(pid, group, signal.SIGKILL)  # the leader may be gone with workers left in its group
    return pids


def _kill(pid: int, group: int, sig: int) -> None:
    try:
        if group == pid:  # a session / group of its own: the whole group
            os.killpg(group, sig)
        elif _alive(pid):
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@dataclass
class ServerDemoResult:
    report: DemoReport
    ui_url: str
    backend_uri: str


def run_server_demo(workspace: Path, spec: DemoSpec = DemoSpec(), keep_running: bool = False,
                    on_ready: Callable[[ServerStack], None] | None = None, *,
                    mlflow_port: int | None = None, hooks_port: int | None = None) -> ServerDemoResult:
    """Start the children (``mlflow_port`` / ``hooks_port``: their ports, default free ones),
    run the loop over HTTP with webhook-driven gates, print the summary (ending with the UI
    address) and stop the children; ``keep_running`` waits for Ctrl-C / SIGTERM first.
    ``on_ready`` is called once both children are up (tests). A stop signal ends it within
    :data:`EXIT_DEADLINE_S` s (:class:`PromptStop`)."""
    cfg = demo_config(workspace, spec)
    # MLflow prints "View run ... at: <url>" for every run over HTTP (trials too): the summary has them
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    with PromptStop() as prompt:
        stack = start_stack(cfg, mlflow_port=mlflow_port, hooks_port=hooks_port)
        try:
            if on_ready is not None:
                on_ready(stack)
            with _tracking_env(stack.url):
                report = run_demo(workspace, spec,
                                  await_gate=lambda version: await_webhook_gate(stack, cfg, version))
            console.print(f"tracking store: {mask_text(stack.backend_uri)}; artifacts: "
                          f"{stack.tracking.artifacts_dir}; logs: {stack.logs}", soft_wrap=True)
            print_report(report, workspace, ui_url=stack.url,
                         title="make demo-server: the loop against mlflow server, gates by webhook")
            if keep_running:
                console.print(f"servers kept running: MLflow UI {stack.url}, receiver {stack.receiver_url}. "
                              "Ctrl-C stops them.", soft_wrap=True)
                try:
                    while True:
                        stack.check_alive()
                        time.sleep(1.0)
                except KeyboardInterrupt:  # the way to end --keep-running: not an error
                    console.print("stopping the servers")
            return ServerDemoResult(report, stack.url, stack.backend_uri)
        finally:
            stack.stop(CHILD_GRACE_S if prompt.fired.is_set() else 15.0)
            prompt.children_stopped.set()
