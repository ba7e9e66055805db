"""Registry gate: wall time of one decision, of a re-run (idempotent reuse), and the webhook
receiver's acknowledgement latency over a real socket.

Simulates ``--customers`` customers x 120 days (stable), trains a champion (as_of
2026-04-24) and a challenger (as_of 2026-05-01) with the real ``train`` path
(``--trials`` Optuna trials each), then times :func:`mlflow_churn.evaluation.evaluate.evaluate`
at as_of 2026-05-01: once for real, then ``--reruns`` times on the same versions (each must
reuse the decision and create no run). The receiver (``create_app`` under uvicorn on
loopback) gets ``--deliveries`` signed ``model_version_alias.created`` deliveries for a
recording gate, then the same ids again (duplicates). Prints a Markdown section; wall-clock
figures are reported, never asserted.

    python -m bench.bench_gate [--customers 20000] [--trials 2] [--reruns 5] [--deliveries 200]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
import uuid
from datetime import UTC, date, datetime
from pathlib import Path

from mlflow_churn.tracking_server import free_port


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def bench_receiver(cfg, n: int) -> dict[str, float]:
    """Median / p99 ack latency (ms) of fresh and duplicate deliveries over HTTP."""
    import httpx
    import uvicorn

    from mlflow_churn.hooks.app import (
        DELIVERY_HEADER,
        SIGNATURE_HEADER,
        TIMESTAMP_HEADER,
        create_app,
        sign,
    )

    jobs: list[str] = []
    app = create_app(cfg, gate=lambda job: jobs.append(job.version) or "bench")
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    deliveries = []
    for i in range(n):
        body = json.dumps({"entity": "model_version_alias", "action": "created", "timestamp": "",
                           "data": {"name": cfg.training.model_name, "alias": "challenger",
                                    "version": str(i + 1)}})
        did, stamp = str(uuid.uuid4()), str(int(time.time()))
        deliveries.append((body, {DELIVERY_HEADER: did, TIMESTAMP_HEADER: stamp,
                                  SIGNATURE_HEADER: sign(cfg.hooks.secret, did, stamp, body)}))
    fresh, dup = [], []
    with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
        for target, expected in ((fresh, 202), (dup, 200)):
            for body, headers in deliveries:
                t0 = time.perf_counter()
                res = client.post("/webhook", content=body, headers=headers)
                target.append((time.perf_counter() - t0) * 1000)
                assert res.status_code == expected, res.text
    app.state.worker.join()
    server.should_exit = True
    thread.join(10)
    return {"fresh_median": statistics.median(fresh), "fresh_p99": _pct(fresh, 0.99),
            "dup_median": statistics.median(dup), "dup_p99": _pct(dup, 0.99), "gates": len(jobs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=20_000)
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--reruns", type=int, default=5)
    parser.add_argument("--deliveries", type=int, default=200)
    args = parser.parse_args()
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID"):
        os.environ.pop(name, None)
    import logging

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    from mlflow.tracking import MlflowClient

    from mlflow_churn.config import load_config
    from mlflow_churn.data.simulator import SimulationSpec, simulate
    from mlflow_churn.evaluation.evaluate import evaluate
    from mlflow_churn.registry.aliases import CHAMPION, move_alias
    from mlflow_churn.training.train import train

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(workspace=Path(tmp) / "ws", environ={},
                          overrides={"hooks.secret": "bench-secret"})
        spec = SimulationSpec(customers=args.customers, days=120, start=date(2026, 1, 1), seed=5)
        simulate(spec, cfg.data_dir)
        champ = train(cfg, datetime(2026, 4, 24, tzinfo=UTC), n_trials=args.trials, progress=False)
        client = MlflowClient(cfg.mlflow_tracking_uri, cfg.mlflow_tracking_uri)
        move_alias(client, cfg.training.model_name, CHAMPION, champ.version)
        chal = train(cfg, datetime(2026, 5, 1, tzinfo=UTC), n_trials=args.trials, progress=False)
        as_of = datetime(2026, 5, 1, tzinfo=UTC)
        t0 = time.perf_counter()
        first = evaluate(cfg, as_of)
        full_s = time.perf_counter() - t0
        exp_ids = [e.experiment_id for e in client.search_experiments()]
        runs_before = len(client.search_runs(exp_ids, max_results=10_000))
        rerun_s = []
        for _ in range(args.reruns):
            t0 = time.perf_counter()
            again = evaluate(cfg, as_of)
            rerun_s.append(time.perf_counter() - t0)
            assert again.reused and again.run_id == first.run_id
        idempotent = len(client.search_runs(exp_ids, max_results=10_000)) == runs_before
        hooks = bench_receiver(cfg, args.deliveries)

    print("## Registry gate and webhook receiver (issue 5)\n")
    print(f"{args.customers:,} simulated customers x 120 days; champion v{champ.version} "
          f"(window end {champ.window_end[:10]}), challenger v{chal.version} "
          f"(window end {chal.window_end[:10]}), {args.trials} Optuna trials each.\n")
    print("| measure | value |")
    print("|---|---|")
    print(f"| holdout rows (cutoffs {first.holdout_start[:10]} .. {first.holdout_end[:10]}) | "
          f"{first.holdout_rows:,} |")
    print(f"| decision | {first.decision} ({len(first.rules)} rules, {len(first.reasons)} failed) |")
    print(f"| challenger / champion ROC AUC | {first.metrics['challenger_roc_auc']:.4f} / "
          f"{first.metrics.get('champion_roc_auc', float('nan')):.4f} |")
    print(f"| full gate wall time (frames, scoring, metrics, plots, Evidently report, run) | "
          f"{full_s:.1f} s |")
    print(f"| re-run on the same versions, median of {args.reruns} | {statistics.median(rerun_s):.2f} s |")
    print(f"| ratio full / re-run | {full_s / statistics.median(rerun_s):.0f}x |")
    print(f"| webhook ack, fresh delivery (202), median / p99 | {hooks['fresh_median']:.1f} / "
          f"{hooks['fresh_p99']:.1f} ms |")
    print(f"| webhook ack, duplicate (200), median / p99 | {hooks['dup_median']:.1f} / "
          f"{hooks['dup_p99']:.1f} ms |")
    print(f"| gates run for {args.deliveries} fresh + {args.deliveries} duplicate deliveries | "
          f"{hooks['gates']} |")
    print()
    print(f"- Re-running changes nothing (same decision run, no new run): "
          f"{'met' if idempotent else 'not met'}.")
    print(f"- Webhook answered before the gate runs (median ack {hooks['fresh_median']:.1f} ms vs gate "
          f"{full_s:.0f} s): {'met' if hooks['fresh_median'] / 1000 < full_s / 10 else 'not met'}.")
    print(f"- Each delivery id gates once: {'met' if hooks['gates'] == args.deliveries else 'not met'}.")


if __name__ == "__main__":
    main()
