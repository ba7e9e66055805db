"""Materialization: compute the newest value of every registered feature, swap it online.

:func:`materialize` computes, with :func:`mlflow_churn.features.offline.compute_latest`
(the same SQL as the training frames), every registered feature of every version
(``monthly_usage`` and ``monthly_usage_v2`` both) for every customer alive at ``as_of``,
and writes them as one new batch that replaces the serving one atomically.

Incremental mode recomputes only customers with events after the previous batch's
watermark (new activity or signup), drops customers who churned since, keeps every other
row of the previous batch as it was, and writes the merge as a new full batch. Values of a
customer without new events then stay those of the previous ``as_of`` (their windows are
not slid forward); a full batch, or ``churn features check-skew``, shows the difference.

:func:`run_every` is the ``--every 1h`` scheduler.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import duckdb
import pandas as pd

from mlflow_churn.data.tables import TablePaths, register_views
from mlflow_churn.errors import ChurnError
from mlflow_churn.features.offline import _utc, check_cutoffs, compute_latest, data_bounds
from mlflow_churn.features.online import CHUNK_ROWS, BatchInfo, OnlineStore, new_batch_id, open_store
from mlflow_churn.features.registry import FeatureDefinition, registry_for


def served_features(cfg: Any) -> list[FeatureDefinition]:
    """Every registered definition that has an offline source (all versions)."""
    return [d for d in registry_for(cfg).definitions() if d.source in ("customers", "activity")]


@dataclass(frozen=True)
class _Delta:
    changed: list[int]
    churned: list[int]


def _delta(data_dir: Any, since: datetime, as_of: datetime) -> _Delta:
    """Customers with activity or signup in ``(since, as_of]``, and those who churned then."""
    con = duckdb.connect()
    try:
        con.execute("SET TimeZone = 'UTC'")
        register_views(con, TablePaths(data_dir))
        lo, hi = f"TIMESTAMPTZ '{since.isoformat()}'", f"TIMESTAMPTZ '{as_of.isoformat()}'"
        changed = con.execute(f"""
            SELECT DISTINCT customer_id FROM activity
            WHERE date >= DATE '{since.date().isoformat()}' AND date <= DATE '{as_of.date().isoformat()}'
              AND event_timestamp > {lo} AND event_timestamp <= {hi}
            UNION
            SELECT customer_id FROM customers WHERE event_timestamp > {lo} AND event_timestamp <= {hi}
        """).fetchall()
        churned = con.execute(
            f"SELECT customer_id FROM churn_events WHERE event_timestamp <= {hi}").fetchall()
    finally:
        con.close()
    return _Delta(sorted(r[0] for r in changed), sorted(r[0] for r in churned))


def materialize(
    cfg: Any,
    as_of: datetime,
    incremental: bool = False,
    store: OnlineStore | None = None,
    progress: bool = False,
) -> BatchInfo:
    """Compute every registered feature at ``as_of`` (UTC) and make it the serving batch.

    ``incremental``: recompute only customers with events after the previous batch's
    watermark (falls back to a full batch when there is no previous one). Raises ChurnError
    when ``as_of`` is outside the data, not after the previous batch's ``as_of``
    (incremental), or when the registered features changed since the previous batch
    (incremental; run a full batch).
    """
    as_of = _utc(as_of, "as_of")
    features = served_features(cfg)
    names = tuple(f.full_name for f in features)
    check_cutoffs(cfg.data_dir, features, [as_of])
    own = store is None
    store = open_store(cfg, must_exist=False) if own else store
    try:
        started = datetime.now(UTC)
        prev = store.current_batch() if incremental else None
        if prev is None:
            latest = compute_latest(cfg.data_dir, features, as_of)
            frame, watermark, mode, updated = latest.frame, latest.watermark, "full", len(latest.frame)
        else:
            if tuple(prev.features) != names:
                raise ChurnError(
                    f"the registered features changed since batch {prev.batch_id}; run a full "
                    "`churn features materialize` (without --incremental) first"
                )
            if as_of <= prev.as_of:
                raise ChurnError(
                    f"--as-of {as_of.isoformat()} is not after the serving batch's as_of "
                    f"{prev.as_of.isoformat()}; an incremental batch must move forward"
                )
            since = prev.watermark or prev.as_of
            delta = _delta(cfg.data_dir, since, as_of)
            latest = compute_latest(cfg.data_dir, features, as_of, customer_ids=delta.changed)
            old = store.scan(prev.batch_id)
            drop = set(delta.changed) | set(delta.churned)
            kept = old[~old["customer_id"].isin(drop)]
            parts = [p for p in (kept, latest.frame[["customer_id", "event_time", *names]]) if len(p)]
            frame = (pd.concat(parts, ignore_index=True) if parts else old.iloc[0:0])
            frame = frame.sort_values("customer_id", ignore_index=True)
            marks = [m for m in (prev.watermark, latest.watermark) if m is not None]
            watermark, mode, updated = (max(marks) if marks else None), "incremental", len(latest.frame)
        info = BatchInfo(
            batch_id=new_batch_id(as_of), as_of=as_of, watermark=watermark, rows=len(frame),
            features=names, started_at=started, mode=mode, updated_rows=updated,
            parent_batch_id=prev.batch_id if prev else None,
        )
        if progress:
            from mlflow_churn.cli_common import with_progress

            chunks = max(1, -(-len(frame) // CHUNK_ROWS))
            return with_progress(f"writing {len(frame):,} rows ({mode})", chunks, True,
                                 lambda tick: store.write_batch(frame, info, on_chunk=tick))
        return store.write_batch(frame, info)
    finally:
        if own:
            store.close()


def run_every(
    cfg: Any,
    every: timedelta,
    incremental: bool = False,
    max_runs: int | None = None,
    store: OnlineStore | None = None,
    progress: bool = False,
    sleep: Callable[[float], None] = time.sleep,
    on_run: Callable[[BatchInfo | None, str], None] | None = None,
) -> list[BatchInfo]:
    """Materialize now and then every ``every``, at the data's newest event each time.

    A run whose data has no event after the serving batch's ``as_of`` writes nothing
    (``on_run(None, reason)``). With ``incremental`` every run after the first batch is
    incremental. A ChurnError in a later run is reported through ``on_run`` and the
    schedule goes on; one in the first run is raised. Stops after ``max_runs`` runs
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
                as_of = data_bounds(cfg.data_dir).last_event
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
            runs += 1
            if max_runs is not None and runs >= max_runs:
                return written
            sleep(max(0.0, every.total_seconds() - (time.monotonic() - tick)))
    finally:
        if own:
            store.close()


__all__ = ["materialize", "run_every", "served_features"]
