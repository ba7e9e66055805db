"""Helpers shared by every ``churn`` sub-command: config loading, dates, progress."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime
from typing import Any, TypeVar

import typer
from rich.console import Console

from mlflow_churn.config import ChurnConfig, load_config
from mlflow_churn.errors import ChurnError

T = TypeVar("T")
console = Console()
err_console = Console(stderr=True)


def opt_str(value: str | None) -> str | None:
    """MLproject passes unset string parameters as ''; treat that as unset."""
    return value or None


def get_config(ctx: typer.Context, overrides: dict | None = None) -> ChurnConfig:
    """Load the config named by the root options, with command-level overrides."""
    root = ctx.find_root().obj or {}
    return load_config(root.get("config"), root.get("workspace"), overrides)


def parse_date(value: str, option: str) -> date:
    """Parse YYYY-MM-DD or raise a ChurnError naming ``option``."""
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise ChurnError(f"{option} must be a date like 2026-01-31, got '{value}'") from None


def parse_datetime(value: str, option: str) -> datetime:
    """Parse an ISO date or datetime as tz-aware UTC, or raise a ChurnError naming ``option``."""
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ChurnError(
            f"{option} must be an ISO date or time like 2026-03-01 or 2026-03-01T12:00Z, got '{value}'"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def with_progress(label: str, total: int, enabled: bool, work: Callable[[Callable[[Any], None]], T]) -> T:
    """Run ``work(tick)`` under a rich progress bar of ``total`` steps."""
    if not enabled:
        return work(lambda _i: None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=err_console, transient=False) as bar:
        task = bar.add_task(label, total=total)
        return work(lambda _i: bar.advance(task))


@contextmanager
def rich_progress(label: str, total: int) -> Iterator[Callable[[int], None]]:
    """A :class:`mlflow_churn.progress.ProgressFactory` drawing a rich bar on stderr."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=err_console, transient=False) as bar:
        task = bar.add_task(label, total=max(total, 1))
        yield lambda n=1: bar.advance(task, n)


def progress_arg(enabled: bool):
    """What a command passes as ``progress=`` to a core function: a rich bar or nothing."""
    return rich_progress if enabled else None
