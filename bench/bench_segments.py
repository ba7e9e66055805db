"""Performance per segment (issue 23 item 2): the segment rule measured by ``backtest``.

Targets: ``segment_concept``: the degraded segment named by performance within 2 windows of
its labels maturing (or of the label-free estimate, before), while the population AUC drops
by < 0.01 and the population PSI stays < 0.1; ``stable``: <= 1% false alarms with the
per-segment rules on.

- ``segment_concept``: inside ``region=pacific`` (10% of customers) behaviour drives churn
  0.45 as much and price starts to; the default seed and configuration, a 7-day window every
  week, the onset 4 weeks after the first training, replayed until 3 weeks after the onset's
  30-day labels mature. The population's AUC moves by about a tenth of the segment's drop, so
  a drop that keeps it < 0.01 is < 0.1, and a segment's noise shrinks only with its own
  churners: hence many customers. The population AUC is measured **paired**: the replay's
  first champion scores the matured cutoffs of the window that named the segment (else the
  last window) in this dataset and in the ``stable`` scenario simulated with the same seed
  (identical up to the onset), so the difference is the scenario's, not sampling noise (the
  window's own ``auc_drop`` against training's baseline is shown beside it).
- ``stable``: 20,000 customers, a 7-day window every day, as ``bench_detection`` replays it:
  any window whose decision is not ``ok`` is a false alarm; the windows where the segment rule
  named a segment are counted apart.

Usage: ``python -m bench.bench_segments [--quick]`` (``--quick``: 40,000 customers for
``segment_concept``, 8,000 for ``stable``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow_churn.config import load_config
from mlflow_churn.monitoring.backtest import BacktestResult, backtest, first_training_index

#: scenario -> (customers, quick customers, step days, days after the first training)
PLAN: dict[str, tuple[int, int, int, int]] = {
    "segment_concept": (80_000, 40_000, 7, 28 + 30 + 21),
    "stable": (20_000, 8_000, 1, 114),
}
ONSET_AFTER = 28
#: config overrides per scenario (none: the defaults are what is measured)
OVERRIDES: dict[str, dict[str, str]] = {}


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def _paired(cfg, res: BacktestResult, customers: int, days: int, onset_day: int) -> dict[str, float]:
    """Population and segment AUC of the replay's first champion on the matured cutoffs of the
    detection window, in this dataset and in ``stable`` simulated with the same seed."""
    from datetime import datetime, timedelta

    from sklearn.metrics import roc_auc_score

    from mlflow_churn.data.simulator import SimulationSpec, simulate
    from mlflow_churn.features.offline import build_training_frame
    from mlflow_churn.monitoring.monitor import window_cutoffs
    from mlflow_churn.training.model import load_scorer

    first = res.windows[0].model_version
    at = next((w for w in res.windows if res.segment in w.named_segments), res.windows[-1])
    as_of = datetime.fromisoformat(at.as_of)
    horizon = cfg.features.label_horizon_days
    sim = cfg.simulation
    stable_dir = Path(cfg.workspace) / "stable-data"
    simulate(SimulationSpec(customers=customers, days=days, start=sim.start, scenario="stable", seed=sim.seed,
                            onset_day=onset_day, segment_column=sim.segment_column,
                            segment_value=sim.segment_value), stable_dir, overwrite=True)
    scorer = load_scorer(f"models:/{cfg.training.model_name}/{first}", first)
    cutoffs = window_cutoffs(as_of - timedelta(days=horizon), cfg.monitoring.window_days)
    out: dict[str, float] = {"as_of": as_of.timestamp(), "version": float(first)}
    column, value = res.segment.split("=", 1)
    for name, data in (("stable", stable_dir), ("concept", cfg.data_dir)):
        frame = build_training_frame(data, scorer.feature_set, cutoffs, horizon, label=True,
                                     label_as_of=as_of)
        scores = scorer.predict_proba(frame)
        seg = (frame[column].astype(str) == value).to_numpy()
        y = frame["label"].to_numpy()
        out[f"{name}_population_auc"] = float(roc_auc_score(y, scores))
        out[f"{name}_segment_auc"] = float(roc_auc_score(y[seg], scores[seg]))
    return out


def _one(scenario: str, customers: int, out: Path) -> None:
    """Replay one scenario in a temporary workspace; write its result as JSON to ``out``."""
    from dataclasses import asdict

    _, _, step, after = PLAN[scenario]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(workspace=Path(tmp) / "ws", environ={}, overrides=OVERRIDES.get(scenario, {}))
        days = first_training_index(cfg) + after
        onset_day = first_training_index(cfg) + ONSET_AFTER
        start = time.perf_counter()
        r_seg = f"{cfg.simulation.segment_column}={cfg.simulation.segment_value}"

        def progress(w) -> None:
            print(f"{time.perf_counter() - start:6.0f} s window {w.index} {w.as_of[:10]} v{w.model_version} "
                  f"{w.action}: named {w.named_segments or '-'}; {r_seg} {w.segment_source or '-'} AUC "
                  f"{_fmt(w.segment_auc)} vs {_fmt(w.segment_reference)}: drop {_fmt(w.segment_drop)} (SE "
                  f"{_fmt(w.segment_drop_se)}, limit {_fmt(w.segment_drop_limit)}); baseline "
                  f"{_fmt(w.segment_baseline_auc)} (SE {_fmt(w.segment_baseline_se)}); population AUC "
                  f"{_fmt(w.realised_auc)}, PSI {_fmt(w.population_psi_max)}", file=sys.stderr, flush=True)

        r = backtest(cfg, scenario, days, customers=customers, step_days=step, fast=True, onset_day=onset_day,
                     on_window=progress)
        took = time.perf_counter() - start
        paired = _paired(cfg, r, customers, days, onset_day) if scenario == "segment_concept" else {}
        out.write_text(json.dumps({"result": asdict(r), "seconds": took, "paired": paired}))


def _verdicts(scenario: str, r: BacktestResult, paired: dict[str, float]) -> list[str]:
    if scenario == "stable":
        named = sum(1 for w in r.windows if w["named_segments"])
        ok = r.false_alarm_rate <= 0.01 and len(r.windows) >= 100
        return [f"false alarms <= 1% over >= 100 windows with the per-segment rules on: "
                f"{'met' if ok else 'not met'} ({r.false_alarms}/{r.pre_onset_windows}; windows where the "
                f"segment rule named a segment: {named})"]
    pop = paired["stable_population_auc"] - paired["concept_population_auc"]
    seg = paired["stable_segment_auc"] - paired["concept_segment_auc"]
    psi = r.population_psi_at_segment
    delay = r.segment_delay_windows
    ok = bool(r.segment_named and delay is not None and delay <= 2 and pop < 0.01
              and psi is not None and psi < 0.1)
    return [f"{r.segment} named by performance within 2 windows of its labels maturing, population AUC "
            f"drop < 0.01, PSI < 0.1: {'met' if ok else 'not met'} (named {r.segment_named}, delay "
            f"{_fmt(delay, '.1f')} windows; population AUC {pop:+.4f} paired; PSI {_fmt(psi)}; the segment's "
            f"AUC {seg:+.3f} paired)",
            f"other segments named after the onset: {', '.join(r.other_segments_named) or 'none'}"]


def render(results: list[tuple[str, int, dict]]) -> str:
    """The Markdown section from ``(scenario, customers, child result)`` triples."""
    rows, verdicts = [], []
    for scenario, customers, data in results:
        raw, took, paired = data["result"], data["seconds"], data["paired"]
        step = PLAN[scenario][2]
        r = BacktestResult(**{k: v for k, v in raw.items() if k != "windows"}, windows=raw["windows"])
        first = next((w for w in r.windows if r.segment in w["named_segments"]), None)
        drop = (f"{first['segment_drop']:.3f} (SE {first['segment_drop_se']:.3f}, limit "
                f"{first['segment_drop_limit']:.3f})" if first else "-")
        pop = seg = "-"
        if paired:
            a, b = paired["stable_population_auc"], paired["concept_population_auc"]
            pop = f"{a:.4f} -> {b:.4f} ({b - a:+.4f})"
            a, b = paired["stable_segment_auc"], paired["concept_segment_auc"]
            seg = f"{a:.3f} -> {b:.3f} ({b - a:+.3f})"
        named = sum(1 for w in r.windows if w["named_segments"])
        rows.append(f"| `{scenario}` | {customers:,} | {len(r.windows)} (every {step} d) | {r.onset[:10]} | "
                    f"{(r.labels_matured or '-')[:10]} | {first['as_of'][:10] if first else '-'} "
                    f"({_fmt(r.segment_delay_windows, '.1f')}) | {drop} | {pop} | {seg} | "
                    f"{_fmt(r.population_auc_drop_at_segment)} | {_fmt(r.population_psi_at_segment)} | "
                    f"{r.false_alarms}/{r.pre_onset_windows} | {named} | {len(r.retrains)} | {took:.0f} |")
        verdicts += [f"- `{scenario}`: {v}" for v in _verdicts(scenario, r, paired)]
    head = ("## Performance per segment (backtest, default policy and segment rule)\n\n"
            "| scenario | customers | windows | onset | labels matured | segment named (delay, windows) "
            "| its drop at naming | population AUC, paired (stable -> scenario) | segment AUC, paired "
            "| population auc_drop (monitored) | population PSI | false alarms / pre-onset windows "
            "| windows naming a segment | retrains | seconds |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    return head + "\n".join(rows) + "\n\n" + "\n".join(verdicts)


def main(argv: list[str]) -> int:
    if "--one" in argv:  # a child: one scenario per process, so no MLflow / SQLite state is shared
        _one(argv[argv.index("--one") + 1], int(argv[argv.index("--customers") + 1]), Path(argv[-1]))
        return 0
    quick = "--quick" in argv
    results = []
    for scenario, (full, small, _step, _after) in PLAN.items():
        customers = small if quick else full
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "result.json"
            subprocess.run([sys.executable, "-m", "bench.bench_segments", "--one", scenario, "--customers",
                            str(customers), str(out)], check=True, stdout=subprocess.DEVNULL)
            data = json.loads(out.read_text())
        print(f"{scenario}: {data['seconds']:.0f} s", file=sys.stderr, flush=True)
        results.append((scenario, customers, data))
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
