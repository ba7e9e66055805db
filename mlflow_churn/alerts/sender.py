"""Delivering the outbox: one sender per process and outbox file, and the producer API.

:func:`fire` / :func:`resolve` record a condition in the outbox and wake this process's
sender; they return at once (a producer never waits on a receiver). The sender is a daemon
thread, started by the first :func:`fire` (or by :func:`start_sender`, which long-running
processes call at start so that what earlier processes left in the outbox is delivered). It
claims due steps, POSTs them, records every attempt, retries failures with exponential
back-off (``alerts.retry_initial_seconds`` doubled up to ``alerts.retry_max_seconds``; a step
failing for ``alerts.give_up_hours`` is given up, recorded and logged), re-posts firing
alerts to Alertmanager every ``alerts.repeat_seconds``, and looks at the outbox every
``alerts.poll_seconds`` for rows other processes wrote. When the process exits it waits up to
``alerts.flush_wait_seconds`` for the alerts *it* raised; what is still undelivered stays in
the outbox for the next process (``churn alerts flush``, any long-running churn process).
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from mlflow_churn.alerts.outbox import MAX_KEY, Claim, Fired, Outbox, Timing, clean_labels
from mlflow_churn.alerts.outlets import ALERTMANAGER, WEBHOOK, alertmanager_api, send
from mlflow_churn.config import ChurnConfig
from mlflow_churn.errors import ChurnError
from mlflow_churn.times import utc

_log = logging.getLogger(__name__)


def outbox_path(cfg: ChurnConfig) -> Path:
    """``alerts.outbox``, else ``<workspace>/alerts.db``."""
    return Path(cfg.alerts.outbox) if cfg.alerts.outbox else cfg.workspace / "alerts.db"


_warned_legacy = False


def outlets(cfg: ChurnConfig) -> dict[str, str]:
    """Outlet name -> the URL it is POSTed to: ``alertmanager`` (``alerts.alertmanager_url``, else
    the deprecated ``hooks.alert_url``, as its ``/api/v2/alerts`` endpoint) and ``webhook``
    (``alerts.webhook_url``). Empty when none is configured (alerts are then only recorded)."""
    global _warned_legacy
    out = {}
    url = cfg.alerts.alertmanager_url
    if not url and cfg.hooks.alert_url:
        url = cfg.hooks.alert_url
        if not _warned_legacy:
            _warned_legacy = True
            _log.warning("hooks.alert_url is deprecated: it is read as alerts.alertmanager_url (the body it "
                         "always had is Alertmanager's API v2 list); set alerts.alertmanager_url instead")
    if url:
        out[ALERTMANAGER] = alertmanager_api(url)
    if cfg.alerts.webhook_url:
        out[WEBHOOK] = cfg.alerts.webhook_url
    return out


def timing(cfg: ChurnConfig) -> Timing:
    a = cfg.alerts
    return Timing(retry_initial_seconds=a.retry_initial_seconds, retry_max_seconds=a.retry_max_seconds,
                  give_up_seconds=a.give_up_hours * 3600.0, repeat_seconds=a.repeat_seconds,
                  hold_seconds=a.hold_hours * 3600.0, lease_seconds=a.timeout_seconds + 30.0,
                  keep_seconds=a.keep_days * 86_400.0)


class Sender:
    """Delivers the steps of ``outbox`` that are due, on a daemon thread (see module doc)."""

    PRUNE_EVERY = 3600.0

    def __init__(self, outbox: Outbox, timing: Timing, timeout: float = 5.0, poll_seconds: float = 5.0,
                 flush_wait_seconds: float = 10.0, clock: Callable[[], float] = time.time) -> None:
        self.outbox, self.timing, self.timeout = outbox, timing, timeout
        self.poll_seconds, self.flush_wait_seconds, self.clock = poll_seconds, flush_wait_seconds, clock
        self.pid = os.getpid()
        self._mine: set[tuple[str, int]] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pruned_at = 0.0

    # ------------------------------------------------------------------ the work
    def deliver_due(self) -> int:
        """Send every step due now, once each; how many attempts were made."""
        claims = self.outbox.claim(self.clock(), self.timing)
        for claim in claims:
            self._attempt(claim)
        return len(claims)

    def _attempt(self, claim: Claim) -> None:
        started = self.clock()
        answer = send(claim.outlet, claim.url, claim.message, self.timeout)
        gave_up = self.outbox.finish(claim, answer, started, self.clock(), self.timing)
        name = claim.message.labels.get("alertname", "")
        if answer.ok:
            _log.info("alert %s (%s) %s delivered to %s", name, claim.key, claim.step, claim.outlet)
        elif gave_up:
            _log.error("alert %s (%s) %s to %s given up after alerts.give_up_hours of failures: %s", name,
                       claim.key, claim.step, claim.outlet, answer.error)
        else:
            _log.warning("alert %s (%s) %s to %s failed: %s (retried with back-off)", name, claim.key,
                         claim.step, claim.outlet, answer.error)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                if self.deliver_due():
                    continue
                now = self.clock()
                if now - self._pruned_at >= self.PRUNE_EVERY:
                    self._pruned_at = now
                    self.outbox.prune(now, self.timing)
                nxt = self.outbox.next_due(now, self.timing)
                wait = self.poll_seconds if nxt is None else min(self.poll_seconds, max(nxt - now, 0.01))
            except Exception:  # a broken outbox file or a bug: log it, keep the thread
                _log.exception("alert sender of %s failed; retrying", self.outbox.path)
                wait = self.poll_seconds
            self._wake.wait(wait)
            self._wake.clear()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Sender:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(target=self._loop, name="alert-sender", daemon=True)
                self._thread.start()
        self.wake()
        return self

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------------ waiting
    def note(self, key: str, episode: int) -> None:
        """Remember an episode this process fired or resolved (:meth:`drain` waits for them)."""
        with self._lock:
            self._mine.add((key, episode))

    def drain(self, timeout: float, mine_only: bool = True) -> int:
        """Wait up to ``timeout`` seconds until the steps owed (of the episodes this process
        raised, or all) are delivered or given up; returns how many are still owed. Returns
        early when what is left cannot run before the deadline (a back-off past it)."""
        with self._lock:
            episodes = set(self._mine) if mine_only else None
        if episodes is not None and not episodes:
            return 0
        self.start()
        deadline = time.monotonic() + max(timeout, 0.0)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.outbox.pending(episodes, before=self.clock() + remaining):
                return self.outbox.pending(episodes)
            time.sleep(min(0.05, remaining))

    def _at_exit(self) -> None:
        try:
            left = self.drain(self.flush_wait_seconds)
            if left:
                _log.warning("%d alert message(s) not delivered yet; they stay in the outbox %s for the "
                             "next churn process (`churn alerts flush`, `churn alerts list`)", left,
                             self.outbox.path)
        except Exception:  # the interpreter is going away: never turn an exit into a traceback
            _log.exception("alert sender: the flush at exit failed")
        finally:
            self.stop(timeout=1.0)


_SENDERS: dict[Path, Sender] = {}
_SENDERS_LOCK = threading.Lock()


def sender(cfg: ChurnConfig) -> Sender:
    """This process's sender of ``cfg``'s outbox (created and started on first use, with a
    bounded flush at exit)."""
    path = outbox_path(cfg).resolve()
    with _SENDERS_LOCK:
        found = _SENDERS.get(path)
        if found is None or found.pid != os.getpid():  # a forked child starts its own
            a = cfg.alerts
            found = Sender(Outbox(path), timing(cfg), a.timeout_seconds, a.poll_seconds, a.flush_wait_seconds)
            _SENDERS[path] = found
            atexit.register(found._at_exit)
    return found.start()


def start_sender(cfg: ChurnConfig) -> Sender:
    """Start delivering ``cfg``'s outbox in this process now (long-running processes call it at
    start: what earlier processes left undelivered goes out, Alertmanager re-posts happen)."""
    return sender(cfg)


def stop_sender(cfg: ChurnConfig, wait: float | None = None) -> int:
    """Stop this process's sender of ``cfg``'s outbox after waiting up to ``wait`` seconds
    (default ``alerts.flush_wait_seconds``) for the alerts this process raised; how many
    steps are still owed (they stay in the outbox)."""
    path = outbox_path(cfg).resolve()
    with _SENDERS_LOCK:
        found = _SENDERS.pop(path, None)
    if found is None:
        return 0
    left = found.drain(cfg.alerts.flush_wait_seconds if wait is None else wait)
    found.stop()
    atexit.unregister(found._at_exit)
    return left


def _seconds(value: datetime | float | None, what: str) -> float | None:
    if value is None or isinstance(value, int | float):
        return value
    return utc(value, what).timestamp()


def fire(cfg: ChurnConfig, key: str | None, labels: dict[str, Any], annotations: dict[str, Any] | None = None,
         *, starts_at: datetime | float | None = None, ttl_seconds: float | None = None,
         now: float | None = None) -> Fired | None:
    """Record that condition ``key`` fires (None: the key is the labels' fingerprint) and wake
    the sender; returns at once. Firing what already fires with the same labels sends nothing
    new. ``ttl_seconds``: the condition clears by itself that long after (an event). Labels
    need ``alertname``; empty ones are dropped. A bad label raises ChurnError; an outbox that
    cannot be written is logged (error) and gives None: an alert never fails the work that
    raised it."""
    clean_labels(labels)  # bad input is the caller's bug: raised before anything is recorded
    if key is not None and not 0 < len(str(key)) <= MAX_KEY:
        raise ChurnError(f"an alert key must be 1 to {MAX_KEY} characters, got {len(str(key))}")
    try:
        s = sender(cfg)
        fired = s.outbox.fire(key, labels, annotations, outlets(cfg), time.time() if now is None else now,
                              _seconds(starts_at, "starts_at"), ttl_seconds)
    except (ChurnError, OSError) as exc:
        _log.error("alert %s not recorded: %s", labels.get("alertname"), exc)
        return None
    except Exception as exc:  # sqlite3.Error and kin
        _log.error("alert %s not recorded: %s: %s", labels.get("alertname"), type(exc).__name__, exc)
        return None
    s.note(fired.key, fired.episode)
    s.wake()
    return fired


def resolve(cfg: ChurnConfig, key: str, *, ends_at: datetime | float | None = None,
            now: float | None = None) -> int | None:
    """Record that condition ``key`` cleared and wake the sender; the episode resolved, None
    when it was not firing (or the outbox cannot be written: logged)."""
    try:
        s = sender(cfg)
        episode = s.outbox.resolve(key, time.time() if now is None else now, _seconds(ends_at, "ends_at"))
    except (ChurnError, OSError) as exc:
        _log.error("alert %s not resolved: %s", key, exc)
        return None
    except Exception as exc:  # resolving is best effort beside the caller's work: logged, never raised
        _log.error("alert %s not resolved: %s: %s", key, type(exc).__name__, exc)
        return None
    if episode is not None:
        s.note(key, episode)
        s.wake()
    return episode


def flush(cfg: ChurnConfig, timeout: float | None = None, mine_only: bool = False) -> int:
    """Deliver what the outbox owes (all of it, or only what this process raised), waiting up
    to ``timeout`` seconds (default ``alerts.flush_wait_seconds``); how many steps are still
    owed (they stay in the outbox)."""
    s = sender(cfg)
    s.wake()
    return s.drain(cfg.alerts.flush_wait_seconds if timeout is None else timeout, mine_only=mine_only)


__all__ = ["Sender", "fire", "flush", "outbox_path", "outlets", "resolve", "sender", "start_sender",
           "stop_sender", "timing"]
