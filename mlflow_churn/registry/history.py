"""Alias history: every move of every alias of a model, recorded once, in order, with its actor.

MLflow keeps only the current aliases of a model (mlflow/mlflow#2169 asks for more). Here
each move is one MLflow run in the experiment :data:`HISTORY_EXPERIMENT`
(``churn-alias-history``), tags:

- ``model``, ``alias``, ``from_version``, ``to_version`` (``""`` = not set / deleted) and
  ``from_ref`` / ``to_ref`` (``"<version>:<identity>"``, :func:`~mlflow_churn.registry.signing.version_ref`:
  a number re-used after a delete is another version);
- ``position`` (1, 2, ... within that alias) and ``seq`` (1, 2, ... within the model): the
  order of the moves, gap-free; ``move_key`` (model, alias, position, from, to);
- ``moved_at`` (ISO UTC), ``moved_after`` (only on reconciled moves: the move happened in
  ``(moved_after, moved_at]``);
- ``actor`` (``claimed=true`` when the actor is what the client said, not an authenticated
  user), ``reason``, ``evidence_run_id``; ``source`` (``guard`` | ``webhook`` | ``project`` |
  ``reconcile``), ``delivery_id`` (webhook moves), ``via`` (``mlflow-churn`` when the move
  came with the project's claim, :mod:`mlflow_churn.registry.claims`).

One ordered writer per deployment (:func:`writer_of` tells which), so each move is recorded
exactly once:

- ``guard``: ``mlflow server --app-name churn-guard`` is in front. The guard records every
  alias set / delete it lets through, after MLflow answered, under the per-model lock it
  holds from reading the alias to the write: server order, ``from`` read before the write,
  the basic-auth user (else the claimed actor). The project only claims
  (:mod:`mlflow_churn.registry.claims`, request headers).
- ``receiver``: a plain ``mlflow server`` whose alias webhook feeds ``churn hooks serve``
  (the receiver marks the model with tag ``churn.history_writer=receiver``): the receiver
  records each delivery once (its id is the key), ordered by MLflow's event time
  (:func:`record_delivery`; ``from`` = the previous recorded ``to``). The project claims in
  the model tag ``churn.claim.<alias>``.
- ``project``: neither (the embedded SQLite store of ``make demo``): ``move_alias`` /
  ``remove_alias`` record their own moves under :func:`history_lock`
  (:func:`record_project_move`).

Reconciliation (:func:`reconcile`: the receiver's start; a project move that finds its
alias elsewhere than recorded) adds a move only when the registry's state, read after the
history and under the lock the writers hold, differs from the last recorded state: source
``reconcile``, actor :data:`RECONCILED`, with ``moved_after``. It never infers a move from a
snapshot taken before a writer finished.

Runs work identically on the embedded SQLite store and on ``mlflow server``, and a person
audits them in the UI: open the experiment and filter, e.g. ``tags.model = 'churn-model' and
tags.alias = 'champion'`` (sort by ``tags.seq``).
"""

from __future__ import annotations

import getpass
import hashlib
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mlflow_churn.errors import ChurnError, is_missing
from mlflow_churn.interrupt import uninterruptible
from mlflow_churn.registry.lock import model_lock
from mlflow_churn.registry.signing import version_ref
from mlflow_churn.tags import HISTORY_WRITER_TAG as WRITER_TAG
from mlflow_churn.times import utc
from mlflow_churn.tracking import ensure_experiment

HISTORY_EXPERIMENT = "churn-alias-history"
#: a RUNNING history run older than this is a writer that died mid-move: ignored by readers
STALE_RUNNING_S = 300.0
RECONCILED = "unknown (reconciled)"
UNKNOWN = "unknown"
#: the route and response header by which a churn-guard server says it writes the history
GUARD_ROUTE = "/churn-guard/health"
GUARD_HEADER = "X-Churn-Guard"
#: seconds a process trusts its last answer to "is this server a churn-guard?"
GUARD_PROBE_TTL_S = 10.0
ALIAS_EVENTS = ("model_version_alias.created", "model_version_alias.deleted")
_FINISHED = RunStatus.to_string(RunStatus.FINISHED)
_RUNNING = RunStatus.to_string(RunStatus.RUNNING)
_KILLED = RunStatus.to_string(RunStatus.KILLED)
_LOCK_NAMESPACE = "mlflow-churn-history"


@dataclass(frozen=True)
class AliasMove:
    """One recorded move of ``alias`` of ``model`` (``from_version``/``to_version`` None = unset)."""

    model: str
    alias: str
    from_version: str | None
    to_version: str | None
    moved_at: datetime
    actor: str
    reason: str
    evidence_run_id: str | None
    source: str
    move_key: str
    run_id: str
    moved_after: datetime | None = None
    status: str = _FINISHED
    position: int = 0  # 1-based, within the alias
    seq: int = 0  # 1-based, within the model
    from_ref: str = ""
    to_ref: str = ""
    claimed: bool = False  # the actor is what the client said (not an authenticated user)
    delivery_id: str = ""
    via: str = ""  # "mlflow-churn": the request said it was made by this project's code (a claim)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["moved_at"] = self.moved_at.isoformat()
        out["moved_after"] = self.moved_after.isoformat() if self.moved_after else None
        return out


def default_actor() -> str:
    """``<os user>@mlflow-churn``: who runs this process."""
    try:
        user = getpass.getuser()
    except Exception:  # no passwd entry (containers)
        user = "unknown-user"
    return f"{user}@mlflow-churn"


def move_key(model: str, alias: str, position: int, from_version: str | None, to_version: str | None) -> str:
    """Deterministic key of the ``position``-th move (1-based) of ``alias``."""
    raw = f"{model}\x00{alias}\x00{position}\x00{from_version or ''}\x00{to_version or ''}"
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


def experiment_id(client: MlflowClient) -> str:
    """The id of :data:`HISTORY_EXPERIMENT` in ``client``'s store (created when missing)."""
    return ensure_experiment(client, None, HISTORY_EXPERIMENT, tags={
        "mlflow.note.content": "One run per alias move (mlflow-churn alias history), in order: tags.seq "
                               "(model), tags.position (alias). Filter with tags.model = '<model>' and "
                               "tags.alias = 'champion'."})


def _parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        ts = datetime.fromisoformat(value)
    except ValueError:
        return None
    return utc(ts)


def _int(value: str | None) -> int:
    try:
        return int(value or 0)
    except ValueError:
        return 0


def _move_of(run) -> AliasMove | None:
    tags = run.data.tags
    moved_at = _parse_time(tags.get("moved_at"))
    if "alias" not in tags or moved_at is None:
        return None
    return AliasMove(tags.get("model", ""), tags["alias"], tags.get("from_version") or None,
                     tags.get("to_version") or None, moved_at, tags.get("actor", UNKNOWN),
                     tags.get("reason", ""), tags.get("evidence_run_id") or None, tags.get("source", ""),
                     tags.get("move_key", ""), run.info.run_id, _parse_time(tags.get("moved_after")),
                     run.info.status, _int(tags.get("position")), _int(tags.get("seq")),
                     tags.get("from_ref", ""), tags.get("to_ref", ""), tags.get("claimed") == "true",
                     tags.get("delivery_id", ""), tags.get("via", ""))


def _order(m: AliasMove) -> tuple:
    """History order: ``seq`` (moves recorded before it existed first), then time."""
    return (m.seq, m.moved_at, m.run_id)


def read_moves(client: MlflowClient, model: str, alias: str | None = None,
               include_running: bool = False, now: datetime | None = None,
               running_max_age_s: float = STALE_RUNNING_S, include_dropped: bool = False) -> list[AliasMove]:
    """Recorded moves of ``model`` (one ``alias`` or all), in history order (oldest first).
    Moves still in flight (RUNNING, younger than ``running_max_age_s``) only with
    ``include_running``; the receiver's observations that are no move in event-time order
    (KILLED, tag ``dropped``) only with ``include_dropped``."""
    exp = client.get_experiment_by_name(HISTORY_EXPERIMENT)
    if exp is None:
        return []
    filt = f"tags.model = '{_quote(model)}'" + (f" and tags.alias = '{_quote(alias)}'" if alias else "")
    runs, token = [], None
    while True:
        page = client.search_runs([exp.experiment_id], filt, max_results=1000, page_token=token,
                                  order_by=["attributes.start_time ASC"])
        runs.extend(page)
        token = page.token
        if not token:
            break
    now = now or datetime.now(UTC)
    moves = []
    for run in runs:
        move = _move_of(run)
        if move is None:
            continue
        if move.status == _KILLED and include_dropped and run.data.tags.get("dropped"):
            moves.append(move)
            continue
        if move.status not in (_FINISHED, _RUNNING):
            continue
        if move.status == _RUNNING:
            started = datetime.fromtimestamp(run.info.start_time / 1000, UTC)
            if not include_running or (now - started).total_seconds() > running_max_age_s:
                continue
        moves.append(move)
    moves.sort(key=_order)
    return moves


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def last_state(moves: list[AliasMove]) -> dict[str, str | None]:
    """Alias -> version after the last recorded move (None = deleted)."""
    state: dict[str, str | None] = {}
    for m in moves:
        state[m.alias] = m.to_version
    return state


def next_numbers(moves: list[AliasMove], alias: str) -> tuple[int, int]:
    """(position, seq) of the next move of ``alias`` after ``moves`` (the model's history)."""
    mine = [m for m in moves if m.alias == alias]
    position = max([m.position for m in mine] + [len(mine)]) + 1
    seq = max([m.seq for m in moves] + [len(moves)]) + 1
    return position, seq


def version_ref_of(client: MlflowClient, model: str, version: str | None) -> str:
    """``"<version>:<identity>"`` of ``version`` of ``model`` ("" for none, or when it is gone)."""
    if not version:
        return ""
    try:
        return version_ref(client.get_model_version(model, str(version)))
    except MlflowException as exc:
        if not is_missing(exc):  # an outage is not "the version is gone"
            raise
        return ""


def _tags(model: str, alias: str, from_v: str | None, to_v: str | None, *, actor: str, reason: str,
          evidence_run_id: str | None, source: str, moved_at: datetime, position: int, seq: int,
          from_ref: str, to_ref: str, moved_after: datetime | None, claimed: bool,
          delivery_id: str, via: str = "") -> dict[str, str]:
    tags = {"model": model, "alias": alias, "from_version": from_v or "", "to_version": to_v or "",
            "from_ref": from_ref, "to_ref": to_ref, "moved_at": moved_at.isoformat(),
            "actor": actor[:500], "reason": reason[:4000], "evidence_run_id": evidence_run_id or "",
            "source": source, "position": str(position), "seq": str(seq),
            "move_key": move_key(model, alias, position, from_v, to_v),
            "mlflow.runName": f"{model}@{alias} #{position}: {_v(from_v)} -> {_v(to_v)}",
            "mlflow.user": actor[:250]}
    if claimed:
        tags["claimed"] = "true"
    if delivery_id:
        tags["delivery_id"] = delivery_id
    if via:
        tags["via"] = via
    if moved_after is not None:
        tags["moved_after"] = utc(moved_after, "moved_after").isoformat()
    return tags


def record_move(client: MlflowClient, model: str, alias: str, from_version: str | None,
                to_version: str | None, *, position: int, seq: int, actor: str | None = None,
                reason: str = "", evidence_run_id: str | None = None, source: str = "project",
                moved_at: datetime | None = None, moved_after: datetime | None = None,
                from_ref: str = "", to_ref: str = "", claimed: bool = False, delivery_id: str = "",
                via: str = "", experiment: str | None = None, running: bool = False) -> AliasMove:
    """Write one move (a FINISHED run; RUNNING with ``running``: finish it with :func:`end_move`).
    The caller is the model's one writer and computed ``position`` / ``seq``
    (:func:`next_numbers`) under its lock."""
    moved_at = utc(moved_at or datetime.now(UTC), "moved_at")
    from_v = str(from_version) if from_version is not None else None
    to_v = str(to_version) if to_version is not None else None
    who = actor or default_actor()
    tags = _tags(model, alias, from_v, to_v, actor=who, reason=reason, evidence_run_id=evidence_run_id,
                 source=source, moved_at=moved_at, position=position, seq=seq, from_ref=from_ref,
                 to_ref=to_ref, moved_after=moved_after, claimed=claimed, delivery_id=delivery_id, via=via)
    with uninterruptible():  # Ctrl-C never leaves a finished move's run RUNNING
        run = client.create_run(experiment or experiment_id(client),
                                start_time=int(moved_at.timestamp() * 1000), tags=tags)
        if not running:
            client.set_terminated(run.info.run_id, _FINISHED)
    return AliasMove(model, alias, from_v, to_v, moved_at, who, reason, evidence_run_id or None, source,
                     tags["move_key"], run.info.run_id, moved_after, _RUNNING if running else _FINISHED,
                     position, seq, from_ref, to_ref, claimed, delivery_id, via)


def end_move(client: MlflowClient, run_id: str, ok: bool = True) -> None:
    """Finish a move's RUNNING run: FINISHED (it happened) or FAILED (it did not: not history)."""
    client.set_terminated(run_id, _FINISHED if ok else "FAILED")


def _v(version: str | None) -> str:
    return f"v{version}" if version else "(none)"


def aliases_now(client: MlflowClient, model: str) -> dict[str, str]:
    """The model's aliases -> version as text (empty when the model does not exist)."""
    try:
        return {a: str(v) for a, v in client.get_registered_model(model).aliases.items()}
    except MlflowException as exc:
        if is_missing(exc):
            return {}
        raise


# --------------------------------------------------------------------------- who writes
def registry_uri(client: MlflowClient) -> str:
    return str(getattr(client, "_registry_uri", None) or client.tracking_uri)


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


_guard_probes: dict[str, tuple[float, bool]] = {}


def is_guarded(client: MlflowClient, ttl_s: float = GUARD_PROBE_TTL_S) -> bool:
    """Whether ``client``'s registry is a ``churn-guard`` server (it answers
    :data:`GUARD_ROUTE`, and every response, with header :data:`GUARD_HEADER`). Asked once per
    ``ttl_s`` per server and process; False for a store that is not a server."""
    uri = registry_uri(client)
    if not _is_http(uri):
        return False
    hit = _guard_probes.get(uri)
    if hit is not None and time.monotonic() - hit[0] < ttl_s:
        return hit[1]
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    response = http_request(get_default_host_creds(uri), GUARD_ROUTE, "GET", raise_on_status=False)
    guarded = response.headers.get(GUARD_HEADER) is not None
    _guard_probes[uri] = (time.monotonic(), guarded)
    return guarded


def alias_webhook_active(client: MlflowClient) -> bool:
    """Whether the server has an active webhook for both alias events (False when it cannot
    tell: no webhooks on this store, or no permission to list them)."""
    token = None
    try:
        while True:
            page = client.list_webhooks(max_results=100, page_token=token)
            for hook in page:
                events = {str(e) for e in hook.events}
                if hook.status.is_active() and set(ALIAS_EVENTS) <= events:
                    return True
            token = page.token
            if not token:
                return False
    except (MlflowException, NotImplementedError):
        return False


def writer_of(client: MlflowClient, model: str) -> str:
    """Who records the alias moves of ``model`` on ``client``'s registry: ``guard`` (a
    churn-guard server), ``receiver`` (a server whose alias webhook feeds the receiver, which
    tagged the model :data:`WRITER_TAG` = receiver) or ``project`` (anything else: the
    embedded store, a plain server without a receiver)."""
    uri = registry_uri(client)
    if not _is_http(uri):
        return "project"
    if is_guarded(client):
        return "guard"
    try:
        tags = client.get_registered_model(model).tags
    except MlflowException as exc:
        if not is_missing(exc):  # an outage must not elect the project as the writer
            raise
        return "project"
    if tags.get(WRITER_TAG) == "receiver" and alias_webhook_active(client):
        return "receiver"
    return "project"


def _lock_dir(uri: str) -> Path:
    """Where the history lock file of a store lives: next to an SQLite database
    (``<dir>/locks/history``), else a per-store folder in the temp dir (one machine)."""
    if uri.startswith("sqlite:///") and ":memory:" not in uri:
        return Path(uri[len("sqlite:///"):].split("?")[0]).resolve().parent / "locks" / "history"
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "mlflow-churn-locks" / digest


@contextmanager
def history_lock(client: MlflowClient, model: str, timeout_s: float = 120.0) -> Iterator[str]:
    """The lock the ``project`` writer of ``model``'s history holds from reading an alias to
    recording its move: a PostgreSQL advisory lock on a PostgreSQL store, else ``fcntl``
    next to the SQLite database (or, for another store, in the temp dir: processes of one
    machine). Not the transitions' ``registry_lock``, which callers may hold around it."""
    uri = registry_uri(client)
    with model_lock(uri, model, _lock_dir(uri), timeout_s, namespace=_LOCK_NAMESPACE) as held:
        yield held


# --------------------------------------------------------------------------- writers
def record_project_move(client: MlflowClient, model: str, alias: str, to_version: str | None,
                        apply: Callable[[], None], *, actor: str | None = None, reason: str = "",
                        evidence_run_id: str | None = None,
                        now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> AliasMove | None:
    """The ``project`` writer: under :func:`history_lock`, read ``alias``, ``apply()`` the move
    (set / delete) and record it; None when it is not a move (the alias is there already).

    The run is created RUNNING before ``apply`` and finished after (FAILED when ``apply``
    raises: not history). Under the lock no other writer is mid-move, so a RUNNING run left
    by a writer that died is resolved first (finished when the registry holds its move,
    failed otherwise), and an alias found elsewhere than recorded (moved past the project)
    gets a reconciled move before this one."""
    to_v = str(to_version) if to_version is not None else None
    with history_lock(client, model):
        moves = read_moves(client, model, include_running=True, running_max_age_s=float("inf"))
        current = aliases_now(client, model)
        moves = resolve_running(client, moves, current)
        exp = experiment_id(client)
        holder = current.get(alias)
        recorded = last_state(moves).get(alias)
        if recorded != holder:
            reconcile_alias(client, model, alias, recorded, holder, moves, now(), exp,
                             "found at the project's next move of this alias (moved past the project)")
            moves = read_moves(client, model)
        if holder == to_v:
            apply()  # not a move: the registry is asked anyway (it may mirror stages)
            return None
        position, seq = next_numbers(moves, alias)
        prev_ref = next((m.to_ref for m in reversed(moves) if m.alias == alias), "") if holder else ""
        move = record_move(client, model, alias, holder, to_v, position=position, seq=seq, actor=actor,
                           reason=reason, evidence_run_id=evidence_run_id, source="project", moved_at=now(),
                           from_ref=prev_ref or version_ref_of(client, model, holder),
                           to_ref=version_ref_of(client, model, to_v), experiment=exp, running=True)
        try:
            apply()
        except BaseException:
            end_move(client, move.run_id, ok=False)
            raise
        end_move(client, move.run_id)
    return AliasMove(**{**asdict(move), "status": _FINISHED})


def resolve_running(client: MlflowClient, moves: list[AliasMove],
                     current: dict[str, str]) -> list[AliasMove]:
    """Finish (the registry holds its move) or fail each RUNNING run; the FINISHED moves."""
    out: list[AliasMove] = []
    for i, m in enumerate(moves):
        if m.status != _RUNNING:
            out.append(m)
            continue
        nxt = next((o for o in moves[i + 1:] if o.alias == m.alias), None)
        # the registry (or the next recorded move of the alias) holds what it was moving to
        happened = (nxt.from_version if nxt else current.get(m.alias)) == m.to_version
        end_move(client, m.run_id, ok=happened)
        if happened:
            out.append(AliasMove(**{**asdict(m), "status": _FINISHED}))
    return out


def reconcile_alias(client: MlflowClient, model: str, alias: str, recorded: str | None,
                     holder: str | None, moves: list[AliasMove], now: datetime, exp: str, reason: str,
                     moved_after: datetime | None = None) -> AliasMove:
    """Record the move the registry proves: ``alias`` found on ``holder`` where the history
    (``moves``) left it on ``recorded``; it happened in ``(moved_after, now]`` (``moved_after``
    default: the newest move of ``moves``). The caller holds the writers' lock."""
    position, seq = next_numbers(moves, alias)
    known = moved_after or max((m.moved_at for m in moves), default=None)
    prev_ref = next((m.to_ref for m in reversed(moves) if m.alias == alias), "") if recorded else ""
    return record_move(client, model, alias, recorded, holder, position=position, seq=seq, actor=RECONCILED,
                       reason=reason, source="reconcile", moved_at=now, moved_after=known,
                       from_ref=prev_ref, to_ref=version_ref_of(client, model, holder), experiment=exp)


def reconcile(client: MlflowClient, model: str, *, now: datetime, reason: str,
              moved_after: datetime | None = None) -> list[AliasMove]:
    """Record, as reconciled moves, every alias of ``model`` the registry holds elsewhere than
    the history's last state; return them. The CALLER HOLDS the lock of the model's writers
    (the history is read first, the registry after it, so no writer is mid-move): a move is
    added only when the registry proves it. Each says it happened in ``(moved_after, now]``
    (``moved_after`` default: the newest recorded move)."""
    moves = read_moves(client, model)
    state = last_state(moves)
    current = aliases_now(client, model)  # after the history
    known = max([m.moved_at for m in moves] + ([moved_after] if moved_after else []), default=None)
    new: list[AliasMove] = []
    exp: str | None = None
    for alias in sorted(set(current) | {a for a, v in state.items() if v is not None}):
        if current.get(alias) == state.get(alias):
            continue
        exp = exp or experiment_id(client)
        move = reconcile_alias(client, model, alias, state.get(alias), current.get(alias), moves, now, exp,
                               reason, known)
        moves.append(move)
        new.append(move)
    return new


def record_delivery(client: MlflowClient, model: str, alias: str, to_version: str | None, at: datetime,
                    delivery_id: str, *, actor: str = UNKNOWN, claimed: bool = False, reason: str = "",
                    evidence_run_id: str | None = None, via: str = "", wait_s: float = 30.0,
                    sleep: Callable[[float], None] = time.sleep) -> AliasMove | None:
    """The ``receiver`` writer: record what a webhook delivery reports (``alias`` now on
    ``to_version``, None = deleted, at MLflow's event time ``at``); the move, or None when the
    delivery is recorded already (same ``delivery_id``) or is no move.

    Each delivery (and each reconciled move) is an observation "``alias`` holds X from
    ``at``"; the history is the observations in event-time order, each ``from`` the previous
    ``to``, without the ones that change nothing. Deliveries travel in parallel, so one that
    arrives after a later one is put in its place: the model's observations are renumbered,
    re-chained and re-judged (:func:`rechain`): one that became no move (a reconciled move this
    delivery explains, a repeated set) is dropped (KILLED, tag ``dropped``), one that became a
    move again (a delete that arrived before the set it undoes) is restored. RUNNING runs of a
    ``project`` writer (the writer changed while it moved) are waited for up to ``wait_s``."""
    to_v = str(to_version) if to_version is not None else None
    at = utc(at, "at")
    deadline = time.monotonic() + wait_s
    while True:
        seen = read_moves(client, model, include_running=True, include_dropped=True)
        if not any(m.status == _RUNNING for m in seen) or time.monotonic() >= deadline:
            break
        sleep(0.5)
    if any(m.delivery_id == delivery_id for m in seen):
        return None
    moves = [m for m in seen if m.status == _FINISHED]
    in_order = all(m.moved_at <= at for m in seen if m.status != _RUNNING)
    prev = next((m for m in reversed(moves) if m.alias == alias), None)
    common = {"actor": actor, "reason": reason, "evidence_run_id": evidence_run_id, "source": "webhook",
              "moved_at": at, "to_ref": version_ref_of(client, model, to_v), "claimed": claimed,
              "delivery_id": delivery_id, "via": via}
    if in_order:
        from_v = prev.to_version if prev else None
        position, seq = next_numbers(moves, alias)
        move = record_move(client, model, alias, from_v, to_v, position=position, seq=seq,
                           from_ref=prev.to_ref if prev else "", running=from_v == to_v, **common)
        if from_v != to_v:
            return move
        _drop(client, move.run_id)  # kept: an earlier delivery arriving later may make it a move
        return None
    move = record_move(client, model, alias, None, to_v, position=0, seq=0, **common)
    rechained = rechain(client, model)
    return next((m for m in rechained if m.run_id == move.run_id), None)


def _drop(client: MlflowClient, run_id: str) -> None:
    client.set_tag(run_id, "dropped", "no move in event-time order")
    client.set_terminated(run_id, _KILLED)


def rechain(client: MlflowClient, model: str) -> list[AliasMove]:
    """Put the model's observations in event-time order: renumber them (``seq``,
    ``position``), chain each ``from`` onto the previous ``to`` of its alias, drop those that
    change nothing and restore dropped ones that change something now; the resulting history.
    For the receiver writer only (it alone orders by event time)."""
    seen = read_moves(client, model, include_dropped=True)
    seen.sort(key=lambda m: (m.moved_at, m.seq or 10**12, m.run_id))
    prev: dict[str, AliasMove] = {}
    count: dict[str, int] = {}
    out: list[AliasMove] = []
    seq = 0
    for m in seen:
        before = prev.get(m.alias)
        from_v = before.to_version if before else None
        if from_v == m.to_version:
            if m.status != _KILLED:
                _drop(client, m.run_id)
            continue
        if m.status == _KILLED:
            client.delete_tag(m.run_id, "dropped")
            client.set_terminated(m.run_id, _FINISHED)
        seq += 1
        count[m.alias] = count.get(m.alias, 0) + 1
        fixed = AliasMove(**{**asdict(m), "from_version": from_v, "position": count[m.alias], "seq": seq,
                             "from_ref": before.to_ref if before else "", "status": _FINISHED,
                             "move_key": move_key(model, m.alias, count[m.alias], from_v, m.to_version)})
        if (fixed.from_version, fixed.position, fixed.seq, fixed.from_ref) != (
                m.from_version, m.position, m.seq, m.from_ref):
            tags = _tags(model, m.alias, from_v, m.to_version, actor=m.actor, reason=m.reason,
                         evidence_run_id=m.evidence_run_id, source=m.source, moved_at=m.moved_at,
                         position=fixed.position, seq=seq, from_ref=fixed.from_ref, to_ref=m.to_ref,
                         moved_after=m.moved_after, claimed=m.claimed, delivery_id=m.delivery_id, via=m.via)
            for key in ("from_version", "from_ref", "position", "seq", "move_key", "mlflow.runName"):
                client.set_tag(m.run_id, key, tags[key])
        prev[m.alias] = fixed
        out.append(fixed)
    return out


# --------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class AliasAt:
    """Which version held ``alias`` at ``at`` (None = none); ``uncertain`` when a
    reconciled move makes ``at`` fall in a window where the answer is not known."""

    model: str
    alias: str
    at: datetime
    version: str | None
    move: AliasMove | None
    uncertain: bool = False

    def to_dict(self) -> dict:
        return {"model": self.model, "alias": self.alias, "at": self.at.isoformat(), "version": self.version,
                "uncertain": self.uncertain, "move": self.move.to_dict() if self.move else None}


def version_at(moves: list[AliasMove], model: str, alias: str, at: datetime) -> AliasAt:
    """The version behind ``alias`` at time ``at`` (tz-aware), from ``moves`` (oldest first)."""
    if at.tzinfo is None:
        raise ChurnError(f"time {at.isoformat()} has no time zone; pass UTC, e.g. 2026-06-01T00:00Z")
    at = at.astimezone(UTC)
    holder: AliasMove | None = None
    uncertain = False
    for m in moves:
        if m.alias != alias:
            continue
        if m.moved_at <= at:
            holder = m
        elif m.moved_after is not None and m.moved_after < at:
            uncertain = True  # a move reconciled later may already have happened at `at`
    return AliasAt(model, alias, at, holder.to_version if holder else None, holder, uncertain)


__all__ = ["AliasAt", "AliasMove", "GUARD_HEADER", "GUARD_ROUTE", "HISTORY_EXPERIMENT", "RECONCILED",
           "UNKNOWN", "WRITER_TAG", "end_move", "experiment_id", "history_lock", "is_guarded", "last_state",
           "next_numbers", "read_moves", "rechain", "reconcile", "reconcile_alias", "record_delivery",
           "record_move", "record_project_move", "resolve_running", "version_at", "version_ref_of",
           "writer_of"]
