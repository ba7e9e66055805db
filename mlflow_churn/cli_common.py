"""Helpers shared by every ``churn`` sub-command: config loading, dates, progress."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, date, datetime
from typing import Any, TypeVar

import typer
from rich.console import Console

from mlflow_churn.config import ChurnConfig, load_config
from mlflow_churn.errors import ChurnError

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


def print_json(data: Any) -> None:
    """``data`` as indented JSON on stdout (dates and paths as strings, NaN as null)."""
    import json
    import math

    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {str(k): clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [clean(v) for v in value]
        return value

    def other(value: Any) -> Any:  # numpy scalars -> numbers; dates, paths -> text
        return clean(value.item()) if hasattr(value, "item") and callable(value.item) else str(value)

    typer.echo(json.dumps(clean(data), indent=2, default=other))


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
