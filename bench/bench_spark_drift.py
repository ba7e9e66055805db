"""Issue 28 part B (beside bench/bench_spark.py, materialize): a monitoring window's drift,
local numpy engine vs Spark aggregations, on the same rows and the same 2 cores.

Rows: a real simulated window (3,000 customers x 7 daily cutoffs, the offline builder's
frame) resampled with replacement to ``customers`` customers x 1 cutoff (plus the 6 other
cutoffs' rows when ``--drift-cutoffs 7``), written once as Parquet. Each engine reads that
Parquet and computes :class:`~mlflow_churn.monitoring.window_drift.WindowCounts` (local:
pandas + numpy; Spark: :func:`~mlflow_churn.monitoring.spark_drift.spark_window_counts`),
then the same :func:`~mlflow_churn.monitoring.window_drift.drift_from_counts`. The model
call is not in it (``churn score``'s bench measures scoring); scores are drawn once. The
figures are medians of ``--repeats`` runs of each engine, alternating local and Spark so that
both see the same load, after one warm-up run of each that is not counted (the first Spark
call of a session starts the Python workers and warms the JVM: the table shows that run too),
with the load average beside them.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import UTC, date, datetime
from pathlib import Path

from bench.bench_spark import _load, section_on_spark

TARGET_RATIO = 3.0
LINEAR_SLACK = 1.5


def _window(tmp: Path, customers: int, cutoffs: int) -> tuple[Path, dict, object]:
    """Parquet of ``customers`` x ``cutoffs`` rows resampled from a real window, its profile, cfg."""
    import numpy as np
    import pandas as pd

    from mlflow_churn.config import load_config
    from mlflow_churn.data.simulator import SimulationSpec, simulate
    from mlflow_churn.features.offline import build_training_frame
    from mlflow_churn.features.registry import load_registry
    from mlflow_churn.monitoring.monitor import window_cutoffs
    from mlflow_churn.training.profile import build_profile

    data = tmp / "drift-data"
    if not data.exists():
        simulate(SimulationSpec(customers=3000, days=120, start=date(2026, 1, 1), seed=7,
                                scenario="segment_shift", onset_day=90), data)
    fs = load_registry().feature_set("churn_default")
    rng = np.random.default_rng(0)
    ref = build_training_frame(data, fs, [datetime(2026, 3, 10, tzinfo=UTC)], 30, label=False)
    profile = build_profile(ref, fs, rng.beta(1, 8, len(ref)), segments=["plan", "region", "contract"])
    cuts = window_cutoffs(datetime(2026, 4, 27, tzinfo=UTC), 7)
    src = build_training_frame(data, fs, cuts, 30, label=False)
    days = sorted(src["cutoff"].unique())[-cutoffs:]
    parts = []
    for day in days:
        rows = src[src["cutoff"] == day]
        take = rows.iloc[rng.integers(0, len(rows), customers)].reset_index(drop=True)
        take["customer_id"] = np.arange(customers, dtype="int64")
        parts.append(take)
    frame = pd.concat(parts, ignore_index=True)
    frame["churn_probability"] = rng.beta(1.2, 8, len(frame))
    path = tmp / f"drift-window-{customers}-{cutoffs}.parquet"
    frame.to_parquet(path, index=False)
    cfg = load_config(environ={}, overrides={"monitoring.min_segment_size": 100})
    return path, profile, cfg


def _once(spark, tmp: Path, customers: int, cutoffs: int, repeats: int) -> dict:
    import statistics

    import pandas as pd

    from mlflow_churn.monitoring.spark_drift import spark_window_counts
    from mlflow_churn.monitoring.window_drift import drift_from_counts, window_counts

    path, profile, cfg = _window(tmp, customers, cutoffs)
    out: dict = {"customers": customers, "rows": customers * cutoffs}
    times: dict[str, list[float]] = {"local": [], "spark": []}
    loads = []
    for _ in range(repeats + 1):  # the first: warm-up
        t0 = time.perf_counter()
        frame = pd.read_parquet(path)
        local = drift_from_counts(window_counts(frame, frame["churn_probability"].to_numpy(), profile, cfg),
                                  profile, cfg)
        times["local"].append(time.perf_counter() - t0)
        del frame
        t0 = time.perf_counter()
        remote = drift_from_counts(spark_window_counts(spark.read.parquet(f"file://{path}"), profile, cfg),
                                   profile, cfg)
        times["spark"].append(time.perf_counter() - t0)
        loads.append(_load())
    out["local_s"] = statistics.median(times["local"][1:])
    out["spark_s"] = statistics.median(times["spark"][1:])
    out["spark_first_s"] = times["spark"][0]
    loads = loads[1:]
    a = json.dumps(local.stats.to_dict(), sort_keys=True, default=str)
    b = json.dumps(remote.stats.to_dict(), sort_keys=True, default=str)
    out["equal"] = a == b
    out["load"] = "-".join(dict.fromkeys([min(loads, key=float), max(loads, key=float)]))
    path.unlink()
    return out


def drift_rows(args: argparse.Namespace, spark, tmp: Path) -> list[str]:
    """The drift section's lines (Markdown): 1M customers, then 4M when the load allows."""
    cutoffs = getattr(args, "drift_cutoffs", 1)
    repeats = getattr(args, "repeats", 3)
    first = _once(spark, tmp, args.customers, cutoffs, repeats)
    ratio = first["spark_s"] / first["local_s"]
    lines = [
        f"Window drift (PSI / KS / chi-square / JS per feature, per segment and day, 21 features + "
        f"score, 3 segment columns) of {args.customers:,} customers x {cutoffs} cutoff(s), read from "
        "the same Parquet: numpy (local engine) vs Spark local[2] (the local engine's counting code "
        "on the executors, Spark sums the counts), then the same statistics code (session start "
        f"{args.session_s:.1f} s, not counted); medians of {repeats} runs each, alternating, after a "
        "warm-up run of each (not counted; the first Spark run, which starts the Python workers, beside "
        "them).",
        "",
        "| customers | rows | local numpy (s) | Spark local[2] (s) | Spark / local | first Spark run (s) | "
        "rows/s per core, Spark | equal stats | load average |",
        "|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]

    def row(r: dict) -> str:
        return (f"| {r['customers']:,} | {r['rows']:,} | {r['local_s']:.1f} | {r['spark_s']:.1f} | "
                f"{r['spark_s'] / r['local_s']:.2f} | {r['spark_first_s']:.1f} | "
                f"{r['rows'] / r['spark_s'] / 2:,.0f} | {r['equal']} | "
                f"{r['load']} |")

    lines.append(row(first))
    bigger = None
    if float(_load()) < 4 or args.force_4x:
        bigger = _once(spark, tmp, args.customers * 4, cutoffs, repeats)
        lines.append(row(bigger))
    lines.append("")
    lines.append(f"- target (issue 28): Spark drift within {TARGET_RATIO:g}x of the local engine at "
                 f"{args.customers:,} customers on local[2]: "
                 f"{'met' if ratio <= TARGET_RATIO else 'not met'} ({first['spark_s']:.1f} s vs "
                 f"{first['local_s']:.1f} s = {ratio:.2f}x, load {first['load']}; identical statistics: "
                 f"{first['equal']})")
    if bigger is None:
        lines.append(f"- target (issue 28): Spark drift linear from {args.customers:,} to "
                     f"{args.customers * 4:,} customers: not measured (load average {_load()} >= 4 "
                     "on 2 cores shared with other sessions)")
    else:
        growth = bigger["spark_s"] / first["spark_s"]
        lines.append(f"- target (issue 28): Spark drift linear from {args.customers:,} to "
                     f"{args.customers * 4:,} customers: "
                     f"{'met' if growth <= 4 * LINEAR_SLACK else 'not met'} (4x rows took {growth:.2f}x "
                     f"the time; local {bigger['local_s'] / first['local_s']:.2f}x)")
    return lines


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--customers", type=int, default=1_000_000)
    ap.add_argument("--drift-cutoffs", type=int, default=1, help="daily cutoffs per customer (1..7)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each engine per size (medians)")
    ap.add_argument("--force-4x", action="store_true", help="run the 4x size whatever the load")
    args = ap.parse_args(argv)
    out = section_on_spark(args, "Window drift: local engine vs Spark (issue 28)", "bench-spark-drift",
                           [(None, drift_rows)])
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
