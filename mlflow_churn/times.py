"""Time is UTC and tz-aware everywhere: the one helper that makes it so."""

from __future__ import annotations

from datetime import UTC, datetime

from mlflow_churn.errors import ChurnError


def utc(ts: datetime, what: str = "as_of") -> datetime:
    """``ts`` as a tz-aware UTC datetime (a naive one is taken to be UTC already).
    ChurnError naming ``what`` when ``ts`` is not a datetime."""
    if not isinstance(ts, datetime):
        raise ChurnError(f"{what} must be a datetime, got {ts!r}")
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


__all__ = ["utc"]
