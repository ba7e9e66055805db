"""Time is UTC and tz-aware everywhere: the helpers that make it so."""

from __future__ import annotations

from datetime import UTC, date, datetime, time

from mlflow_churn.errors import ChurnError


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


__all__ = ["midnight", "utc"]
