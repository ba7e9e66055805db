"""Canary judge backtest (issue 24 item 5): how often the judge promotes, rolls back or pauses
the first rollout step of a good challenger, a challenger reading one feature scaled wrong, a
worse model, and the champion against itself (A/A).

Simulates ``--customers`` customers x 120 days (stable), trains the models on them and runs
:func:`mlflow_churn.serving.judge_backtest.judge_backtest` with ``--replays`` replays per
scenario at the default configuration (first step: ``canary.steps[0].weight`` %,
``canary.min_requests`` / ``serving.min_canary_samples`` canary requests). Prints a Markdown
section with the issue's targets; nothing is asserted.

    python -m bench.bench_canary_judge [--customers 5000] [--replays 200]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from datetime import date
from pathlib import Path


def main(customers: int, replays: int) -> None:
    from mlflow_churn.config import load_config
    from mlflow_churn.data.simulator import SimulationSpec, simulate
    from mlflow_churn.serving.judge_backtest import judge_backtest

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        simulate(SimulationSpec(customers=customers, days=120, start=date(2026, 1, 1), seed=7), data)
        cfg = load_config(workspace=Path(tmp), environ={})
        start = time.perf_counter()
        res = judge_backtest(cfg, data, replays=replays)
        took = time.perf_counter() - start
    print("## Canary judge backtest (issue 24 item 5)\n")
    print(f"{customers:,} simulated customers x 120 days; the first rollout step at {res.canary_weight:g} % "
          f"weight: {res.min_requests} canary requests and {res.champion_requests} champion requests, the "
          f"judge looking every {res.look_every} canary requests (fail = roll back at once; at the end "
          f"pass = promote, marginal = pause); {replays} replays per scenario; labels not matured "
          f"(performance = the label-free estimate). bad_feature: the good challenger reading "
          f"`{res.feature}` x {res.feature_scale:g}. Holdout AUC: "
          + ", ".join(f"{k} {v:.3f}" for k, v in res.holdout_auc.items()) + f". {took:.0f} s in all.\n")
    print("| scenario | promoted | rolled back | paused | requests (median) | rollback requests (median) "
          "| rolled back at the first look | metrics failed at rollback |")
    print("|---|---|---|---|---|---|---|---|")
    for s in res.scenarios:
        rb = "-" if math.isnan(s.rollback_requests_median) else f"{s.rollback_requests_median:.0f}"
        failed = ", ".join(f"{k} {v}" for k, v in sorted(s.failed_metrics.items())) or "-"
        print(f"| {s.scenario} | {s.promoted:.1%} | {s.rolled_back:.1%} | {s.paused:.1%} | "
              f"{s.requests_median:.0f} | {rb} | {s.rolled_back_first_look:.1%} | {failed} |")
    aa, good = res.scenario("aa"), res.scenario("good")
    print()

    def verdict(ok: bool) -> str:
        return "met" if ok else "not met"

    aa_ok = aa.rolled_back <= 0.01 and replays >= 200
    print(f"- target aa false rollbacks <= 1 % over >= 200 replays: {verdict(aa_ok)} "
          f"({aa.rolled_back:.1%} of {replays})")
    print(f"- target good promoted >= 95 %: {verdict(good.promoted >= 0.95)} ({good.promoted:.1%})")
    for name in ("bad_feature", "bad_model"):
        s = res.scenario(name)
        within = s.rolled_back >= 0.99 and (math.isnan(s.rollback_requests_median)
                                            or s.rollback_requests_median <= res.min_requests)
        print(f"- target {name} rolled back in >= 99 % at the first step within its {res.min_requests} "
              f"requests: {verdict(within)} ({s.rolled_back:.1%}, median {s.requests_median:.0f} requests)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=5000)
    parser.add_argument("--replays", type=int, default=200)
    args = parser.parse_args()
    main(args.customers, args.replays)
