"""Helpers shared by every ``churn`` sub-command: config loading, dates, progress."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import date, datetime
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console

from mlflow_churn.config import ChurnConfig, load_config
from mlflow_churn.errors import ChurnError
from mlflow_churn.jsonable import dumps
from mlflow_churn.times import utc

T = TypeVar("T")

#: Width of a console whose output is not a terminal (a pipe, a file, a test's capture). Rich
#: would cut tables to 80 columns ("monthl…"); this wide, so `churn features list | grep
#: monthly_usage_v2` finds the name. Tables are not expanded, so nothing is padded to it.
PIPE_WIDTH = 10_000


def make_console(stderr: bool = False) -> Console:
    """A rich console: the terminal's width on a terminal, :data:`PIPE_WIDTH` otherwise."""
    probe = Console(stderr=stderr)
    return probe if probe.is_terminal else Console(stderr=stderr, width=PIPE_WIDTH)


console = make_console()
err_console = make_console(stderr=True)


def config_default(key: str) -> Any:
    """The documented default of config key ``section.key`` (from :class:`ChurnConfig`)."""
    model: Any = ChurnConfig
    value: Any = None
    for part in key.split("."):
        info = model.model_fields[part]
        value = info.default_factory() if info.default_factory is not None else info.default
        model = type(value)
    return value


def from_config(text: str, key: str, secret: bool = False) -> str:
    """Help text of an option that overrides config ``key``, with that key's default shown,
    e.g. ``Port. [default: 8080, config serving.port]`` (escaped for typer's rich markup)."""
    value = config_default(key)
    shown = "unset" if value is None else ("set" if secret else value)
    return f"{text} \\[default: {shown}, config {key}]"


#: ``--json`` of every listing and status command
JSON_OPTION = typer.Option(False, "--json", help="Print the result as JSON (for scripts) instead of tables.")


def engine_option(spark_does: str) -> Any:
    """``--engine local|spark`` of a command with a Spark engine (``spark_does``: what Spark runs)."""
    return typer.Option("local", "--engine", help=f"local (this machine) or spark ({spark_does}).")


#: ``--spark-master`` of every command with ``--engine spark``
SPARK_MASTER_OPTION = typer.Option(
    None, "--spark-master", help="engine spark: Spark master URL, e.g. spark://HOST:7077, yarn "
    "(default local[*]: this machine).")


def staging_option(staged: str) -> Any:
    """``--staging`` of a command with ``--engine spark`` (``staged``: what is staged there)."""
    return typer.Option(
        None, "--staging", help="engine spark: directory (path or URI) the driver and every executor "
        f"can read, for {staged} (default: a local temporary directory).")


def print_json(data: Any) -> None:
    """``data`` as indented JSON on stdout (dates and paths as strings, NaN as null)."""
    typer.echo(dumps(data))


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
    try:
        parsed = utc(parsed, option)
    except OverflowError:
        raise ChurnError(f"{option} must lie between the years 1900 and 9000, got '{value}'") from None
    if not 1900 <= parsed.year <= 9000:  # far outside any data: would overflow windows and horizons
        raise ChurnError(f"{option} must lie between the years 1900 and 9000, got '{value}'")
    return parsed


def as_of_or_latest(cfg: ChurnConfig, value: str | None, option: str = "--as-of") -> datetime:
    """``value`` parsed as :func:`parse_datetime` (naming ``option`` when bad), or, when not
    given, the newest event of the workspace data (``data.bounds.latest_as_of``): the
    one default ``as_of`` of every command."""
    if opt_str(value):
        return parse_datetime(str(value), option)
    from mlflow_churn.data.bounds import latest_as_of

    try:
        return latest_as_of(cfg.data_dir)
    except ChurnError as exc:
        raise ChurnError(f"{exc}; or pass {option}") from None


def parse_version(value: str, option: str) -> str:
    """A registered model version number (ASCII digits, >= 1) or a ChurnError naming ``option``."""
    text = str(value).strip()
    if not (text.isascii() and text.isdigit() and int(text) >= 1 and len(text) <= 18):
        raise ChurnError(f"{option} must be a version number such as 3, got '{value}'; "
                         "see `churn canary status` for the versions")
    return str(int(text))


def check_number(value: float | None, option: str, low: float | None = None,
                 high: float | None = None) -> float | None:
    """``value`` if it is finite and within [low, high] (None passes), else a ChurnError."""
    if value is None:
        return None
    bad = not math.isfinite(value) or (low is not None and value < low) or (high is not None and value > high)
    if bad:
        span = "" if low is None and high is None else (
            f" in [{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]")
        raise ChurnError(f"{option} must be a finite number{span}, got {value}")
    return value


def writable_dir(value: str, option: str) -> Path:
    """``value`` as a directory this process can write (created if missing), or a ChurnError."""
    path = Path(value)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ChurnError(f"{option} {value} cannot be created ({exc.strerror or exc}); pass a writable "
                         "directory") from None
    if not path.is_dir() or not os.access(path, os.W_OK | os.X_OK):
        raise ChurnError(f"{option} {value} is not a writable directory; pass a writable directory")
    return path


@contextmanager
def rich_progress(label: str, total: int) -> Iterator[Callable[[int], None]]:
    """A :class:`mlflow_churn.progress.ProgressFactory` drawing a rich bar on stderr."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=err_console, transient=False) as bar:
        task = bar.add_task(label, total=max(total, 1))
        yield lambda n=1: bar.advance(task, n)


def with_progress(label: str, total: int, enabled: bool, work: Callable[[Callable[[Any], None]], T]) -> T:
    """Run ``work(tick)`` under a :func:`rich_progress` bar of ``total`` steps; each call of
    ``tick`` advances it one step, whatever it is passed (a day index, a step name)."""
    if not enabled:
        return work(lambda _i: None)
    with rich_progress(label, total) as advance:
        return work(lambda _i: advance(1))


def progress_arg(enabled: bool):
    """What a command passes as ``progress=`` to a core function: a rich bar or nothing."""
    return rich_progress if enabled else None
