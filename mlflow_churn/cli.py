"""The ``churn`` command: parses options, calls one module function, prints the result.

Failures raise a :class:`~mlflow_churn.errors.ChurnError` of their kind deep down; :func:`main`
turns it, and Click's usage errors (a wrong option type, an unknown option or command), into
one line ``error: ...`` on stderr and the kind's exit code (``mlflow_churn.errors.ANSWERS``:
2 for bad input, not found and conflict, 3 for an unavailable dependency, named).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

import typer
import yaml
from rich.table import Table

from mlflow_churn.cli_common import (
    console,
    from_config,
    get_config,
    opt_str,
    parse_date,
    print_json,
    progress_arg,
)
from mlflow_churn.config import SCENARIOS, mask_text, masked
from mlflow_churn.errors import ChurnError, Unavailable, exit_code, first_line, outage
from mlflow_churn.interrupt import SafeInterrupt

app = typer.Typer(
    name="churn",
    help="Guardrails for a production churn model, centred on MLflow.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Show the resolved configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")


@app.callback()
def _root(
    ctx: typer.Context,
    config: str = typer.Option(
        None, "--config", help="YAML config file (default: $CHURN_CONFIG or ./churn.yaml)."
    ),
    workspace: str = typer.Option(
        None, "--workspace", help="Workspace directory (default: $CHURN_WORKSPACE or ./churn-workspace)."
    ),
) -> None:
    ctx.obj = {"config": opt_str(config), "workspace": opt_str(workspace)}


@config_app.command("show")
def config_show(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="Print the configuration as JSON."),
) -> None:
    """Print the resolved configuration (defaults + churn.yaml + CHURN_* variables); secrets
    (tokens, hooks.secret, passwords in URLs) are shown as ***."""
    cfg = get_config(ctx)
    data = cfg.model_dump(mode="json")
    data["resolved_tracking_uri"] = cfg.mlflow_tracking_uri
    data = masked(data)
    if as_json:
        print_json(data)
    else:
        typer.echo(yaml.safe_dump(data, sort_keys=False))


def simulate(
    ctx: typer.Context,
    customers: int = typer.Option(None, help=from_config("Customers at the start.", "simulation.customers")),
    days: int = typer.Option(None, help=from_config("Days of daily activity.", "simulation.days")),
    start: str = typer.Option(None, help=from_config("First day, YYYY-MM-DD (UTC).", "simulation.start")),
    scenario: str = typer.Option(None, help=from_config(f"One of: {', '.join(SCENARIOS)}.",
                                                        "simulation.scenario")),
    seed: int = typer.Option(None, help=from_config("Random seed; same seed, same bytes.",
                                                    "simulation.seed")),
    onset_day: int = typer.Option(None, help="Day index where drift starts (default days // 2)."),
    segment: str = typer.Option(
        None, help="Segment that shifts in segment_shift, COLUMN=VALUE (default region=pacific)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing dataset."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Simulate customers, daily activity and churn events into <workspace>/data."""
    from mlflow_churn.data.simulator import SimulationSpec
    from mlflow_churn.data.simulator import simulate as run_simulation

    seg_col = seg_val = None
    if segment:
        if "=" not in segment:
            raise ChurnError(f"--segment must look like COLUMN=VALUE (e.g. region=pacific), got '{segment}'")
        seg_col, seg_val = segment.split("=", 1)
    cfg = get_config(ctx, {
        "simulation.customers": customers, "simulation.days": days,
        "simulation.start": parse_date(start, "--start") if start else None,
        "simulation.scenario": scenario, "simulation.seed": seed,
        "simulation.onset_day": onset_day, "simulation.segment_column": seg_col,
        "simulation.segment_value": seg_val,
    })
    spec = SimulationSpec.from_config(cfg.simulation)
    result = run_simulation(spec, cfg.data_dir, overwrite=overwrite, progress=progress_arg(progress))
    table = Table(title=f"churn simulate: scenario={spec.scenario} seed={spec.seed}")
    table.add_column("table")
    table.add_column("rows", justify="right")
    table.add_column("path")
    table.add_row("customers", f"{result.customers:,}", str(result.data_dir / "customers.parquet"))
    table.add_row("activity", f"{result.activity_rows:,}",
                  str(result.data_dir / "activity" / "date=*" / "part-0.parquet"))
    table.add_row("churn_events", f"{result.churn_events:,}", str(result.data_dir / "churn_events.parquet"))
    console.print(table)
    console.print(
        f"days {result.first_day} .. {result.last_day}, drift onset {result.onset_day}; "
        f"manifest: {result.data_dir / 'manifest.json'}"
    )
    from mlflow_churn.tracking import log_to_project_run

    log_to_project_run(  # inside `mlflow run`: what this entry point did
        params={"customers": spec.customers, "days": spec.days, "start": str(spec.start),
                "scenario": spec.scenario, "seed": spec.seed, "onset_day": spec.onset},
        metrics={"activity_rows": result.activity_rows, "churn_events": result.churn_events},
        artifacts=(result.data_dir / "manifest.json",),
    )


def demo(
    ctx: typer.Context,
    customers: int = typer.Option(50_000, help="Simulated customers."),
    n_trials: int = typer.Option(8, help="Optuna trials per training."),
    server: bool = typer.Option(False, "--server", help="Start `mlflow server` (PostgreSQL from "
                                "mlflow.server_backend_uri / CHURN_MLFLOW_BACKEND_URI, else SQLite in the "
                                "workspace) and the webhook receiver, run the loop over HTTP with the gate "
                                "started by the registry's webhook (what `make demo-server` runs)."),
    keep_running: bool = typer.Option(False, "--keep-running", help="With --server: keep both servers up "
                                      "after the summary, until Ctrl-C."),
    mlflow_port: int = typer.Option(None, "--mlflow-port", min=1, max=65535, help="With --server: the port "
                                    "of `mlflow server` on 127.0.0.1 (default: a free one)."),
    hooks_port: int = typer.Option(None, "--hooks-port", min=1, max=65535, help="With --server: the port "
                                   "of the webhook receiver on 127.0.0.1 (default: a free one)."),
) -> None:
    """Run the whole loop end to end in the workspace (what `make demo` runs). With --server,
    Ctrl-C or SIGTERM ends it within seconds, whatever step runs, its servers stopped."""
    from mlflow_churn.demo import DemoSpec, print_report, run_demo

    if customers < 2000:
        raise ChurnError(f"--customers must be at least 2000 for the demo's segments, got {customers}")
    if n_trials < 1:
        raise ChurnError(f"--n-trials must be >= 1, got {n_trials}")
    for option, given in (("--keep-running", keep_running), ("--mlflow-port", mlflow_port),
                          ("--hooks-port", hooks_port)):
        if given and not server:
            raise ChurnError(f"{option} needs --server (it is about the demo's servers)")
    if server:  # before the demo's heavy imports: a bad port fails at once
        from mlflow_churn.tracking_server import check_ports

        check_ports({"--mlflow-port": mlflow_port, "--hooks-port": hooks_port})
    cfg = get_config(ctx)
    traffic = min(12_000, customers // 2)
    # the canary sees ~10% of the traffic: a smaller demo asks its verdict for fewer predictions
    # (half of what it should get), or the canary analysis never had enough to decide
    spec = DemoSpec(customers=customers, n_trials=n_trials, traffic_customers=traffic,
                    min_canary_samples=min(DemoSpec.min_canary_samples, traffic // 20))
    if server:
        from mlflow_churn.demo_server import run_server_demo

        run_server_demo(cfg.workspace, spec, keep_running=keep_running, mlflow_port=mlflow_port,
                        hooks_port=hooks_port)
        return
    report = run_demo(cfg.workspace, spec)
    print_report(report, cfg.workspace)


# One registration style: a command is a module-level function; a package's ``cli.py`` has
# ``register(app)`` adding its root commands with ``app.command(name)(fn)`` and its command
# groups (a Typer sub-app whose commands are ``@group.command(name)``) with ``add_typer``.
# Each sub-package with commands is listed here.
_COMMAND_MODULES: tuple[str, ...] = (
    "mlflow_churn.serving.batch_cli",
    "mlflow_churn.monitoring.retrain_cli",
    "mlflow_churn.serving.cli",
    "mlflow_churn.features.cli",
    "mlflow_churn.training.cli",
    "mlflow_churn.monitoring.cli",
    "mlflow_churn.evaluation.cli",
    "mlflow_churn.hooks.cli",
    "mlflow_churn.registry.cli",
    "mlflow_churn.alerts.cli",
    "mlflow_churn.scheduler.cli",
)


def _register_commands() -> None:
    import importlib

    app.command("simulate")(simulate)
    app.command("demo")(demo)
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(app)


_register_commands()


#: Click's exceptions, wherever this typer takes Click from (newer typers vendor it)
_click = importlib.import_module(typer.BadParameter.__module__)
#: `churn` / `churn features` without a command: Click shows the help (click >= 8.2)
_NO_ARGS = getattr(_click, "NoArgsIsHelpError", ())


def _one_line_text(exc: ChurnError) -> str:
    """A ChurnError's message on one line; an outage's names its dependency."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, Unavailable) and exc.dependency.lower() not in text.lower():
        text = f"{exc.dependency} unavailable: {text}"
    return text


def _one_line(exc: Exception) -> str:
    """Click's message on one line, naming the rejected value, with where to find the usage."""
    text = " ".join(exc.format_message().split()).rstrip(".")
    errors = getattr(exc.__cause__, "errors", None)  # typer's pydantic coercion hides the value
    if callable(errors) and errors() and "input" in errors()[0]:
        text += f", got {errors()[0]['input']!r}"
    ctx = getattr(exc, "ctx", None)
    return f"{text} (see `{ctx.command_path if ctx else 'churn'} --help`)"


#: (module, exception class) of failures a command can meet in its environment: a path that
#: is missing or unwritable, a corrupt file, a service that does not answer, a registry that
#: refuses a value. main() reports them in one line (exit 2, or 3 when :func:`failure_of` finds
#: a dependency down) like a ChurnError; the module
#: is looked up only when already imported (an exception cannot come from one that is not)
_EXPECTED: tuple[tuple[str, str], ...] = (
    ("duckdb", "Error"), ("pyarrow", "ArrowException"), ("mlflow.exceptions", "MlflowException"),
    ("redis.exceptions", "RedisError"), ("sqlite3", "Error"), ("sqlalchemy.exc", "OperationalError"),
    ("psycopg", "OperationalError"), ("yaml", "YAMLError"),
)


def expected_failure(exc: BaseException) -> str | None:
    """One line describing ``exc`` when it is an expected failure of the environment, else None."""
    if isinstance(exc, OverflowError):  # a number or date past what the libraries can hold
        return f"a value is out of range: {' '.join(str(exc).split())[:200]} (OverflowError)"
    if isinstance(exc, OSError):
        what = exc.strerror or " ".join(str(exc).split()) or type(exc).__name__
        where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
        return f"{what}{where} ({type(exc).__name__})"
    for module, name in _EXPECTED:
        mod = sys.modules.get(module)
        cls = getattr(mod, name, None) if mod is not None else None
        if isinstance(cls, type) and isinstance(exc, cls):
            return f"{first_line(exc, empty='failed')} ({type(exc).__name__})"
    return None


def failure_of(exc: BaseException) -> ChurnError | None:
    """``exc`` as the :class:`ChurnError` of its kind: itself when it is one; an
    :class:`~mlflow_churn.errors.Unavailable` naming the dependency for a connection-type
    failure (the tracking server not answering or answering 5xx, Redis, PostgreSQL); bad input
    for the other expected failures of :func:`expected_failure`; None for anything else (a bug)."""
    if isinstance(exc, ChurnError):
        return exc
    if "mlflow" in sys.modules:
        from mlflow_churn.tracking import TrackingUnavailable, server_failure

        reason = server_failure(exc)
        if reason is not None:
            uri = sys.modules["mlflow"].get_tracking_uri()
            return TrackingUnavailable(f"the MLflow tracking server at {uri} failed ({reason}); try again "
                                       "when it answers")
    down = outage(exc)
    if down is not None:
        return down
    line = expected_failure(exc)
    return ChurnError(line) if line is not None else None


def main() -> None:
    """Console-script entry point: one-line errors, the exit code of the error's kind."""
    # MLflow's per-download bars would interleave with the commands' own progress and tables
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # against `mlflow server` MLflow prints "View run ... at: URL" on stdout when a run ends,
    # which breaks `--json`; the commands print their run ids themselves
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    # "Creating initial MLflow database tables..." is noise on stderr, where errors are one line
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    try:
        with SafeInterrupt():  # Ctrl-C raised outside xgboost's ctypes callbacks (no crash)
            code = app(standalone_mode=False)  # Click raises its errors instead of boxing them
    except _NO_ARGS as exc:
        typer.echo(exc.ctx.get_help() if exc.ctx else exc.format_message())
        sys.exit(2)
    except _click.ClickException as exc:
        typer.echo(f"error: {mask_text(_one_line(exc))}", err=True)
        sys.exit(2)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:
        failure = failure_of(exc)
        if failure is None:
            raise
        typer.echo(f"error: {mask_text(_one_line_text(failure))}", err=True)
        sys.exit(exit_code(failure))
    if code == 130:  # Typer turns a KeyboardInterrupt inside a command into Exit(130), silently
        typer.echo("interrupted", err=True)
    if isinstance(code, int) and code:  # typer.Exit(n) of a command (e.g. check-skew's 1)
        sys.exit(code)


if __name__ == "__main__":
    main()
