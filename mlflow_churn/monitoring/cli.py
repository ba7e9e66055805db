"""``churn monitor`` and ``churn backtest``: thin shells over monitoring.monitor / backtest."""

from __future__ import annotations

import typer
from rich.table import Table

from mlflow_churn.cli_common import (
    JSON_OPTION,
    SPARK_MASTER_OPTION,
    as_of_or_latest,
    console,
    engine_option,
    get_config,
    opt_str,
    print_json,
    staging_option,
    with_progress,
)
from mlflow_churn.config import SCENARIOS
from mlflow_churn.errors import ChurnError


def _fmt(v: float | None, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _trigger_line(st) -> str:
    """E.g. ``psi[*] > 0.2: pending, active in 1 of the last 1 window(s) (needs 2 before it counts):
    monthly_usage 0.626 (limit 0.2)``."""
    shown = ", ".join(f"{k} {v:.3f} (limit {st.limits.get(k, float('nan')):.3g})"
                      for k, v in list(st.values.items())[:3])
    if st.state == "quiet":
        return f"{st.trigger}: quiet" + (f", largest {shown}" if shown else ", no value in this window "
                                         "(e.g. labels not matured yet)")
    span = f"active in {st.hits} of the last {st.windows} window(s)"
    if st.state == "fired":
        return f"{st.trigger}: FIRED, {span} (needs {st.required}): {shown}"
    return f"{st.trigger}: pending, {span} (needs {st.required} before it counts): {shown}"


def _segment_rule_lines(decision, segment_drop: dict[str, float] | None, top: int) -> list[str]:
    """E.g. ``segment rule: region=pacific NAMED: realised AUC 0.712 vs 0.795 (first window), drop
    0.083, SE 0.021 > limit 0.068, in 2 of the last 3 windows``."""
    lines = [f"segment rule: {d.segment} NAMED: {d.source} AUC {d.auc:.3f} vs {d.baseline:.3f} "
             f"({d.baseline_source}), drop {d.drop:.3f}, SE {d.se:.3f} > limit {d.limit:.3f}, in {d.hits} "
             f"of the last {d.windows} windows" for d in decision.segment_drops[:top]]
    if len(decision.segment_drops) > top:
        lines.append(f"segment rule: and {len(decision.segment_drops) - top} more segment(s) named")
    if decision.pending_drops:
        tops = sorted(decision.pending_drops.items(), key=lambda kv: -kv[1])[:top]
        lines.append("segment rule: pending (AUC dropped beyond noise, not yet in enough windows): "
                     + ", ".join(f"{k} drop {v:.3f}" for k, v in tops))
    if not lines and segment_drop is not None:
        lines.append(f"segment rule: none of {len(segment_drop)} segments compared with their baseline "
                     "dropped beyond its noise" if segment_drop else
                     "segment rule: no segment compared (too few rows or churners, see the segment table)")
    return lines


def decision_lines(decision, segment_psi: dict[str, float], top: int = 5,
                   segment_drop: dict[str, float] | None = None) -> list[str]:
    """The decision in a few lines: one per trigger (fired / pending / quiet and the values), the
    segment rule (the segments named with their AUC drop and its SE, the pending ones; with
    ``segment_drop``, the window's drops, also how many were compared), the segments' drift as
    context (how many moved, the top movers), and why the action is what it is."""
    lines = [_trigger_line(st) for st in decision.triggers]
    lines += _segment_rule_lines(decision, segment_drop, top)
    moved, pending = list(decision.drift_segments), dict(decision.pending_segments)
    if moved or pending:
        psi = {**pending, **{k: segment_psi.get(k, float("nan")) for k in moved}}
        tops = sorted(psi.items(), key=lambda kv: -kv[1])[:top]
        lines.append(f"segment drift (PSI, context): {len(moved)} moved in enough windows, {len(pending)} "
                     f"pending, of {len(segment_psi)} tested; top: "
                     + ", ".join(f"{k} {v:.3f}" for k, v in tops))
    elif segment_psi:
        lines.append(f"segment drift (PSI, context): none of {len(segment_psi)} tested moved beyond its "
                     "threshold")
    fired = [st.trigger for st in decision.triggers if st.state == "fired"]
    waiting = [st.trigger for st in decision.triggers if st.state == "pending"]
    why = {
        "blocked": "integrity fault: never act on broken data",
        "retrain": f"performance trigger(s) fired: {', '.join(decision.fired)}",
        "investigate": (f"drift trigger(s) fired without a performance trigger: {', '.join(fired)}" if fired
                        else "the segment rule named " + ", ".join(decision.segments)
                        + " (policy.segment_action: investigate, or a retrain within the cooldown)"
                        if decision.segments
                        else "segments drifted (or an integrity warning) without a persistent trigger"),
        "ok": ("nothing fired" + (f"; pending: {', '.join(waiting)} (not yet in enough windows)"
                                  if waiting else "")),
    }[decision.action]
    detail = [r for r in decision.reasons
              if r.startswith(("integrity", "cooldown", "refresh", "drift without"))]
    lines.append(f"decision: {decision.action}, because {why}" + (f"; {'; '.join(detail)}" if detail else ""))
    return lines


def _pm(value: float | None, se: float | None) -> str:
    return "-" if value is None else f"{value:.3f} +- {se:.3f}" if se is not None else f"{value:.3f}"


def segment_table(segments, decision, min_drop: float = 0.0) -> Table:
    """Per segment: realised AUC, recall@k, revenue lift and the estimate, each +- its SE, the
    AUC the drop is measured against (realised: the version's first window's; estimated: the
    segment's baseline estimate), the AUC training measured, the drop against its limit
    (max(``min_drop``, z x SE)), and the segment rule's verdict (or why the segment was not
    measured)."""
    table = Table(title="per-segment performance (+- standard error; drop = reference - AUC)")
    for col in ("segment", "churners", "AUC", "recall@k", "revenue lift", "estimated AUC", "reference",
                "training AUC", "drop (limit)", "segment rule"):
        table.add_column(col, justify="left" if col in ("segment", "segment rule") else "right")
    for key, p in segments.items():
        drop = "-" if p.drop is None else f"{p.drop:.3f} ({max(p.threshold or 0.0, min_drop):.3f})"
        if key in {d.segment for d in decision.segment_drops}:
            verdict = "NAMED"
        elif key in decision.pending_drops:
            verdict = "pending"
        elif p.source:
            verdict = f"{p.source} vs {p.reference_source}"
        else:
            verdict = ("no baseline" if p.estimated_auc is not None or p.auc is not None
                       else "; ".join(r for r in (p.reason, p.estimate_reason) if r))
        table.add_row(key, "-" if p.churners is None else str(p.churners), _pm(p.auc, p.auc_se),
                      _pm(p.recall_at_k, p.recall_at_k_se), _pm(p.revenue_lift, p.revenue_lift_se),
                      _pm(p.estimated_auc, p.estimated_auc_se), _fmt(p.reference),
                      _pm(p.training_auc, p.training_auc_se),
                      drop, verdict or "")
    return table


def serving_skew_line(stats, top: int = 3) -> str:
    """E.g. ``serving skew: 480 sampled served rows compared; differ most: tenure_days 100% (PSI
    1.23), ...`` or why it was not checked."""
    if stats.serving_skew_rows is None:
        return ("serving skew: not checked (no served feature values in the window, or "
                "monitoring.serving_skew_sample is 0)")
    head = f"serving skew: {stats.serving_skew_rows} sampled served rows compared"
    worst = sorted((kv for kv in stats.serving_mismatch_rate.items() if kv[1] > 0), key=lambda kv: -kv[1])
    if not worst:
        return head + ", every value equals its offline recomputation"
    shown = ", ".join(f"{f} {v:.0%} (PSI {stats.serving_skew_psi.get(f, float('nan')):.2f})"
                      for f, v in worst[:top])
    return f"{head}; {len(worst)} feature(s) differ, most: {shown}"


def monitor_cmd(
    ctx: typer.Context,
    as_of: str = typer.Option("", "--as-of", help="End of the window, ISO UTC (default: newest event)."),
    alias: str = typer.Option("champion", help="Model alias to monitor."),
    report: bool = typer.Option(True, "--report/--no-report", help="Write the Evidently HTML report."),
    report_value: str = typer.Option(
        None, "--report-value", hidden=True, help="true/false form of --report (MLproject parameter)."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress."),
    source: str = typer.Option(
        "auto", "--source",
        help="Where the window's rows come from: served (the feature values and scores the version "
        "actually served, from the prediction log), offline (recomputed from the raw data), auto (served "
        "when the window holds monitoring.min_served_rows served rows, else offline). The serving-skew "
        "check runs on the window's served values whichever source is used.",
    ),
    engine: str = engine_option("scores the window with spark_udf and counts its drift with Spark "
                                "aggregations; the same statistics and decision"),
    spark_master: str = SPARK_MASTER_OPTION,
    staging: str = staging_option("the window's staged rows"),
    as_json: bool = JSON_OPTION,
) -> None:
    """Monitor the last monitoring.window_days days: drift, performance, serving skew, policy decision."""
    from mlflow_churn.monitoring.alerting import alert_decision
    from mlflow_churn.monitoring.monitor import SparkEngine, monitor
    from mlflow_churn.monitoring.retrain_cli import parse_bool
    from mlflow_churn.monitoring.served import SOURCES
    from mlflow_churn.serving.batch import ENGINES
    from mlflow_churn.spark import DEFAULT_SPARK_MASTER, check_staging

    if report_value is not None:
        report = parse_bool(report_value, "--report-value")
    source = opt_str(source) or "auto"
    if source not in SOURCES:
        raise ChurnError(f"--source must be one of {', '.join(SOURCES)}, got '{source}'")
    engine = opt_str(engine) or "local"
    if engine not in ENGINES:
        raise ChurnError(f"--engine must be one of {', '.join(ENGINES)}, got '{engine}'")
    spark = SparkEngine(opt_str(spark_master) or DEFAULT_SPARK_MASTER, opt_str(staging))
    check_staging(spark.staging, spark.master)
    cfg = get_config(ctx)
    when = as_of_or_latest(cfg, as_of)
    res = with_progress("monitoring window", 1, progress and not as_json,
                        lambda tick: (monitor(cfg, when, alias=opt_str(alias) or "champion", report=report,
                                              on_decision=lambda r: alert_decision(cfg, r),
                                              source=source, engine=engine, spark=spark), tick(1))[0])
    if as_json:
        print_json(res.to_dict())
        return
    table = Table(title=f"churn monitor: {cfg.training.model_name} v{res.model_version} "
                        f"window {res.window_start:%Y-%m-%d} .. {res.as_of:%Y-%m-%d}")
    s = res.stats
    for col in ("feature", "PSI", "KS D", "JS", "null rate"):
        table.add_column(col, justify="left" if col == "feature" else "right")
    for f, v in sorted(s.psi.items(), key=lambda kv: -kv[1])[:10]:
        table.add_row(f, _fmt(v), _fmt(s.ks.get(f)), _fmt(s.js.get(f)), _fmt(s.null_rate.get(f)))
    table.add_row("(model score)", _fmt(s.score_psi), "-", "-", "-")
    console.print(table)
    console.print(f"source: {s.source} ({s.source_reason})", markup=False, highlight=False)
    console.print(serving_skew_line(s), markup=False, highlight=False)
    perf = res.performance
    src = [f"{c} {v:.1%}" for c, v in s.source_null_rate.items() if v > 0]
    if src:
        console.print("raw source null rates (worst day): " + ", ".join(src))
    console.print(
        f"estimated AUC {_fmt(perf.estimated_auc)} (reference {_fmt(perf.reference_estimated_auc)}); "
        f"realised AUC {_fmt(s.realised_auc)} (unseen customers {_fmt(s.realised_auc_unseen)} vs "
        f"baseline {_fmt(s.auc_baseline)}); early-label AUC {_fmt(s.early_auc)} vs "
        f"{_fmt(s.early_auc_baseline)}"
    )
    if perf.segments:
        console.print(segment_table(perf.segments, res.decision, cfg.monitoring.policy.segment_min_drop))
    lines = decision_lines(res.decision, res.stats.segment_psi, segment_drop=res.stats.segment_auc_drop)
    for line in lines[:-1]:
        console.print(f"  {line}", markup=False, highlight=False)
    console.print(lines[-1], style="bold", markup=False, highlight=False)
    console.print(f"MLflow run: {res.run_id}")

def backtest_cmd(
    ctx: typer.Context,
    scenario: str = typer.Option("stable", help=f"One of: {', '.join(SCENARIOS)}."),
    days: int = typer.Option(200, help="Simulated days."),
    customers: int = typer.Option(
        None, help="Simulated customers (default and 0: config simulation.customers)."),
    onset_day: int = typer.Option(
        None, help="Drift onset day index; -1 = default (4 windows after the first training)."
    ),
    step_days: int = typer.Option(
        None, help="Days between windows, 1 = daily (default and 0: config monitoring.window_days)."
    ),
    n_trials: int = typer.Option(3, help="Optuna trials per (re)training."),
    seed: int = typer.Option(None, help="Simulation seed (default and -1: config simulation.seed)."),
    fast: bool = typer.Option(False, "--fast", help="No per-window MLflow runs / reports."),
    fast_value: str = typer.Option(
        None, "--fast-value", hidden=True, help="true/false form of --fast (MLproject parameter)."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Replay a scenario: simulate, train, monitor window by window, retrain; score detection."""
    from mlflow_churn.monitoring.backtest import backtest
    from mlflow_churn.monitoring.retrain_cli import parse_bool

    if n_trials < 1:
        raise ChurnError(f"--n-trials must be >= 1, got {n_trials}")
    if scenario not in SCENARIOS:
        raise ChurnError(f"--scenario must be one of {', '.join(SCENARIOS)}, got '{scenario}'")
    if not 1 <= days <= 36_500:
        raise ChurnError(f"--days must be between 1 and 36500 (100 years), got {days}")
    for option, value, low in (("--customers", customers, 0), ("--step-days", step_days, 0),
                               ("--onset-day", onset_day, -1), ("--seed", seed, -1)):
        if value is not None and value < low:
            raise ChurnError(f"{option} must be >= {low}, got {value}")
    customers = customers or None
    step_days = step_days or None
    onset_day = None if onset_day == -1 else onset_day
    seed = None if seed == -1 else seed
    if fast_value is not None:
        fast = fast or parse_bool(fast_value, "--fast-value")
    cfg = get_config(ctx)
    step = step_days or cfg.monitoring.window_days
    total = max(1, days // step)
    res = with_progress(
        f"backtest {scenario}",
        total,
        progress and not as_json,
        lambda tick: backtest(
            cfg,
            scenario,
            days,
            customers=customers,
            onset_day=onset_day,
            seed=seed,
            step_days=step_days,
            n_trials=n_trials,
            fast=fast,
            on_window=tick,
        ),
    )
    if as_json:
        from dataclasses import asdict

        print_json({"summary": res.summary(), "windows": [asdict(w) for w in res.windows]})
        return
    table = Table(title=f"churn backtest: {scenario}, onset {res.onset[:10]}")
    for col in (
        "#",
        "as_of",
        "model",
        "decision",
        "pop PSI",
        "top feature",
        "top segment",
        "seg PSI",
        "realised AUC",
        "early AUC",
        "est. AUC",
        "retrained",
    ):
        table.add_column(col)
    for w in res.windows:
        table.add_row(
            str(w.index),
            w.as_of[:10],
            w.model_version,
            w.action,
            _fmt(w.population_psi_max),
            w.top_feature,
            w.top_segment or "-",
            _fmt(w.top_segment_psi),
            _fmt(w.realised_auc),
            _fmt(w.early_auc),
            _fmt(w.estimated_auc),
            w.retrained_to or "",
        )
    console.print(table)
    summ = Table(title="detection quality")
    summ.add_column("measure")
    summ.add_column("value", justify="right")
    for k, v in res.summary().items():
        if k in ("windows",):
            continue
        summ.add_row(k, _fmt(v) if isinstance(v, float) else str(v))
    console.print(summ)


def register(app: typer.Typer) -> None:
    """Add the monitoring commands to the ``churn`` app."""
    app.command("monitor")(monitor_cmd)
    app.command("backtest")(backtest_cmd)
