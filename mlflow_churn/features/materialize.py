"""Materialization: compute the newest value of every registered feature, swap it online.

:func:`materialize` computes, with :func:`mlflow_churn.features.offline.compute_latest`
(the same SQL as the training frames), every registered feature of every version
(``monthly_usage`` and ``monthly_usage_v2`` both) for every customer alive at ``as_of``,
and writes them as one new batch that replaces the serving one atomically. It holds the
store's writer lock from reading the serving batch to the flip, so two runs never
interleave (the second one fails at once, naming the first), and it refuses an ``as_of``
older than the serving batch's unless ``force``. The batch records each feature's
definition hash.

Incremental mode gives the same values as a full batch at the same ``as_of`` while
recomputing the activity features of fewer customers. It recomputes in full every
customer alive at ``as_of`` who has any activity in ``(prev.as_of - longest window,
as_of]`` or is not in the previous batch (new signups); the others have empty windows at
both instants, so their activity features and event time are carried over from the previous
batch, and only their customer-level features (a scan of the customers table; some depend
on the cutoff, e.g. ``tenure_days``) are recomputed. Customers who churned are dropped.
``updated_rows`` counts the customers recomputed in full. It needs a previous batch with
the same features and definition hashes; otherwise run a full batch. When everyone is
active (the simulator writes a row per live customer and day), it recomputes everyone.

:func:`run_every` is the ``--every 1h`` scheduler.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pandas as pd
import redis

from mlflow_churn.data.bounds import latest_as_of
from mlflow_churn.errors import ChurnError
from mlflow_churn.features.materialize_spark import write_batch_on_spark
from mlflow_churn.features.offline import _connect, check_cutoffs, compute_latest, longest_window
from mlflow_churn.features.online import (
    CHUNK_ROWS,
    BatchInfo,
    OnlineStore,
    check_order,
    new_batch_id,
    open_store,
)
from mlflow_churn.features.registry import FeatureDefinition, registry_for
from mlflow_churn.features.sandbox import limited
from mlflow_churn.features.snapshots import write_snapshot
from mlflow_churn.progress import ProgressArg, resolve
from mlflow_churn.spark import DEFAULT_SPARK_MASTER, session_for
from mlflow_churn.times import utc

log = logging.getLogger(__name__)

#: backend errors a scheduled run survives (reported, retried at the next tick)
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    sqlite3.OperationalError, redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
)


def served_features(cfg: Any) -> list[FeatureDefinition]:
    """Every registered definition that has an offline source (all versions)."""
    return [d for d in registry_for(cfg).definitions() if d.source in ("customers", "activity")]


def _active(data_dir: Any, lo: datetime, hi: datetime) -> set[int]:
    """Customers with an activity row whose event time lies in ``(lo, hi]`` (UTC)."""
    con = _connect(data_dir)
    try:
        with limited(con, f"the activity scan of the data at {data_dir}"):
            rows = con.execute(f"""
                SELECT DISTINCT customer_id FROM activity
                WHERE date >= DATE '{(lo - timedelta(days=1)).date().isoformat()}'
                  AND date <= DATE '{hi.date().isoformat()}'
                  AND event_timestamp > TIMESTAMPTZ '{lo.isoformat()}'
                  AND event_timestamp <= TIMESTAMPTZ '{hi.isoformat()}'
            """).fetchall()
    finally:
        con.close()
    return {int(r[0]) for r in rows}


def _check_parent(prev: BatchInfo, features: list[FeatureDefinition], as_of: datetime) -> None:
    """ChurnError unless an incremental batch at ``as_of`` can build on ``prev``."""
    hint = "run a full `churn features materialize` (without --incremental) first"
    if tuple(prev.features) != tuple(f.full_name for f in features):
        raise ChurnError(f"the registered features changed since batch {prev.batch_id}; {hint}")
    if prev.feature_hashes is None:
        raise ChurnError(f"batch {prev.batch_id} does not record its definition hashes; {hint}")
    changed = [f.full_name for f in features if prev.feature_hashes.get(f.full_name) != f.hash]
    if changed:
        raise ChurnError(
            f"the definition of {', '.join(changed)} changed since batch {prev.batch_id}; {hint}")
    if as_of <= prev.as_of:
        raise ChurnError(
            f"--as-of {as_of.isoformat()} is not after the serving batch's as_of "
            f"{prev.as_of.isoformat()}; an incremental batch must move forward"
        )


def _incremental(cfg: Any, features: list[FeatureDefinition], prev: BatchInfo, as_of: datetime,
                 store: OnlineStore) -> tuple[pd.DataFrame, int]:
    """The merged frame of an incremental batch on ``prev`` and how many rows were
    recomputed in full (see the module docstring for why the carried rows are exact)."""
    names = [f.full_name for f in features]
    static = [f.full_name for f in features if f.source == "customers"]
    live = compute_latest(cfg.data_dir, [f for f in features if f.source == "customers"], as_of,
                          with_event_time=False).frame
    quiet_since = prev.as_of - timedelta(days=longest_window(features))
    active = _active(cfg.data_dir, quiet_since, as_of)
    carry = (set(store.customer_ids(prev.batch_id)) & set(live["customer_id"])) - active
    redo = sorted(set(live["customer_id"]) - carry)
    fresh = compute_latest(cfg.data_dir, features, as_of, customer_ids=redo).frame
    cols = ["customer_id", "event_time", *names]
    parts = [fresh[cols]] if len(fresh) else []
    if carry:  # read the previous rows only when some are carried over
        old = store.scan(prev.batch_id)
        parts.append(old.loc[old["customer_id"].isin(carry)].drop(columns=static).merge(
            live[["customer_id", *static]], on="customer_id", how="inner")[cols])
    frame = pd.concat(parts, ignore_index=True) if parts else fresh[cols]
    return frame.sort_values("customer_id", ignore_index=True), len(fresh)


def materialize(
    cfg: Any,
    as_of: datetime,
    incremental: bool = False,
    store: OnlineStore | None = None,
    progress: ProgressArg = None,
    force: bool = False,
    engine: str = "local",
    spark: Any = None,
    spark_master: str | None = None,
    partition_hook: Any = None,
) -> BatchInfo:
    """Compute every registered feature at ``as_of`` (UTC) and make it the serving batch.

    ``engine="spark"``: the features are computed (and, with Redis, written) by Spark
    executors on ``spark`` (default: a session on ``spark_master``, default ``local[*]``,
    started and stopped here); :mod:`mlflow_churn.features.materialize_spark`. Full batches
    only. ``partition_hook``: called in each Spark partition before it writes (tests).

    ``incremental``: build on the serving batch (see the module docstring; falls back to a
    full batch when there is none). ``force``: accept an ``as_of`` older than the serving
    batch's (a deliberate roll back). Raises ChurnError when ``as_of`` is outside the data
    or older than the serving batch's, when another writer holds the store's lock, when
    the writer lost its lock before the flip, or (incremental) when ``as_of`` is not after
    the serving batch's or its features or definitions changed.
    """
    as_of = utc(as_of, "as_of")
    if engine not in ("local", "spark"):
        raise ChurnError(f"--engine must be local or spark, got '{engine}'")
    if engine == "spark" and incremental:
        raise ChurnError("--incremental runs on the local engine only; drop --engine spark (a full "
                         "batch on Spark) or --incremental")
    features = served_features(cfg)
    names = tuple(f.full_name for f in features)
    check_cutoffs(cfg.data_dir, features, [as_of])
    own = store is None
    store = open_store(cfg, must_exist=False) if own else store
    try:
        with store.writer():
            started = datetime.now(UTC)
            current = store.current_batch()
            check_order(current, as_of, force, store.location)
            if engine == "spark":
                master = spark_master or DEFAULT_SPARK_MASTER
                info = BatchInfo(
                    batch_id=new_batch_id(as_of), as_of=as_of, watermark=None, rows=0, features=names,
                    started_at=started, mode="full", feature_hashes={f.full_name: f.hash for f in features})
                with session_for(spark, master, "churn-materialize") as session, \
                        resolve(progress)(f"computing and writing {len(names)} features on Spark", 1) as tick:
                    done = write_batch_on_spark(session, master, cfg, store, features, info, force,
                                                partition_hook)
                    tick(1)
                return done
            prev = current if incremental else None
            if prev is None:
                frame = compute_latest(cfg.data_dir, features, as_of).frame
                mode, updated = "full", len(frame)
            else:
                _check_parent(prev, features, as_of)
                frame, updated = _incremental(cfg, features, prev, as_of, store)
                mode = "incremental"
            newest = frame["event_time"].max() if len(frame) else None
            info = BatchInfo(
                batch_id=new_batch_id(as_of), as_of=as_of,
                watermark=None if newest is None or pd.isna(newest) else newest.to_pydatetime(),
                rows=len(frame), features=names, started_at=started, mode=mode, updated_rows=updated,
                parent_batch_id=prev.batch_id if prev else None,
                feature_hashes={f.full_name: f.hash for f in features},
            )
            # the same rows offline, for `churn score` at this as_of (features/snapshots.py)
            write_snapshot(cfg.feature_snapshot_dir, frame, as_of, features, info.batch_id,
                           cfg.features.snapshot_keep_days)
            chunks = max(1, -(-len(frame) // CHUNK_ROWS))
            with resolve(progress)(f"writing {len(frame):,} rows ({mode})", chunks) as tick:
                return store.write_batch(frame, info, on_chunk=lambda _rows: tick(1), allow_older=force)
    finally:
        if own:
            store.close()


def run_every(
    cfg: Any,
    every: timedelta,
    incremental: bool = False,
    max_runs: int | None = None,
    store: OnlineStore | None = None,
    progress: ProgressArg = None,
    sleep: Callable[[float], None] = time.sleep,
    on_run: Callable[[BatchInfo | None, str], None] | None = None,
) -> list[BatchInfo]:
    """Materialize now and then every ``every``, at the data's newest event each time.

    A run whose data has no event after the serving batch's ``as_of`` writes nothing
    (``on_run(None, reason)``). With ``incremental`` every run after the first batch is
    incremental. A ChurnError in a later run is reported through ``on_run`` and the
    schedule goes on; one in the first run is raised. A transient backend error
    (:data:`TRANSIENT_ERRORS`: SQLite busy or locked, Redis unreachable) is logged and
    reported in any run, and the next tick retries. Stops after ``max_runs`` runs
    (None = forever). Returns the batches written.
    """
    if every.total_seconds() <= 0:
        raise ChurnError(f"--every must be a positive duration, got {every}")
    if max_runs is not None and max_runs < 1:
        raise ChurnError(f"max_runs must be >= 1, got {max_runs}")
    own = store is None
    store = open_store(cfg, must_exist=False) if own else store
    written: list[BatchInfo] = []
    runs = 0
    try:
        while True:
            tick = time.monotonic()
            try:
                as_of = latest_as_of(cfg.data_dir)
                cur = store.current_batch()
                if cur is not None and cur.as_of >= as_of:
                    if on_run:
                        on_run(None, f"no data after {cur.as_of.isoformat()}; batch {cur.batch_id} serves")
                else:
                    info = materialize(cfg, as_of, incremental=incremental and cur is not None,
                                       store=store, progress=progress)
                    written.append(info)
                    if on_run:
                        on_run(info, "written")
            except ChurnError as exc:
                if runs == 0:
                    raise
                if on_run:
                    on_run(None, f"error: {exc}")
            except TRANSIENT_ERRORS as exc:
                log.warning("materialize run failed (%s: %s); retrying at the next run",
                            type(exc).__name__, exc)
                if on_run:
                    on_run(None, f"error: {type(exc).__name__}: {exc}; retrying at the next run")
            runs += 1
            if max_runs is not None and runs >= max_runs:
                return written
            sleep(max(0.0, every.total_seconds() - (time.monotonic() - tick)))
    finally:
        if own:
            store.close()


__all__ = ["materialize", "run_every", "served_features"]
