"""The feature SQL sandbox: definitions are checked by DuckDB's parser, never run
unreviewed; the feature connections read only the workspace's data directory.

Each refused construct names the definition in one line; the two reproductions of the issue
(``read_csv('/etc/passwd')`` and ``... LIMIT 0; COPY (...) TO 'x.csv'; ...``) fail in
``churn features list`` without the file being written; built-in and legitimate user
definitions still materialize and build offline frames.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pytest
import yaml

from mlflow_churn.config import load_config
from mlflow_churn.errors import ChurnError
from mlflow_churn.features.offline import _connect, build_training_frame, compute_latest, daily_cutoffs
from mlflow_churn.features.registry import FeatureDefinition, FeatureSet, load_registry
from mlflow_churn.features.sandbox import check_expression, check_statement

T1 = datetime(2026, 3, 20, tzinfo=UTC)


def _defs_file(tmp_path: Path, expression: str, source: str = "customers", name: str = "x") -> Path:
    feature = {"name": name, "version": 1, "dtype": "float64", "source": source,
               "expression": expression, "description": "d"}
    if source == "activity":
        feature["window_days"] = 7
    path = tmp_path / "features.yaml"
    path.write_text(yaml.safe_dump({"features": [feature]}))
    return path


def _copy_stmt(target: Path) -> str:
    return f"1) AS y FROM customers LIMIT 0; COPY (SELECT 42 AS a) TO '{target}'; SELECT (1"


#: (expression, source, text the refusal names)
REFUSED = [
    ("(SELECT count(*) FROM read_csv('/etc/passwd'))", "customers", "read_csv"),
    ("(SELECT count(*) FROM read_csv_auto('/etc/passwd'))", "customers", "read_csv_auto"),
    ("(SELECT count(*) FROM read_parquet('/tmp/*.parquet'))", "customers", "read_parquet"),
    ("(SELECT count(*) FROM parquet_scan('/tmp/x.parquet'))", "customers", "parquet_scan"),
    ("(SELECT count(*) FROM read_json('/etc/x.json'))", "customers", "read_json"),
    ("(SELECT count(*) FROM read_json_auto('/etc/x.json'))", "customers", "read_json_auto"),
    ("(SELECT count(*) FROM read_ndjson_objects('/etc/x.json'))", "customers", "read_ndjson_objects"),
    ("(SELECT count(*) FROM glob('/etc/*'))", "customers", "glob"),
    ("(SELECT max(content) FROM read_text('/etc/hostname'))", "customers", "read_text"),
    ("(SELECT max(size) FROM read_blob('/etc/hostname'))", "customers", "read_blob"),
    ("(SELECT count(*) FROM sniff_csv('/etc/passwd'))", "customers", "sniff_csv"),
    ("(SELECT count(*) FROM query('SELECT 1'))", "customers", "query"),
    ("(SELECT count(*) FROM range(3))", "customers", "range"),
    ("read_text('/etc/hostname')", "customers", "read_text"),
    ("length(getenv('HOME'))", "customers", "getenv"),
    ("(SELECT count(*) FROM '/etc/passwd')", "customers", "'/etc/passwd'"),
    ("(SELECT count(*) FROM churn_events)", "customers", "subquery not allowed"),
    ("(SELECT count(*) FROM spine)", "customers", "subquery not allowed"),
    ("sum((SELECT count(*) FROM customers))", "activity", "subquery not allowed"),
    ("(SELECT count(*) FROM main.customers)", "customers", "subquery not allowed"),
    ("(WITH t AS (SELECT 1) SELECT count(*) FROM t)", "customers", "subquery not allowed"),
    ("(SELECT count(*) FROM (SUMMARIZE customers))", "customers", "subquery not allowed"),
    ("1) AS y, (2", "customers", "outside its parentheses"),
    ("1) AS y FROM customers UNION ALL SELECT (2", "customers", "outside its parentheses"),
    ("1) AS y FROM read_csv('/etc/passwd') --", "customers", "does not run: Parser Error"),
    ("1) AS y FROM customers; ATTACH 'evil.db' AS evil; SELECT (1", "customers", "ATTACH"),
    ("1) AS y FROM customers; DETACH evil; SELECT (1", "customers", "DETACH"),
    ("1) AS y FROM customers; INSTALL httpfs; SELECT (1", "customers", "LOAD"),
    ("1) AS y FROM customers; LOAD httpfs; SELECT (1", "customers", "LOAD"),
    ("1) AS y FROM customers; PRAGMA version; SELECT (1", "customers", "PRAGMA"),
    ("1) AS y FROM customers; SET enable_external_access = true; SELECT (1", "customers", "SET"),
    ("1) AS y FROM customers; CALL pragma_version(); SELECT (1", "customers", "CALL"),
    ("1) AS y FROM customers; EXPORT DATABASE 'dump'; SELECT (1", "customers", "EXPORT"),
    ("1) AS y FROM customers; IMPORT DATABASE 'dump'; SELECT (1", "customers", "statements"),
    ("1) AS y FROM customers; CREATE TABLE t (a INT); SELECT (1", "customers", "CREATE"),
    ("1) AS y FROM customers; INSERT INTO t VALUES (1); SELECT (1", "customers", "INSERT"),
    ("1) AS y FROM customers; UPDATE t SET a = 2; SELECT (1", "customers", "UPDATE"),
    ("1) AS y FROM customers; DELETE FROM t; SELECT (1", "customers", "DELETE"),
    ("1) AS y FROM customers; DROP TABLE t; SELECT (1", "customers", "DROP"),
    ("sum(minutes_used)) AS y FROM act GROUP BY 1; COPY act TO 'a.csv'; SELECT (1", "activity", "COPY"),
]


@pytest.mark.parametrize(("expression", "source", "needle"), REFUSED,
                         ids=[f"{i}-{r[2]}" for i, r in enumerate(REFUSED)])
def test_refused_construct_names_the_definition(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                expression: str, source: str, needle: str) -> None:
    monkeypatch.chdir(tmp_path)  # anything written relative would land here
    path = _defs_file(tmp_path, expression, source)
    with pytest.raises(ChurnError) as err:
        load_registry(path)
    msg = str(err.value)
    assert "\n" not in msg
    assert f"feature 'x' (v1, source {source}) in {path}" in msg
    assert "is refused" in msg or "does not run: Parser Error" in msg
    assert needle in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["features.yaml"]  # nothing written


@pytest.mark.parametrize("expression", [
    "monthly_charge * 2",
    "date_diff('day', signup_date, CAST(cutoff AS DATE))",
    "CASE WHEN plan = 'premium' THEN 1 ELSE 0 END",
    "monthly_charge / nullif(num_lines, 0)",
    "monthly_charge -- a trailing comment",
    "monthly_charge /* a comment */ + 1",
])
def test_allowed_expressions(expression: str) -> None:
    check_expression(expression, "customers", "feature 'x'")


def test_a_model_logged_feature_set_is_checked_before_it_runs(small_data: Path) -> None:
    """A feature set read back from a model's artifacts never reaches DuckDB unparsed."""
    evil = FeatureDefinition("x", 1, "float64", "d", "customers",
                             "(SELECT count(*) FROM read_csv('/etc/passwd'))")
    fs = FeatureSet.from_dict(FeatureSet("evil", (evil,)).to_dict())
    with pytest.raises(ChurnError, match=r"feature 'x' .*read_csv\(\) is not allowed"):
        compute_latest(small_data, fs.features, T1)
    with pytest.raises(ChurnError, match="read_csv"):
        build_training_frame(small_data, fs, [T1], 30)


def test_feature_names_are_sql_identifiers() -> None:
    with pytest.raises(ChurnError, match="name must be letters, digits and _"):
        FeatureDefinition('x" FROM customers; --', 1, "float64", "d", "customers", "1")


def test_check_statement_refuses_more_than_one_select() -> None:
    check_statement("SELECT 1", "q")
    with pytest.raises(ChurnError, match="refusing to run 2 statement"):
        check_statement("SELECT 1; COPY (SELECT 1) TO 'x.csv'", "q")
    with pytest.raises(ChurnError, match="refusing to run 1 statement"):
        check_statement("ATTACH 'x.db'", "q")


def test_feature_connection_reads_its_data_only(tmp_path: Path, small_data: Path) -> None:
    """The second line of defence: even SQL that got past the parser cannot reach files."""
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "data").symlink_to(small_data, target_is_directory=True)  # as the test workspaces do
    other = tmp_path / "other.csv"
    other.write_text("a\n1\n")
    con = _connect(ws / "data")
    try:
        assert con.execute("SELECT count(*) FROM customers").fetchone()[0] > 0
        assert con.execute("SELECT count(*) FROM activity").fetchone()[0] > 0
        assert con.execute("SELECT count(*) FROM churn_events").fetchone()[0] >= 0
        for sql in (
            "SELECT * FROM read_csv('/etc/passwd')",
            f"SELECT * FROM read_csv('{other}')",
            f"COPY (SELECT 1) TO '{tmp_path / 'out.csv'}'",
            f"ATTACH '{tmp_path / 'evil.db'}' AS evil",
            "INSTALL httpfs",
            "SET enable_external_access = true",
            "SET allowed_directories = ['/']",
            "SET lock_configuration = false",
        ):
            with pytest.raises(duckdb.Error):
                con.execute(sql)
    finally:
        con.close()
    assert not (tmp_path / "out.csv").exists() and not (tmp_path / "evil.db").exists()


# --- the issue's reproductions through the real command ----------------------------------------

def _churn(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHURN_", "MLFLOW_"))}
    return subprocess.run([sys.executable, "-m", "mlflow_churn.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("kind", ["read_csv", "copy"])
def test_issue_reproductions_refused_by_features_list(tmp_path: Path, kind: str) -> None:
    target = tmp_path / "x.csv"
    expression = ("(SELECT count(*) FROM read_csv('/etc/passwd'))" if kind == "read_csv"
                  else _copy_stmt(target))
    defs = _defs_file(tmp_path, expression)
    (tmp_path / "churn.yaml").write_text(yaml.safe_dump({"features": {"definitions_file": str(defs)}}))
    res = _churn(["--workspace", str(tmp_path / "ws"), "features", "list"], tmp_path)
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: feature 'x' (v1, source customers)"), res.stderr
    assert "Traceback" not in res.stderr and "root:" not in res.stdout + res.stderr
    assert not target.exists() and not (tmp_path / "x.csv").exists()


# --- legitimate definitions still work end to end ----------------------------------------------

def test_user_definition_materializes_and_builds_frames(tmp_path: Path, small_data: Path) -> None:
    from mlflow_churn.features.materialize import materialize
    from mlflow_churn.features.online import open_store

    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "data").symlink_to(small_data, target_is_directory=True)
    defs = tmp_path / "features.yaml"
    defs.write_text(yaml.safe_dump({
        "features": [
            {"name": "charge_vs_mean", "version": 1, "dtype": "float64", "source": "customers",
             "expression": "monthly_charge / nullif(num_lines, 0) -- per line",
             "description": "charge per line"},
            {"name": "monthly_usage", "version": 3, "dtype": "float64", "source": "activity",
             "window_days": 28, "expression": "sum(minutes_used) FILTER (WHERE age_days < 28)",
             "default": 0, "description": "minutes, last 28 days"},
        ],
        "feature_sets": [{"name": "churn_custom", "base": "churn_default",
                          "replace": {"monthly_usage": "monthly_usage_v3"}, "add": ["charge_vs_mean"]}],
    }))
    cfg = load_config(workspace=ws, environ={}, overrides={"features.definitions_file": str(defs)})
    info = materialize(cfg, T1)
    assert "charge_vs_mean" in info.features and "monthly_usage_v3" in info.features
    store = open_store(cfg)
    try:
        served = store.scan(info.batch_id)
    finally:
        store.close()
    assert len(served) > 1000 and served["charge_vs_mean"].notna().all()
    assert served["charge_vs_mean"].gt(0).all()
    fs = load_registry(defs).feature_set("churn_custom")
    frame = build_training_frame(cfg.data_dir, fs, daily_cutoffs(T1.replace(day=13), T1, 7), 30)
    assert {"charge_vs_mean", "monthly_usage_v3", "plan", "label"} <= set(frame.columns)
    assert len(frame) > 1000 and frame["monthly_usage_v3"].ge(0).all()


@pytest.mark.parametrize(("field", "value", "needle"), [
    ("default", float("inf"), "default must be a finite number"),
    ("default", float("nan"), "default must be a finite number"),
    ("default", "zero", "default must be a finite number"),
    ("version", "1", "version must be an integer"),
    ("window_days", 0, "window_days must be an integer"),
    ("window_days", 7.5, "window_days must be an integer"),
])
def test_definition_fields_are_checked(field: str, value: object, needle: str) -> None:
    data = {"name": "x", "version": 1, "dtype": "float64", "source": "activity", "window_days": 7,
            "expression": "sum(minutes_used)", "description": "d", "default": 0.0, field: value}
    with pytest.raises(ChurnError, match=needle):
        FeatureDefinition.from_dict(data)
