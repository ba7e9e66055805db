"""Ctrl-C that never lands inside xgboost's ctypes callbacks, SQLAlchemy or a run's start or end.

Python's own SIGINT handler raises KeyboardInterrupt wherever the main thread is. Inside
Python code that C calls through ctypes (:data:`FRAGILE_CALLBACKS`: xgboost's ``DataIter``
callbacks, which catch Exception only) ctypes drops it and xgboost then frees its iterator
state twice: the process aborts, segfaults or hangs (24 of 30 Ctrl-C during
``XGBClassifier.fit``, measured here). :class:`SafeInterrupt` raises it
:data:`RETRY_INTERRUPT_S` s later instead, outside the callback (none of 30). The same holds
inside SQLAlchemy (:data:`FRAGILE_MODULES`) and inside an :func:`uninterruptible` block (a
run being created or ended), so Ctrl-C never leaves a run RUNNING.

``churn`` runs every command inside a :class:`SafeInterrupt` (:func:`mlflow_churn.cli.main`);
``churn demo --server`` extends it (:class:`mlflow_churn.demo_server.PromptStop`) with a
watchdog that stops its children and ends the process within seconds. Servers (uvicorn)
install their own handlers while they run.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

#: (module, class, function) of Python code that C calls through ctypes and that must not see a
#: KeyboardInterrupt (measured with xgboost 3.2 during XGBClassifier.fit)
FRAGILE_CALLBACKS = (("xgboost.core", "DataIter", "_next_wrapper"),
                     ("xgboost.core", "DataIter", "_reset_wrapper"),
                     ("xgboost.core", None, "_log_callback"))
#: modules inside which a KeyboardInterrupt is not raised either: SQLAlchemy cut in a flush or a
#: commit leaves its connection's transaction open, SQLite's write lock stays held and the
#: clean-up that ends the run FAILED fails "database is locked" (CI: a tuning trial left RUNNING)
FRAGILE_MODULES = ("sqlalchemy.",)
#: seconds between two tries to interrupt the main thread while it is inside a fragile callback
RETRY_INTERRUPT_S = 0.02

#: how many :func:`uninterruptible` blocks the current context is inside
_uninterruptible: ContextVar[int] = ContextVar("churn_uninterruptible", default=0)


@contextmanager
def uninterruptible() -> Iterator[None]:
    """A block that a :class:`SafeInterrupt` signal never cuts in two: its KeyboardInterrupt
    lands just after the block instead. For a call whose effect the caller must learn to undo
    it, e.g. creating a run on the tracking server (a Ctrl-C after the server made it and
    before the caller has its id leaves it RUNNING for ever) or ending one."""
    token = _uninterruptible.set(_uninterruptible.get() + 1)
    try:
        yield
    finally:
        _uninterruptible.reset(token)


def in_fragile_callback(frame: Any) -> bool:
    """True when ``frame`` or a frame below it runs one of :data:`FRAGILE_CALLBACKS` or code
    of :data:`FRAGILE_MODULES`."""
    codes = set()
    for module, owner, name in FRAGILE_CALLBACKS:
        mod = sys.modules.get(module)
        holder = getattr(mod, owner, None) if owner else mod
        code = getattr(getattr(holder, name, None), "__code__", None)
        if code is not None:
            codes.add(code)
    while frame is not None:
        if frame.f_code in codes or frame.f_globals.get("__name__", "").startswith(FRAGILE_MODULES):
            return True
        frame = frame.f_back
    return False


class SafeInterrupt:
    """While the block runs (main thread only; elsewhere a no-op), each of ``signals`` raises
    KeyboardInterrupt in the main thread, once, outside :data:`FRAGILE_CALLBACKS` and
    :data:`FRAGILE_MODULES` (a signal that finds the main thread inside one, or inside an
    :func:`uninterruptible` block, is raised again a moment later, by SIGINT to the main
    thread, until it lands outside). The previous handlers come back at the end."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGINT,)) -> None:
        self.signals = signals
        self._active = False
        self._raised = False
        self._retrying = False
        self._retry_lock = threading.Lock()
        self._saved: dict[int, object] = {}

    def __enter__(self) -> SafeInterrupt:
        if threading.current_thread() is not threading.main_thread():
            return self
        handled = set(self.signals) | {signal.SIGINT}  # the retry pokes with SIGINT
        self._saved = {s: signal.signal(s, self._handler) for s in handled}
        self._active = True
        return self

    def __exit__(self, *_exc: object) -> None:
        if not self._active:
            return
        self._active = False
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]

    def _handler(self, signum: int, frame: Any) -> None:
        self._interrupt(signum, frame)

    def _interrupt(self, signum: int, frame: Any) -> None:
        """Raise KeyboardInterrupt here, or a moment later when ``frame`` is fragile."""
        if self._raised:
            return
        if in_fragile_callback(frame) or _uninterruptible.get() > 0:
            self._retry_later()
            return
        self._raised = True
        raise KeyboardInterrupt(f"signal {signum}")

    def _retry_later(self) -> None:
        with self._retry_lock:
            if self._retrying:
                return
            self._retrying = True
        main = threading.main_thread().ident

        def poke() -> None:
            while self._active and not self._raised:
                time.sleep(RETRY_INTERRUPT_S)
                if self._active and not self._raised and main is not None:
                    signal.pthread_kill(main, signal.SIGINT)

        threading.Thread(target=poke, name="safe-interrupt-retry", daemon=True).start()


__all__ = ["FRAGILE_CALLBACKS", "FRAGILE_MODULES", "RETRY_INTERRUPT_S", "SafeInterrupt",
           "in_fragile_callback",
           "uninterruptible"]
