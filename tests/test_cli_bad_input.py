"""Every `churn` command answers bad input with one line `error: ...` and exit code 2.

The command tree is enumerated from the Typer app, so a new command without bad values here
fails :func:`test_every_command_has_bad_values`. Each command gets at least two bad values of
its own plus the generic ones (a missing --config, a config with an infinite number, an
unknown option); all run in process through :func:`mlflow_churn.cli.main` (fast) and fail
before any heavy work. The issue's three reproductions also run as real subprocesses, in
parallel.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from mlflow_churn.cli import app

CHURN = [sys.executable, "-m", "mlflow_churn.cli"]


def command_paths() -> list[str]:
    """Every leaf command of `churn`, e.g. 'score', 'canary rollback', 'features list'."""
    out: list[str] = []

    def walk(cmd, path: list[str]) -> None:
        subs = getattr(cmd, "commands", None)
        if subs:
            for name, sub in subs.items():
                walk(sub, [*path, name])
        else:
            out.append(" ".join(path))

    walk(typer.main.get_command(app), [])
    return sorted(out)


#: per command: (extra args, text the one line must hold); at least two each
BAD: dict[str, list[tuple[list[str], str]]] = {
    "simulate": [(["--customers", "-3"], "-3"), (["--scenario", "chaos"], "chaos"),
                 (["--start", "2026-13-45"], "2026-13-45"), (["--segment", "region"], "COLUMN=VALUE")],
    "demo": [(["--customers", "10"], "--customers"), (["--n-trials", "0"], "--n-trials"),
             (["--customers", "many"], "many")],
    "score": [(["--engine", "gpu"], "gpu"), (["--batch-rows", "0"], "--batch-rows"),
              (["--as-of", "yesterday"], "yesterday"),
              (["--as-of", "2026-03-20", "--out", "/proc/forbidden"], "/proc/forbidden")],
    "retrain": [(["--force-value", "maybe"], "maybe"), (["--n-trials", "0"], "--n-trials"),
                (["--as-of", "noon"], "noon")],
    "serve": [(["--port", "70000"], "serving.port"), (["--canary-fraction", "2"], "serving.canary_fraction"),
              (["--canary-fraction", "nan"], "serving.canary_fraction"), (["--port", "eighty"], "eighty")],
    "compress": [(["--version", "abc"], "'abc'"), (["--version", "3", "--budget", "-1"], "--budget"),
                 (["--version", "3", "--budget", "inf"], "--budget"), ([], "--version")],
    "train": [(["--timeout", "-1"], "--timeout"), (["--timeout", "inf"], "--timeout"),
              (["--wait", "nan"], "--wait"), (["--table", "t.csv"], "--label"),
              (["--model-name", "x"], "--model-name"), (["--n-trials", "-2"], "--n-trials")],
    "monitor": [(["--as-of", "yesterday"], "yesterday"), (["--report-value", "perhaps"], "perhaps")],
    "backtest": [(["--scenario", "chaos"], "chaos"), (["--n-trials", "0"], "--n-trials"),
                 (["--days", "x"], "'x'")],
    "evaluate": [(["--as-of", "2026-02-30"], "2026-02-30"), (["--as-of", "later"], "later")],
    "config show": [(["--bogus"], "--bogus"), (["extra"], "extra")],
    "canary status": [(["--reason", "x"], "--reason"), (["--as-of", "nope"], "nope"),
                      (["--since", "whenever"], "whenever")],
    "canary evaluate": [(["--as-of", "nope"], "nope"), (["--since", "whenever"], "whenever")],
    "canary auto": [(["--as-of", "nope"], "nope"), (["--since", "whenever"], "whenever")],
    "canary run": [(["--every", "soon"], "soon"), (["--every", "0s"], "--every"),
                   (["--as-of", "nope"], "nope"), (["--since", "2026-01-01"], "--since")],
    "canary resume": [(["--as-of", "2026-01-01"], "--as-of"), (["--since", "whenever"], "--since")],
    "canary backtest": [(["--scenario", "chaos"], "chaos"), (["--replays", "0"], "--replays"),
                        (["--replays", "many"], "many")],
    "canary promote": [([], "--reason"), (["--reason", "r", "--version", "abc"], "'abc'"),
                       (["--reason", "r", "--version", "0"], "'0'"),
                       (["--reason", "r", "--version", "١٢"], "--version")],
    "canary rollback": [([], "--reason"), (["--reason", "r", "--version", "abc"], "'abc'"),
                        (["--reason", "r", "--version", "-1"], "'-1'")],
    "features list": [(["extra"], "extra"), (["--json-please"], "--json-please")],
    "features describe": [(["monthly_usage_v9"], "monthly_usage_v9"), ([], "'name'")],
    "features materialize": [(["--as-of", "yesterday"], "yesterday"), (["--every", "5x"], "5x"),
                             (["--max-runs", "3"], "--every"), (["--engine", "gpu"], "gpu"),
                             (["--engine", "spark", "--incremental"], "--incremental"),
                             (["--engine", "spark", "--every", "1h"], "--every"),
                             (["--spark-master", "local[2]"], "--engine spark")],
    "features history": [(["--limit", "0"], "--limit"), (["--limit", "abc"], "abc")],
    "features serve": [(["--port", "70000"], "features.port"), (["--port", "-1"], "features.port")],
    "features check-skew": [(["--sample", "0"], "--sample"), (["--sample", "lots"], "lots"),
                            (["--seed", "-1"], "--seed")],
    "hooks serve": [(["--port", "70000"], "hooks.port"), (["--port", "0"], "hooks.port")],
    "hooks reconcile": [(["extra"], "extra"), (["--once=yes"], "--once")],
    "alerts list": [(["--key", "no-such-key"], "no-such-key"), (["extra"], "extra")],
    "alerts test": [(["--wait", "-1"], "--wait"), (["--hold", "soon"], "soon")],
    "alerts flush": [(["--wait", "-5"], "--wait"), (["--wait", "later"], "later")],
    "alerts resolve": [([], "Missing argument"), (["no-such-key"], "no-such-key")],
    "scheduler status": [(["--job", "nightly"], "nightly"), (["extra"], "extra")],
    "registry history": [(["--at", "whenever"], "whenever"), (["--at", "2026-02-30"], "2026-02-30"),
                         (["--no-such"], "--no-such")],
    "registry keygen": [(["extra"], "extra"), (["--rotate=yes"], "--rotate")],
    "registry approve": [(["--version", "abc", "--approver", "alice"], "'abc'"),
                         (["--version", "3"], "--approver"),
                         (["--version", "3", "--approver", " "], "--approver")],
    "registry verify": [(["extra"], "extra"), (["--model"], "--model")],
    "traffic": [(["--customers", "0"], "--customers"), (["--customers", "many"], "many"),
                (["--customers", "5", "--url", "http://192.0.2.1:8080"], "192.0.2.1")],
    "hooks register": [(["--url", "http://127.0.0.1:9/webhook"], "secret"),
                       (["--url", "ftp://x/webhook", "--secret", "s"], "ftp://x/webhook"), ([], "--url")],
}

#: (root args, command args, needle) that every command must refuse the same way
GENERIC: list[tuple[str, list[str], list[str], str]] = [
    ("missing-config", ["--config", "missing.yaml"], [], "missing.yaml"),
    ("unknown-option", [], ["--no-such-option"], "--no-such-option"),
]
#: configs that can never work, refused by every command that reads the config (one each suffices:
#: they fail in load_config, shared by all)
BAD_CONFIGS = [("inf.yaml", "evaluation.min_auc_delta"), ("psi.yaml", "monitoring.policy.triggers.0.value")]


def test_every_command_has_bad_values() -> None:
    paths = command_paths()
    assert len(paths) >= 20
    missing = [p for p in paths if len(BAD.get(p, [])) < 2]
    assert not missing, f"add at least two bad values to BAD for: {missing}"
    assert not set(BAD) - set(paths), f"BAD names commands that do not exist: {set(BAD) - set(paths)}"


@pytest.fixture(scope="module")
def cli_dir(tmp_path_factory: pytest.TempPathFactory, small_data: Path) -> Path:
    """A working directory with a workspace (data: the shared small dataset) and bad configs."""
    root = tmp_path_factory.mktemp("cli")
    (root / "ws").mkdir()
    (root / "ws" / "data").symlink_to(small_data, target_is_directory=True)
    (root / "inf.yaml").write_text("evaluation:\n  min_auc_delta: .inf\n")
    (root / "psi.yaml").write_text(
        "monitoring:\n  policy:\n    triggers:\n      - {metric: psi, op: '>', value: -1}\n")
    return root


@pytest.fixture
def churn(cli_dir: Path, monkeypatch: pytest.MonkeyPatch, churn_main):
    """``churn(args) -> (code, stdout, stderr)`` through main() in this process, in cli_dir."""
    monkeypatch.chdir(cli_dir)

    def invoke(args: list[str]) -> tuple[int, str, str]:
        res = churn_main(args)
        return res.returncode, res.stdout, res.stderr

    return invoke


def _assert_one_line(code: int, out: str, err: str, needle: str, exit_code: int = 2) -> None:
    assert code == exit_code, (code, out, err)
    assert "Traceback" not in out + err, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert needle in lines[0], err


_CASES = [(path, args, needle) for path, cases in sorted(BAD.items()) for args, needle in cases]


@pytest.mark.parametrize(("path", "args", "needle"), _CASES,
                         ids=[f"{p}:{' '.join(a) or '(none)'}" for p, a, _ in _CASES])
def test_bad_value_is_one_line_exit_2(churn, path: str, args: list[str], needle: str) -> None:
    code, out, err = churn(["--workspace", "ws", *path.split(), *args])
    _assert_one_line(code, out, err, needle)


_GENERIC = [(path, name, root, args, needle) for path in command_paths()
            for name, root, args, needle in GENERIC]


@pytest.mark.parametrize(("path", "name", "root", "args", "needle"), _GENERIC,
                         ids=[f"{p}:{n}" for p, n, *_ in _GENERIC])
def test_generic_bad_input_is_one_line_exit_2(churn, path: str, name: str, root: list[str],
                                              args: list[str], needle: str) -> None:
    extra = {"alerts resolve": ["some-key"], "compress": ["--version", "3"],
             "canary promote": ["--reason", "r"], "canary rollback": ["--reason", "r"],
             "features describe": ["plan"],
             "hooks register": ["--url", "http://127.0.0.1:9/webhook", "--secret", "s"],
             "registry approve": ["--version", "3", "--approver", "alice"],
             "traffic": ["--customers", "5"]}.get(path, [])
    code, out, err = churn(["--workspace", "ws", *root, *path.split(), *extra, *args])
    _assert_one_line(code, out, err, needle)


@pytest.mark.parametrize(("path", "needle"), BAD_CONFIGS)
def test_configs_that_can_never_work(churn, path: str, needle: str) -> None:
    for command in (["config", "show"], ["features", "history"]):
        _assert_one_line(*churn(["--workspace", "ws", "--config", path, *command]), needle)


def test_feature_definitions_file_missing_or_evil(churn, cli_dir: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHURN_FEATURES__DEFINITIONS_FILE", str(cli_dir / "nope.yaml"))
    _assert_one_line(*churn(["features", "list"]), "nope.yaml")
    evil = cli_dir / "evil.yaml"
    evil.write_text("features:\n  - {name: x, version: 1, dtype: float64, source: customers, "
                    "description: d, expression: \"(SELECT count(*) FROM read_csv('/etc/passwd'))\"}\n")
    monkeypatch.setenv("CHURN_FEATURES__DEFINITIONS_FILE", str(evil))
    _assert_one_line(*churn(["features", "list"]), "read_csv")


def test_expected_failures_of_the_environment_are_one_line() -> None:
    """The safety net of main(): OSError and the libraries' own errors, not programming errors."""
    import duckdb

    from mlflow_churn.cli import expected_failure

    try:
        open("/proc/forbidden/x", "w")  # noqa: SIM115
    except OSError as exc:
        assert expected_failure(exc) == "No such file or directory: /proc/forbidden/x (FileNotFoundError)"
    try:
        duckdb.connect().execute("SELECT * FROM read_parquet('/nonexistent/x.parquet')")
    except duckdb.Error as exc:
        line = expected_failure(exc)
        assert line and "\n" not in line and "IOException" in line
    assert expected_failure(KeyError("x")) is None and expected_failure(TypeError("x")) is None


# --- the issue's reproductions as real subprocesses (in parallel) ---------------------------------

def test_issue_reproductions_over_subprocesses(tmp_path: Path, small_data: Path) -> None:
    """`score --out /proc/forbidden`, `score` on a truncated Parquet file and `canary rollback
    --version abc` as real processes: one line, exit 2, no traceback, nothing written."""
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "data").symlink_to(small_data, target_is_directory=True)
    broken = tmp_path / "broken"
    shutil.copytree(small_data, broken / "data")
    part = broken / "data" / "activity" / "date=2026-03-19" / "part-0.parquet"
    part.write_bytes(part.read_bytes()[:200])  # truncated: no footer, no magic bytes
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHURN_", "MLFLOW_"))}
    cases = {
        "out": (["--workspace", str(ws), "score", "--as-of", "2026-03-20", "--out", "/proc/forbidden",
                 "--no-progress"], "/proc/forbidden"),
        "truncated": (["--workspace", str(broken), "score", "--no-progress"], str(part)),
        "rollback": (["--workspace", str(ws), "canary", "rollback", "--reason", "r", "--version", "abc"],
                     "'abc'"),
    }
    procs = {k: subprocess.Popen(CHURN + args, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for k, (args, _) in cases.items()}
    for key, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        _assert_one_line(proc.returncode, out, err, cases[key][1])
    assert not Path("/proc/forbidden").exists()
    assert not (broken / "scores").exists() and not (ws / "mlflow.db").exists()


def test_damaged_table_while_scoring_is_one_line(tmp_path: Path, small_data: Path) -> None:
    """A file that breaks only while DuckDB scans it (past the footer check) still ends in a
    ChurnError naming the data directory."""
    from datetime import UTC, datetime

    from mlflow_churn.errors import ChurnError
    from mlflow_churn.features.registry import FeatureSet, load_registry
    from mlflow_churn.serving.batch import _data_errors, stream_features

    data = tmp_path / "data"
    shutil.copytree(small_data, data)
    part = data / "churn_events.parquet"  # read first (the spine), so the test is quick
    raw = bytearray(part.read_bytes())
    raw[8:len(raw) // 2] = b"\xff" * (len(raw) // 2 - 8)  # footer intact, pages garbage
    part.write_bytes(bytes(raw))
    reg = load_registry()
    fs = FeatureSet("plan_only", (reg.get("plan"),))  # customers only: no activity scan
    with pytest.raises(ChurnError, match=f"cannot read the tables under {data}"):
        with _data_errors(data), stream_features(data, fs, datetime(2026, 3, 20, tzinfo=UTC)) as stream:
            for _ in stream.batches:
                pass


@pytest.mark.parametrize(("args", "needle"), [
    (["features", "materialize", "--every", "99999999999999d"], "--every"),
    (["canary", "status", "--as-of", "9999-12-31T23:59:59-14:00"], "--as-of"),
    (["monitor", "--as-of", "0001-01-01T00:00:00+14:00"], "--as-of"),
    (["score", "--as-of", "0001-01-01"], "--as-of"),
    (["backtest", "--days", "99999999999999999999"], "--days"),
    (["simulate", "--days", "99999999999999999999", "--overwrite"], "simulation.days"),
    (["simulate", "--customers", "99999999999999999999", "--overwrite"], "simulation.customers"),
])
def test_values_out_of_any_range_are_one_line(churn, args: list[str], needle: str) -> None:
    _assert_one_line(*churn(["--workspace", "ws", *args]), needle)


@pytest.mark.parametrize(("env", "args", "needle"), [
    ({"CHURN_SERVING__PREDICTION_LOG": "postgresql://churn:pg-s3cret@127.0.0.1:1/db"},
     ["canary", "status"], "postgresql://churn:***@127.0.0.1:1/db"),
    ({"CHURN_FEATURES__ONLINE_BACKEND": "redis", "CHURN_FEATURES__REDIS_URL": "redis://:r3dis-pw@127.0.0.1:1/0"},
     ["features", "history"], "redis://:***@127.0.0.1:1/0"),
])
def test_unreachable_service_is_one_line_without_its_password(
        churn, monkeypatch: pytest.MonkeyPatch, env: dict, args: list[str], needle: str) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code, out, err = churn(["--workspace", "ws", *args])
    _assert_one_line(code, out, err, needle, exit_code=3)  # an outage (3), not bad input (2)
    assert "s3cret" not in err and "r3dis-pw" not in err
