"""The Spark engine's shared pieces: the session, and staging directories executors can read.

Every ``--engine spark`` path (feature SQL, materialization, drift, training frames, batch
scoring) starts its session with :func:`spark_session` and stages files through
:class:`Staging`, so the settings that make both engines agree (UTC session time zone,
microsecond Parquet timestamps, Arrow transfers) are set in one place. pyspark is imported
only inside these functions: importing this module needs no Java.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from mlflow_churn.errors import ChurnError

__all__ = ["DEFAULT_SPARK_MASTER", "Staging", "check_staging", "is_local_master", "local_driver_memory",
           "session_for", "spark_session"]

DEFAULT_SPARK_MASTER = "local[*]"


def spark_session(master: str = DEFAULT_SPARK_MASTER, app_name: str = "churn") -> Any:
    """A Spark session (UTC, Arrow on; this Python on local workers)."""
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        raise ChurnError(
            "engine 'spark' needs pyspark: pip install 'mlflow-churn[spark]' (and Java 17+)"
        ) from None
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    builder = SparkSession.builder
    driver_memory = "1g"  # a cluster's driver only plans and collects
    if is_local_master(master):
        # 200 shuffle partitions (Spark's default, sized for clusters) cost 4-6x on one box:
        # two per local core (measured on the feature query, 20k customers, local[2])
        cores = os.cpu_count() or 2
        if master.startswith("local[") and master[6:-1].isdigit():
            cores = int(master[6:-1])
        builder = builder.config("spark.sql.shuffle.partitions", str(2 * cores))
        driver_memory = local_driver_memory()
    return (builder.master(master).appName(app_name)
            .config("spark.sql.session.timeZone", "UTC")
            .config("spark.sql.execution.arrow.pyspark.enabled", "true")
            .config("spark.sql.parquet.outputTimestampType", "TIMESTAMP_MICROS")
            .config("spark.ui.enabled", "false")
            .config("spark.driver.memory", driver_memory)
            .getOrCreate())


def local_driver_memory() -> str:
    """The JVM heap of a local session: a quarter of this machine's memory, 1 to 8 GiB. The
    executors run in the driver's JVM, and the feature query's aggregation holds one
    hash-table entry per customer in each task: with 1 GiB it took about twice the JVM's CPU
    time of a 3 GiB heap at 1M customers on local[2] (little of it garbage collection)."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return "1g"
    return f"{max(1, min(8, total // 4 // 2**30))}g"



@contextmanager
def session_for(spark: Any, master: str = DEFAULT_SPARK_MASTER, app_name: str = "churn") -> Iterator[Any]:
    """The caller's running session ``spark`` (left running), or, when it is None, one started
    on ``master`` by :func:`spark_session` and stopped when the block ends."""
    if spark is not None:
        yield spark
        return
    own = spark_session(master, app_name)
    try:
        yield own
    finally:
        own.stop()

def is_local_master(master: str) -> bool:
    """True for ``local``, ``local[N]``, ``local[*]`` (driver and executors on this machine)."""
    return master == "local" or master.startswith("local[")


def check_staging(staging: str | None, master: str) -> None:
    """ChurnError when executors of ``master`` could not read the default local staging."""
    if staging is None and not is_local_master(master):
        raise ChurnError(
            f"--spark-master {master} runs executors on other machines, which cannot read this "
            "machine's temporary directory; pass --staging DIR on storage every executor can read "
            "(hdfs://..., s3://..., a shared mount)")


class Staging:
    """One run's directory under ``staging`` (a path or URI), for pyarrow and for Spark."""

    def __init__(self, staging: str | None, master: str) -> None:
        check_staging(staging, master)
        if staging is None:
            self._own_tmp: str | None = tempfile.mkdtemp(prefix="churn-spark-")
            base = self._own_tmp
        else:
            self._own_tmp = None
            base = staging
        name = f"churn-spark-{uuid.uuid4().hex[:12]}"
        if "://" in base:
            try:
                self.fs, root = pafs.FileSystem.from_uri(base)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
                raise ChurnError(f"--staging {base}: pyarrow cannot open it ({exc}); use a path or an "
                                 "hdfs://, s3://, gs:// URI") from None
            spark_base = base.rstrip("/")
        else:
            self.fs, root = pafs.LocalFileSystem(), str(Path(base).resolve())
            spark_base = f"file://{root}"  # not the cluster's default filesystem
        self.path = f"{root.rstrip('/')}/{name}"  # for pyarrow
        self.uri = f"{spark_base}/{name}"  # the same directory, for Spark
        try:
            self.fs.create_dir(self.path, recursive=True)
        except OSError as exc:
            raise ChurnError(f"--staging {base}: cannot create {self.path} ({exc})") from None

    def cleanup(self) -> None:
        """Delete this run's directory (and the temporary base when it made one)."""
        try:
            self.fs.delete_dir(self.path)
        except OSError:
            pass
        if self._own_tmp is not None:
            shutil.rmtree(self._own_tmp, ignore_errors=True)
