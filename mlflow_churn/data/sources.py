"""Null rates of the raw source columns, per day, read with DuckDB from the Parquet partitions.

A feature can hide an outage: ``data_mb_30d = sum(data_used_mb)`` skips NULLs, so when the
source column turns null for a third of the customers the feature merely shrinks, and its
PSI creeps up over weeks. Integrity is therefore also checked at the source: for every
non-key column of the ``activity`` table, the share of NULLs on each day of the window
(``activity/date=YYYY-MM-DD`` partitions whose rows' ``event_timestamp`` lies in
``(start, end]``; NaN counts as missing in a float column, as it does in the features),
against the share in the version's training window (``sources`` of the reference profile,
computed once at training by :func:`source_reference`).

The size-aware allowance (:func:`mlflow_churn.stats.drift.null_rise_noise`) accounts
for the rows of the day and of the reference; the policy blocks when a day's rise exceeds
both it and ``policy.max_null_increase``. A day of the window without any activity row is
a fault too (``missing_days``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from mlflow_churn.data.tables import TablePaths, register_views
from mlflow_churn.stats import drift

TABLE = "activity"
KEY_COLUMNS = ("customer_id", "event_timestamp", "created", "date")


@dataclass
class SourceNulls:
    """Rows and NULL counts per day (oldest first) of each raw column of the activity table."""

    days: list[date]
    rows: np.ndarray
    nulls: dict[str, np.ndarray] = field(default_factory=dict)

    def daily_rates(self) -> dict[str, np.ndarray]:
        """``table.column`` -> NULL share per day (NaN on a day without rows)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return {f"{TABLE}.{c}": np.where(self.rows > 0, n / np.maximum(self.rows, 1), np.nan)
                    for c, n in self.nulls.items()}


def _expected_days(start: datetime, end: datetime) -> list[date]:
    """Days whose end (midnight UTC of the next day, the rows' event time) lies in (start, end]."""
    t = start.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1)
    days = []
    while t <= end:
        days.append((t - timedelta(days=1)).date())
        t += timedelta(days=1)
    return days


def daily_source_nulls(data_dir: Path, start: datetime, end: datetime) -> SourceNulls:
    """NULL counts per day and raw column of the activity rows with event time in (start, end]."""
    import duckdb

    days = _expected_days(start, end)
    con = duckdb.connect()
    try:
        register_views(con, TablePaths(Path(data_dir)))
        described = [r[:2] for r in con.execute(f"DESCRIBE {TABLE}").fetchall() if r[0] not in KEY_COLUMNS]
        cols = [c for c, _ in described]
        nulls = ", ".join(
            f'count(*) FILTER (WHERE "{c}" IS NULL OR isnan("{c}")) AS "{c}"' if kind in ("FLOAT", "DOUBLE")
            else f'count(*) - count("{c}") AS "{c}"' for c, kind in described)
        lo = (days[0] if days else start.date()).isoformat()
        hi = (days[-1] if days else end.date()).isoformat()
        rows = con.execute(
            f"""SELECT date, count(*) AS __rows, {nulls} FROM {TABLE}
                WHERE date BETWEEN DATE '{lo}' AND DATE '{hi}'
                  AND event_timestamp > TIMESTAMPTZ '{start.isoformat()}'
                  AND event_timestamp <= TIMESTAMPTZ '{end.isoformat()}'
                GROUP BY date"""
        ).fetchall()
    finally:
        con.close()
    by_day = {r[0]: r[1:] for r in rows}
    table = np.array([by_day.get(d, (0,) * (len(cols) + 1)) for d in days], dtype="int64").reshape(
        len(days), len(cols) + 1)
    return SourceNulls(days, table[:, 0], {c: table[:, i + 1] for i, c in enumerate(cols)})


def source_reference(data_dir: Path, start: datetime, end: datetime) -> dict[str, Any]:
    """Reference NULL shares of the raw columns over (start, end] (the training window):
    ``{"activity.col": {"null_rate": r, "rows": n}}``, stored in the profile's ``sources``."""
    s = daily_source_nulls(data_dir, start, end)
    n = int(s.rows.sum())
    return {f"{TABLE}.{c}": {"null_rate": float(v.sum() / n) if n else 0.0, "rows": n}
            for c, v in s.nulls.items()}


@dataclass
class SourceIntegrity:
    """Per raw column: the highest daily NULL share in the window, its reference share and the
    size-aware allowed rise on that day; the window's days without rows."""

    rate: dict[str, float]
    ref_rate: dict[str, float]
    noise: dict[str, float]
    missing_days: list[str]
    daily: dict[str, np.ndarray]


def source_integrity(window: SourceNulls, reference: dict[str, Any] | None,
                     quantile: float = 0.99) -> SourceIntegrity:
    """Compare ``window`` with the profile's ``sources`` (no reference: a share of 0 over 0
    rows). The noise quantile is split over every (day, column) test (Bonferroni)."""
    ref = reference or {}
    daily = window.daily_rates()
    n_tests = max(1, len(daily) * max(len(window.days), 1))
    q = 1.0 - (1.0 - quantile) / n_tests
    rate, ref_rate, noise = {}, {}, {}
    for col, rates in daily.items():
        r0 = float(ref.get(col, {}).get("null_rate", 0.0))
        n0 = int(ref.get(col, {}).get("rows", 0))
        if not np.isfinite(rates).any():
            continue
        i = int(np.nanargmax(rates - r0))
        rate[col], ref_rate[col] = float(rates[i]), r0
        noise[col] = drift.null_rise_noise(r0, n0, float(rates[i]), int(window.rows[i]), q)
    missing = [d.isoformat() for d, n in zip(window.days, window.rows, strict=True) if n == 0]
    return SourceIntegrity(rate, ref_rate, noise, missing, daily)
