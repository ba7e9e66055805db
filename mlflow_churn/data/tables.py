"""Where the raw tables live and how DuckDB reads them.

Layout under ``<workspace>/data`` (Feast-compatible: entity id, ``event_timestamp``,
``created``): ``customers.parquet``, ``activity/date=YYYY-MM-DD/part-*.parquet`` and
``churn_events.parquet``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import duckdb

from mlflow_churn.errors import ChurnError


@dataclass(frozen=True)
class TablePaths:
    """Paths of the raw tables below one data directory."""

    data_dir: Path

    @property
    def customers(self) -> Path:
        return self.data_dir / "customers.parquet"

    @property
    def activity_glob(self) -> str:
        return str(self.data_dir / "activity" / "*" / "*.parquet")

    @property
    def churn_events(self) -> Path:
        return self.data_dir / "churn_events.parquet"

    def check(self) -> None:
        """Raise ChurnError naming the first missing table."""
        if not self.customers.is_file():
            raise ChurnError(
                f"no customers table at {self.customers}; run `churn simulate` "
                "or point --workspace at a workspace that has data"
            )
        if not any((self.data_dir / "activity").glob("*/*.parquet")):
            raise ChurnError(f"no activity partitions under {self.data_dir / 'activity'}")
        if not self.churn_events.is_file():
            raise ChurnError(f"no churn_events table at {self.churn_events}")


def register_views(con: duckdb.DuckDBPyConnection, paths: TablePaths) -> None:
    """Create views ``customers``, ``activity`` and ``churn_events`` on ``con``."""
    paths.check()
    con.execute(f"CREATE OR REPLACE VIEW customers AS SELECT * FROM read_parquet('{paths.customers}')")
    con.execute(
        "CREATE OR REPLACE VIEW activity AS SELECT * FROM "
        f"read_parquet('{paths.activity_glob}', hive_partitioning = true)"
    )
    con.execute(
        f"CREATE OR REPLACE VIEW churn_events AS SELECT * FROM read_parquet('{paths.churn_events}')"
    )
