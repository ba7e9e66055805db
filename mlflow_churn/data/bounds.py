"""What days the raw data covers, and the one default ``as_of`` every command and service uses."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path

from mlflow_churn.data.tables import TablePaths
from mlflow_churn.times import midnight


@dataclass(frozen=True)
class DataBounds:
    """First and last day of activity, and the event times that close them (UTC)."""

    first_day: date
    last_day: date

    @property
    def first_event(self) -> datetime:
        return midnight(self.first_day + timedelta(days=1))

    @property
    def last_event(self) -> datetime:
        return midnight(self.last_day + timedelta(days=1))


def latest_as_of(data_dir: Path) -> datetime:
    """The default ``as_of`` of every command and service: the newest event in the data (UTC).
    ChurnError when the data directory holds no activity."""
    return data_bounds(data_dir).last_event


def data_bounds(data_dir: Path) -> DataBounds:
    """First and last activity day, from the partition names (no data is read)."""
    paths = TablePaths(Path(data_dir))
    paths.check()
    days = sorted(
        date.fromisoformat(p.name.split("=", 1)[1])
        for p in (paths.data_dir / "activity").glob("date=*") if any(p.glob("*.parquet"))
    )
    return DataBounds(days[0], days[-1])


__all__ = ["DataBounds", "data_bounds", "latest_as_of"]
