"""Where the raw tables live and how DuckDB reads them.

Layout under ``<workspace>/data`` (Feast-compatible: entity id, ``event_timestamp``,
``created``): ``customers.parquet``, ``activity/date=YYYY-MM-DD/part-*.parquet`` and
``churn_events.parquet``. The column types are :data:`CUSTOMERS_SCHEMA`,
:data:`ACTIVITY_SCHEMA` (plus the ``date`` partition column) and :data:`CHURN_EVENTS_SCHEMA`;
the simulator writes them and the feature registry compiles definitions against them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow as pa

from mlflow_churn.errors import ChurnError, first_line

_TS = pa.timestamp("us", tz="UTC")
CUSTOMERS_SCHEMA = pa.schema([
    ("customer_id", pa.int64()), ("signup_date", pa.date32()), ("plan", pa.string()),
    ("region", pa.string()), ("contract", pa.string()), ("payment_method", pa.string()),
    ("paperless_billing", pa.bool_()), ("num_lines", pa.int16()), ("age", pa.int16()),
    ("monthly_charge", pa.float64()), ("event_timestamp", _TS), ("created", _TS),
])
ACTIVITY_SCHEMA = pa.schema([
    ("customer_id", pa.int64()), ("event_timestamp", _TS), ("created", _TS),
    ("sessions", pa.int32()), ("minutes_used", pa.float32()), ("data_used_mb", pa.float32()),
    ("support_calls", pa.int32()), ("failed_payments", pa.int32()), ("dropped_calls", pa.int32()),
])
CHURN_EVENTS_SCHEMA = pa.schema([
    ("customer_id", pa.int64()), ("churn_date", pa.date32()), ("event_timestamp", _TS),
    ("created", _TS),
])


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


def check_parquet_files(paths: TablePaths) -> None:
    """Raise ChurnError naming the first table file that is not readable Parquet (truncated,
    corrupt, not Parquet at all); reads only each file's footer, so it is cheap."""
    import pyarrow.parquet as pq

    paths.check()
    files = [paths.customers, paths.churn_events,
             *sorted((paths.data_dir / "activity").glob("*/*.parquet"))]
    for path in files:
        try:
            pq.read_metadata(path)
        except (OSError, pa.ArrowException) as exc:
            first = first_line(exc)
            raise ChurnError(f"table file {path} is not readable Parquet ({first[:200]}); rewrite it "
                             "(e.g. `churn simulate --overwrite`) or remove it") from None


def _quote(path: Path | str) -> str:
    """``path`` as a SQL string literal."""
    return "'" + str(path).replace("'", "''") + "'"


def register_views(con: duckdb.DuckDBPyConnection, paths: TablePaths) -> None:
    """Create views ``customers``, ``activity`` and ``churn_events`` on ``con``.

    A table that is not Parquet (truncated, corrupt) raises ChurnError naming its path."""
    paths.check()
    activity = f"read_parquet({_quote(paths.activity_glob)}, hive_partitioning = true)"
    for name, source in (("customers", f"read_parquet({_quote(paths.customers)})"),
                         ("activity", activity),
                         ("churn_events", f"read_parquet({_quote(paths.churn_events)})")):
        try:
            con.execute(f"CREATE OR REPLACE VIEW {name} AS SELECT * FROM {source}")
        except duckdb.Error as exc:
            raise ChurnError(f"cannot read the {name} table under {paths.data_dir}: {first_line(exc)}; "
                             "rewrite it (e.g. `churn simulate --overwrite`) or fix the file") from None


def register_empty_views(con: duckdb.DuckDBPyConnection) -> None:
    """Create empty ``customers``, ``activity`` (with its ``date`` partition column) and
    ``churn_events`` relations of the layout's types on ``con`` (to compile SQL without data)."""
    activity = ACTIVITY_SCHEMA.append(pa.field("date", pa.date32()))
    for name, schema in (("customers", CUSTOMERS_SCHEMA), ("activity", activity),
                         ("churn_events", CHURN_EVENTS_SCHEMA)):
        con.register(f"{name}_empty", schema.empty_table())
        con.execute(f"CREATE OR REPLACE TEMP VIEW {name} AS SELECT * FROM {name}_empty")
