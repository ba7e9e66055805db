"""Targeted retrain on the ``segment_concept`` scenario (issue 23 item 3).

Target: on the ``segment_concept`` backtest, the targeted retrain's AUC on the scenario's
segment is >= the plain retrain's + 0.01 and >= the champion's + 0.02, and no other segment
is worse by more than its tolerance (``evaluation.segment_tolerance``).

Two parts, in one temporary workspace:

1. **The backtest** (:func:`mlflow_churn.monitoring.backtest.backtest`, default configuration,
   weekly windows, the onset 4 weeks after the first training): simulate ``segment_concept``
   in ``--segment`` (default ``contract=one-year`` as ``bench_segments`` replays it: 25% of
   the customers; inside it behaviour stops driving churn and price starts to, at an
   unchanged churn rate), train the first champion, monitor window by window; the segment
   rule names the segment, ``retrain`` trains a targeted challenger
   (``training.segment_weight``) and the gate requires the segment to improve. The section
   lists each retrain the replay ran: its targets and the gate's ``segment_improves`` figures.
2. **The comparison** on the first day a retrain's recent rows (``segment_recent_days``) have
   labels that all follow the onset (the replay's first retrain targeting the segment from
   then on, if any: before it no retrain can learn the new relation): the champion in
   service then, a plain retrain (weight 1), targeted retrains with several
   weights and recent spans (``training.segment_recent_days``), and a per-segment model
   (a second model trained on the segment's rows alone, routed by segment at scoring; the
   plain retrain scores the others). Every retrain is the real ``train()`` (Optuna trials
   with the weighted objective, the final fit), repeated over ``--seeds`` training seeds and
   averaged. All are scored on the holdout customers (never trained on) at the daily
   cutoffs of the ``--eval-days`` after the retrain's window, labels matured: ROC AUC on the
   segment, on every other segment of ``evaluation.segments`` and overall.

Usage: ``python -m bench.bench_targeted [--quick] [--customers N] [--seeds K] [--trials T]
[--segment column=value]`` (``--quick``: 20,000 customers, one seed).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from mlflow_churn.config import ChurnConfig, load_config
from mlflow_churn.evaluation.holdout import holdout_frame
from mlflow_churn.features.offline import daily_cutoffs
from mlflow_churn.monitoring.backtest import backtest, first_training_index
from mlflow_churn.stats.metrics import segment_metrics
from mlflow_churn.training.model import load_scorer
from mlflow_churn.training.targeting import SegmentTargets, segment_mask
from mlflow_churn.training.train import LABEL, prepare_window, train, train_on_frame

SCENARIO = "segment_concept"
#: days simulated after the first training day; the onset 28 days after it (4 quiet weeks)
DAYS_AFTER_FIRST_TRAINING, ONSET_AFTER = 140, 28


#: the scenario's segment (``--segment``), set on every config of the run
SEGMENT = {"simulation.segment_column": "contract", "simulation.segment_value": "one-year"}


def _cfg(workspace: Path, **training: Any) -> ChurnConfig:
    return load_config(workspace=workspace, environ={},
                       overrides=SEGMENT | {f"training.{k}": v for k, v in training.items()})


def _replay(workspace: Path, customers: int, trials: int) -> tuple[Any, list[dict[str, Any]]]:
    """Part 1: the backtest, then every retrain run it made (targets, gate figures)."""
    from mlflow import MlflowClient

    cfg = _cfg(workspace)
    first = first_training_index(cfg)
    result = backtest(cfg, SCENARIO, first + DAYS_AFTER_FIRST_TRAINING, customers=customers, step_days=7,
                      fast=True, seed=11, onset_day=first + ONSET_AFTER, n_trials=trials)
    client = MlflowClient()
    exps = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(exps, filter_string="tags.`retrain.action` = 'retrained'",
                              order_by=["attributes.start_time ASC"])
    retrains = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in runs:
            tags = run.data.tags
            gate: dict[str, Any] = {}
            if tags.get("retrain.gate_run_id"):
                path = client.download_artifacts(tags["retrain.gate_run_id"], "decision.json", tmp)
                gate = json.loads(Path(path).read_text())
            rules = [r for r in gate.get("rules", []) if r["rule"] == "segment_improves"]
            retrains.append({
                "as_of": tags["retrain.as_of"], "targets": tags.get("retrain.target_segments", "none"),
                "version": tags.get("retrain.challenger_version"), "gate": tags.get("retrain.gate", "-"),
                "improves": rules, "reasons": gate.get("reasons", []),
            })
    return result, retrains


def _eval_frame(cfg: ChurnConfig, fs: Any, window_end: datetime, days: int) -> Any:
    """Holdout customers at the daily cutoffs of the ``days`` after ``window_end``."""
    cutoffs = [c for c in daily_cutoffs(window_end, window_end + timedelta(days=days), 1) if c > window_end]
    return holdout_frame(cfg, fs, cutoffs)


def _scores_table(cfg: ChurnConfig, frame: Any, scores: np.ndarray) -> dict[str, float]:
    """ROC AUC per ``segment=value`` of ``evaluation.segments`` and overall (``all``)."""
    from sklearn.metrics import roc_auc_score

    table = segment_metrics(frame.assign(score=scores), "score", LABEL, cfg.evaluation.segments,
                            cfg.evaluation, min_size=1)
    out = {f"{r.segment}={r.value}": float(r.roc_auc) for r in table.itertuples()}
    out["all"] = float(roc_auc_score(frame[LABEL].to_numpy(), scores))
    return out


Tables = dict[str, dict[str, float]]
PLAIN, CHAMPION = "plain retrain (weight 1)", "champion"


def _arms(workspace: Path, as_of: datetime, named: tuple[str, ...], key: str, champion_uri: str,
          seeds: int, trials: int, eval_days: int, weights: list[float],
          log: Any) -> tuple[dict[str, list[Any]], Any, dict]:
    """Part 2: every arm's scores (one array per seed) on one evaluation frame; ``named``: the
    segments the replay's retrain targeted, ``key``: the scenario's (the per-segment model's)."""
    base = _cfg(workspace)
    prep = prepare_window(base, as_of)
    fs = prep.feature_set
    frame = _eval_frame(base, fs, datetime.fromisoformat(prep.window_end), eval_days)
    inside = segment_mask(frame, [key])
    y = frame[LABEL].to_numpy()
    info = {"window": f"{prep.window_start[:10]} .. {prep.window_end[:10]}", "eval_rows": len(frame),
            "segment_rows": int(inside.sum()),
            "segment_churners": int(frame.loc[inside & (y == 1), "customer_id"].nunique()),
            "cutoffs": f"{frame['cutoff'].min():%Y-%m-%d} .. {frame['cutoff'].max():%Y-%m-%d}"}
    scores: dict[str, list[Any]] = {CHAMPION: [load_scorer(champion_uri).predict_proba(frame)]}
    arms: list[tuple[str, dict[str, Any], SegmentTargets | None]] = [(PLAIN, {}, None)]
    for w in weights:
        arms.append((f"targeted, weight {w:g}, recent 14 d", {"segment_weight": w, "segment_recent_days": 14},
                     SegmentTargets(named, w)))
    w_mid = weights[len(weights) // 2]
    arms.append((f"targeted, weight {w_mid:g}, whole window",
                 {"segment_weight": w_mid, "segment_recent_days": 10_000}, SegmentTargets(named, w_mid)))
    for seed in range(1, seeds + 1):
        for name, extra, targets in arms:
            start = time.perf_counter()
            cfg = _cfg(workspace, seed=seed, n_trials=trials, **extra)
            res = train(cfg, as_of, n_trials=trials, progress=False, targets=targets)
            scores.setdefault(name, []).append(load_scorer(res.model_uri).predict_proba(frame))
            log(f"seed {seed} {name}: {time.perf_counter() - start:.0f} s")
        # the per-segment model: the segment's own rows, the plain retrain for everyone else
        start = time.perf_counter()
        cfg = _cfg(workspace, seed=seed, n_trials=trials, model_name="churn-segment-model")
        seg_prep = prepare_window(cfg, as_of)
        seg_train = seg_prep.train[segment_mask(seg_prep.train, [key])]
        seg_valid = seg_prep.valid[segment_mask(seg_prep.valid, [key])]
        res = train_on_frame(cfg, seg_train, seg_valid, fs, source="table", n_trials=trials,
                             progress=False)
        routed = scores[PLAIN][-1].copy()
        routed[inside] = load_scorer(res.model_uri).predict_proba(frame[inside])
        scores.setdefault(f"per-segment model for {key} (routed)", []).append(routed)
        log(f"seed {seed} per-segment model: {time.perf_counter() - start:.0f} s")
    return scores, frame, info


def _mean_tables(tables: list[dict[str, float]]) -> dict[str, float]:
    """Per key, the mean over the seeds (NaN where a segment holds one class only)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "mean of empty slice": one-class segments
        return {k: float(np.nanmean([t[k] for t in tables])) for k in tables[0]}


def _tolerance_margins(cfg: ChurnConfig, frame: Any, arm: Any, ref: Any, named: tuple[str, ...],
                       diffs: dict[str, float]) -> tuple[str, float]:
    """The other segments as the gate's segment_auc rule sees them: the worst of
    ``diff + segment_tolerance + z x SE`` (>= 0: within its tolerance) over the segments with
    enough rows and churners, ``diffs`` the seed-averaged AUC differences."""
    from mlflow_churn.stats.metrics import add_segment_columns
    from mlflow_churn.stats.uncertainty import segment_auc_diff_se, segment_z

    ev = cfg.evaluation
    se = segment_auc_diff_se(add_segment_columns(frame), arm, ref, ev.segments, seed=cfg.training.seed)
    rows = [r for r in se.itertuples() if f"{r.segment}={r.value}" not in named
            and r.churners >= ev.min_segment_churners and np.isfinite(r.auc_diff_se)]
    z = segment_z(ev.segment_alpha, len(rows))
    margins = {}
    for r in rows:
        name = f"{r.segment}={r.value}"
        if np.isfinite(diffs.get(name, np.nan)):
            margins[name] = diffs[name] + ev.segment_tolerance + z * r.auc_diff_se
    return min(margins.items(), key=lambda kv: kv[1])


def _report(result: Any, retrains: list[dict[str, Any]], key: str, named: tuple[str, ...],
            scores: dict[str, list[Any]], frame: Any, info: dict[str, Any], args: argparse.Namespace,
            cfg: ChurnConfig, default: str) -> None:
    print(f"## Targeted retrain (`{SCENARIO}` backtest, {args.customers:,} customers, segment `{key}`)\n")
    alarms = [w for w in result.windows if w.action != "ok"]
    print(f"Backtest: onset {result.onset[:10]}, {len(result.windows)} weekly windows, detected "
          f"{'yes' if result.detected else 'no'} (delay {result.detection_delay_windows or 0:.1f} windows), "
          f"{len(alarms)} alarmed windows, {len(retrains)} retrain(s):\n")
    print("| retrain as_of | targets | challenger | gate "
          "| segment_improves (challenger vs champion, required) |")
    print("|---|---|---|---|---|")
    for r in retrains:
        imp = "; ".join(f"{x['metric']}: {x['candidate']:.3f} vs {x['baseline']:.3f} (>= {x['required']:.3f})"
                        if x.get("required") is not None else f"{x['metric']}: not measurable"
                        for x in r["improves"]) or "-"
        print(f"| {r['as_of'][:10]} | {r['targets']} | v{r['version']} | {r['gate']} | {imp} |")
    named_first: dict[str, str] = {}
    for w in result.windows:
        if w.top_segment and w.action != "ok":
            named_first.setdefault(w.top_segment, w.as_of[:10])
    print("\nFirst named (top segment of a decision that was not ok): "
          + (", ".join(f"`{k}` {d}" for k, d in named_first.items()) or "none") + ".")
    tables = {name: _mean_tables([_scores_table(cfg, frame, s) for s in ss]) for name, ss in scores.items()}
    print(f"\nComparison on {info['as_of'][:10]} ({info['why']}; targets {', '.join(named)}; champion "
          f"v{info['champion']}, in service then; training window {info['window']}; {args.seeds} training "
          "seed(s) x "
          f"{args.trials} Optuna trials, AUCs averaged over the seeds): holdout customers at "
          f"{info['cutoffs']} ({info['eval_rows']:,} rows; `{key}` {info['segment_rows']:,} rows, "
          f"{info['segment_churners']} churned customers). Other segments: the gate's rule, the worst "
          "of AUC difference + segment_tolerance + z x SE (>= 0: within its tolerance).\n")
    extra = [k for k in named if k != key]
    print(f"| arm | AUC `{key}` | " + "".join(f"AUC `{k}` | " for k in extra)
          + "AUC overall | worst other segment vs plain | worst other segment vs champion |")
    print("|---|---|" + "---|" * len(extra) + "---|---|---|")
    plain, champ = tables[PLAIN], tables[CHAMPION]
    worst: dict[str, tuple[tuple[str, float], tuple[str, float]]] = {}
    for name, t in tables.items():
        arm = scores[name][0]
        wp = _tolerance_margins(cfg, frame, arm, scores[PLAIN][0], named, {k: t[k] - plain[k] for k in t})
        wc = _tolerance_margins(cfg, frame, arm, scores[CHAMPION][0], named, {k: t[k] - champ[k] for k in t})
        worst[name] = (wp, wc)
        cols = "".join(f"{t[k]:.4f} | " for k in extra)
        print(f"| {name} | {t[key]:.4f} | {cols}{t['all']:.4f} | {wp[0]} {wp[1]:+.4f} | "
              f"{wc[0]} {wc[1]:+.4f} |")
    t = tables[default]
    wp, wc = worst[default]
    ok_plain, ok_champ = t[key] >= plain[key] + 0.01, t[key] >= champ[key] + 0.02
    print(f"\n- default ({default}): AUC on `{key}` >= plain retrain + 0.01: "
          f"{'met' if ok_plain else 'not met'} ({t[key]:.4f} vs {plain[key]:.4f}, "
          f"{t[key] - plain[key]:+.4f})")
    print(f"- default: AUC on `{key}` >= champion + 0.02: {'met' if ok_champ else 'not met'} "
          f"({t[key]:.4f} vs {champ[key]:.4f}, {t[key] - champ[key]:+.4f})")
    print(f"- default: no other segment worse than its tolerance: "
          f"{'met' if min(wp[1], wc[1]) >= 0 else 'not met'} (worst margin vs champion {wc[0]} {wc[1]:+.4f}, "
          f"vs plain {wp[0]} {wp[1]:+.4f})")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench.bench_targeted")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--customers", type=int, default=None)
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--eval-days", type=int, default=28)
    parser.add_argument("--weights", default="2,3,5")
    parser.add_argument("--segment", default="contract=one-year")
    args = parser.parse_args(argv)
    column, _, value = args.segment.partition("=")
    SEGMENT.update({"simulation.segment_column": column, "simulation.segment_value": value})
    args.customers = args.customers or (20_000 if args.quick else 40_000)
    args.seeds = args.seeds or (1 if args.quick else 2)
    weights = [float(w) for w in args.weights.split(",")]

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        workspace = Path(tmp) / "ws"
        start = time.perf_counter()
        result, retrains = _replay(workspace, args.customers, args.trials)
        log(f"backtest: {time.perf_counter() - start:.0f} s, {len(retrains)} retrains")
        cfg = _cfg(workspace)
        key = f"{cfg.simulation.segment_column}={cfg.simulation.segment_value}"
        default_w = cfg.training.segment_weight
        default = f"targeted, weight {default_w:g}, recent 14 d"
        if cfg.training.segment_recent_days >= cfg.training.window_days:
            default = f"targeted, weight {default_w:g}, whole window"
        # the comparison: the first day a retrain's recent rows have labels that all follow the
        # onset (earlier, no retrain can learn the new relation), or the replay's first retrain
        # targeting the scenario's segment on or after it
        onset = datetime.fromisoformat(result.onset)
        as_of = onset + timedelta(days=cfg.features.label_horizon_days + cfg.evaluation.holdout_days
                                  + cfg.training.segment_recent_days)
        first = next((r for r in retrains if key in r["targets"].split(",")
                      and datetime.fromisoformat(r["as_of"]) >= as_of), None)
        named = tuple(first["targets"].split(",")) if first else (key,)
        as_of = datetime.fromisoformat(first["as_of"]) if first else as_of
        served = [w for w in result.windows if datetime.fromisoformat(w.as_of) <= as_of]
        champion = (served[-1].retrained_to or served[-1].model_version) if served else "1"
        if default_w not in weights:
            weights.append(default_w)
        scores, frame, info = _arms(workspace, as_of, named, key,
                                    f"models:/{cfg.training.model_name}/{champion}", args.seeds, args.trials,
                                    args.eval_days, sorted(weights), log)
        info |= {"as_of": as_of.isoformat(), "champion": champion,
                 "why": ("the replay's first retrain targeting it once its recent rows' labels followed the "
                         "onset" if first else "no retrain of the replay targeted it once its recent "
                         "training rows' labels followed the onset: a retrain targeted at it on the first "
                         "such day")}
        log(f"total: {time.perf_counter() - start:.0f} s")
        _report(result, retrains, key, named, scores, frame, info, args, cfg, default)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
