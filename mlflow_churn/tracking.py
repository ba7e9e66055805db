"""Point MLflow at the configured store and make sure our experiment exists there.

Against a tracking server (``http(s)://``) this module also keeps MLflow's waits bounded and
its failures clean:

- :func:`export_http_limits` (called by :func:`setup_mlflow`; servers call it before they start
  threads) exports the ``mlflow.http_*`` config keys as ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` /
  ``_TIMEOUT`` / ``_BACKOFF_FACTOR`` unless the user set those variables, so a dead server
  costs seconds, not minutes. It writes ``os.environ`` once per process, at start-up; later
  calls change nothing (no process-wide state changes while threads run);
- :func:`fail_fast` turns a server failure inside a command (connection refused or reset,
  timeout, 5xx after the retries; :func:`server_failure` recognises them) into ONE
  :class:`TrackingUnavailable` (a :class:`ChurnError`: an outage, worth retrying, which the
  webhook receiver tells from bad input by its type) naming the server, what was being done
  and what was left;
- :func:`_end_run_failed` / :func:`_terminate_failed` mark a run FAILED with one quick attempt
  (:func:`one_attempt`: a client whose REST stores make each call once, with a short timeout,
  instead of changing MLflow's variables for everyone);
  what cannot be written because the server is gone (a run still RUNNING, a version to
  delete) goes to a journal, ``<workspace>/mlflow-pending.jsonl``, which the next
  :func:`setup_mlflow` against the same server replays (:func:`_replay_pending`). The same
  journal holds the runs a process has open (``client_run(..., journal=True)``, e.g. the gate's
  decision run) with its pid, written before the run is made (the run names its entry by the
  tag ``churn.journal_entry``): an entry whose process is gone (kill -9) is replayed too, so
  its run ends FAILED at the next command instead of staying RUNNING for ever.

The run a step logs into has one way per job: :func:`step_run` when the step logs with
MLflow's fluent API in the calling thread (it opens, nests under or resumes the ``mlflow
run`` project run); :func:`client_run` when the step logs with explicit ``MlflowClient``
calls - a worker thread, a server, trials or audit records, where no fluent active-run
state (``MLFLOW_RUN_ID``, the active run stack) may be involved: it creates the run (a
child of ``parent_run_id`` when given), marks it FINISHED, or FAILED through
:func:`_terminate_failed` when the block raises; :func:`log_to_project_run` when a CLI
entry point only adds its params, metrics and artifacts to the ``mlflow run`` project run
(a no-op outside one). Inside a fluent run, :func:`failed_on_error` ends it FAILED the same
way.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import mlflow
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

from mlflow_churn.config import ChurnConfig
from mlflow_churn.errors import ChurnError, Unavailable, first_line
from mlflow_churn.interrupt import uninterruptible
from mlflow_churn.tags import EXPERIMENT_KIND_TAG, FAILED_TAG, JOURNAL_ENTRY_TAG

PROBE_TIMEOUT_S = 5.0
#: MLflow's declared kind of an experiment, on every experiment the project creates or writes
#: runs into (:func:`ensure_experiment`, :func:`client_run`). MLflow 3.17's UI reads it only
#: when its workflow-based navigation is off (it is on in the build): the view an experiment
#: opens in is chosen per browser, see :mod:`mlflow_churn.web.mlflow_ui`.
EXPERIMENT_KIND = "custom_model_development"
#: (tracking URI, experiment id) pairs whose kind tag this process has checked
_kind_checked: set[tuple[str, str]] = set()
#: MLflow's variable -> key of the ``mlflow`` config section
HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "http_max_retries",
            "MLFLOW_HTTP_REQUEST_TIMEOUT": "http_timeout_seconds",
            "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "http_backoff_factor"}
#: what :func:`export_http_limits` exported, once per process (empty before the first call)
_exported: dict[str, str] = {}
_export_lock = threading.Lock()
#: the timeout (s) of a clean-up request made after the server already failed once
CLEANUP_TIMEOUT_S = 5
PENDING_FILE = "mlflow-pending.jsonl"


class TrackingUnavailable(Unavailable):
    """The tracking server (or store) did not answer, dropped the connection, timed out or
    answered 5xx: an outage, worth retrying later, as opposed to bad input (exit 3, HTTP 503).
    Raised by :func:`fail_fast`, :func:`probe_server` and :func:`setup_mlflow`."""

    default_dependency = "tracking server"


def export_http_limits(cfg: ChurnConfig) -> dict[str, str]:
    """Export ``cfg.mlflow.http_*`` as MLflow's HTTP retry / timeout / back-off variables,
    leaving any the user set; return the values in force. Only the first call in a process
    writes ``os.environ`` (a command or server calls it at start-up, before it starts
    threads); later calls, whatever their ``cfg``, return what is in force and change nothing."""
    with _export_lock:
        if not _exported:
            for var, key in HTTP_ENV.items():
                value = os.environ.get(var)
                if value is None:
                    value = str(getattr(cfg.mlflow, key))
                    os.environ[var] = value
                _exported[var] = value
        return dict(_exported)


def http_limits() -> dict[str, str]:
    """The MLflow HTTP variables :func:`export_http_limits` put in force in this process
    (empty before its first call)."""
    return dict(_exported)


def _once_timeout(timeout_s: float) -> float:
    """The timeout of a one-attempt call: ``timeout_s``, never more than the configured one."""
    configured = float(_exported.get("MLFLOW_HTTP_REQUEST_TIMEOUT")
                       or os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT") or timeout_s)
    return max(1.0, min(float(timeout_s), configured))


class _OnceCalls:
    """Mixin of MLflow's REST stores: each call is made once (no retries, no back-off) and
    waits at most ``timeout_s`` - MLflow's ``http_request`` with explicit limits, so that no
    process-wide variable changes. The rest of the call is MLflow's own ``call_endpoint``."""

    timeout_s: float = CLEANUP_TIMEOUT_S

    def _call_once(self, endpoint: str, method: str, json_body: str | None, response_proto: Any,
                   extra_headers: dict[str, str] | None = None) -> Any:
        from mlflow.utils.proto_json_utils import parse_dict
        from mlflow.utils.rest_utils import http_request, verify_rest_response

        body = json.loads(json_body) if json_body is not None else None
        kwargs: dict[str, Any] = {"params": body} if method == "GET" else {"json": body}
        if extra_headers:
            kwargs["extra_headers"] = extra_headers
        response = http_request(self.get_host_creds(), endpoint, method, max_retries=0,  # type: ignore[attr-defined]
                                backoff_factor=0, timeout=self.timeout_s, **kwargs)
        response = verify_rest_response(response, endpoint)
        if response.status_code == 204:
            return response_proto
        parse_dict(js_dict=json.loads(response.text), message=response_proto)
        return response_proto


def one_attempt(client: MlflowClient, timeout_s: float = CLEANUP_TIMEOUT_S) -> MlflowClient:
    """A client of ``client``'s tracking and registry servers whose requests are made once:
    no retries, at most ``timeout_s`` each (never more than the configured timeout). For
    clean-up after the server already failed once. ``client`` itself when its stores are not
    HTTP servers (a local store makes no requests)."""
    from mlflow.store.model_registry.rest_store import RestStore as RegistryRestStore
    from mlflow.store.tracking.rest_store import RestStore as TrackingRestStore
    from mlflow.tracking._model_registry.client import ModelRegistryClient
    from mlflow.tracking._tracking_service.client import TrackingServiceClient
    from mlflow.utils.credentials import get_default_host_creds

    tracking_uri, registry_uri = client.tracking_uri, client._registry_uri
    if not (tracking_uri.startswith(("http://", "https://")) and registry_uri.startswith(("http://", "https://"))):
        return client
    limit = _once_timeout(timeout_s)

    class OnceTrackingStore(_OnceCalls, TrackingRestStore):
        timeout_s = limit

        def _call_endpoint(self, api: Any, json_body: str | None = None, endpoint: str | None = None,
                           retry_timeout_seconds: float | None = None, response_proto: Any = None) -> Any:
            paths = self._V3_METHOD_TO_INFO if api in self._V3_APIS else self._METHOD_TO_INFO
            path, method = paths[api]
            return self._call_once(endpoint or path, method, json_body, response_proto or api.Response())

    class OnceRegistryStore(_OnceCalls, RegistryRestStore):
        timeout_s = limit

        def _call_endpoint(self, api: Any, json_body: str | None, call_all_endpoints: bool = False,
                           extra_headers: dict[str, str] | None = None) -> Any:
            if call_all_endpoints:  # fallbacks over several endpoints: MLflow's own loop
                return super()._call_endpoint(api, json_body, call_all_endpoints, extra_headers)
            path, method = self._get_endpoint_from_method(api)
            proto = self._get_response_from_method(api)
            return self._call_once(path, method, json_body, proto, extra_headers)

    tracking_store = OnceTrackingStore(lambda: get_default_host_creds(tracking_uri))
    registry_store = OnceRegistryStore(lambda: get_default_host_creds(registry_uri))

    class OnceTracking(TrackingServiceClient):
        @property
        def store(self) -> Any:
            return tracking_store

    class OnceRegistry(ModelRegistryClient):
        @property
        def store(self) -> Any:
            return registry_store

    once = MlflowClient(tracking_uri, registry_uri)
    once._tracking_client = OnceTracking(tracking_uri)
    once._registry_client_lazy = OnceRegistry(registry_uri, tracking_uri)
    return once


# ------------------------------------------------------------------ recognising a server failure
_ENDPOINT = re.compile(r"/api/2\.0/mlflow(?:-artifacts)?/([\w./-]+)")
_STATUS = re.compile(r"too many (\d{3}) error responses|failed with error code (\d{3})")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen and len(seen) < 12:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def server_failure(exc: BaseException) -> str | None:
    """A short reason (``"model-versions/create: connection refused"``) when ``exc`` or an
    exception it was raised from says that the tracking server did not answer, dropped the
    connection, timed out or answered 5xx; None for every other error (bad input, a
    missing resource, a bug)."""
    import requests

    for err in _chain(exc):
        text = str(err)
        hit = isinstance(err, requests.exceptions.ConnectionError | requests.exceptions.Timeout
                         | requests.exceptions.RetryError | ConnectionError | TimeoutError)
        # an artifact download reports its files' failures inside one MlflowException
        if not hit and text.startswith(("API request to", "The following failures occurred while download")):
            status = _STATUS.search(text)
            hit = ("failed with exception" in text or "failed with timeout exception" in text
                   or bool(status and (status.group(1) or status.group(2) or "").startswith("5")))
        if not hit and getattr(err, "error_code", None) in ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE") \
                and type(err).__name__ == "RestException":
            hit = True
        if hit:
            return _reason(err)
    return None


def _reason(err: BaseException) -> str:
    text = str(err)
    low = text.lower()
    status = _STATUS.search(text)
    if status:
        why = f"answered HTTP {status.group(1) or status.group(2)}"
    elif "refused" in low:
        why = "connection refused"
    elif "timed out" in low or "timeout" in low:
        why = f"no answer within {os.environ.get('MLFLOW_HTTP_REQUEST_TIMEOUT', '?')} s"
    elif "reset" in low or "aborted" in low or "remotedisconnected" in low or "closed" in low:
        why = "connection dropped"
    else:
        why = first_line(err, 160, empty="error")
    endpoint = _ENDPOINT.search(text)
    return f"{endpoint.group(1).rstrip('/.')}: {why}" if endpoint else why


# ------------------------------------------------------------------ the journal of what is left
def _journal(cfg: ChurnConfig) -> Path:
    return cfg.workspace / PENDING_FILE


def defer(cfg: ChurnConfig, op: str, **fields: Any) -> Path:
    """Record a clean-up the server could not take now (``op`` ``end_run``: ``run_id``;
    ``delete_version``: ``name``, ``version``, optional ``alias`` / ``previous``); the next
    :func:`setup_mlflow` against the same tracking URI replays it. Returns the journal."""
    path = _journal(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    entry = {"tracking_uri": cfg.mlflow_tracking_uri, "op": op, "at": datetime.now(UTC).isoformat(), **fields}
    with path.open("a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        fh.write(json.dumps(entry) + "\n")
    return path


def _apply(client: MlflowClient, entry: dict[str, Any]) -> str:
    from mlflow.exceptions import MlflowException

    if entry["op"] == "end_run" and not entry.get("run_id"):  # journalled before the run was made
        runs = client.search_runs([entry["experiment_id"]],
                                  f"tags.`{JOURNAL_ENTRY_TAG}` = '{entry['entry_id']}'", ViewType.ALL)
        if not runs:
            return "run never made"
        return "; ".join(_apply(client, {**entry, "run_id": run.info.run_id}) for run in runs)
    if entry["op"] == "end_run":
        try:
            run = client.get_run(entry["run_id"])
        except MlflowException:
            return "run gone"
        if run.info.status == "RUNNING":
            why = (f"its process (pid {entry['pid']} on {entry.get('host')}) ended without ending it "
                   f"(started {entry['at']}); marked FAILED on replay" if entry.get("pid")
                   else f"tracking server unreachable at {entry['at']}; marked FAILED on replay")
            client.set_tag(entry["run_id"], FAILED_TAG, why)
            client.set_terminated(entry["run_id"], "FAILED")
            return f"run {entry['run_id']} marked FAILED"
        return f"run {entry['run_id']} already {run.info.status}"
    if entry["op"] == "delete_version":
        name, version = entry["name"], str(entry["version"])
        try:
            mv = client.get_model_version(name, version)
        except MlflowException:
            return "version gone"
        alias, previous = entry.get("alias"), entry.get("previous")
        if alias and previous and alias in (mv.aliases or []):
            try:
                client.set_registered_model_alias(name, alias, str(previous))
            except MlflowException as exc:
                if server_failure(exc):
                    raise
        client.delete_model_version(name, version)
        return f"version {version} of '{name}' deleted"
    return "unknown op"


def _replay_pending(cfg: ChurnConfig, client: MlflowClient | None = None) -> list[str]:
    """Apply the journal's entries for this tracking URI (see :func:`defer`); keep the others
    and those the server still cannot take. Returns what was done."""
    path = _journal(cfg)
    if not path.is_file():
        return []
    uri = cfg.mlflow_tracking_uri
    client = client or MlflowClient(uri, uri)
    done: list[str] = []
    with path.open("r+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        entries = [json.loads(line) for line in fh.read().splitlines() if line.strip()]
        keep = []
        for entry in entries:
            if entry.get("tracking_uri") != uri or _owner_alive(entry):
                keep.append(entry)
                continue
            try:
                done.append(_apply(client, entry))
            except Exception as exc:  # still unreachable, or refused: keep it for the next time
                if server_failure(exc) is None:
                    done.append(f"could not replay {entry['op']}: {str(exc)[:120]}")
                else:
                    keep.append(entry)
        fh.seek(0)
        fh.truncate()
        fh.write("".join(json.dumps(e) + "\n" for e in keep))
    if not keep:
        path.unlink(missing_ok=True)
    return done


def _started(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, /proc), None when unknown."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _owner_alive(entry: dict[str, Any]) -> bool:
    """True when the process that journalled a pending run may still be running it (another
    host: it cannot be told, so yes)."""
    pid = entry.get("pid")
    if not pid:
        return False
    if entry.get("host") != socket.gethostname():
        return True
    if pid == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    started = _started(int(pid))
    return started is None or entry.get("pid_start") in (None, started)


def _pending_run(cfg: ChurnConfig, experiment_id: str) -> str:
    """Journal the run this process is about to make in ``experiment_id`` as pending while it
    runs it (the pending-run journal): if the process dies without ending the run (kill -9,
    OOM), the next :func:`setup_mlflow` finds the process gone and marks the run FAILED. The
    entry is written before the run exists (a kill between the two would leave a RUNNING run
    no entry covers), so it names the run by its tag :data:`JOURNAL_ENTRY_TAG` = the entry's id,
    which it returns (for the run's tags and for :func:`_forget`)."""
    key = uuid.uuid4().hex
    defer(cfg, "end_run", run_id=None, experiment_id=experiment_id, entry_id=key, pid=os.getpid(),
          host=socket.gethostname(), pid_start=_started(os.getpid()))
    return key


def _forget(cfg: ChurnConfig, key: str | None) -> None:
    """Drop the journal entry ``key`` (the run it names was ended, or journalled again)."""
    path = _journal(cfg)
    if key is None or not path.is_file():
        return
    try:
        with path.open("r+") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            lines = [line for line in fh.read().splitlines() if line.strip()]
            keep = [line for line in lines if json.loads(line).get("entry_id") != key]
            fh.seek(0)
            fh.truncate()
            fh.write("".join(line + "\n" for line in keep))
            if not keep:
                path.unlink(missing_ok=True)
    except OSError:
        logging.getLogger(__name__).warning("could not update the pending-run journal %s", path)


# ------------------------------------------------------------------ failing cleanly
class Failure:
    """What a command left when the tracking server failed: filled by :func:`_end_run_failed`,
    :func:`_terminate_failed` and the registry's registration helper, read by :func:`fail_fast`."""

    def __init__(self, cfg: ChurnConfig) -> None:
        self.cfg = cfg
        self.notes: list[str] = []
        self.pending = False

    def note(self, text: str) -> None:
        if text not in self.notes:  # a run ended FAILED by a step and again by its opener
            self.notes.append(text)

    def defer(self, op: str, **fields: Any) -> None:
        defer(self.cfg, op, **fields)
        self.pending = True


#: the open :func:`fail_fast` blocks of this thread / task, innermost last (a ContextVar:
#: the gate worker and the alias watcher each see their own)
_failures: ContextVar[tuple[Failure, ...]] = ContextVar("churn_fail_fast", default=())


def current_failure() -> Failure | None:
    """The innermost :func:`fail_fast` block's record in this context (None outside one)."""
    stack = _failures.get()
    return stack[-1] if stack else None


def _cleanup(cfg: ChurnConfig, what: str, call: Callable[[], Any], op: str, **fields: Any) -> bool:
    """Run ``call`` (which makes its requests through a :func:`one_attempt` client: no
    retries, short timeout); on a server failure journal ``op`` with ``fields`` and note it in
    the current :func:`fail_fast` block. True when it went through."""
    failure = current_failure()
    try:
        call()
        return True
    except Exception as exc:
        if server_failure(exc) is None:
            raise
        if failure is not None:
            failure.defer(op, **fields)
            failure.note(f"{what} is left for the next churn command against this server")
        else:
            defer(cfg, op, **fields)
        return False


def _end_run_failed(cfg: ChurnConfig, run_id: str) -> bool:
    """End the active (fluent) run ``run_id`` as FAILED with one quick attempt; when the
    server cannot take it, journal it. True when it was marked."""
    def end() -> None:
        uri = cfg.mlflow_tracking_uri
        once = one_attempt(MlflowClient(uri, uri))
        active = mlflow.active_run()
        if active is not None and active.info.run_id == run_id:
            try:
                once.set_terminated(run_id, "FAILED")
            finally:  # off the fluent stack whatever the server said: its context manager does nothing more
                _pop_active_run(run_id)
        else:
            once.set_terminated(run_id, "FAILED")

    ok = _cleanup(cfg, f"marking run {run_id} FAILED", end, "end_run", run_id=run_id)
    failure = current_failure()
    if ok and failure is not None:
        failure.note(f"run {run_id} marked FAILED")
    return ok


def _pop_active_run(run_id: str) -> None:
    """Take the active fluent run ``run_id`` off this thread's run stack without a request
    (MLflow's ``end_run`` would ask the server again, with its retries). The one place the
    package touches MLflow's fluent stack; the run's status was written by the caller."""
    from mlflow.tracking.fluent import _active_run_stack

    stack = _active_run_stack.get()
    if stack and stack[-1].info.run_id == run_id:
        stack.pop()


def _cleanup_after(error: BaseException, cleanup: Callable[[], Any]) -> None:
    """Run the cleanup of a block that raised ``error``. After an interrupt (Ctrl-C's
    KeyboardInterrupt, SIGTERM's SystemExit) the store may still be settling what the signal
    cut short (an SQLAlchemy flush, a SQLite transaction): a cleanup that fails is tried once
    more, then logged, and the interrupt goes on - it is never replaced by the cleanup's
    error (the command must still end as interrupted, exit 130). After an ordinary error a
    failing cleanup raises, as before."""
    interrupted = not isinstance(error, Exception)
    for attempt in range(2 if interrupted else 1):
        try:
            cleanup()
            return
        except Exception as exc:
            if not interrupted:
                raise
            if attempt == 1:
                logging.getLogger(__name__).warning(
                    "after %s, ending the run failed: %s", type(error).__name__, first_line(exc))


def _terminate_failed(cfg: ChurnConfig, client: MlflowClient, run_id: str) -> bool:
    """:func:`_end_run_failed` for a run made with explicit client calls (no fluent state)."""
    ok = _cleanup(cfg, f"marking run {run_id} FAILED",
                  lambda: one_attempt(client).set_terminated(run_id, "FAILED"), "end_run", run_id=run_id)
    failure = current_failure()
    if ok and failure is not None:
        failure.note(f"run {run_id} marked FAILED")
    return ok


@contextmanager
def failed_on_error(cfg: ChurnConfig) -> Iterator[None]:
    """Enter inside ``with mlflow.start_run(...)``: an error in the block ends that (active)
    run FAILED with :func:`_end_run_failed` (one quick attempt, journalled when the server
    is gone) before it goes on."""
    run = mlflow.active_run()
    try:
        yield
    except BaseException as exc:
        if run is not None:
            _cleanup_after(exc, lambda: _end_run_failed(cfg, run.info.run_id))
        raise


@contextmanager
def fail_fast(cfg: ChurnConfig, doing: str) -> Iterator[Failure]:
    """Inside the block, a tracking-server failure (see :func:`server_failure`) becomes one
    ChurnError: ``the MLflow tracking server at URI failed while DOING (REASON); NOTES``.
    Other errors pass unchanged. Blocks nest; the innermost one speaks."""
    failure = Failure(cfg)
    token = _failures.set((*_failures.get(), failure))
    try:
        yield failure
    except ChurnError:
        raise
    except Exception as exc:
        reason = server_failure(exc)
        if reason is None:
            raise
        notes = "; ".join(failure.notes) or "nothing was left half-written"
        if failure.pending:
            notes += f" (pending in {_journal(cfg)})"
        raise TrackingUnavailable(f"the MLflow tracking server at {cfg.mlflow_tracking_uri} failed while "
                                  f"{doing} ({reason}); {notes}") from None
    finally:
        _failures.reset(token)


def probe_server(uri: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """For an ``http(s)://`` tracking URI, GET ``<uri>/health`` once (``timeout`` seconds, no
    retries) so an unreachable server fails in seconds, not after MLflow's minutes of
    retries. ChurnError naming the URI when it does not answer; other schemes: no-op."""
    if not uri.startswith(("http://", "https://")):
        return
    url = uri.rstrip("/") + "/health"
    try:
        # any HTTP answer will do (a proxy or an auth layer may refuse /health): let MLflow talk to it
        httpx.get(url, timeout=timeout, follow_redirects=True)
    except httpx.TransportError as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise TrackingUnavailable(f"cannot reach the MLflow tracking server at {uri} ({reason}); start it "
                                  "or fix MLFLOW_TRACKING_URI / tracking_uri") from None


_stores_ready: set[str] = set()


def sqlite_store_ready(uri: str) -> None:
    """For a ``sqlite:///`` store, create or upgrade its tables once, under an exclusive
    ``flock`` on ``<db>.init-lock``: two processes opening a new workspace store at once
    (``churn serve`` and a ``churn canary status`` beside it) would otherwise both run
    MLflow's ``CREATE TABLE`` and one would fail with "table ... already exists". Once per
    process and URI; other schemes: no-op (a server or PostgreSQL migrates on its own)."""
    if not uri.startswith("sqlite:///") or uri in _stores_ready:
        return
    from mlflow.tracking._model_registry.utils import _get_store as registry_store
    from mlflow.tracking._tracking_service.utils import _get_store as tracking_store

    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".init-lock"), "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            tracking_store(uri)
            registry_store(uri)
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
    _stores_ready.add(uri)


def setup_mlflow(cfg: ChurnConfig, experiment: str | None = None) -> str:
    """Set the tracking/registry URI from ``cfg`` and return the experiment id.

    In the default workspace store (``sqlite:///<workspace>/mlflow.db``) the experiment's
    artifacts go to ``<workspace>/mlartifacts``; elsewhere the server decides.
    Raises ChurnError when the tracking store cannot be reached.
    """
    uri = cfg.mlflow_tracking_uri
    if uri.startswith("sqlite:///"):
        cfg.workspace.mkdir(parents=True, exist_ok=True)
    export_http_limits(cfg)
    project_run_id()  # MLFLOW_RUN_ID read once, now, before any fluent run or thread
    probe_server(uri)
    mlflow.set_tracking_uri(uri)  # a no-op when unchanged (MLflow compares first)
    if os.environ.get("MLFLOW_REGISTRY_URI") != uri:  # MLflow writes it on every call: only on a change
        mlflow.set_registry_uri(uri)
    name = experiment or cfg.training.experiment
    try:
        sqlite_store_ready(uri)
        client = MlflowClient(uri, uri)
        exp_id = ensure_experiment(client, cfg, name)
    except ChurnError:
        raise
    except Exception as exc:  # MLflow raises many types for an unreachable store
        first = first_line(exc)
        kind = TrackingUnavailable if server_failure(exc) is not None else ChurnError
        raise kind(
            f"cannot reach the MLflow tracking store at {uri} ({first[:200]}); "
            "check MLFLOW_TRACKING_URI / tracking_uri"
        ) from None
    if os.environ.get("MLFLOW_EXPERIMENT_ID") != exp_id:
        # MLflow writes the variable (and a global) on every set_experiment: only when it
        # changes, so a server's threads (same config) change nothing after start-up
        mlflow.set_experiment(experiment_id=exp_id)
    if _journal(cfg).is_file():
        _replay_pending(cfg, client)
    return exp_id


def ensure_experiment(client: MlflowClient, cfg: ChurnConfig | None, name: str,
                      tags: dict[str, str] | None = None) -> str:
    """The one way the project makes an experiment: the id of experiment ``name`` in
    ``client``'s store, created when missing (artifacts in ``<workspace>/mlartifacts`` for
    ``cfg``'s workspace store; elsewhere, or without ``cfg``, where the store decides) with
    ``tags`` and ``mlflow.experimentKind=custom_model_development``; an existing one gets
    those of them it lacks. A concurrent creation of the same name is not an error."""
    from mlflow.exceptions import MlflowException

    wanted = {**(tags or {}), EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
    exp = client.get_experiment_by_name(name)
    if exp is None:
        location = None
        if cfg is not None and client.tracking_uri == f"sqlite:///{cfg.workspace.resolve() / 'mlflow.db'}":
            location = cfg.artifact_root.as_uri()
        try:
            exp_id = client.create_experiment(name, artifact_location=location, tags=wanted)
        except MlflowException:  # created concurrently (or refused: then it is still missing)
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
        else:
            _kind_checked.add((client.tracking_uri, str(exp_id)))
            return exp_id
    for key, value in wanted.items():
        if exp.tags.get(key) != value:
            client.set_experiment_tag(exp.experiment_id, key, value)
    _kind_checked.add((client.tracking_uri, str(exp.experiment_id)))
    return exp.experiment_id


def _mark_kind(client: MlflowClient, experiment_id: str) -> None:
    """Tag experiment ``experiment_id`` ``mlflow.experimentKind`` when it lacks it (checked once
    per process): for experiments made elsewhere, e.g. the guard's audit experiment, which
    the guard creates through the server's own store. Best effort: a failure leaves it."""
    key = (client.tracking_uri, str(experiment_id))
    if key in _kind_checked:
        return
    try:
        if client.get_experiment(experiment_id).tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
            client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    except Exception as exc:  # the run itself is what matters; its own calls report a dead server
        if server_failure(exc) is None:
            _kind_checked.add(key)  # refused (permissions, a deleted experiment): do not ask again
        return
    _kind_checked.add(key)


# --------------------------------------------------------------- the run a step logs into
PROJECT_RUN_ENV = "MLFLOW_RUN_ID"


#: this process's ``mlflow run`` project run: ``MLFLOW_RUN_ID`` as the process found it, read
#: once (empty before the first :func:`project_run_id`)
_project_run: list[str | None] = []
_project_lock = threading.Lock()


def project_run_id() -> str | None:
    """The run ``mlflow run`` opened for this entry point (``MLFLOW_RUN_ID`` as the process
    found it), if any. The first call - :func:`setup_mlflow`, at the start of a command -
    takes the variable out of ``os.environ`` for good (while it is set, MLflow's fluent
    ``start_run``, even ``nested=True``, resumes that run instead of opening a new one, and
    deletes it itself); no later call changes the environment."""
    with _project_lock:
        if not _project_run:
            _project_run.append(os.environ.pop(PROJECT_RUN_ENV, None) or None)
        return _project_run[0]


@contextmanager
def without_project_run() -> Iterator[str | None]:
    """Yields the project run (:func:`project_run_id`); fluent runs opened inside are new runs,
    not that run resumed (``MLFLOW_RUN_ID`` left the environment at start-up)."""
    yield project_run_id()


@contextmanager
def step_run(run_name: str, experiment_id: str | None = None, parent_run_id: str | None = None, *,
             resume: bool = False) -> Iterator[Any]:
    """The one way a step opens the MLflow run it logs into (the active fluent run inside).

    ``parent`` = ``parent_run_id``, else the ``mlflow run`` project run (``MLFLOW_RUN_ID``):

    - ``resume`` and a parent: log into the parent itself (e.g. training inside ``mlflow run``);
    - a parent: a new child run ``run_name`` of it, in the parent's experiment;
    - no parent: a new run ``run_name`` in ``experiment_id`` (default: the active
      experiment), nested under the active fluent run when there is one.

    ``MLFLOW_RUN_ID`` left the environment at start-up (:func:`project_run_id`), so runs opened
    inside are children, not the project run resumed. ChurnError when the parent run is not in
    the tracking store.
    """
    with without_project_run() as project:
        parent = parent_run_id or project
        if not parent:
            yield from _fluent_run(lambda: mlflow.start_run(run_name=run_name, experiment_id=experiment_id,
                                                            nested=mlflow.active_run() is not None))
            return
        client = MlflowClient()
        exp = _parent_experiment(client, parent)
        mlflow.set_experiment(experiment_id=exp)  # start_run(run_id) refuses a run of another experiment

        def start() -> Any:
            run_id = parent if resume else _create_run(client, exp, run_name, {}, parent)
            nested = mlflow.active_run() is not None and mlflow.active_run().info.run_id != run_id
            return mlflow.start_run(run_id=run_id, nested=nested)

        yield from _fluent_run(start)


def _fluent_run(start: Callable[[], Any]) -> Iterator[Any]:
    """The fluent run ``start()`` opens, active while the caller's block runs, ended FINISHED
    after it or FAILED when it raises (what ``with mlflow.start_run()`` does), with the start
    and the end :func:`uninterruptible`: a Ctrl-C never finds a run made and not yet ended
    by this block."""
    run = None

    def end(status: str) -> None:
        active = mlflow.active_run()
        if run is not None and active is not None and active.info.run_id == run.info.run_id:
            with uninterruptible():
                mlflow.end_run(status)

    try:
        with uninterruptible():
            run = start()
        yield run
    except BaseException:
        end("FAILED")
        raise
    end("FINISHED")


@contextmanager
def client_run(client: MlflowClient, cfg: ChurnConfig, run_name: str, *, experiment_id: str | None = None,
               parent_run_id: str | None = None, tags: dict[str, str] | None = None,
               resume: bool = False, start_time: int | None = None, journal: bool = False) -> Iterator[str]:
    """The one way a step makes the run it logs into with explicit ``client`` calls (no fluent
    active-run state: ``MLFLOW_RUN_ID`` and the active run are neither read nor changed);
    yields the run id.

    A new run ``run_name`` with ``tags`` (and ``mlflow.parentRunId`` = ``parent_run_id`` when
    given) in ``experiment_id`` (default: the parent's experiment); FINISHED when the block
    ends, FAILED through :func:`_terminate_failed` (one quick attempt, journalled when the
    server is gone) when it raises - the error goes on. ``resume`` with a parent: the
    parent itself (e.g. the ``mlflow run`` project run), left for its opener to end.
    ``journal``: the run is in the pending-run journal while the block runs (:func:`_pending_run`),
    so a process killed inside it (kill -9) leaves no RUNNING run after the next command.
    The experiment gets the ``mlflow.experimentKind`` tag when it lacks it (:func:`_mark_kind`:
    experiments made without :func:`ensure_experiment`, e.g. the guard's audit experiment).
    ChurnError when the parent run is not in the tracking store.
    """
    if resume and parent_run_id:
        yield parent_run_id
        return
    if experiment_id is None:
        if not parent_run_id:
            raise ValueError("client_run needs an experiment_id or a parent_run_id")
        experiment_id = _parent_experiment(client, parent_run_id)
    run_id: str | None = None
    pending = None
    try:
        with uninterruptible():  # a Ctrl-C lands once the id is known and this try can end it
            pending = _pending_run(cfg, experiment_id) if journal else None  # before the run: see there
            run_tags = {**(tags or {}), **({JOURNAL_ENTRY_TAG: pending} if pending else {})}
            run_id = _create_run(client, experiment_id, run_name, run_tags, parent_run_id, start_time)
        _mark_kind(client, experiment_id)  # after the run: a dead server fails the run, not this
        yield run_id
    except BaseException as exc:
        if run_id is not None:
            _cleanup_after(exc, lambda: _terminate_failed(cfg, client, run_id))
        _forget(cfg, pending)
        raise
    with uninterruptible():
        client.set_terminated(run_id, "FINISHED")
        _forget(cfg, pending)


def _parent_experiment(client: MlflowClient, parent: str) -> str:
    """The experiment of run ``parent``; ChurnError when it is not in the tracking store."""
    try:
        return client.get_run(parent).info.experiment_id
    except Exception as exc:  # MlflowException (not found) or a server failure
        if server_failure(exc) is not None:
            raise
        raise ChurnError(f"parent run {parent} (MLFLOW_RUN_ID / parent_run_id) is not in the tracking "
                         f"store: {first_line(exc, 200)}") from None


def _create_run(client: MlflowClient, experiment_id: str, run_name: str, tags: dict[str, str],
                parent: str | None, start_time: int | None = None) -> str:
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

    tags = {**tags, MLFLOW_RUN_NAME: run_name} | ({MLFLOW_PARENT_RUN_ID: parent} if parent else {})
    return client.create_run(experiment_id, start_time=start_time, run_name=run_name, tags=tags).info.run_id


def log_to_project_run(params: dict[str, Any] | None = None, metrics: dict[str, float] | None = None,
                       tags: dict[str, str] | None = None, artifacts: tuple[Path, ...] = (),
                       dicts: dict[str, Any] | None = None) -> str | None:
    """Inside ``mlflow run`` (``MLFLOW_RUN_ID`` set), add ``params``, ``metrics``, ``tags``, the
    files ``artifacts`` and the JSON documents ``dicts`` (artifact name -> payload) to that
    project run and return its id; None (nothing logged) outside one. Explicit client calls:
    the fluent API would insist that the active experiment is the run's, and ending the run
    is ``mlflow run``'s job."""
    import time

    from mlflow.entities import Metric, Param, RunTag

    run_id = project_run_id()
    if run_id is None:
        return None
    client = MlflowClient()
    now_ms = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now_ms, 0) for k, v in (metrics or {}).items()],
                     params=[Param(k, str(v)) for k, v in (params or {}).items()],
                     tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()])
    for path in artifacts:
        client.log_artifact(run_id, str(path))
    for name, payload in (dicts or {}).items():
        client.log_dict(run_id, payload, name)
    return run_id


def download_if_present(client: MlflowClient, run_id: str, path: str, dst: str | Path) -> str | None:
    """The local copy of artifact ``path`` of run ``run_id`` (downloaded into ``dst``), or None
    when the run has no such artifact (decided by listing its folder, never by catching a
    failed download): a server that fails while listing or downloading raises, so an outage
    is never taken for a missing artifact."""
    folder = path.rsplit("/", 1)[0] if "/" in path else None
    if path not in {f.path for f in client.list_artifacts(run_id, folder)}:
        return None
    return download_artifact(client, run_id, path, dst)


def download_artifact(client: MlflowClient, run_id: str, path: str, dst: str | Path) -> str:
    """The local copy of artifact ``path`` of run ``run_id`` (downloaded into ``dst``), through
    the run's artifact repository, so that a failure raises its own error (a server's 5xx is
    recognised by :func:`server_failure`): ``MlflowClient.download_artifacts`` swallows the
    repository's error, an outage included, and raises RESOURCE_DOES_NOT_EXIST instead."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    repo = get_artifact_repository(client.get_run(run_id).info.artifact_uri, tracking_uri=client.tracking_uri)
    return repo.download_artifacts(path, str(dst))
