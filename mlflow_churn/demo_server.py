"""`churn demo --server` / `make demo-server`: the demo's loop against a real tracking server.

What it starts, as child processes it owns and stops on every exit (normal end, error,
Ctrl-C, SIGTERM):

- ``mlflow server`` (:func:`mlflow_churn.tracking_server.start_tracking_server`) on 127.0.0.1
  and a free port, ``--backend-store-uri`` = a NEW database on the PostgreSQL server of
  ``mlflow.server_backend_uri`` / ``CHURN_MLFLOW_BACKEND_URI`` (``postgresql://user@host/db``
  or ``postgresql+psycopg2://...``; ``db`` is only where to connect to create it), or, when
  none is given, a new SQLite file ``<workspace>/mlflow-server.db``;
  ``--artifacts-destination <workspace>/mlartifacts`` (proxied: this process never touches it);
  webhooks enabled for loopback receivers;
- the webhook receiver, ``churn hooks serve`` on a free port with a generated secret, and
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
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from mlflow_churn.config import ChurnConfig, mask_text
from mlflow_churn.demo import DemoReport, DemoSpec, GateOutcome, console, demo_config, print_report, run_demo
from mlflow_churn.errors import ChurnError
from mlflow_churn.tracking_server import (
    LOOPBACK,
    TrackingServer,
    create_database,
    free_port,
    server_env,
    start_tracking_server,
    stop_process,
    wait_http,
)

SQLITE_FILE = "mlflow-server.db"
DELIVERY_TIMEOUT_S = 120.0  # from the alias move to the delivery's arrival at the receiver
GATE_TIMEOUT_S = 1800.0  # from the delivery to the gate's decision
RECEIVER_READY_S = 120.0


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

    def stop(self) -> None:
        """Stop the receiver, then the server (each: terminate its process group, then kill)."""
        try:
            stop_process(self.receiver)
        finally:
            self.tracking.stop()


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
                   tries: int = 3) -> tuple[subprocess.Popen, str]:
    """``churn hooks serve`` on 127.0.0.1 and a free port, in its own process group, against
    ``tracking_url``; its process and base URL once ``/health`` answers."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID")}
    env.update({"MLFLOW_TRACKING_URI": tracking_url, "CHURN_HOOKS__SECRET": secret, "PYTHONUNBUFFERED": "1"})
    log_path.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(tries):
        port = free_port()
        args = [sys.executable, "-m", "mlflow_churn.cli", "--workspace", str(cfg.workspace.resolve()),
                "hooks", "serve", "--host", LOOPBACK, "--port", str(port)]
        with log_path.open("w") as out:
            proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        url = f"http://{LOOPBACK}:{port}"
        try:
            wait_http(f"{url}/health", proc, RECEIVER_READY_S, log_path)
            return proc, url
        except ChurnError:
            stop_process(proc, 5.0)
            text = log_path.read_text(errors="replace").lower()
            if attempt + 1 < tries and ("address already in use" in text or "errno 98" in text):
                continue
            raise
    raise ChurnError("the webhook receiver could not find a free port")  # pragma: no cover


def _fresh_delivery_log(workspace: Path) -> None:
    """The receiver's delivery ids belong to one store: a new store starts a new log."""
    for name in ("hooks.db", "hooks.db-wal", "hooks.db-shm"):
        (workspace / name).unlink(missing_ok=True)


def start_stack(cfg: ChurnConfig, say: Callable[[str], None] = console.print) -> ServerStack:
    """Start the tracking server and the receiver and register the webhook; stops what it
    started when a later part fails."""
    from mlflow_churn.registry.webhooks import register_webhook

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
    server = start_tracking_server(backend, artifacts, app_name="churn-guard",
                                   log_path=logs / "mlflow-server.log", cwd=cfg.workspace.resolve(), env=env)
    receiver = None
    try:
        secret = secrets.token_urlsafe(32)
        _fresh_delivery_log(cfg.workspace)
        receiver, receiver_url = start_receiver(cfg, server.url, secret, logs / "hooks.log")
        stack = ServerStack(server, receiver, receiver_url, secret, logs)
        hook_cfg = cfg.model_copy(update={"tracking_uri": server.url,
                                          "hooks": cfg.hooks.model_copy(update={"secret": secret})})
        with _tracking_env(server.url):
            hook = register_webhook(hook_cfg, f"{receiver_url}/webhook")
        say(f"mlflow server {server.url} (pid {server.process.pid}); webhook receiver {receiver_url} "
            f"(pid {receiver.pid}); webhook {hook.name} {hook.verb}")
        return stack
    except BaseException:
        if receiver is not None:
            stop_process(receiver)
        server.stop()
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
    passed = run.data.tags.get("gate") == "passed"
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


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGTERM (and SIGHUP) raise KeyboardInterrupt like Ctrl-C, so ``finally`` blocks stop the
    children; only from the main thread (elsewhere: unchanged)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {s: signal.signal(s, _interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def _stop_quietly(stack: ServerStack) -> None:
    """Stop the children with Ctrl-C / SIGTERM ignored meanwhile (a second Ctrl-C must not
    leave them running)."""
    if threading.current_thread() is not threading.main_thread():
        stack.stop()
        return
    saved = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        stack.stop()
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


@dataclass
class ServerDemoResult:
    report: DemoReport
    ui_url: str
    backend_uri: str


def run_server_demo(workspace: Path, spec: DemoSpec = DemoSpec(), keep_running: bool = False,
                    on_ready: Callable[[ServerStack], None] | None = None) -> ServerDemoResult:
    """Start the children, run the loop over HTTP with webhook-driven gates, print the
    summary (ending with the UI address) and stop the children; ``keep_running`` waits for
    Ctrl-C / SIGTERM first. ``on_ready`` is called once both children are up (tests)."""
    cfg = demo_config(workspace, spec)
    # MLflow prints "View run ... at: <url>" for every run over HTTP (trials too): the summary has them
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    with _signals_interrupt():
        stack = start_stack(cfg)
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
            _stop_quietly(stack)
