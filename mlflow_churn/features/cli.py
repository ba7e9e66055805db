"""``churn features ...``: list, describe, materialize, history, serve, check-skew."""

from __future__ import annotations

from datetime import timedelta

import typer
from rich.table import Table

from mlflow_churn.cli_common import (
    JSON_OPTION,
    SPARK_MASTER_OPTION,
    as_of_or_latest,
    console,
    engine_option,
    from_config,
    get_config,
    opt_str,
    print_json,
    progress_arg,
)
from mlflow_churn.errors import ChurnError
from mlflow_churn.times import parse_duration

features_app = typer.Typer(help="Feature store: definitions, materialization, online API.",
                           no_args_is_help=True)

def parse_every(value: str) -> timedelta:
    """``1h``, ``30m``, ``1h30m``, ``90s``, ``1d`` -> timedelta; ChurnError otherwise."""
    return parse_duration(value, "--every")


def _sets_of(cfg) -> dict[str, list[str]]:
    from mlflow_churn.features.registry import registry_for

    out: dict[str, list[str]] = {}
    for fs in registry_for(cfg).feature_sets():
        for col in fs.columns:
            out.setdefault(col, []).append(fs.name)
    return out


@features_app.command("list")
def list_features(ctx: typer.Context, as_json: bool = JSON_OPTION) -> None:
    """Every feature definition and version, and the feature sets."""
    from mlflow_churn.features.registry import registry_for

    cfg = get_config(ctx)
    reg = registry_for(cfg)
    sets = _sets_of(cfg)
    if as_json:
        print_json({
            "features": [{"served_name": d.full_name, **d.to_dict(), "sets": sets.get(d.full_name, [])}
                         for d in reg.definitions()],
            "feature_sets": [{"name": fs.name, "description": fs.description, "hash": fs.hash,
                              "features": list(fs.columns)} for fs in reg.feature_sets()],
        })
        return
    table = Table(title="feature definitions")
    for col in ("served name", "name", "version", "dtype", "source", "window", "owner", "sets"):
        table.add_column(col)
    for d in reg.definitions():
        table.add_row(d.full_name, d.name, str(d.version), d.dtype, d.source,
                      f"{d.window_days} d" if d.window_days else "-", d.owner,
                      ", ".join(sets.get(d.full_name, [])) or "-")
    console.print(table)
    sets_table = Table(title="feature sets")
    for col in ("name", "features", "hash", "description"):
        sets_table.add_column(col)
    for fs in reg.feature_sets():
        sets_table.add_row(fs.name, str(len(fs.columns)), fs.hash[:12], fs.description)
    console.print(sets_table)


@features_app.command("describe")
def describe(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Feature (any version) or feature set."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Every version of a feature (or the members of a feature set), with its SQL."""
    from mlflow_churn.features.registry import UnknownFeatureError, registry_for

    cfg = get_config(ctx)
    reg = registry_for(cfg)
    if name in {fs.name for fs in reg.feature_sets()}:
        fs = reg.feature_set(name)
        if as_json:
            print_json({"feature_set": fs.to_dict()})
            return
        console.print(f"feature set [bold]{fs.name}[/bold]: {fs.description}")
        console.print(f"hash {fs.hash}")
        console.print("features: " + ", ".join(fs.columns))
        return
    base = name
    try:
        base = reg.get(name).name
    except UnknownFeatureError:
        pass
    try:
        versions = reg.versions(base)
    except UnknownFeatureError as err:
        sets = ", ".join(fs.name for fs in reg.feature_sets())
        raise ChurnError(f"unknown feature or feature set '{name}'; features: "
                         f"{', '.join(err.available)}; feature sets: {sets}") from None
    sets = _sets_of(cfg)
    if as_json:
        print_json({"feature": base, "versions": [
            {"served_name": d.full_name, **d.to_dict(), "sets": sets.get(d.full_name, [])}
            for d in versions]})
        return
    for d in versions:
        console.print(f"[bold]{d.full_name}[/bold] (feature {d.name}, version {d.version})")
        console.print(f"  {d.description}")
        console.print(f"  dtype {d.dtype}; source {d.source}; entity {d.entity}; owner {d.owner}")
        if d.window_days:
            console.print(f"  window: last {d.window_days} days; default {d.default}")
        console.print(f"  expression: {d.expression}")
        if d.categories:
            console.print(f"  categories: {', '.join(d.categories)}")
        if d.tags:
            console.print(f"  tags: {', '.join(d.tags)}")
        console.print(f"  in feature sets: {', '.join(sets.get(d.full_name, [])) or '-'}")


def _batch_table(title: str, batches) -> Table:
    table = Table(title=title)
    for col in ("batch id", "mode", "as_of", "watermark", "rows", "updated", "features",
                "seconds", "finished"):
        table.add_column(col)
    for b in batches:
        table.add_row(b.batch_id, b.mode, b.as_of.isoformat(),
                      b.watermark.isoformat() if b.watermark else "-", f"{b.rows:,}",
                      f"{b.updated_rows:,}" if b.updated_rows is not None else "-",
                      str(len(b.features)), f"{b.duration_s:.2f}" if b.duration_s is not None else "-",
                      b.finished_at.isoformat(timespec="seconds") if b.finished_at else "-")
    return table


def _log_batch_to_project_run(info) -> None:
    """Inside ``mlflow run`` (MLFLOW_RUN_ID set), record the batch in that run."""
    from mlflow_churn.tracking import log_to_project_run

    # the entry point's own parameters (as_of = "" for newest data) are already logged
    log_to_project_run(params={"batch_as_of": info.as_of.isoformat(), "batch_mode": info.mode,
                               "batch_id": info.batch_id, "n_features": len(info.features)},
                       metrics={"rows": info.rows, "updated_rows": info.updated_rows or 0,
                                "duration_s": info.duration_s or 0.0},
                       dicts={"batch.json": info.to_dict()})


@features_app.command("materialize")
def materialize_cmd(
    ctx: typer.Context,
    as_of: str = typer.Option(None, "--as-of",
                              help="Compute values at this UTC time (default: newest data)."),
    incremental: bool = typer.Option(
        False, "--incremental",
        help="Build on the serving batch: same values, only customers active in its windows recomputed."),
    every: str = typer.Option(None, "--every", help="Run on a schedule, e.g. 1h (default: once)."),
    max_runs: int = typer.Option(None, "--max-runs",
                                 help="With --every: stop after this many runs (default: never)."),
    force: bool = typer.Option(False, "--force",
                               help="Accept an --as-of older than the serving one (roll back)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    engine: str = engine_option("executors compute the features and write Redis in parallel"),
    spark_master: str = SPARK_MASTER_OPTION,
) -> None:
    """Compute every registered feature and swap the batch in online atomically."""
    from mlflow_churn.features.materialize import materialize, run_every
    cfg = get_config(ctx)
    as_of_s, every_s = opt_str(as_of), opt_str(every)
    if engine not in ("local", "spark"):
        raise ChurnError(f"--engine must be local or spark, got '{engine}'")
    if engine == "local" and opt_str(spark_master):
        raise ChurnError(f"--spark-master {spark_master} needs --engine spark; add it or drop --spark-master")
    if engine == "spark" and every_s:
        raise ChurnError("--every runs on the local engine only; drop --engine spark or --every")
    if max_runs is not None and not every_s:
        raise ChurnError(f"--max-runs {max_runs} needs --every (it bounds a schedule); add e.g. --every 1h")
    if every_s:
        if as_of_s:
            raise ChurnError("--as-of and --every exclude each other: a schedule always uses the newest data")
        if force:
            raise ChurnError("--force and --every exclude each other: a schedule only moves forward")

        def report(info, reason: str) -> None:
            if info is None:
                console.print(f"no batch: {reason}")
            else:
                console.print(_batch_table("churn features materialize", [info]))
                _log_batch_to_project_run(info)

        run_every(cfg, parse_every(every_s), incremental=incremental, max_runs=max_runs,
                  progress=progress_arg(progress), on_run=report)
        return
    when = as_of_or_latest(cfg, as_of_s)
    info = materialize(cfg, when, incremental=incremental, progress=progress_arg(progress), force=force,
                       engine=engine, spark_master=opt_str(spark_master))
    console.print(_batch_table("churn features materialize", [info]))
    console.print(f"serving batch {info.batch_id} from {cfg.features.online_backend} store")
    _log_batch_to_project_run(info)


@features_app.command("history")
def history(ctx: typer.Context,
            limit: int = typer.Option(20, "--limit", help="Newest batches to show."),
            as_json: bool = JSON_OPTION) -> None:
    """Every completed batch, newest first (the first one serves)."""
    from mlflow_churn.features.online import open_store

    if limit < 1:
        raise ChurnError(f"--limit must be >= 1, got {limit}")
    store = open_store(get_config(ctx), must_exist=True)
    try:
        batches = store.history(limit)
        location = store.location
    finally:
        store.close()
    if not batches:
        raise ChurnError(f"{location} has no batch yet; run `churn features materialize`")
    if as_json:
        print_json({"store": location, "batches": [b.to_dict() for b in batches]})
        return
    console.print(_batch_table(f"batches in {location}", batches))


@features_app.command("serve")
def serve_cmd(
    ctx: typer.Context,
    host: str = typer.Option(None, "--host", help=from_config("Bind address.", "features.host")),
    port: int = typer.Option(None, "--port", help=from_config("Port.", "features.port")),
) -> None:
    """Serve GET /features, /health and /metrics with uvicorn (features.api_token: bearer token;
    needed to bind a non-loopback address)."""
    from mlflow_churn.features.api import serve
    from mlflow_churn.web.auth import check_exposure

    cfg = get_config(ctx, {"features.host": opt_str(host), "features.port": port})
    check_exposure(cfg.features.host, "churn features serve", {"features.api_token": cfg.features.api_token})
    console.print(f"feature API on http://{cfg.features.host}:{cfg.features.port} "
                  f"({cfg.features.online_backend} store; /features and /metrics "
                  f"{'need features.api_token' if cfg.features.api_token else 'open'})")
    serve(cfg)


@features_app.command("check-skew")
def check_skew_cmd(
    ctx: typer.Context,
    sample: int = typer.Option(1000, "--sample", help="Customers to recompute offline."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the sample (>= 0)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Recompute a sample of online values offline; exit 1 when any differ."""
    from mlflow_churn.features.skew import check_skew

    report = check_skew(get_config(ctx), sample=sample, seed=seed)
    if as_json:
        print_json(report.to_dict())
        if not report.ok:
            raise typer.Exit(1)
        return
    console.print(f"batch {report.batch_id} (as_of {report.as_of}): {report.compared} of "
                  f"{report.sampled} sampled customers compared on {len(report.features)} features")
    if report.ok:
        console.print("no skew: every online value equals its offline recomputation")
        return
    table = Table(title=f"skew: {len(report.mismatches)} values differ "
                        f"({report.mismatch_rate:.2%}); by feature")
    table.add_column("feature")
    table.add_column("mismatches", justify="right")
    table.add_column("example (customer: online vs offline)")
    examples = {}
    for m in report.mismatches:
        examples.setdefault(m.feature, m)
    for feat, n in report.by_feature().items():
        m = examples[feat]
        table.add_row(feat, str(n), f"{m.customer_id}: {m.online!r} vs {m.offline!r}")
    console.print(table)
    if report.missing_offline:
        console.print(f"{len(report.missing_offline)} served customers are absent offline, e.g. "
                      f"{report.missing_offline[:5]}")
    raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add ``churn features ...`` to the root command."""
    app.add_typer(features_app, name="features")
