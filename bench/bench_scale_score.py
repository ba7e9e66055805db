"""`churn score` end to end at 10M simulated customers (issue 27): wall time and peak RSS.

Simulates ``--customers`` customers (default 10,000,000) for ``--days`` days (default 65),
trains and registers one champion on a 50k-customer sample (``bench_scoring``'s recipe),
then runs the real commands as child processes, each under ``/usr/bin/time`` (its peak
RSS is the child's own: a child forked by this larger process would inherit this
process's high-water mark):

1. ``churn features materialize --as-of T`` (the online store and the offline snapshot);
2. ``churn score --as-of T`` (reads the snapshot: the day's features are not computed again);
3. ``churn score --as-of T --recompute`` (computes the features with DuckDB), for context.

Target (issue 27): 10M simulated customers end to end <= 2 min on 2 cores with peak RSS
<= 2.5 GB, for ``churn score`` with materialize's snapshot present. ``--data DIR`` reuses
(or keeps) a simulated dataset (default ``bench/.work/scale-data``), since simulating 10M
customers takes ~10 minutes; a kept dataset of other ``--customers`` / ``--days`` is made anew.
Prints one Markdown section on stdout. Wall-clock numbers are reported, never asserted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from bench.bench_scoring import champion_for_bench
from mlflow_churn.config import load_config
from mlflow_churn.data.bounds import data_bounds
from mlflow_churn.data.simulator import SimulationSpec, simulate
from mlflow_churn.features.registry import registry_for

TIME = "/usr/bin/time"
TARGET_SECONDS = 120.0
TARGET_RSS_GB = 2.5


@dataclass(frozen=True)
class Child:
    """One command's wall time (s) and peak RSS (GB), and its last line of output."""

    seconds: float
    rss_gb: float
    last_line: str


def _log(msg: str) -> None:
    print(f"[bench_scale_score] {msg}", file=sys.stderr, flush=True)


def run_child(args: list[str], env: dict[str, str]) -> Child:
    """``args`` under ``/usr/bin/time -f %M``: the wall time and the child's own peak RSS."""
    with tempfile.NamedTemporaryFile(prefix="bench-time-", suffix=".txt") as rss_file:
        start = time.perf_counter()
        res = subprocess.run([TIME, "-f", "%M", "-o", rss_file.name, *args], env=env,
                             capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited {res.returncode}: {res.stderr.strip()[-800:]}")
        kb = int(Path(rss_file.name).read_text().split()[-1])
    lines = [ln for ln in res.stdout.splitlines() if ln.strip()]
    return Child(seconds, kb / 1024**2, lines[-1] if lines else "")


def _same_spec(data: Path, args: argparse.Namespace) -> bool:
    """True when the kept dataset at ``data`` was simulated with these customers and days."""
    import json

    spec = json.loads((data / "manifest.json").read_text())
    spec = spec.get("spec", spec)
    return spec.get("customers") == args.customers and spec.get("days") == args.days


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--customers", type=int, default=10_000_000)
    ap.add_argument("--days", type=int, default=65)
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parent / ".work" / "scale-data",
                    help="simulated data directory to reuse (made there when missing, and kept; "
                         "default bench/.work/scale-data, ignored by git)")
    ap.add_argument("--materialize-memory", default="12GB",
                    help="features.query_memory_limit for the materialize step only (a daily job on a "
                         "bigger box: at 10M customers the 2GB default spills tens of GB to disk)")
    ap.add_argument("--no-recompute", action="store_true",
                    help="skip the context run that computes the features (minutes at 10M)")
    args = ap.parse_args(argv)
    if not Path(TIME).exists():
        print("## `churn score` at 10M customers\n\nnot run: /usr/bin/time is missing "
              "(Debian package `time`).")
        return 0

    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp_name:
        tmp = Path(tmp_name)
        ws = tmp / "ws"
        cfg = load_config(workspace=ws, environ={})
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("MLFLOW_", "CHURN_"))}
        data = args.data
        t0 = time.perf_counter()
        if data is not None and (data / "manifest.json").exists() and not _same_spec(data, args):
            shutil.rmtree(data)
        if data is None or not (data / "manifest.json").exists():
            target = data or cfg.data_dir
            simulate(SimulationSpec(customers=args.customers, days=args.days, start=date(2026, 1, 1),
                                    seed=3), target)
            _log(f"simulated {args.customers:,} x {args.days} days in {time.perf_counter() - t0:.0f} s")
        if data is not None:  # the workspace's data directory is the kept dataset
            cfg.data_dir.parent.mkdir(parents=True, exist_ok=True)
            if cfg.data_dir.exists():
                shutil.rmtree(cfg.data_dir)
            cfg.data_dir.symlink_to(data.resolve(), target_is_directory=True)
        bounds = data_bounds(cfg.data_dir)
        as_of = bounds.last_event
        fs = registry_for(cfg).feature_set(cfg.features.feature_set)
        _, mv = champion_for_bench(cfg, fs, bounds.first_event, as_of, args.customers, args.rounds)
        _log(f"champion v{mv.version} registered")

        churn = str(Path(sys.executable).parent / "churn")
        stamp = as_of.isoformat()
        base = [churn, "--workspace", str(ws)]
        load_before = os.getloadavg()[0]
        mat = run_child([*base, "features", "materialize", "--as-of", stamp, "--no-progress"],
                        env | {"CHURN_FEATURES__QUERY_MEMORY_LIMIT": args.materialize_memory})
        _log(f"materialize {mat.seconds:.1f} s, {mat.rss_gb:.2f} GB")
        snap = run_child([*base, "score", "--as-of", stamp, "--out", str(tmp / "scores-snapshot")], env)
        _log(f"score (snapshot) {snap.seconds:.1f} s, {snap.rss_gb:.2f} GB")
        comp = None
        if not args.no_recompute:
            comp = run_child([*base, "score", "--as-of", stamp, "--recompute", "--out",
                              str(tmp / "scores-computed")], env)
            _log(f"score (computed) {comp.seconds:.1f} s, {comp.rss_gb:.2f} GB")
        load_after = os.getloadavg()[0]
        rows = sum(1 for _ in (tmp / "scores-snapshot").rglob("*.parquet"))
        import pyarrow.parquet as pq

        scored = pq.ParquetDataset(tmp / "scores-snapshot").read(columns=["customer_id"]).num_rows
        computed_rows = (pq.ParquetDataset(tmp / "scores-computed").read(columns=["customer_id"]).num_rows
                         if comp is not None else 0)

    met = snap.seconds <= TARGET_SECONDS and snap.rss_gb <= TARGET_RSS_GB
    print("## `churn score` at 10M customers (issue 27)\n")
    print(f"{args.customers:,} simulated customers x {args.days} days; {scored:,} live customers scored "
          f"at {as_of.date()} ({rows} Parquet files); model: {args.rounds} trees of depth 6; each command a "
          f"child process under `/usr/bin/time` (peak RSS of that process); {os.cpu_count()} cores; "
          f"load average {load_before:.1f} before, {load_after:.1f} after.\n")
    print("| command | seconds | peak RSS (GB) | customers/s |")
    print("|---|---:|---:|---:|")
    print(f"| `churn features materialize` (online store + snapshot; query_memory_limit "
          f"{args.materialize_memory}) | {mat.seconds:.1f} | "
          f"{mat.rss_gb:.2f} | {scored / mat.seconds:,.0f} |")
    print(f"| `churn score` (features from the snapshot) | {snap.seconds:.1f} | {snap.rss_gb:.2f} | "
          f"{scored / snap.seconds:,.0f} |")
    if comp is not None:
        print(f"| `churn score --recompute` (features computed by DuckDB) | {comp.seconds:.1f} | "
              f"{comp.rss_gb:.2f} | {computed_rows / comp.seconds:,.0f} |")
    context = ("the computing run was skipped: --no-recompute" if comp is None
               else f"computing the features instead: {comp.seconds:.0f} s, {comp.rss_gb:.2f} GB")
    print(f"\n- target (issue 27): 10M simulated customers end to end <= 2 min on 2 cores, peak RSS "
          f"<= {TARGET_RSS_GB} GB (the scoring command, with materialize's features stored for the day): "
          f"{snap.seconds:.0f} s, {snap.rss_gb:.2f} GB -> **{'met' if met else 'not met'}** "
          f"(load average {load_after:.1f}; {context})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
