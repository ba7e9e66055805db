"""Progress callbacks that core functions take; the shells decide how progress looks.

A core function that runs long takes ``progress``: a :class:`ProgressFactory`, i.e. a
callable ``(label, total) -> context manager yielding tick(n)``, where ``tick(n)`` advances
the work by ``n`` units (trials, chunks, rows). The CLI passes a rich progress bar
(:func:`mlflow_churn.cli_common.rich_progress`); tests and libraries pass nothing.
For convenience ``progress`` may also be a bool: ``False`` / ``None`` = silent, ``True`` =
:func:`log_progress` (a line on the ``mlflow_churn`` logger every 10 %), so core code never
imports a presentation library.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

Tick = Callable[[int], None]
_log = logging.getLogger("mlflow_churn")


class ProgressFactory(Protocol):
    """``factory(label, total)`` -> a context manager whose value is ``tick(n)``."""

    def __call__(self, label: str, total: int) -> AbstractContextManager[Tick]: ...


@contextmanager
def silent(label: str, total: int) -> Iterator[Tick]:
    """No progress at all."""
    yield lambda _n=1: None


@contextmanager
def log_progress(label: str, total: int) -> Iterator[Tick]:
    """One log line (INFO, logger ``mlflow_churn``) per 10 % of ``total`` done."""
    state = {"done": 0, "shown": 0}
    total = max(int(total), 1)

    def tick(n: int = 1) -> None:
        state["done"] += n
        tenth = min(10, state["done"] * 10 // total)
        if tenth > state["shown"]:
            state["shown"] = tenth
            _log.info("%s: %d/%d (%d%%)", label, min(state["done"], total), total, tenth * 10)

    yield tick


ProgressArg = ProgressFactory | bool | None


def resolve(progress: ProgressArg) -> ProgressFactory:
    """The factory behind a ``progress`` argument (see the module doc)."""
    if progress is None or progress is False:
        return silent
    if progress is True:
        return log_progress
    return progress


__all__ = ["ProgressArg", "ProgressFactory", "Tick", "log_progress", "resolve", "silent"]
