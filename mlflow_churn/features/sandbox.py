"""The feature SQL sandbox: what a definition's DuckDB expression may do, checked by parsing.

A definition's ``expression`` is spliced into the offline builder's SQL
(:func:`mlflow_churn.features.offline._feature_sql`), so it must be exactly one SQL
*expression* over the feature's declared source table. :func:`check_expression` parses it
with DuckDB's own parser (``extract_statements`` and ``json_serialize_sql``: nothing is
executed) inside ``SELECT (<expression>) AS f FROM <source>`` and refuses, with a one-line
:class:`~mlflow_churn.errors.ChurnError` naming the definition:

- anything that is not one SELECT statement (``...) LIMIT 0; COPY (...) TO 'x.csv'; ...``,
  ``COPY``, ``ATTACH``, ``DETACH``, ``INSTALL``, ``LOAD``, ``PRAGMA``, ``SET``, ``CALL``,
  ``EXPORT``/``IMPORT DATABASE``, ``CREATE``/``INSERT``/``UPDATE``/``DELETE``/``DROP``);
- an expression that breaks out of its parentheses (a second column, its own ``FROM``,
  ``WHERE``, ``UNION``, ``LIMIT``, ...);
- every table function (``read_csv``, ``read_parquet``, ``read_json*``, ``parquet_scan``,
  ``glob``, ``read_text``, ``read_blob``, ``sniff_csv``, ``query``, ``range``, ...) and every
  other FROM item that is not a declared table, a subquery, a join of those or ``VALUES``
  (``FROM 'file.csv'`` reads as a table named like the file: refused);
- a table other than the feature's declared source (``customers`` or ``activity``),
  qualified names (``main.x``, ``other_db.x``) and CTE names included;
- the file-reading functions above called as scalar functions, and ``getenv``.

Subqueries over the declared source are allowed, e.g. ``monthly_charge / (SELECT
avg(monthly_charge) FROM customers)``.

Second line of defence, at run time: :func:`lock_down` turns a connection's external
access off (no files but those of ``allowed_directories``, no extensions installed or
loaded, no ``COPY`` elsewhere, no ``ATTACH``) and locks its configuration. The offline
builder's connections read the workspace's data directory only.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import duckdb

from mlflow_churn.errors import ChurnError

#: the table each source's expressions may read (the offline builder's views of that name)
DECLARED_TABLES: dict[str, frozenset[str]] = {
    "customers": frozenset({"customers"}),
    "activity": frozenset({"activity"}),
}

#: functions that read or list files (or run SQL text, or read the environment); refused by
#: name as well, wherever they appear (table functions are refused as a class anyway)
FILE_FUNCTIONS = frozenset({
    "read_csv", "read_csv_auto", "read_parquet", "parquet_scan", "read_json", "read_json_auto",
    "read_json_objects", "read_json_objects_auto", "read_ndjson", "read_ndjson_auto",
    "read_ndjson_objects", "read_text", "read_blob", "glob", "sniff_csv", "parquet_metadata",
    "parquet_schema", "parquet_file_metadata", "parquet_kv_metadata", "parquet_bloom_probe",
    "read_xlsx", "st_read", "iceberg_scan", "delta_scan", "query", "query_table", "getenv",
    "sqlite_scan", "sqlite_attach", "postgres_scan", "postgres_attach", "mysql_scan",
})

#: FROM items an expression's subqueries may use
_ALLOWED_REFS = frozenset({"BASE_TABLE", "SUBQUERY", "JOIN", "EMPTY", "EXPRESSION_LIST"})

_ALIAS = "__churn_feature__"
#: prefix of a problem that is a syntax error (reported as "does not run", not "is refused")
_PARSE = "does not run: "


def _refuse(where: str, expression: str, why: str, columns: Iterable[str] = ()) -> ChurnError:
    shown = " ".join(str(expression).split())
    shown = shown if len(shown) <= 160 else shown[:157] + "..."
    usable = f"usable columns: {', '.join(columns)}; " if columns else ""
    verdict = why if why.startswith(_PARSE) else f"is refused: {why}"
    return ChurnError(f"{where}: expression '{shown}' {verdict}; fix the expression: one SQL "
                      f"expression over its source table ({usable}see docs/security-features.md)")


def _walk(node: Any) -> Iterator[dict]:
    """Every JSON object below (and including) ``node``."""
    stack = [node]
    while stack:
        cur = stack.pop()
        if isinstance(cur, dict):
            yield cur
            stack.extend(cur.values())
        elif isinstance(cur, list):
            stack.extend(cur)


def _parser_message(text: str) -> str:
    """DuckDB's parser message without the position lines (they show the wrapper)."""
    return " ".join(text.split("LINE ")[0].split())[:200]


def _serialize(sql: str) -> dict:
    con = duckdb.connect()
    try:
        return json.loads(con.execute("SELECT json_serialize_sql($1)", [sql]).fetchone()[0])
    finally:
        con.close()


@lru_cache(maxsize=1024)
def _problem(expression: str, source: str) -> str | None:
    """Why ``expression`` is not a sandboxed expression over ``source``, or None."""
    if source not in DECLARED_TABLES:
        return f"source '{source}' has no table to run SQL on"
    if not isinstance(expression, str) or not expression.strip():
        return "the expression is empty"
    if "\x00" in expression:
        return "the expression holds a NUL character"
    sql = f"SELECT ({expression}\n) AS {_ALIAS} FROM {source}"
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        return _PARSE + _parser_message(str(exc))
    kinds = [s.type.name for s in statements]
    if len(statements) != 1:
        others = sorted({k for k in kinds if k != "SELECT"}) or ["SELECT"]
        return (f"it holds {len(statements)} SQL statements (including {', '.join(others)}), "
                "not one expression")
    if kinds[0] != "SELECT":
        return f"it makes a {kinds[0]} statement, not an expression"
    tree = _serialize(sql)
    if tree.get("error"):
        return _PARSE + _parser_message(tree.get("error_message", "?"))
    stmts = tree.get("statements") or []
    node = stmts[0].get("node", {}) if len(stmts) == 1 else {}
    select = node.get("select_list") or []
    frm = node.get("from_table") or {}
    shape_ok = (
        node.get("type") == "SELECT_NODE" and len(select) == 1 and select[0].get("alias") == _ALIAS
        and frm.get("type") == "BASE_TABLE" and frm.get("table_name") == source
        and not frm.get("alias") and not frm.get("schema_name") and not frm.get("catalog_name")
        and not node.get("where_clause") and not node.get("group_expressions")
        and not node.get("having") and not node.get("qualify") and not node.get("modifiers")
        and not (node.get("cte_map") or {}).get("map") and not node.get("sample")
    )
    if not shape_ok:
        return "it reaches outside its parentheses (extra columns, FROM, WHERE, UNION, LIMIT, ...)"
    allowed = DECLARED_TABLES[source]
    # every FROM item of every subquery, joins followed: only whitelisted kinds (an unknown
    # kind of a future DuckDB is refused, not let through)
    refs = [obj["from_table"] for obj in _walk(select[0]) if isinstance(obj.get("from_table"), dict)]
    while refs:
        ref = refs.pop()
        kind = ref.get("type")
        if kind == "TABLE_FUNCTION":
            fn = (ref.get("function") or {}).get("function_name", "?")
            return f"table function {fn}() is not allowed (no table functions, no file reads)"
        if kind not in _ALLOWED_REFS:
            return f"a subquery reads from a {kind} item; only {', '.join(sorted(allowed))} may be read"
        if kind == "JOIN":
            refs += [r for r in (ref.get("left"), ref.get("right")) if isinstance(r, dict)]
    for obj in _walk(select[0]):
        kind = obj.get("type")
        if "class" not in obj and kind in _REF_TYPES:  # a FROM item of a subquery
            if kind == "TABLE_FUNCTION":
                fn = (obj.get("function") or {}).get("function_name", "?")
                return f"table function {fn}() is not allowed (no table functions, no file reads)"
            if kind not in _ALLOWED_REFS:
                return f"a subquery reads from a {kind} item; only {', '.join(sorted(allowed))} may be read"
            if kind == "BASE_TABLE":
                name = obj.get("table_name", "")
                if obj.get("schema_name") or obj.get("catalog_name") or name not in allowed:
                    full = ".".join(p for p in (obj.get("catalog_name"), obj.get("schema_name"), name) if p)
                    return (f"table '{full}' is not its declared source; it may read only "
                            f"{', '.join(sorted(allowed))}")
        elif (obj.get("cte_map") or {}).get("map"):
            return "subqueries may not define CTEs (WITH)"
        elif obj.get("class") == "FUNCTION" and str(obj.get("function_name", "")).lower() in FILE_FUNCTIONS:
            return f"function {obj['function_name']}() is not allowed (it reads files or the environment)"
    return None


#: the TableRef kinds of DuckDB's serialized parse tree
_REF_TYPES = frozenset({
    "BASE_TABLE", "SUBQUERY", "JOIN", "TABLE_FUNCTION", "EMPTY", "EXPRESSION_LIST", "CTE",
    "PIVOT", "SHOW_REF", "COLUMN_DATA", "DELIM_GET", "BOUND_TABLE_REF", "INVALID",
})


def check_expression(expression: str, source: str, where: str, columns: Iterable[str] = ()) -> None:
    """Raise ChurnError (prefixed ``where``, e.g. "feature 'x' (v1) in defs.yaml", listing
    ``columns`` as the usable ones) unless ``expression`` is one sandboxed SQL expression
    over ``source``'s table."""
    problem = _problem(expression, source)
    if problem is not None:
        raise _refuse(where, expression, problem, columns)


def check_statement(sql: str, what: str) -> None:
    """Raise ChurnError unless ``sql`` is exactly one SELECT statement (the builder's own SQL,
    checked before it runs: no definition can have smuggled in a second statement)."""
    try:
        kinds = [s.type.name for s in duckdb.extract_statements(sql)]
    except duckdb.Error as exc:
        raise ChurnError(f"{what}: the SQL does not parse: {_parser_message(str(exc))}") from None
    if kinds != ["SELECT"]:
        raise ChurnError(f"{what}: refusing to run {len(kinds)} statement(s) ({', '.join(kinds)}); "
                         "expected one SELECT")


def lock_down(con: duckdb.DuckDBPyConnection, allowed_directories: Iterable[Path | str] = (),
              settings: dict[str, str] | None = None) -> duckdb.DuckDBPyConnection:
    """Apply ``settings`` (e.g. TimeZone, memory_limit, temp_directory), allow reading only
    below ``allowed_directories``, turn external access off and lock the configuration.

    After this, ``con`` reads Parquet below those directories and Python objects registered
    on it, and nothing else: no other file, no COPY elsewhere, no ATTACH, no extension
    install or load, no SET.
    """
    for name, value in (settings or {}).items():
        con.execute(f"SET {name} = $1", [value])
    dirs: list[str] = []
    for d in allowed_directories:  # as given (made absolute) and with symlinks resolved
        for form in (Path(d).absolute(), Path(d).resolve()):
            text = str(form).rstrip("/") + "/"
            if text not in dirs:
                dirs.append(text)
    con.execute("SET autoinstall_known_extensions = false")
    con.execute("SET autoload_known_extensions = false")
    if dirs:
        con.execute("SET allowed_directories = $1", [dirs])
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con


__all__ = ["DECLARED_TABLES", "FILE_FUNCTIONS", "check_expression", "check_statement", "lock_down"]
