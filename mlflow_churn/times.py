"""Time is UTC and tz-aware everywhere: the helpers that make it so."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, time, timedelta

from mlflow_churn.errors import ChurnError

_DURATION = re.compile(r"(\d+(?:\.\d+)?)([dhms])")
_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}


def utc(ts: datetime, what: str = "as_of") -> datetime:
    """``ts`` as a tz-aware UTC datetime (a naive one is taken to be UTC already).
    ChurnError naming ``what`` when ``ts`` is not a datetime."""
    if not isinstance(ts, datetime):
        raise ChurnError(f"{what} must be a datetime, got {ts!r}")
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


def midnight(day: date) -> datetime:
    """Midnight at the start of ``day``, UTC (tz-aware). A datetime counts as its own calendar
    date: its time and zone are dropped, not converted."""
    return datetime.combine(day, time(0), tzinfo=UTC)


def parse_duration(value: str, what: str = "duration", zero: bool = False) -> timedelta:
    """``1h``, ``30m``, ``1h30m``, ``90s``, ``1.5s``, ``1d`` -> timedelta, at most a year;
    ChurnError naming ``what`` and the value otherwise (``0s`` only with ``zero``)."""
    text = str(value).strip().lower()
    if not text or _DURATION.sub("", text) != "":
        raise ChurnError(f"{what} must be a duration like 1h, 30m, 1h30m or 1d, got '{value}'")
    seconds = sum(float(n) * _UNITS[u] for n, u in _DURATION.findall(text))
    if seconds <= 0 and not zero:
        raise ChurnError(f"{what} must be longer than 0 s, got '{value}'")
    if seconds > 366 * 86400:
        raise ChurnError(f"{what} must be at most a year (366d), got '{value}'")
    return timedelta(seconds=seconds)


__all__ = ["midnight", "parse_duration", "utc"]
