"""``churn monitor`` and ``churn backtest``: thin shells over monitoring.monitor / backtest."""

from __future__ import annotations

import typer
from rich.table import Table

from mlflow_churn.cli_common import console, get_config, opt_str, parse_datetime, with_progress
from mlflow_churn.config import SCENARIOS
from mlflow_churn.errors import ChurnError


def _fmt(v: float | None, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def register(app: typer.Typer) -> None:
    """Add the monitoring commands to the ``churn`` app."""

    @app.command("monitor")
    def monitor_cmd(
        ctx: typer.Context,
        as_of: str = typer.Option("", "--as-of", help="End of the window, ISO UTC (default: newest event)."),
        alias: str = typer.Option("champion", help="Model alias to monitor."),
        report: bool = typer.Option(True, "--report/--no-report", help="Write the Evidently HTML report."),
        report_value: str = typer.Option(
            None, "--report-value", hidden=True, help="true/false form of --report (MLproject parameter)."
        ),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress."),
    ) -> None:
        """Monitor the last monitoring.window_days days: drift, performance, policy decision."""
        from mlflow_churn.features.offline import data_bounds
        from mlflow_churn.monitoring.monitor import monitor
        from mlflow_churn.monitoring.retrain_cli import parse_bool

        if report_value is not None:
            report = parse_bool(report_value, "--report-value")
        cfg = get_config(ctx)
        when = parse_datetime(as_of, "--as-of") if opt_str(as_of) else data_bounds(cfg.data_dir).last_event
        res = with_progress("monitoring window", 1, progress,
                            lambda tick: (monitor(cfg, when, alias=opt_str(alias) or "champion",
                                                  report=report), tick(1))[0])
        d = res.decision
        table = Table(title=f"churn monitor: {cfg.training.model_name} v{res.model_version} "
                            f"window {res.window_start:%Y-%m-%d} .. {res.as_of:%Y-%m-%d}")
        s = res.stats
        for col in ("feature", "PSI", "KS D", "JS", "null rate"):
            table.add_column(col, justify="left" if col == "feature" else "right")
        for f, v in sorted(s.psi.items(), key=lambda kv: -kv[1])[:10]:
            table.add_row(f, _fmt(v), _fmt(s.ks.get(f)), _fmt(s.js.get(f)), _fmt(s.null_rate.get(f)))
        table.add_row("(model score)", _fmt(s.score_psi), "-", "-", "-")
        console.print(table)
        segs = sorted(res.stats.segment_psi.items(), key=lambda kv: -kv[1])[:5]
        if segs:
            console.print("top segments: " + ", ".join(
                f"{k} {v:.3f} (noise {res.stats.segment_threshold.get(k, 0):.3f})" for k, v in segs))
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
        console.print(f"[bold]decision: {d.action}[/bold]; " + "; ".join(d.reasons))
        if d.segments:
            console.print("segments that moved: " + ", ".join(d.segments))
        console.print(f"MLflow run: {res.run_id}")

    @app.command("backtest")
    def backtest_cmd(
        ctx: typer.Context,
        scenario: str = typer.Option("stable", help=f"One of: {', '.join(SCENARIOS)}."),
        days: int = typer.Option(200, help="Simulated days."),
        customers: int = typer.Option(None, help="Simulated customers; 0 = simulation.customers."),
        onset_day: int = typer.Option(
            None, help="Drift onset day index; -1 = default (4 windows after the first training)."
        ),
        step_days: int = typer.Option(
            None, help="Days between windows; 0 = monitoring.window_days (1 = daily)."
        ),
        n_trials: int = typer.Option(3, help="Optuna trials per (re)training."),
        seed: int = typer.Option(None, help="Simulation seed; -1 = simulation.seed."),
        fast: bool = typer.Option(False, "--fast", help="No per-window MLflow runs / reports."),
        fast_value: str = typer.Option(
            None, "--fast-value", hidden=True, help="true/false form of --fast (MLproject parameter)."
        ),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress."),
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
            progress,
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
