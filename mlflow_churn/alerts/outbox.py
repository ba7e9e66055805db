"""The alert outbox: a SQLite file (WAL; ``alerts.outbox``, default ``<workspace>/alerts.db``)
every producer writes to and every sender delivers from.

Three tables:

- ``conditions``: one row per **episode** of a condition. A condition is named by its dedup
  key (an explicit key, or the fingerprint of its labels); it fires (``status = firing``),
  clears (``resolved``, ``ends_at`` set) and may fire again later: a new episode. Firing a
  condition that is already firing with the same labels changes no message (its
  annotations are refreshed, ``fired`` counts the calls); firing it with other labels
  clears the old episode and starts a new one. An episode fired with a ``ttl`` clears by
  itself at ``expires_at`` (an event such as a refused promotion, rather than a state).
- ``deliveries``: per episode and outlet (recorded when the episode fires: the URL is the
  one configured then), what the outlet has been told (``told``: '' -> ``firing`` ->
  ``resolved``), consecutive failures, when the next attempt may run (back-off), the
  last success and error, and a lease so that two senders (two processes on one
  workspace) never send the same step twice.
- ``attempts``: every attempt: time, outlet, step (``firing`` | ``resolved`` | ``repeat``),
  HTTP status or error, duration.

Times are Unix seconds (UTC). One connection per call; claims run in ``BEGIN IMMEDIATE``.
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow_churn.alerts.outlets import ALERTMANAGER, OUTLETS, Answer, Message
from mlflow_churn.errors import ChurnError

FIRING, RESOLVED, REPEAT = "firing", "resolved", "repeat"
#: Prometheus / Alertmanager label names
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
MAX_KEY = 200
MAX_TEXT = 4000

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS conditions (
        key TEXT NOT NULL, episode INTEGER NOT NULL, status TEXT NOT NULL,
        labels TEXT NOT NULL, annotations TEXT NOT NULL, starts_at REAL NOT NULL, ends_at REAL,
        expires_at REAL, fired INTEGER NOT NULL DEFAULT 1, updated_at REAL NOT NULL,
        PRIMARY KEY (key, episode))""",
    "CREATE INDEX IF NOT EXISTS conditions_status ON conditions (status)",
    """CREATE TABLE IF NOT EXISTS deliveries (
        key TEXT NOT NULL, episode INTEGER NOT NULL, outlet TEXT NOT NULL, url TEXT NOT NULL,
        told TEXT NOT NULL DEFAULT '', failures INTEGER NOT NULL DEFAULT 0, next_at REAL,
        lease_until REAL, lease_token TEXT, last_ok_at REAL, last_error TEXT,
        step_since REAL NOT NULL, gave_up INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (key, episode, outlet))""",
    "CREATE INDEX IF NOT EXISTS deliveries_open ON deliveries (told, gave_up)",
    """CREATE TABLE IF NOT EXISTS attempts (
        id INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL, episode INTEGER NOT NULL,
        outlet TEXT NOT NULL, step TEXT NOT NULL, at REAL NOT NULL, ok INTEGER NOT NULL,
        http_status INTEGER, error TEXT, seconds REAL NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS attempts_key ON attempts (key, episode)",
)


def fingerprint(labels: dict[str, str]) -> str:
    """The dedup key of a label set (16 hex digits; the same labels, the same key)."""
    return hashlib.sha256(json.dumps(sorted(labels.items())).encode()).hexdigest()[:16]


def clean_labels(labels: dict[str, Any]) -> dict[str, str]:
    """Labels as text, empty ones dropped (an empty label is no label to Alertmanager);
    ChurnError on a name Alertmanager refuses or without ``alertname``."""
    out = {}
    for name, value in labels.items():
        if not isinstance(name, str) or not _LABEL_NAME.fullmatch(name):
            raise ChurnError(f"alert label name {name!r} is not valid: use letters, digits and _ "
                             "(not starting with a digit)")
        text = "" if value is None else str(value)
        if text:
            out[name] = text[:MAX_TEXT]
    if not out.get("alertname"):
        raise ChurnError(f"an alert needs an 'alertname' label, got labels {sorted(out)}")
    return dict(sorted(out.items()))


def clean_annotations(annotations: dict[str, Any] | None) -> dict[str, str]:
    return {str(k): ("" if v is None else str(v))[:MAX_TEXT] for k, v in sorted((annotations or {}).items())}


@dataclass(frozen=True)
class Fired:
    """What :meth:`Outbox.fire` did: ``change`` is ``new`` (a new episode), ``same`` (already
    firing with these labels: no new message) or ``relabelled`` (the previous episode was
    cleared and a new one started)."""

    key: str
    episode: int
    change: str


@dataclass(frozen=True)
class Delivery:
    """What one outlet has been told about one episode."""

    outlet: str
    url: str
    told: str
    failures: int
    next_at: float | None
    last_ok_at: float | None
    last_error: str | None
    gave_up: bool
    attempts: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"outlet": self.outlet, "told": self.told or None, "failures": self.failures,
                "next_at": self.next_at, "last_ok_at": self.last_ok_at, "last_error": self.last_error,
                "gave_up": self.gave_up, "attempts": self.attempts}


@dataclass(frozen=True)
class Condition:
    """One episode of a condition, with its deliveries."""

    key: str
    episode: int
    status: str
    labels: dict[str, str]
    annotations: dict[str, str]
    starts_at: float
    ends_at: float | None
    expires_at: float | None
    fired: int
    updated_at: float
    deliveries: tuple[Delivery, ...] = field(default=())

    @property
    def delivered(self) -> bool:
        """Every outlet has been told the episode's current status."""
        return all(d.told == self.status for d in self.deliveries)

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "episode": self.episode, "status": self.status, "labels": self.labels,
                "annotations": self.annotations, "starts_at": self.starts_at, "ends_at": self.ends_at,
                "expires_at": self.expires_at, "fired": self.fired, "updated_at": self.updated_at,
                "deliveries": [d.to_dict() for d in self.deliveries]}


@dataclass(frozen=True)
class Attempt:
    key: str
    episode: int
    outlet: str
    step: str
    at: float
    ok: bool
    http_status: int | None
    error: str | None
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "episode": self.episode, "outlet": self.outlet, "step": self.step,
                "at": self.at, "ok": self.ok, "http_status": self.http_status, "error": self.error,
                "seconds": self.seconds}


@dataclass(frozen=True)
class Claim:
    """A step a sender has leased: send ``message`` to ``outlet`` at ``url``, then
    :meth:`Outbox.finish`."""

    key: str
    episode: int
    outlet: str
    url: str
    step: str
    token: str
    message: Message


@dataclass(frozen=True)
class Timing:
    """The delivery settings the outbox needs (from ``alerts.*``)."""

    retry_initial_seconds: float = 2.0
    retry_max_seconds: float = 300.0
    give_up_seconds: float = 86_400.0
    repeat_seconds: float = 600.0
    hold_seconds: float = 259_200.0
    lease_seconds: float = 60.0
    keep_seconds: float = 30 * 86_400.0

    def delay(self, failures: int) -> float:
        """Back-off after the ``failures``-th consecutive failure (1, 2, ...)."""
        return min(self.retry_initial_seconds * 2 ** min(max(failures - 1, 0), 60), self.retry_max_seconds)


def _step(outlet: str, told: str, status: str, last_ok_at: float | None, now: float,
          timing: Timing) -> str | None:
    """The next thing ``outlet`` must be told about an episode, or None."""
    if told == "":
        # Alertmanager takes a cleared alert directly (startsAt and endsAt); a webhook reader
        # is told it fired, then that it cleared
        return RESOLVED if status == RESOLVED and outlet == ALERTMANAGER else FIRING
    if told == FIRING and status == RESOLVED:
        return RESOLVED
    if (told == FIRING and status == FIRING and outlet == ALERTMANAGER and last_ok_at is not None
            and now - last_ok_at >= timing.repeat_seconds):
        return REPEAT
    return None


class Outbox:
    """The outbox file at ``path`` (created with its tables when missing)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._connect() as con:
                for statement in _SCHEMA:
                    con.execute(statement)
        except (OSError, sqlite3.Error) as exc:
            raise ChurnError(f"the alert outbox {self.path} cannot be opened: {exc}; set alerts.outbox "
                             "to a writable file") from None

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        con.row_factory = sqlite3.Row
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA busy_timeout=30000")
        return con

    # ------------------------------------------------------------------ producers
    def fire(self, key: str | None, labels: dict[str, Any], annotations: dict[str, Any] | None,
             outlets: dict[str, str], now: float, starts_at: float | None = None,
             ttl_seconds: float | None = None) -> Fired:
        """Record that the condition ``key`` (None: the labels' fingerprint) fires."""
        labels = clean_labels(labels)
        notes = clean_annotations(annotations)
        key = fingerprint(labels) if key is None else str(key)
        if not key or len(key) > MAX_KEY:
            raise ChurnError(f"an alert key must be 1 to {MAX_KEY} characters, got {len(key)}")
        unknown = set(outlets) - set(OUTLETS)
        if unknown:
            raise ChurnError(f"unknown alert outlet(s) {sorted(unknown)}; one of {', '.join(OUTLETS)}")
        expires = None if ttl_seconds is None else now + float(ttl_seconds)
        labels_text, notes_text = json.dumps(labels), json.dumps(notes)
        con = self._connect()
        try:
            con.execute("BEGIN IMMEDIATE")
            _expire(con, now)
            row = con.execute("SELECT episode, status, labels FROM conditions WHERE key = ? "
                              "ORDER BY episode DESC LIMIT 1", (key,)).fetchone()
            if row is not None and row["status"] == FIRING and row["labels"] == labels_text:
                episode, change = int(row["episode"]), "same"
                con.execute("UPDATE conditions SET annotations = ?, fired = fired + 1, updated_at = ?, "
                            "expires_at = COALESCE(?, expires_at) WHERE key = ? AND episode = ?",
                            (notes_text, now, expires, key, episode))
            else:
                change = "new"
                if row is not None and row["status"] == FIRING:  # other labels: a new episode
                    _clear(con, key, int(row["episode"]), now, now)
                    change = "relabelled"
                episode = (int(row["episode"]) + 1) if row is not None else 1
                con.execute("INSERT INTO conditions (key, episode, status, labels, annotations, starts_at, "
                            "expires_at, updated_at) VALUES (?, ?, 'firing', ?, ?, ?, ?, ?)",
                            (key, episode, labels_text, notes_text, now if starts_at is None else starts_at,
                             expires, now))
            for outlet, url in outlets.items():
                con.execute("INSERT OR IGNORE INTO deliveries (key, episode, outlet, url, step_since) "
                            "VALUES (?, ?, ?, ?, ?)", (key, episode, outlet, url, now))
            con.execute("COMMIT")
        finally:
            con.close()
        return Fired(key, episode, change)

    def resolve(self, key: str, now: float, ends_at: float | None = None) -> int | None:
        """Record that the condition ``key`` cleared; the episode resolved, None when it was
        not firing (nothing to do)."""
        con = self._connect()
        try:
            con.execute("BEGIN IMMEDIATE")
            _expire(con, now)
            row = con.execute("SELECT episode FROM conditions WHERE key = ? AND status = 'firing' "
                              "ORDER BY episode DESC LIMIT 1", (str(key),)).fetchone()
            episode = None
            if row is not None:
                episode = int(row["episode"])
                _clear(con, str(key), episode, now if ends_at is None else ends_at, now)
            con.execute("COMMIT")
        finally:
            con.close()
        return episode

    # ------------------------------------------------------------------ senders
    def claim(self, now: float, timing: Timing, limit: int = 100) -> list[Claim]:
        """Lease up to ``limit`` steps that are due at ``now``: the step of every open
        delivery out of back-off and not leased by another sender, oldest first; an episode
        waits until the earlier episodes of its key were delivered to that outlet (so a
        cleared episode's ``resolved`` never lands after the next one's ``firing``)."""
        con = self._connect()
        claims: list[Claim] = []
        try:
            con.execute("BEGIN IMMEDIATE")
            _expire(con, now)
            rows = con.execute(
                "SELECT d.*, c.status, c.labels, c.annotations, c.starts_at, c.ends_at, c.expires_at "
                "FROM deliveries d JOIN conditions c ON c.key = d.key AND c.episode = d.episode "
                "WHERE d.gave_up = 0 AND d.told != 'resolved' ORDER BY d.key, d.episode").fetchall()
            blocked: set[tuple[str, str]] = set()
            for r in rows:
                lane = (r["key"], r["outlet"])
                if lane in blocked:
                    continue
                blocked.add(lane)  # rows come oldest episode first: a later one of this lane waits
                step = _step(r["outlet"], r["told"], r["status"], r["last_ok_at"], now, timing)
                if step is None or (r["next_at"] is not None and r["next_at"] > now):
                    continue
                if r["lease_until"] is not None and r["lease_until"] > now:
                    continue
                if len(claims) >= limit:
                    break
                token = uuid.uuid4().hex
                con.execute("UPDATE deliveries SET lease_until = ?, lease_token = ? WHERE key = ? AND "
                            "episode = ? AND outlet = ?",
                            (now + timing.lease_seconds, token, r["key"], r["episode"], r["outlet"]))
                claims.append(Claim(r["key"], int(r["episode"]), r["outlet"], r["url"], step, token,
                                    _message(r, step, now, timing)))
            con.execute("COMMIT")
        finally:
            con.close()
        return claims

    def finish(self, claim: Claim, answer: Answer, started: float, now: float, timing: Timing) -> bool:
        """Record the attempt of ``claim`` and move its delivery on (told, or back-off); True when
        this failure gave the step up (``give_up_seconds`` after it was due)."""
        give_up = False
        con = self._connect()
        try:
            con.execute("BEGIN IMMEDIATE")
            con.execute("INSERT INTO attempts (key, episode, outlet, step, at, ok, http_status, error, "
                        "seconds) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (claim.key, claim.episode, claim.outlet, claim.step, started, int(answer.ok),
                         answer.status, answer.error, max(now - started, 0.0)))
            where = "WHERE key = ? AND episode = ? AND outlet = ? AND lease_token = ?"
            ids = (claim.key, claim.episode, claim.outlet, claim.token)
            if answer.ok:
                told = FIRING if claim.step == REPEAT else claim.step
                con.execute("UPDATE deliveries SET told = ?, failures = 0, next_at = NULL, lease_until = "
                            "NULL, lease_token = NULL, last_ok_at = ?, last_error = NULL, step_since = ? "
                            f"{where}",
                            (told, now, now, *ids))
            else:
                row = con.execute(f"SELECT failures, step_since FROM deliveries {where}", ids).fetchone()
                if row is not None:
                    failures = int(row["failures"]) + 1
                    late = now - float(row["step_since"]) >= timing.give_up_seconds
                    give_up = claim.step != REPEAT and late
                    con.execute("UPDATE deliveries SET failures = ?, next_at = ?, lease_until = NULL, "
                                f"lease_token = NULL, last_error = ?, gave_up = ? {where}",
                                (failures, now + timing.delay(failures), answer.error, int(give_up), *ids))
            con.execute("COMMIT")
        finally:
            con.close()
        return give_up

    def next_due(self, now: float, timing: Timing) -> float | None:
        """When the earliest open step becomes due (``now`` or later), None when there is none:
        back-offs, leases, Alertmanager re-posts and ``ttl`` expiries."""
        with self._closing() as con:
            rows = con.execute(
                "SELECT d.outlet, d.told, d.next_at, d.lease_until, d.last_ok_at, c.status, c.expires_at "
                "FROM deliveries d JOIN conditions c ON c.key = d.key AND c.episode = d.episode "
                "WHERE d.gave_up = 0 AND d.told != 'resolved'").fetchall()
        best: float | None = None
        for r in rows:
            if r["told"] == FIRING and r["status"] == FIRING:
                candidates = [r["expires_at"]]
                if r["outlet"] == ALERTMANAGER and r["last_ok_at"] is not None:
                    candidates.append(r["last_ok_at"] + timing.repeat_seconds)
            else:
                candidates = [max(r["next_at"] or now, r["lease_until"] or now)]
            for when in candidates:
                if when is not None:
                    best = max(when, now) if best is None else min(best, max(when, now))
        return best

    def pending(self, episodes: Iterable[tuple[str, int]] | None = None, before: float | None = None) -> int:
        """Open steps (re-posts not counted) of ``episodes`` (default: all) that are not given up;
        with ``before``, only those that may still run before that time (out of back-off by then)."""
        wanted = None if episodes is None else set(episodes)
        with self._closing() as con:
            rows = con.execute(
                "SELECT d.key, d.episode, d.outlet, d.told, d.next_at, c.status, c.expires_at "
                "FROM deliveries d JOIN conditions c ON c.key = d.key AND c.episode = d.episode "
                "WHERE d.gave_up = 0 AND d.told != 'resolved'").fetchall()
        count = 0
        for r in rows:
            if wanted is not None and (r["key"], r["episode"]) not in wanted:
                continue
            if r["told"] == FIRING and r["status"] == FIRING:
                continue  # told; a re-post or a ttl expiry may follow, nothing is owed now
            if before is not None and r["next_at"] is not None and r["next_at"] > before:
                continue
            count += 1
        return count

    def prune(self, now: float, timing: Timing) -> int:
        """Drop resolved episodes (and their deliveries and attempts) that ended more than
        ``keep_seconds`` ago and owe no outlet anything; how many."""
        cutoff = now - timing.keep_seconds
        con = self._connect()
        try:
            con.execute("BEGIN IMMEDIATE")
            old = con.execute(
                "SELECT key, episode FROM conditions c WHERE status = 'resolved' AND ends_at < ? AND NOT "
                "EXISTS (SELECT 1 FROM deliveries d WHERE d.key = c.key AND d.episode = c.episode AND "
                "d.gave_up = 0 AND d.told != 'resolved')", (cutoff,)).fetchall()
            for r in old:
                for table in ("attempts", "deliveries", "conditions"):
                    con.execute(f"DELETE FROM {table} WHERE key = ? AND episode = ?",
                                (r["key"], r["episode"]))
            con.execute("COMMIT")
        finally:
            con.close()
        return len(old)

    # ------------------------------------------------------------------ readers
    def conditions(self, now: float | None = None, all_episodes: bool = False,
                   key: str | None = None) -> list[Condition]:
        """Conditions, newest change first: the latest episode of each key (every episode with
        ``all_episodes``), only ``key`` when given. ``now`` applies ``ttl`` expiries first."""
        if now is not None:
            con = self._connect()
            try:
                con.execute("BEGIN IMMEDIATE")
                _expire(con, now)
                con.execute("COMMIT")
            finally:
                con.close()
        with self._closing() as con:
            where, args = [], []
            if not all_episodes:
                where.append("episode = (SELECT MAX(episode) FROM conditions c2 WHERE c2.key = "
                             "conditions.key)")
            if key is not None:
                where.append("key = ?")
                args.append(key)
            sql = "SELECT * FROM conditions" + (f" WHERE {' AND '.join(where)}" if where else "")
            rows = con.execute(sql + " ORDER BY updated_at DESC, key, episode DESC", args).fetchall()
            counts = {(r["key"], r["episode"], r["outlet"]): int(r["n"]) for r in con.execute(
                "SELECT key, episode, outlet, COUNT(*) AS n FROM attempts GROUP BY key, episode, outlet")}
            deliveries: dict[tuple[str, int], list[Delivery]] = {}
            for d in con.execute("SELECT * FROM deliveries ORDER BY outlet"):
                ids = (d["key"], d["episode"])
                deliveries.setdefault(ids, []).append(Delivery(
                    d["outlet"], d["url"], d["told"], int(d["failures"]), d["next_at"], d["last_ok_at"],
                    d["last_error"], bool(d["gave_up"]), counts.get((*ids, d["outlet"]), 0)))
        return [Condition(r["key"], int(r["episode"]), r["status"], json.loads(r["labels"]),
                          json.loads(r["annotations"]), r["starts_at"], r["ends_at"], r["expires_at"],
                          int(r["fired"]), r["updated_at"], _of(deliveries, r))
                for r in rows]

    def attempts(self, key: str | None = None, limit: int | None = None) -> list[Attempt]:
        """Recorded attempts in order (only ``key``'s when given; the newest ``limit``)."""
        with self._closing() as con:
            sql, args = "SELECT * FROM attempts", []
            if key is not None:
                sql, args = sql + " WHERE key = ?", [key]
            sql += " ORDER BY id DESC" + (f" LIMIT {int(limit)}" if limit else "")
            rows = con.execute(sql, args).fetchall()
        return [Attempt(r["key"], int(r["episode"]), r["outlet"], r["step"], r["at"], bool(r["ok"]),
                        r["http_status"], r["error"], r["seconds"]) for r in reversed(rows)]

    def _closing(self):
        return _Closing(self._connect())


class _Closing:
    """``with`` for a connection that closes it (sqlite3's own ``with`` only commits)."""

    def __init__(self, con: sqlite3.Connection) -> None:
        self.con = con

    def __enter__(self) -> sqlite3.Connection:
        return self.con

    def __exit__(self, *exc: object) -> None:
        self.con.close()


def _of(deliveries: dict[tuple[str, int], list[Delivery]], row: sqlite3.Row) -> tuple[Delivery, ...]:
    return tuple(deliveries.get((row["key"], row["episode"]), ()))


def _clear(con: sqlite3.Connection, key: str, episode: int, ends_at: float, now: float) -> None:
    """Resolve an episode; its outlets owe a ``resolved`` now (a pending back-off is reset)."""
    con.execute("UPDATE conditions SET status = 'resolved', ends_at = ?, updated_at = ? WHERE key = ? AND "
                "episode = ?", (ends_at, now, key, episode))
    con.execute("UPDATE deliveries SET step_since = ?, failures = 0, next_at = NULL WHERE key = ? AND "
                "episode = ? AND told = 'firing'", (now, key, episode))


def _expire(con: sqlite3.Connection, now: float) -> None:
    """Resolve the firing episodes whose ``ttl`` ran out (at their ``expires_at``)."""
    for r in con.execute("SELECT key, episode, expires_at FROM conditions WHERE status = 'firing' AND "
                         "expires_at IS NOT NULL AND expires_at <= ?", (now,)).fetchall():
        _clear(con, r["key"], int(r["episode"]), float(r["expires_at"]), now)


def _message(row: sqlite3.Row, step: str, now: float, timing: Timing) -> Message:
    if step == RESOLVED:
        status, ends = RESOLVED, row["ends_at"]
    elif row["outlet"] == ALERTMANAGER:  # firing: Alertmanager holds it this long without news
        status, ends = FIRING, now + timing.hold_seconds
        if row["expires_at"] is not None:
            ends = min(ends, float(row["expires_at"]))
    else:
        status, ends = FIRING, None
    return Message(row["key"], int(row["episode"]), status, json.loads(row["labels"]),
                   json.loads(row["annotations"]), float(row["starts_at"]), ends)


__all__ = ["FIRING", "REPEAT", "RESOLVED", "Attempt", "Claim", "Condition", "Delivery", "Fired", "Outbox",
           "Timing", "clean_labels", "fingerprint"]
