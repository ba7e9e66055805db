"""Alias history: every move of every alias of a model, recorded once, append-only.

MLflow keeps only the current aliases of a model (mlflow/mlflow#2169 asks for more). Here
each move is one MLflow run in the experiment :data:`HISTORY_EXPERIMENT`
(``churn-alias-history``), tags:

- ``model``, ``alias``, ``from_version``, ``to_version`` (``""`` = not set / deleted),
- ``moved_at`` (ISO UTC), ``moved_after`` (only on reconciled moves: the last time the state
  was known, so the move happened in ``(moved_after, moved_at]``),
- ``actor`` (who, when known), ``reason``, ``evidence_run_id`` (the decision run behind it),
- ``source`` (``project`` | ``webhook`` | ``reconcile``), ``move_key`` (deterministic:
  model, alias, position in that alias's history, from, to).

Runs work identically on the embedded SQLite store and on ``mlflow server`` (no extra
table, no extra database), and a person audits them in the UI: open the experiment and
filter, e.g. ``tags.model = 'churn-model' and tags.alias = 'champion'``.

The project records its own moves in :func:`mlflow_churn.registry.aliases.move_alias` /
``remove_alias``: the run is created (RUNNING) *before* the alias changes and finished
after, so the webhook receiver, which reads the current aliases first and the history
second (:func:`sync`), never records the project's move a second time: it waits for an
in-flight move to finish. Moves made by others (UI, REST, MLflow's client) are recorded
by the receiver (:func:`sync` on each alias delivery) and, for moves made while it was
down, at its next start (actor ``unknown (reconciled)``).
"""

from __future__ import annotations

import getpass
import hashlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mlflow_churn.errors import ChurnError
from mlflow_churn.times import utc
from mlflow_churn.tracking import ensure_experiment

HISTORY_EXPERIMENT = "churn-alias-history"
#: a RUNNING history run older than this is a writer that died mid-move: ignored
STALE_RUNNING_S = 300.0
RECONCILED = "unknown (reconciled)"
UNKNOWN = "unknown"
_FINISHED = RunStatus.to_string(RunStatus.FINISHED)
_RUNNING = RunStatus.to_string(RunStatus.RUNNING)


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

    def to_dict(self) -> dict:
        out = asdict(self)
        out["moved_at"] = self.moved_at.isoformat()
        out["moved_after"] = self.moved_after.isoformat() if self.moved_after else None
        return out


def _default_actor() -> str:
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


def _experiment_id(client: MlflowClient) -> str:
    return ensure_experiment(client, None, HISTORY_EXPERIMENT, tags={
        "mlflow.note.content": "One run per alias move (mlflow-churn alias history). Filter with "
                               "tags.model = '<model>' and tags.alias = 'champion'."})


def _parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        ts = datetime.fromisoformat(value)
    except ValueError:
        return None
    return utc(ts)


def _move_of(run) -> AliasMove | None:
    tags = run.data.tags
    moved_at = _parse_time(tags.get("moved_at"))
    if "alias" not in tags or moved_at is None:
        return None
    return AliasMove(tags.get("model", ""), tags["alias"], tags.get("from_version") or None,
                     tags.get("to_version") or None, moved_at, tags.get("actor", UNKNOWN),
                     tags.get("reason", ""), tags.get("evidence_run_id") or None, tags.get("source", ""),
                     tags.get("move_key", ""), run.info.run_id, _parse_time(tags.get("moved_after")),
                     run.info.status)


def read_moves(client: MlflowClient, model: str, alias: str | None = None,
               include_running: bool = False, now: datetime | None = None) -> list[AliasMove]:
    """Recorded moves of ``model`` (one ``alias`` or all), oldest first. Moves still in
    flight (RUNNING, younger than :data:`STALE_RUNNING_S`) only with ``include_running``."""
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
        if move is None or move.status not in (_FINISHED, _RUNNING):
            continue
        if move.status == _RUNNING:
            started = datetime.fromtimestamp(run.info.start_time / 1000, UTC)
            if not include_running or (now - started).total_seconds() > STALE_RUNNING_S:
                continue
        moves.append(move)
    moves.sort(key=lambda m: (m.moved_at, m.run_id))
    return moves


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def _last_state(moves: list[AliasMove]) -> dict[str, str | None]:
    """Alias -> version after the last recorded move (None = deleted)."""
    state: dict[str, str | None] = {}
    for m in moves:
        state[m.alias] = m.to_version
    return state


def begin_move(client: MlflowClient, model: str, alias: str, from_version: str | None,
               to_version: str | None, *, actor: str | None = None, reason: str = "",
               evidence_run_id: str | None = None, source: str = "project",
               moved_at: datetime | None = None, moved_after: datetime | None = None,
               position: int | None = None) -> str:
    """Create the RUNNING history run of a move about to happen; returns its run id.
    Finish it with :func:`end_move`."""
    moved_at = utc(moved_at or datetime.now(UTC), "moved_at")
    if position is None:
        position = len(read_moves(client, model, alias)) + 1
    from_v, to_v = (str(from_version) if from_version is not None else None,
                    str(to_version) if to_version is not None else None)
    tags = {"model": model, "alias": alias, "from_version": from_v or "", "to_version": to_v or "",
            "moved_at": moved_at.isoformat(), "actor": actor or _default_actor(), "reason": reason[:4000],
            "evidence_run_id": evidence_run_id or "", "source": source, "position": str(position),
            "move_key": move_key(model, alias, position, from_v, to_v),
            "mlflow.runName": f"{model}@{alias}: {_v(from_v)} -> {_v(to_v)}"}
    if moved_after is not None:
        tags["moved_after"] = utc(moved_after, "moved_after").isoformat()
    run = client.create_run(_experiment_id(client), start_time=int(moved_at.timestamp() * 1000), tags=tags)
    return run.info.run_id


def end_move(client: MlflowClient, run_id: str, ok: bool = True) -> None:
    """Finish a move's run: FINISHED (it happened) or FAILED (it did not: not history)."""
    client.set_terminated(run_id, "FINISHED" if ok else "FAILED")


def _record_move(client: MlflowClient, model: str, alias: str, from_version: str | None,
                to_version: str | None, **kwargs) -> str:
    """Record a move that already happened (arguments as :func:`begin_move`); run id."""
    run_id = begin_move(client, model, alias, from_version, to_version, **kwargs)
    end_move(client, run_id)
    return run_id


def _v(version: str | None) -> str:
    return f"v{version}" if version else "(none)"


def sync(client: MlflowClient, model: str, *, actor: str, reason: str, source: str,
         now: datetime, moved_after: datetime | None = None, wait_s: float = 30.0,
         hint: tuple[str, str | None, datetime] | None = None,
         describe: Callable[[str, str | None, datetime], tuple[str, str | None] | None] | None = None,
         sleep: Callable[[float], None] = time.sleep) -> list[AliasMove]:
    """Record every difference between the current aliases of ``model`` and its last
    recorded state; return the new moves.

    Reads the aliases first and the history second, so a move the project has announced
    (a RUNNING run) before changing the alias is seen; waits up to ``wait_s`` for such
    in-flight moves to finish. ``hint`` = (alias, version, time) of a webhook delivery: when
    that alias has moved on since (the version is neither the recorded nor the current
    one), the intermediate move is recorded at the delivery's time first. ``now`` is the
    time stamped on the other moves; ``moved_after`` (reconcile) marks them as having
    happened in ``(moved_after, now]`` (the hinted move keeps the delivery's time).
    ``describe(alias, to_version, at)`` may name the actor and evidence run of a move
    (e.g. from the tags the guard plugin wrote on the version)."""
    current = {a: str(v) for a, v in _aliases(client, model).items()}
    deadline = time.monotonic() + wait_s
    while True:
        moves = read_moves(client, model, include_running=True, now=now)
        if not any(m.status == _RUNNING for m in moves) or time.monotonic() >= deadline:
            break
        sleep(0.5)
    moves = [m for m in moves if m.status == _FINISHED]
    state = _last_state(moves)
    count: dict[str, int] = {}
    last_at: dict[str, datetime] = {}
    for m in moves:
        count[m.alias] = count.get(m.alias, 0) + 1
        last_at[m.alias] = m.moved_at
    new: list[AliasMove] = []

    def add(alias: str, to: str | None, at: datetime, after: datetime | None) -> None:
        count[alias] = count.get(alias, 0) + 1
        who, evidence = (describe(alias, to, at) if describe else None) or (actor, None)
        run_id = _record_move(client, model, alias, state.get(alias), to, actor=who, reason=reason,
                             evidence_run_id=evidence, source=source, moved_at=at, moved_after=after,
                             position=count[alias])
        new.append(AliasMove(model, alias, state.get(alias), to, at, who, reason, evidence, source,
                             move_key(model, alias, count[alias], state.get(alias), to), run_id, after))
        state[alias] = to

    if hint is not None:
        alias, version, at = hint
        seen = last_at.get(alias)
        moved_on = version not in (state.get(alias), current.get(alias))
        if moved_on and (seen is None or at > seen) and at <= now:
            add(alias, version, at, None)
    for alias in sorted(set(current) | {a for a, v in state.items() if v is not None}):
        if current.get(alias) != state.get(alias):
            fresh = hint is not None and (last_at.get(alias) is None or hint[2] > last_at[alias])
            if fresh and hint[0] == alias and hint[1] == current.get(alias) and hint[2] <= now:
                add(alias, current.get(alias), hint[2], None)  # the delivery says when it moved
            else:
                add(alias, current.get(alias), now, moved_after)
    return new


def _aliases(client: MlflowClient, model: str) -> dict[str, str]:
    try:
        return dict(client.get_registered_model(model).aliases)
    except MlflowException:
        return {}


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
