"""Offline snapshots of materialized batches, so a day's features are computed once.

:func:`~mlflow_churn.features.materialize.materialize` computes every served feature of
every customer alive at ``as_of`` for the online store; it also writes the same rows to::

    <root>/date=YYYY-MM-DD/time=HHMMSSffffff/set=<set hash>/part-0.parquet
                                                          /_snapshot.json

(``root`` is ``<workspace>/feature-snapshots``). ``set hash`` identifies the definitions
written (each feature's name and definition hash); ``_snapshot.json`` lists them with the
exact ``as_of``, the row count and the online batch id. A snapshot is written to a
temporary directory and renamed when complete, so a reader never sees half of one.

:func:`find_snapshot` is what ``churn score`` asks first: a snapshot of exactly that
``as_of`` whose every feature of the model's feature set has the model's definition hash.
A snapshot whose definitions differ, or that lacks a column, is never used: scoring then
computes the features as before. The values are the same either way (one SQL, one
cutoff: :func:`~mlflow_churn.features.offline.compute_latest` and the batch stream share
:func:`~mlflow_churn.features.offline._feature_sql`), which the tests check row by row.

Snapshots older than ``features.snapshot_keep_days`` (by ``as_of`` date, counted from the
newest written) are removed when a new one is written; 0 turns snapshots off.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mlflow_churn.errors import ChurnError
from mlflow_churn.features.definitions import FeatureDefinition, FeatureSet
from mlflow_churn.times import utc

PART_FILE = "part-0.parquet"
META_FILE = "_snapshot.json"
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Snapshot:
    """One snapshot on disk: where, at which instant, which definitions, how many rows."""

    path: Path
    as_of: datetime
    feature_hashes: dict[str, str]
    rows: int
    batch_id: str | None

    @property
    def file(self) -> Path:
        return self.path / PART_FILE


def set_hash(feature_hashes: dict[str, str]) -> str:
    """The identity of a set of definitions: a hash of the sorted (name, definition hash) pairs."""
    text = json.dumps(sorted(feature_hashes.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _instant_dir(root: Path, as_of: datetime) -> Path:
    as_of = utc(as_of, "as_of")
    return root / f"date={as_of:%Y-%m-%d}" / f"time={as_of:%H%M%S%f}"


def write_snapshot(root: Path, frame: pd.DataFrame, as_of: datetime,
                   features: Sequence[FeatureDefinition], batch_id: str | None = None,
                   keep_days: int = 7) -> Snapshot | None:
    """Write ``frame`` (``customer_id`` and each feature's column, raw values) as the snapshot
    of ``features`` at ``as_of``, replacing one of the same instant and definitions; then
    remove snapshots more than ``keep_days`` days older. ``keep_days=0``: write nothing."""
    if keep_days <= 0:
        return None
    as_of = utc(as_of, "as_of")
    hashes = {f.full_name: f.hash for f in features}
    final = _instant_dir(root, as_of) / f"set={set_hash(hashes)}"
    cols = ["customer_id", *hashes]
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".snapshot-", dir=final.parent))
        try:
            table = pa.Table.from_pandas(frame[cols], preserve_index=False)
            pq.write_table(table, tmp / PART_FILE, compression="zstd")
            meta = {"schema_version": SCHEMA_VERSION, "as_of": as_of.isoformat(), "rows": len(frame),
                    "batch_id": batch_id, "feature_hashes": hashes}
            (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:
        raise ChurnError(f"cannot write the feature snapshot under {root} ({exc.strerror or exc}); make it "
                         "writable or set features.snapshot_keep_days: 0") from None
    _prune(root, as_of - timedelta(days=keep_days))
    return Snapshot(final, as_of, hashes, len(frame), batch_id)


def _prune(root: Path, before: datetime) -> None:
    """Remove the date partitions older than ``before``'s date."""
    for day in root.glob("date=*"):
        if day.name[len("date="):] < f"{before:%Y-%m-%d}":
            shutil.rmtree(day, ignore_errors=True)


def _read_meta(path: Path) -> Snapshot | None:
    """The snapshot in ``path``, or None when it is incomplete or not one this release reads."""
    try:
        meta = json.loads((path / META_FILE).read_text())
    except FileNotFoundError:  # a directory without its metadata is not a snapshot
        return None
    except (OSError, ValueError) as exc:
        raise ChurnError(f"cannot read the feature snapshot {path / META_FILE}: {exc}; remove that "
                         "directory (the next `churn features materialize` writes it again)") from None
    if meta.get("schema_version") != SCHEMA_VERSION or not (path / PART_FILE).exists():
        return None
    return Snapshot(path, datetime.fromisoformat(meta["as_of"]), dict(meta["feature_hashes"]),
                    int(meta["rows"]), meta.get("batch_id"))


def find_snapshot(root: Path, as_of: datetime, feature_set: FeatureSet) -> Snapshot | None:
    """The snapshot at exactly ``as_of`` holding every feature of ``feature_set`` with the
    set's definition hash, or None (see the module doc)."""
    as_of = utc(as_of, "as_of")
    instant = _instant_dir(root, as_of)
    if not instant.is_dir():
        return None
    wanted = {f.full_name: f.hash for f in feature_set.features}
    for path in sorted(instant.glob("set=*")):
        snap = _read_meta(path)
        if snap is None or snap.as_of != as_of:
            continue
        if all(snap.feature_hashes.get(name) == h for name, h in wanted.items()):
            return snap
    return None


@contextmanager
def read_snapshot(snapshot: Snapshot, feature_set: FeatureSet,
                  batch_rows: int) -> Iterator[tuple[int, Iterator[pa.RecordBatch]]]:
    """The row count and the record batches (``customer_id`` and the set's columns) of
    ``snapshot``; ChurnError naming the file when it cannot be read."""
    try:
        pf = pq.ParquetFile(snapshot.file)
    except (OSError, pa.ArrowException) as exc:
        raise ChurnError(f"cannot read the feature snapshot {snapshot.file}: {exc}; remove its directory "
                         "(scoring then computes the features)") from None
    try:
        yield pf.metadata.num_rows, pf.iter_batches(batch_size=batch_rows,
                                                     columns=["customer_id", *feature_set.columns])
    finally:
        pf.close()


__all__ = ["Snapshot", "find_snapshot", "read_snapshot", "set_hash", "write_snapshot"]
