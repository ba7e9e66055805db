"""`make demo`: the whole loop, end to end, on embedded defaults.

simulate (usage + segment shift) -> materialize -> train a champion -> gate -> promote ->
days pass, weekly monitoring -> the last window as production runs it: ``churn scheduler
--once`` materializes, monitors (the policy asks for a retrain; its decision is an alert) and
retrains (train + gate) -> canary with simulated traffic through the real scoring service ->
canary analysis -> promotion -> the alert delivered to a local receiver the demo started.
Every step is an MLflow run in ``<workspace>/mlflow.db``.

The story's dates (day indexes from ``start``): the champion is trained at ``champion_day``
(its window ends ``horizon + holdout`` days earlier, all before the drift), the drift
starts at ``onset_day``, monitoring runs weekly after it, and the retrain happens at the
end of the data, when a full window of post-drift labels has matured.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import httpx
import numpy as np
from rich.table import Table

from mlflow_churn.alerts.receiver import AlertReceiver
from mlflow_churn.cli_common import make_console, rich_progress
from mlflow_churn.config import ChurnConfig, load_config
from mlflow_churn.data.simulator import SimulationSpec, simulate
from mlflow_churn.times import midnight
from mlflow_churn.tracking_server import free_port

console = make_console()


@dataclass(frozen=True)
class DemoSpec:
    """Sizes and dates of the demo (defaults: ~5 minutes on 2 cores)."""

    customers: int = 50_000
    days: int = 200
    start: date = date(2026, 1, 1)
    onset_day: int = 130
    champion_day: int = 130
    monitor_every_days: int = 7
    early_windows: int = 3
    n_trials: int = 8
    traffic_customers: int = 12_000
    min_canary_samples: int = 500
    seed: int = 42


@dataclass
class DemoStep:
    """One line of the summary table."""

    step: str
    outcome: str
    evidence: str
    seconds: float


@dataclass
class DemoReport:
    """What the demo did, step by step."""

    steps: list[DemoStep] = field(default_factory=list)
    tracking_uri: str = ""
    experiment_id: str = ""  # of training.experiment (`churn`)
    #: (version, kind, decision, compared with, key id, issued at) of every signed decision
    signed: list[tuple[str, str, str, str, str, str]] = field(default_factory=list)
    verify: list[str] = field(default_factory=list)  # what `churn registry verify` found wrong
    verified: bool | None = None

    def add(self, step: str, outcome: str, evidence: str, started: float) -> None:
        self.steps.append(DemoStep(step, outcome, evidence, time.perf_counter() - started))
        console.print(f"[bold green]✓[/] {step}: {outcome}  [dim]{evidence}[/]")


def demo_overrides(spec: DemoSpec, alert_url: str | None = None) -> dict[str, object]:
    """The demo's choices over the embedded defaults (dotted keys).

    ``monitoring.policy.drift_alone = retrain``: drift alone triggers a retrain (the default,
    ``investigate``, waits for evidence of lost performance). ``training.n_trials`` is kept
    small so the demo finishes in minutes. ``alert_url``: the local receiver the alerts go to
    (``alerts.webhook_url``). The scheduler runs materialize, monitor and retrain (not the
    freshness check: the demo's batch is as old as its simulated data).
    """
    found: dict[str, object] = {
        "training.n_trials": spec.n_trials,
        "monitoring.policy.drift_alone": "retrain",
        "serving.min_canary_samples": spec.min_canary_samples,
        "scheduler.freshness.enabled": False,
        "canary.steps": DEMO_PLAN,
    }
    if alert_url:
        found["alerts.webhook_url"] = alert_url
    return found


def demo_config(workspace: Path, spec: DemoSpec, alert_url: str | None = None) -> ChurnConfig:
    """The embedded defaults with :func:`demo_overrides`."""
    return load_config(workspace=workspace, overrides=demo_overrides(spec, alert_url))


def write_demo_config(path: Path, spec: DemoSpec, alert_url: str | None = None) -> Path:
    """:func:`demo_overrides` as a YAML file: the config the scheduler's jobs load (they run as
    `churn scheduler --once` would, from a config file and the workspace)."""
    import yaml

    tree: dict[str, object] = {}
    for dotted, value in demo_overrides(spec, alert_url).items():
        node = tree
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})  # type: ignore[assignment]
        node[leaf] = value  # type: ignore[index]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# written by `churn demo`: the demo's choices over the embedded defaults\n"
                    + yaml.safe_dump(tree, sort_keys=True))
    return path


def _day(spec: DemoSpec, index: int) -> datetime:
    return midnight(spec.start + timedelta(days=index))


def _traffic(cfg: ChurnConfig, customer_ids: np.ndarray, batch: int = 100) -> dict[str, int]:
    """Serve ``customer_ids`` through the real scoring app over a socket; count routes."""
    import uvicorn

    from mlflow_churn.serving.app import create_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(cfg), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    counts: dict[str, int] = {}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            for _ in range(300):
                try:
                    if client.get("/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
            for i in range(0, len(customer_ids), batch):
                ids = [int(c) for c in customer_ids[i:i + batch]]
                res = client.post("/predict", json={"customer_ids": ids})
                res.raise_for_status()
                for row in res.json()["predictions"]:
                    counts[row["route"]] = counts.get(row["route"], 0) + 1
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    return counts


@dataclass(frozen=True)
class GateOutcome:
    """What a gate decided, however it was started (in process, or by a webhook delivery)."""

    passed: bool
    reasons: list[str]
    run_id: str
    metrics: dict[str, float]
    evidence: str = ""  # e.g. "delivery <id>" when the registry's webhook started it


@dataclass
class DemoContext:
    """What the steps share: the config, the spec, the MLflow client and the report.

    ``await_gate``: None runs the gate in process after each training; else a callable
    that waits for the gate the registry's webhook started on a new ``challenger`` version
    (the server mode, :mod:`mlflow_churn.demo_server`) and returns its outcome."""

    cfg: ChurnConfig
    spec: DemoSpec
    report: DemoReport
    await_gate: Callable[[str], GateOutcome] | None = None
    #: the demo's config as a file (the scheduler's jobs load it) and its local alert receiver
    config_file: Path | None = None
    alerts: AlertReceiver | None = None

    @property
    def end(self) -> datetime:
        return _day(self.spec, self.spec.days)


#: the demo's files in its workspace: its config, and where its receiver writes what it got
DEMO_CONFIG_FILE, RECEIVED_FILE = "demo.yaml", "alerts-received.jsonl"
#: the state of the scheduler and of the alerts: the demo starts them afresh, like its data
_FRESH_STATE = ("scheduler.db", "alerts.db", RECEIVED_FILE)


def start_demo(workspace: Path, spec: DemoSpec = DemoSpec(),
               alerts: AlertReceiver | None = None) -> DemoContext:
    """Configure MLflow on ``workspace`` and return the context the steps share. ``alerts``: a
    local receiver the demo's alerts go to (the embedded demo starts one)."""
    from mlflow_churn.tracking import setup_mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    workspace = Path(workspace)
    for name in _FRESH_STATE:
        for path in (workspace / name, workspace / f"{name}-wal", workspace / f"{name}-shm"):
            path.unlink(missing_ok=True)
    alert_url = alerts.url if alerts else None
    config_file = write_demo_config(workspace / DEMO_CONFIG_FILE, spec, alert_url)
    cfg = load_config(config_file, workspace)
    exp_id = setup_mlflow(cfg)
    return DemoContext(cfg, spec, DemoReport(tracking_uri=cfg.mlflow_tracking_uri, experiment_id=exp_id),
                       config_file=config_file, alerts=alerts)


def step_simulate(ctx: DemoContext) -> None:
    """Simulate the customers with a usage and a segment shift at ``onset_day``."""
    spec, t = ctx.spec, time.perf_counter()
    sim = simulate(SimulationSpec(customers=spec.customers, days=spec.days, start=spec.start,
                                  scenario="usage_and_segment", seed=spec.seed,
                                  onset_day=spec.onset_day), ctx.cfg.data_dir, overwrite=True)
    ctx.report.add("simulate", f"{sim.customers:,} customers x {sim.days} days, usage+segment shift "
                   f"from {sim.onset_day}", f"{sim.activity_rows:,} activity rows", t)


def step_champion(ctx: DemoContext) -> str:
    """Materialize, train the first model, gate it on the floors and promote it; its version."""
    from mlflow_churn.evaluation.evaluate import evaluate
    from mlflow_churn.features.materialize import materialize
    from mlflow_churn.serving.transitions import promote
    from mlflow_churn.training.train import train

    cfg, as_of = ctx.cfg, _day(ctx.spec, ctx.spec.champion_day)
    t = time.perf_counter()
    batch = materialize(cfg, as_of)
    ctx.report.add("materialize", f"{batch.rows:,} customers online at {as_of.date()}",
                   f"batch {batch.batch_id}", t)
    t = time.perf_counter()
    first = train(cfg, as_of, progress=rich_progress)
    ctx.report.add("train champion", f"version {first.version}, validation AUC {first.val_auc:.3f}",
                   f"run {first.run_id}", t)
    t = time.perf_counter()
    if ctx.await_gate is not None:
        gate = ctx.await_gate(str(first.version))
    else:
        d = evaluate(cfg, as_of)
        gate = GateOutcome(d.passed, list(d.reasons), d.run_id, dict(d.metrics))
    if not gate.passed:
        raise RuntimeError(f"the first model failed the gate's floors: {gate.reasons}")
    promote(cfg, reason="first model: passed the absolute floors of the gate", version=first.version)
    ctx.report.add("gate + promote", f"version {first.version} -> champion (no champion yet: floors)",
                   f"decision run {gate.run_id}" + (f", {gate.evidence}" if gate.evidence else ""), t)
    return str(first.version)


def monitor_days(spec: DemoSpec) -> list[int]:
    """Day indexes of the monitoring windows: a few weeks after the champion, then the end."""
    days = [spec.champion_day + spec.monitor_every_days * (i + 1) for i in range(spec.early_windows)]
    return days + [spec.days - spec.monitor_every_days, spec.days]


def step_monitor(ctx: DemoContext, days: list[int] | None = None) -> list:
    """Weekly monitoring of the champion (``days``, default :func:`monitor_days`); the
    MonitorResult of each window."""
    from mlflow_churn.monitoring.monitor import monitor

    results = []
    for day in monitor_days(ctx.spec) if days is None else days:
        t = time.perf_counter()
        result = monitor(ctx.cfg, _day(ctx.spec, day))
        d = result.decision
        moved = ", ".join(list(d.features[:3]) + list(d.segments[:2])) or "-"
        ctx.report.add(f"monitor {_day(ctx.spec, day).date()}", d.action, f"moved: {moved}", t)
        results.append(result)
    return results


def step_retrain(ctx: DemoContext):
    """Materialize the newest values, then retrain + gate on the policy's request."""
    from mlflow_churn.features.materialize import materialize
    from mlflow_churn.monitoring.retrain import retrain

    t = time.perf_counter()
    materialize(ctx.cfg, ctx.end)
    outcome = retrain(ctx.cfg, ctx.end, progress=rich_progress, gate=ctx.await_gate is None)
    if outcome.train is None:
        raise RuntimeError(f"retrain did not train: {outcome.reason}")
    if ctx.await_gate is not None:
        ctx.report.add("retrain", f"version {outcome.train.version} -> challenger",
                       f"run {outcome.run_id}", t)
        t = time.perf_counter()
        gate = ctx.await_gate(str(outcome.train.version))
        step, evidence = "gate (webhook)", f"{gate.evidence}, decision run {gate.run_id}"
    elif outcome.gate is not None:
        d = outcome.gate
        gate = GateOutcome(d.passed, list(d.reasons), d.run_id, dict(d.metrics))
        step, evidence = "retrain + gate", f"run {outcome.run_id}"
    else:
        raise RuntimeError(f"retrain did not gate version {outcome.train.version}: {outcome.reason}")
    if not gate.passed:
        raise RuntimeError(f"retrain did not reach canary: {outcome.reason} {gate.reasons}")
    m = gate.metrics
    ctx.report.add(step, f"version {outcome.train.version} -> canary (holdout AUC "
                   f"{m.get('challenger_roc_auc', float('nan')):.3f} vs champion "
                   f"{m.get('champion_roc_auc', float('nan')):.3f})", evidence, t)
    return outcome


#: the demo's rollout plan (``canary.steps``): 10 % of customers, judged, then the promotion
DEMO_PLAN: list[dict[str, object]] = [{"weight": 10, "bake": "0s"}, {"weight": 100}]


def step_canary(ctx: DemoContext):
    """The rollout controller walks the canary through :data:`DEMO_PLAN`: its first tick puts
    step 0's weight live, simulated traffic goes through the real scoring service (which reads
    the weight from the registry), the next tick's judge compares the arms on that step's
    traffic and, on a pass, promotes on its signed verdict. Returns the promoting tick."""
    from mlflow.tracking import MlflowClient

    from mlflow_churn.registry import aliases
    from mlflow_churn.serving.rollout import tick

    cfg, spec = ctx.cfg, ctx.spec
    ids = np.random.default_rng(spec.seed).permutation(np.arange(1, spec.customers + 1))
    t = time.perf_counter()
    res = tick(cfg, datetime.now(UTC), as_of=ctx.end)
    if res.action != "start":
        raise RuntimeError(f"the rollout controller did not start a rollout: {res.action}: {res.message}")
    ctx.report.add("rollout start", f"version {res.version}: {res.message}",
                   f"plan {_plan_text(cfg)}, run {res.run_id}", t)
    served = 0
    for _ in range(2 * len(cfg.canary.steps) + 2):
        t = time.perf_counter()
        chunk = ids[served:served + spec.traffic_customers]
        if len(chunk) == 0:
            raise RuntimeError(f"the demo's {spec.customers:,} customers are all served and the rollout "
                               f"is at step {res.state.step if res.state else '?'}: {res.message}")
        counts = _traffic(cfg, chunk)
        served += len(chunk)
        weight = res.state.weight if res.state else 0.0
        ctx.report.add("canary traffic", f"{sum(counts.values()):,} predictions over HTTP at {weight:g} %",
                       ", ".join(f"{k} {v:,}" for k, v in sorted(counts.items())), t)
        t = time.perf_counter()
        res = tick(cfg, datetime.now(UTC), as_of=ctx.end)
        judged = res.judge
        # e.g. "judge: pass (score 100.0, performance estimated, confidence 0.98)"
        verdict = res.message
        if judged:
            verdict = judged.reasons[0] if judged.reasons else f"judge: {judged.verdict}"
        if res.action == "advance":
            ctx.report.add("rollout advance", res.message, f"{verdict}; run {res.run_id}", t)
            continue
        if res.action != "promote":
            raise RuntimeError(f"the rollout did not promote: {res.action}: {res.message}")
        client = MlflowClient(cfg.mlflow_tracking_uri)
        name = cfg.training.model_name
        champion = aliases.alias_version(client, name, aliases.CHAMPION)
        previous = aliases.alias_version(client, name, aliases.PREVIOUS_CHAMPION)
        ctx.report.add("canary -> champion", f"champion = version {champion.version}, previous-champion = "
                       f"version {previous.version if previous else '-'}",
                       f"{verdict}; run {res.run_id}", t)
        return res
    raise RuntimeError(f"the rollout did not finish: {res.action}: {res.message}")


def _plan_text(cfg: ChurnConfig) -> str:
    """``10 % -> 100 %`` (a pause step: ``pause``)."""
    return " -> ".join("pause" if s.pause else f"{s.weight:g} %" for s in cfg.canary.steps)


def step_scheduler(ctx: DemoContext) -> None:
    """The last window as production runs it: ``churn scheduler --once`` with materialize,
    monitor and retrain due (they run in that order, each under its lock, each recorded): the
    monitor's decision is an alert, the retrain trains and gates a challenger."""
    from mlflow.tracking import MlflowClient

    from mlflow_churn.registry.aliases import CANARY, alias_version
    from mlflow_churn.scheduler.runs import last_run
    from mlflow_churn.scheduler.service import run_due

    cfg = ctx.cfg
    console.print("churn scheduler --once: materialize, monitor and retrain are due (training takes a minute "
                  "or two)", soft_wrap=True)
    statuses = run_due(cfg, str(ctx.config_file))
    url = cfg.scheduler_store_url
    for job in ("materialize", "monitor", "retrain"):
        rec = last_run(url, job)
        if rec is None or statuses.get(job) != "ok":
            raise RuntimeError(f"scheduler job {job}: {statuses.get(job, 'not run')}"
                               + (f": {rec.detail}" if rec else ""))
        evidence = f"run {rec.run_id}" if rec.run_id else "churn scheduler status"
        ctx.report.steps.append(DemoStep(f"scheduler: {job}", rec.detail.split("; latest decision")[0][:120],
                                         evidence,
                                         (rec.ended_at - rec.started_at).total_seconds()))
        console.print(f"[bold green]✓[/] scheduler: {job}: {rec.detail[:200]}  [dim]{evidence}[/]",
                      soft_wrap=True)
    client = MlflowClient(cfg.mlflow_tracking_uri)
    canary = alias_version(client, cfg.training.model_name, CANARY)
    if canary is None:
        raise RuntimeError("the scheduler's retrain left no canary: " + last_run(url, "retrain").detail)
    t = time.perf_counter()
    gate_run = client.get_run(canary.tags["gate_run_id"]) if canary.tags.get("gate_run_id") else None
    m = gate_run.data.metrics if gate_run else {}
    ctx.report.add("gate", f"version {canary.version} -> canary (holdout AUC "
                   f"{m.get('challenger_roc_auc', float('nan')):.3f} vs champion "
                   f"{m.get('champion_roc_auc', float('nan')):.3f})",
                   f"decision run {gate_run.info.run_id if gate_run else '-'}", t)


def step_alert(ctx: DemoContext) -> None:
    """The monitoring decision's alert, delivered by the alert path to the local receiver."""
    from mlflow_churn.alerts import flush
    from mlflow_churn.monitoring.alerting import ALERT_NAME

    if ctx.alerts is None:
        return
    t = time.perf_counter()
    left = flush(ctx.cfg, timeout=60)

    def delivered(receiver: AlertReceiver) -> list:
        return [a for a in receiver.alerts if a["labels"].get("alertname") == ALERT_NAME]

    got = ctx.alerts.wait_for(delivered, 60)
    if not got:
        raise RuntimeError(f"no {ALERT_NAME} alert reached the local receiver {ctx.alerts.url} "
                           f"({left} deliveries still owed; `churn alerts list` shows them)")
    alert = got[-1]
    ctx.report.add("alert delivered", f"{ALERT_NAME} ({alert['labels'].get('decision', '?')}, "
                   f"{alert['status']}) -> {ctx.alerts.url}",
                   f"{ctx.cfg.workspace / RECEIVED_FILE}", t)


def run_demo(workspace: Path, spec: DemoSpec = DemoSpec(),
             await_gate: Callable[[str], GateOutcome] | None = None) -> DemoReport:
    """Run the loop end to end in ``workspace`` (its data is replaced); return the report.
    ``await_gate``: see :class:`DemoContext` (None: gates run in process, the last window and
    the retrain are run by the scheduler, and the alert goes to a local receiver)."""
    if await_gate is not None:  # the server demo: every gate by webhook
        ctx = start_demo(workspace, spec)
        ctx.await_gate = await_gate
        step_simulate(ctx)
        step_champion(ctx)
        step_monitor(ctx)
        step_retrain(ctx)
        step_canary(ctx)
        step_verify(ctx)
        return ctx.report
    with AlertReceiver(log_path=Path(workspace) / RECEIVED_FILE) as receiver:
        ctx = start_demo(workspace, spec, alerts=receiver)
        step_simulate(ctx)
        step_champion(ctx)
        step_monitor(ctx, monitor_days(spec)[:-1])  # the windows that passed before
        step_scheduler(ctx)  # the last one, then the retrain, as production runs them
        step_canary(ctx)
        step_verify(ctx)
        step_alert(ctx)
    return ctx.report


def step_verify(ctx: DemoContext) -> None:
    """The signed decisions behind the registry's state, and ``churn registry verify`` on it."""
    from mlflow.tracking import MlflowClient

    from mlflow_churn.registry.promotion import read_evidence
    from mlflow_churn.registry.signing import verifier_for
    from mlflow_churn.registry.verify import verify_model

    cfg = ctx.cfg
    t = time.perf_counter()
    uri = cfg.mlflow_tracking_uri
    client = MlflowClient(uri, uri)
    name = cfg.training.model_name
    verifier = verifier_for(cfg)
    versions = sorted((mv.version for mv in client.search_model_versions(f"name = '{name}'")), key=int)
    for version in versions:
        ev = read_evidence(client, name, str(version), verifier)
        for kind, d in sorted((ev.decisions if ev else {}).items(), key=lambda kd: kd[1].issued_at):
            against = f"v{d.champion.split(':')[0]}" if d.champion else "-"
            ctx.report.signed.append((str(version), kind, d.decision, against, d.key_id, d.issued_at[:19]))
    result = verify_model(client, cfg, name, verifier)
    ctx.report.verified = result.ok
    ctx.report.verify = [f"{f.alias} v{f.version}: {f.check}: {f.message}" for f in result.failed]
    ctx.report.add("registry verify", "every protected alias verifies" if result.ok
                   else f"{len(result.failed)} finding(s) do not verify",
                   f"{len(ctx.report.signed)} signed decisions, keys {', '.join(verifier.key_ids)}", t)


def print_report(report: DemoReport, workspace: Path, ui_url: str | None = None,
                 title: str = "make demo: the loop, end to end") -> None:
    """The summary table and the command to open the MLflow UI on the workspace (or, with
    ``ui_url``, the address of the tracking server's UI, last), with the address of the
    ``churn`` runs in model training mode (:func:`~mlflow_churn.web.mlflow_ui.runs_url`)."""
    from mlflow_churn.web.mlflow_ui import runs_url

    table = Table(title=title)
    for col in ("step", "outcome", "evidence", "seconds"):
        table.add_column(col, justify="right" if col == "seconds" else "left")
    for s in report.steps:
        table.add_row(s.step, s.outcome, s.evidence, f"{s.seconds:.1f}")
    console.print(table)
    if report.signed:
        signed = Table(title="signed decisions (Ed25519; the guard and `churn serve` verify them)")
        for col in ("version", "decision", "outcome", "against champion", "key", "issued (UTC)"):
            signed.add_column(col)
        for row in report.signed:
            signed.add_row(*row)
        console.print(signed)
    for line in report.verify:
        console.print(f"[red]does not verify:[/] {line}", soft_wrap=True)
    total = sum(s.seconds for s in report.steps)
    runs = f"the runs: {runs_url(ui_url or 'http://127.0.0.1:5000', report.experiment_id)}" \
        if report.experiment_id else ""
    if ui_url:
        console.print(f"total {total:.0f} s. MLflow UI of the tracking server: {ui_url}"
                      + (f"; {runs}" if runs else ""), soft_wrap=True)
        return
    console.print(f"total {total:.0f} s. Open the MLflow UI on the workspace:")
    console.print(f"  .venv/bin/mlflow ui --backend-store-uri {report.tracking_uri}", soft_wrap=True)
    if runs:
        console.print(f"  then {runs}", soft_wrap=True)
