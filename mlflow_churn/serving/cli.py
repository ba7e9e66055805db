"""`churn serve`, `churn canary status|evaluate|auto|promote|rollback|run|resume`, `churn compress`."""

from __future__ import annotations

from datetime import UTC, datetime

import typer
from rich.table import Table

from mlflow_churn.cli_common import (
    JSON_OPTION,
    as_of_or_latest,
    check_number,
    console,
    from_config,
    get_config,
    opt_str,
    parse_datetime,
    parse_version,
    print_json,
)
from mlflow_churn.config import ChurnConfig
from mlflow_churn.errors import ChurnError

canary_app = typer.Typer(help="Canary analysis and transitions: status, evaluate, promote, rollback; the "
                         "rollout controller: run, resume.",
                         no_args_is_help=True)

_AS_OF = typer.Option(None, "--as-of", help="Evaluation time, ISO UTC (default: the data's newest event, "
                      "else the newest logged prediction).")
_SINCE = typer.Option(None, "--since", help="Only predictions with as_of at or after this time (ISO UTC; "
                      "default: from the first).")
_REASON = typer.Option("", "--reason", help="Why (recorded on the run and the version; default: none, "
                       "required by promote and rollback).")
_VERSION = typer.Option(None, "--version", help="The canary version you expect; a no-op if already done "
                        "(default: whatever version is the canary).")
_PROGRESS = typer.Option(True, "--progress/--no-progress", hidden=True,
                         help="Accepted so that one MLproject command line fits every action.")


def _when(cfg: ChurnConfig, value: str | None) -> datetime:
    """--as-of, else the newest data, else the newest logged prediction, else now."""
    from mlflow_churn.serving.canary import default_as_of

    return parse_datetime(value, "--as-of") if opt_str(value) else default_as_of(cfg, datetime.now(UTC))


def _since(value: str | None, until: datetime | None = None) -> datetime | None:
    """--since parsed; a ChurnError when it is after ``until`` (the window's end, --as-of):
    an empty window judges nothing and must not record a decision."""
    start = parse_datetime(value, "--since") if opt_str(value) else None
    if start is not None and until is not None and start > until:
        raise ChurnError(f"--since {value} is after the window's end {until.isoformat()} (--as-of); "
                         "give a --since before it")
    return start


def _service_url(cfg: ChurnConfig, given: str | None) -> str:
    """``given``, else where `churn serve` listens by the config (a wildcard bind as 127.0.0.1)."""
    host = cfg.serving.host if cfg.serving.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    return opt_str(given) or f"http://{host}:{cfg.serving.port}"


def _num(value: float) -> str:
    return "-" if value != value else f"{value:.4g}"  # NaN -> '-'


def _print_evaluation(evaluation: object) -> None:
    from mlflow_churn.serving.canary import CanaryEvaluation

    assert isinstance(evaluation, CanaryEvaluation)
    table = Table(title=f"canary evaluation of '{evaluation.model_name}' at {evaluation.as_of.isoformat()}")
    for col in ("route", "version", "rows", "errors", "error rate", "p99 ms", "mean score", "labelled",
                "AUC", "recall@k"):
        table.add_column(col, justify="left" if col == "route" else "right")
    for st in evaluation.routes.values():
        table.add_row(st.route, str(st.version or "-"), str(st.rows), str(st.errors), _num(st.error_rate),
                      _num(st.p99_latency_ms), _num(st.mean_score), str(st.labelled), _num(st.auc),
                      _num(st.recall_at_k))
    console.print(table)
    console.print(f"score PSI canary vs champion: {_num(evaluation.score_psi)}")
    console.print(f"verdict: [bold]{evaluation.verdict}[/bold]")
    for r in evaluation.reasons:
        console.print(f"  - {r}")
    if evaluation.run_id:
        console.print(f"run: {evaluation.run_id}")


def _print_transition(res: object) -> None:
    from mlflow_churn.serving.transitions import TransitionResult

    assert isinstance(res, TransitionResult)
    console.print(f"{res.action}{' (no-op)' if res.noop else ''}: {res.message}")
    console.print(f"aliases before: {res.before}  after: {res.after}")
    if res.run_id:
        console.print(f"run: {res.run_id}")


@canary_app.command("status")
def canary_status_cmd(
    ctx: typer.Context, as_json: bool = JSON_OPTION,
    as_of: str = typer.Option(None, "--as-of",
                              help="Count predictions with as_of up to this time (default: all)."),
    since: str = _SINCE,
    reason: str = typer.Option("", "--reason", hidden=True, help="Must be empty: status changes nothing."),
    progress: bool = _PROGRESS,
    service_url: str = typer.Option(None, "--service-url", help="The running `churn serve` to ask for "
                                    "its canary fraction (default: http://127.0.0.1:<serving.port>)."),
) -> None:
    """Aliases of the model, the canary fraction the running scoring service routes with (the
    config's serving.canary_fraction, said so, when no service answers) and the predictions
    logged per route and version."""
    from mlflow_churn.serving.alarms import current_alarms
    from mlflow_churn.serving.canary import canary_status
    from mlflow_churn.serving.rollout import RolloutStatus, rollout_state
    from mlflow_churn.serving.traffic import live_canary_fraction

    if opt_str(reason):
        raise ChurnError(f"`churn canary status` changes nothing, so it takes no --reason (got '{reason}')")
    until = parse_datetime(as_of, "--as-of") if opt_str(as_of) else None
    cfg = get_config(ctx)
    st = canary_status(cfg, until, _since(since, until))
    live = live_canary_fraction(_service_url(cfg, service_url), st.model_name, st.canary_fraction)
    _, rollout = rollout_state(cfg)
    watched = (rollout is not None and rollout.status in (RolloutStatus.RUNNING, RolloutStatus.PAUSED)
               and cfg.canary.alarms.enabled)
    alarms = current_alarms(cfg, datetime.now(UTC)) if watched else None  # what the next tick checks
    if as_json:
        print_json({**st.to_dict(), "canary_fraction": live.canary_fraction,
                    "canary_fraction_source": live.source, "service_url": live.service_url,
                    "rollout": rollout.to_dict() if rollout else None,
                    "alarms": alarms.to_dict() if alarms else None,
                    **({"note": live.note} if live.note else {})})
        return
    where = f"the scoring service at {live.service_url}" if live.source == "service" else "the config"
    console.print(f"model '{st.model_name}', canary fraction {live.canary_fraction} (from {where})",
                  soft_wrap=True)
    if live.note:
        console.print(f"note: {live.note}", soft_wrap=True)
    console.print("aliases: " + (", ".join(f"{a}=v{v}" for a, v in sorted(st.aliases.items())) or "none"))
    logged = ", ".join(f"{k}: {n}" for k, n in sorted(st.logged.items()))
    console.print("logged: " + (logged or "nothing yet"))
    if rollout is None:
        console.print("rollout: not started (`churn canary run` starts it)")
    else:
        console.print(f"rollout of v{rollout.version}: {rollout.status} at step {rollout.step} of "
                      f"{len(rollout.plan) - 1}, weight {rollout.weight:g} % since "
                      f"{rollout.step_started_at.isoformat()}"
                      + (f" ({rollout.paused_reason})" if rollout.paused_reason else ""), soft_wrap=True)
    if alarms is not None:
        console.print(f"alarms over the last {cfg.canary.alarms.window}: {alarms.summary()}", soft_wrap=True)


def _evaluate(ctx: typer.Context, as_of: str | None, since: str | None, reason: str, as_json: bool,
              act: bool) -> None:
    from mlflow_churn.serving.alerting import alert_canary
    from mlflow_churn.serving.canary import evaluate_canary
    from mlflow_churn.serving.transitions import act_on_verdict

    cfg = get_config(ctx)
    when = _when(cfg, as_of)
    start = _since(since, when)
    if act:
        evaluation, res = act_on_verdict(cfg, when, start, opt_str(reason))
    else:
        evaluation, res = evaluate_canary(cfg, when, start), None
    alert_canary(cfg, evaluation, res)
    if as_json:
        print_json({"evaluation": evaluation.to_dict(), "transition": res.to_dict() if res else None})
        return
    _print_evaluation(evaluation)
    if res is not None:
        _print_transition(res)
    elif act:
        console.print("auto: waiting (no transition)")


@canary_app.command("evaluate")
def canary_evaluate_cmd(
    ctx: typer.Context, as_of: str = _AS_OF, since: str = _SINCE, reason: str = _REASON,
    auto_mode: bool = typer.Option(False, "--auto", help="Then promote / roll back on the verdict."),
    as_json: bool = JSON_OPTION, progress: bool = _PROGRESS,
) -> None:
    """Compare canary and champion on logged traffic: verdict promote | rollback | wait."""
    _evaluate(ctx, as_of, since, reason, as_json, auto_mode)


@canary_app.command("auto")
def canary_auto_cmd(
    ctx: typer.Context, as_of: str = _AS_OF, since: str = _SINCE, reason: str = _REASON,
    as_json: bool = JSON_OPTION, progress: bool = _PROGRESS,
) -> None:
    """Same as `evaluate --auto`: evaluate, then promote / roll back / wait."""
    _evaluate(ctx, as_of, since, reason, as_json, True)


def _transition(ctx: typer.Context, action: str, reason: str, version: str | None, as_of: str | None,
                since: str | None, as_json: bool, force: bool = False) -> None:
    from mlflow_churn.serving.transitions import promote, rollback

    cfg = get_config(ctx)
    if not opt_str(reason):
        raise ChurnError(f"`churn canary {action}` needs --reason TEXT (it is recorded on the version)")
    if opt_str(version):
        version = parse_version(version, "--version")
    # the transition run always carries the canary evidence of [--since, --as-of]
    if action == "promote":
        when = _when(cfg, as_of)
        res = promote(cfg, reason, version=opt_str(version), as_of=when, since=_since(since, when),
                      force=force)
    else:
        when = _when(cfg, as_of)
        res = rollback(cfg, reason, version=opt_str(version), as_of=when, since=_since(since, when))
    if as_json:
        print_json(res.to_dict())
    else:
        _print_transition(res)


_EVIDENCE_AS_OF = typer.Option(None, "--as-of", help="Evidence up to this time, ISO UTC (default: the data's "
                               "newest event, else the newest logged prediction).")


@canary_app.command("promote")
def canary_promote_cmd(
    ctx: typer.Context, reason: str = _REASON, version: str = _VERSION, as_of: str = _EVIDENCE_AS_OF,
    since: str = _SINCE,
    force: bool = typer.Option(False, "--force", help="Promote although the canary verdict is not "
                               "'promote' (wait, rollback, too few predictions); --reason is signed into "
                               "the version's override decision (tag churn.sig.override)."),
    as_json: bool = JSON_OPTION, progress: bool = _PROGRESS,
) -> None:
    """champion -> the canary version; old champion -> previous-champion; canary removed. Refused
    unless the canary evidence says promote (serving.min_canary_samples predictions within every
    limit), or --force --reason. The run carries the canary evidence."""
    _transition(ctx, "promote", reason, version, as_of, since, as_json, force)


@canary_app.command("rollback")
def canary_rollback_cmd(
    ctx: typer.Context, reason: str = _REASON, version: str = _VERSION, as_of: str = _EVIDENCE_AS_OF,
    since: str = _SINCE, as_json: bool = JSON_OPTION, progress: bool = _PROGRESS,
) -> None:
    """With a canary: sign a rollback of its version, remove alias canary and tag the version
    (champion untouched). After a promotion (no canary): champion back on the version the
    champion's signed promotion replaced (previous-champion). The run carries the evidence."""
    _transition(ctx, "rollback", reason, version, as_of, since, as_json)


def _unused(value: str | None, option: str, command: str) -> None:
    """MLproject passes every canary option to every action: refuse one this action would ignore."""
    if opt_str(value):
        raise ChurnError(f"`churn canary {command}` takes no {option} (got '{value}')")


def _print_tick(res: object) -> None:
    from mlflow_churn.serving.rollout import TickResult

    assert isinstance(res, TickResult)
    st = res.state
    where = f" [step {st.step}/{len(st.plan) - 1}, {st.weight:g} %, {st.status}]" if st else ""
    console.print(f"{datetime.now(UTC):%H:%M:%S} {res.action}{where}: {res.message}", soft_wrap=True)
    if res.run_id:
        console.print(f"  run: {res.run_id}" + (f" (transition run {res.transition_run_id})"
                                                if res.transition_run_id else ""))


@canary_app.command("run")
def canary_run_cmd(
    ctx: typer.Context,
    every: str = typer.Option("60s", "--every", help="Time between two ticks, a duration like 30s, 1m, 5m."),
    once: bool = typer.Option(False, "--once", help="One tick, then exit (for cron or the scheduler)."),
    as_json: bool = typer.Option(False, "--json", help="Print each tick as one JSON object per line."),
    as_of: str = typer.Option(None, "--as-of", help="Business time the judge takes label maturity at, ISO "
                              "UTC (default: the data's newest event, else the newest logged prediction)."),
    since: str = typer.Option(None, "--since", hidden=True, help="Must be empty: each step's own traffic."),
    reason: str = typer.Option("", "--reason", hidden=True, help="Must be empty."),
    progress: bool = _PROGRESS,
) -> None:
    """The rollout controller: walk the canary through canary.steps (advance when the judge
    passes and the bake is over with canary.min_requests per arm, pause on marginal, roll back on
    fail, wait at a pause step for `churn canary resume`, promote at the end). Every --every
    until Ctrl-C, or --once. State lives on the canary version: a restarted controller goes on
    where it was; two controllers never act at once."""
    import json
    import time

    from mlflow_churn.errors import first_line
    from mlflow_churn.jsonable import jsonable
    from mlflow_churn.serving.rollout import tick
    from mlflow_churn.times import parse_duration

    _unused(since, "--since", "run")
    _unused(reason, "--reason", "run")
    period = parse_duration(every, "--every").total_seconds()
    when = parse_datetime(as_of, "--as-of") if opt_str(as_of) else None
    cfg = get_config(ctx)
    while True:
        try:
            res = tick(cfg, datetime.now(UTC), as_of=when)
        except Exception as exc:  # an outage: reported, nothing decided, the next tick tries again
            if once:
                raise
            why = str(exc) if isinstance(exc, ChurnError) else f"{type(exc).__name__}: {first_line(exc)}"
            console.print(f"{datetime.now(UTC):%H:%M:%S} tick failed (nothing decided): {why}",
                          soft_wrap=True)
        else:
            if as_json:
                typer.echo(json.dumps(jsonable(res.to_dict()), default=str))
            else:
                _print_tick(res)
        if once:
            return
        time.sleep(period)


@canary_app.command("resume")
def canary_resume_cmd(
    ctx: typer.Context,
    reason: str = typer.Option("", "--reason", help="Why (recorded on the resume's run; default: none)."),
    as_json: bool = JSON_OPTION,
    as_of: str = typer.Option(None, "--as-of", hidden=True, help="Must be empty."),
    since: str = typer.Option(None, "--since", hidden=True, help="Must be empty."),
    progress: bool = _PROGRESS,
) -> None:
    """Continue a paused rollout: past a plan pause step to the next step, or, after a marginal
    verdict or a refused promotion, the same step again (bake and counts start anew)."""
    from mlflow_churn.serving.rollout import resume

    _unused(as_of, "--as-of", "resume")
    _unused(since, "--since", "resume")
    res = resume(get_config(ctx), datetime.now(UTC), opt_str(reason) or "")
    if as_json:
        print_json(res.to_dict())
    else:
        _print_tick(res)


@canary_app.command("backtest")
def canary_backtest_cmd(
    ctx: typer.Context,
    scenario: list[str] = typer.Option(None, "--scenario", help="good | bad_feature | bad_model | aa; repeat "
                                       "for several (default: all four)."),
    replays: int = typer.Option(200, "--replays",
                                help="Simulated first rollout steps per scenario (1..100000)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the models and the replayed traffic."),
    as_json: bool = JSON_OPTION,
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Replay simulated traffic through the canary judge: per scenario the share promoted / rolled
    back / paused at the rollout's first step and the canary requests the decision needed (the
    workspace's data; models trained on it)."""
    from mlflow_churn.cli_common import rich_progress
    from mlflow_churn.serving.judge_backtest import SCENARIOS, judge_backtest

    chosen = tuple(scenario) if scenario else SCENARIOS
    bad = [s for s in chosen if s not in SCENARIOS]
    if bad:
        raise ChurnError(f"--scenario must be one of {', '.join(SCENARIOS)}, got '{bad[0]}'")
    if not 1 <= replays <= 100_000:
        raise ChurnError(f"--replays must be between 1 and 100000, got {replays}")
    cfg = get_config(ctx)
    res = judge_backtest(cfg, cfg.data_dir, chosen, replays, seed=seed,
                         progress=rich_progress if progress and not as_json else None)
    if as_json:
        print_json(res.to_dict())
        return
    table = Table(title=f"canary judge backtest: first step at {res.canary_weight:g} % weight, "
                  f"{res.min_requests} canary requests ({res.champion_requests} champion), a look every "
                  f"{res.look_every}")
    for col in ("scenario", "replays", "promoted", "rolled back", "paused", "requests (median)",
                "rollback requests (median)", "metrics failed at rollback"):
        table.add_column(col)
    for s in res.scenarios:
        table.add_row(s.scenario, str(s.replays), f"{s.promoted:.1%}", f"{s.rolled_back:.1%}",
                      f"{s.paused:.1%}", _num(s.requests_median), _num(s.rollback_requests_median),
                      ", ".join(f"{k} {v}" for k, v in sorted(s.failed_metrics.items())) or "-")
    console.print(table)
    console.print(f"bad_feature: {res.feature} x {res.feature_scale:g}; AUC on matured holdout labels: "
                  + ", ".join(f"{k} {v:.3f}" for k, v in res.holdout_auc.items()))


def serve_cmd(
    ctx: typer.Context,
    host: str = typer.Option(None, "--host", help=from_config("Bind address.", "serving.host")),
    port: int = typer.Option(None, "--port", help=from_config("Port.", "serving.port")),
    canary_fraction: float = typer.Option(None, "--canary-fraction", help=from_config(
        "Share of customers (0..1) routed to the canary by a sticky hash of the id.",
        "serving.canary_fraction")),
    admin_token: str = typer.Option(None, "--admin-token", envvar="CHURN_ADMIN_TOKEN", help=from_config(
        "Bearer token of the admin endpoints.", "serving.admin_token", secret=True)),
) -> None:
    """Online scoring: POST /predict (champion + canary, sticky split), /health, /ready, /metrics.

    Admin routes need serving.admin_token; without one, a random token is created in
    <workspace>/secrets/admin_token (mode 0600). A non-loopback --host needs serving.api_token.
    """
    from mlflow_churn.serving.app import serve
    from mlflow_churn.web.auth import check_exposure, token_file

    cfg = get_config(ctx, {"serving.host": opt_str(host), "serving.port": port,
                           "serving.canary_fraction": canary_fraction,
                           "serving.admin_token": opt_str(admin_token)})
    check_exposure(cfg.serving.host, "churn serve", {"serving.api_token": cfg.serving.api_token})
    if cfg.serving.admin_token:
        console.print("admin routes: bearer token serving.admin_token (from the config)")
    else:
        path = cfg.workspace / "secrets" / "admin_token"
        cfg.serving.admin_token = token_file(path)
        console.print(f"admin routes: bearer token in {path} (mode 0600; send 'Authorization: Bearer "
                      "<token>', or set serving.admin_token)")
    console.print(f"serving '{cfg.training.model_name}' (canary {cfg.serving.canary_fraction:.0%}) "
                  f"on http://{cfg.serving.host}:{cfg.serving.port}; prediction log "
                  f"{cfg.prediction_log_url}; "
                  f"/predict {'needs serving.api_token' if cfg.serving.api_token else 'open'}")
    serve(cfg)


def traffic_cmd(
    ctx: typer.Context,
    customers: int = typer.Option(..., "--customers", help="Customers to score, drawn at random from the "
                                  "workspace's live customers (each once)."),
    rate: float = typer.Option(None, "--rate", help="At most this many requests per second "
                               "(default: as fast as the service answers)."),
    url: str = typer.Option(None, "--url", help="The running service; loopback only "
                            "(default: http://127.0.0.1:<serving.port>)."),
    batch: int = typer.Option(10, "--batch", help="Customer ids per POST /predict request."),
    max_seconds: float = typer.Option(600.0, "--max-seconds", help="Stop sending after this many seconds."),
    wait_seconds: float = typer.Option(30.0, "--wait-seconds",
                                       help="Wait this long for GET /ready to answer 200 first."),
    token: str = typer.Option(None, "--token", envvar="CHURN_SERVING__API_TOKEN", show_envvar=True,
                              help="Bearer token of /predict, when the service needs one "
                              "(default: serving.api_token, if set)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the customer draw."),
    as_json: bool = JSON_OPTION, progress: bool = typer.Option(True, "--progress/--no-progress",
                                                         help="Show a progress bar."),
) -> None:
    """Send realistic POST /predict traffic to the running `churn serve` (for the canary analysis)."""
    from mlflow_churn.cli_common import with_progress
    from mlflow_churn.serving.traffic import draw_customers, loopback_url, send_traffic

    if customers < 1:
        raise ChurnError(f"--customers must be >= 1, got {customers}")
    if seed < 0:
        raise ChurnError(f"--seed must be >= 0, got {seed}")
    check_number(wait_seconds, "--wait-seconds", 0, 86_400)
    check_number(max_seconds, "--max-seconds", 0, 604_800)
    check_number(rate, "--rate", 0.001)
    if batch < 1:
        raise ChurnError(f"--batch must be >= 1, got {batch}")
    cfg = get_config(ctx)
    target = _service_url(cfg, url)
    loopback_url(target)  # refuse another machine before reading anything
    ids = draw_customers(cfg.data_dir, customers, seed)
    secret = opt_str(token) or getattr(cfg.serving, "api_token", None)
    res = with_progress(
        f"POST {target}/predict", len(ids), progress and not as_json,
        lambda tick: send_traffic(target, ids, batch=batch, rate=rate, max_seconds=max_seconds,
                                  wait_seconds=wait_seconds, token=secret,
                                  on_request=lambda n: [tick(1) for _ in range(n)]),
    )
    if as_json:
        print_json(res.to_dict())
        return
    table = Table(title=f"churn traffic: {res.requests:,} requests to {res.url}/predict "
                        f"in {res.seconds:.1f} s")
    for col in ("answered by", "customers"):
        table.add_column(col, justify="left" if col == "answered by" else "right")
    for kind, counts in (("route", res.routes), ("version", res.versions), ("status", res.statuses)):
        for key, n in sorted(counts.items()):
            table.add_row(f"{kind} {key}", f"{n:,}")
    console.print(table)
    if res.failed_requests:
        console.print(f"{res.failed_requests:,} requests failed (counted by the service as errors)")
    if res.stopped:
        console.print(f"stopped early: {res.stopped}")
    console.print("next: `churn canary status`, then `churn canary evaluate`")


def compress_cmd(
    ctx: typer.Context,
    version: str = typer.Option(..., "--version", help="Registered version to prune."),
    budget: str = typer.Option(None, "--budget", help=from_config("Allowed AUC loss, e.g. 0.002.",
                                                               "serving.auc_loss_budget")),
    as_of: str = typer.Option(None, "--as-of", help="Labels known up to (ISO UTC; default newest data)."),
    alias: str = typer.Option(None, "--alias",
                              help="Point this alias (e.g. challenger) at the new version (default: none)."),
    as_json: bool = JSON_OPTION, progress: bool = _PROGRESS,
) -> None:
    """Register the fewest-trees copy of a version whose holdout AUC is within the budget."""
    from mlflow_churn.serving.compress import compress

    cfg = get_config(ctx)
    version = parse_version(version, "--version")
    budget_value = _budget(budget)
    when = as_of_or_latest(cfg, as_of)
    res = compress(cfg, version, when, budget_value, opt_str(alias))
    if as_json:
        print_json(res.to_dict())
        return
    console.print(
        f"version {res.version} of '{res.model_name}' = version {res.parent_version} pruned to "
        f"{res.trees}/{res.parent_trees} trees: AUC {res.auc:.4f} vs {res.parent_auc:.4f} "
        f"(budget {res.budget}), {res.size_bytes:,} vs {res.parent_size_bytes:,} bytes, one-row p50/p99 "
        f"{res.latency_p50_ms:.3f}/{res.latency_p99_ms:.3f} ms vs "
        f"{res.parent_latency_p50_ms:.3f}/{res.parent_latency_p99_ms:.3f} ms; run {res.run_id}")


def _budget(value: str | None) -> float | None:
    """--budget as a float ('' = the config's, for MLproject), ChurnError naming a bad one."""
    if not opt_str(value):
        return None
    try:
        budget = float(value)
    except ValueError:
        budget = float("nan")
    if not 0 <= budget <= 1:
        raise ChurnError(f"--budget must be an AUC loss in [0, 1] such as 0.002, got '{value}'")
    return budget


def register(app: typer.Typer) -> None:
    """Add the serving commands to the `churn` app."""
    app.command("serve")(serve_cmd)
    app.command("compress")(compress_cmd)
    app.command("traffic")(traffic_cmd)
    app.add_typer(canary_app, name="canary")
