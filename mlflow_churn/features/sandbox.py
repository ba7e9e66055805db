"""The feature SQL sandbox: what a definition's DuckDB expression may do, and what it may cost.

A definition's ``expression`` is spliced into the offline builder's SQL
(:func:`mlflow_churn.features.offline._feature_sql`, always as :func:`wrap`, so a trailing
``-- comment`` ends at a newline of ours). :func:`check_expression` parses it with DuckDB's
own parser (``extract_statements`` and ``json_serialize_sql``: nothing is executed) inside
``SELECT (<expression>) AS f FROM <source>`` and accepts it only when it is ONE expression
built from an allow-list (docs/security-features.md):

- column references: unqualified names of the source's usable columns
  (:func:`usable_columns`; ``cutoff``, and ``age_days`` / ``date`` for activity);
- literals, arithmetic, comparisons, ``AND`` / ``OR`` / ``NOT``, ``IS [NOT] NULL``,
  ``[NOT] IN (list)``, ``BETWEEN``, ``CASE``, ``coalesce``, casts to scalar types;
- the functions of :data:`ALLOWED_FUNCTIONS`: aggregates (with ``FILTER``, ``DISTINCT``),
  math, date parts and differences, string functions whose output is no longer than their
  input (no ``repeat``, ``lpad``, ``replace``, ``format``: their output is unbounded).

Everything else is refused with one line naming the construct: subqueries (a subquery can
read rows after the cutoff, or other customers' rows), window functions, ``*`` /
``COLUMNS``, lambdas, parameters, ``COLLATE``, list / struct / map values and indexing,
every function not on the list (``read_csv``, ``getenv``, ``current_setting``, ``range``,
``repeat``, ``sleep_ms``, ``pg_sleep``, ``now``, ``random``, ...), and any statement shape
that is not one expression (a second statement, its own ``FROM`` / ``WHERE`` / ``LIMIT``,
``TABLESAMPLE`` / ``USING SAMPLE``, ...). The parse tree is walked with an explicit stack
(no recursion); an expression longer than :data:`MAX_EXPRESSION_CHARS` or nested deeper
than :data:`MAX_DEPTH` is refused before its tree is read. The checker raises only
:class:`~mlflow_churn.errors.ChurnError` (any other exception of the parser is reported as
one line too).

Point in time by construction: with no subquery and no table of its own, an expression
sees only the rows the builder gives it (activity at or before the cutoff and within the
window, the customer's own static row), so no accepted definition can read the future.

Resource limits at run time (:class:`QueryLimits`, config ``features.query_memory_limit``,
``features.query_threads``, ``features.query_timeout_seconds``): every feature connection
gets DuckDB's ``memory_limit`` and ``threads`` (:func:`lock_down` settings, then locked),
and every feature query runs under :func:`limited`, which interrupts the connection from a
timer thread once the wall-clock limit passes; hitting either limit is a one-line
ChurnError naming the query's definitions and the limit. Binding a definition at load time
folds its constants (DuckDB evaluates constant sub-expressions while planning), which is
why the allow-list admits no function whose output can grow beyond its input.

Second line of defence: :func:`lock_down` turns a connection's external access off (no
files but those of ``allowed_directories``, no extensions installed or loaded, no ``COPY``
elsewhere, no ``ATTACH``) and locks its configuration.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from itertools import accumulate
from pathlib import Path
from typing import Any

import duckdb

from mlflow_churn.data.tables import ACTIVITY_SCHEMA, CUSTOMERS_SCHEMA
from mlflow_churn.errors import ChurnError, first_line

#: the table each source's expressions are evaluated over (the offline builder's views)
DECLARED_TABLES: dict[str, frozenset[str]] = {
    "customers": frozenset({"customers"}),
    "activity": frozenset({"activity"}),
}

#: functions that read or list files (or run SQL text, or read the environment or the
#: settings): never on the allow-list; named in the refusal as file / environment readers
FILE_FUNCTIONS = frozenset({
    "read_csv", "read_csv_auto", "read_parquet", "parquet_scan", "read_json", "read_json_auto",
    "read_json_objects", "read_json_objects_auto", "read_ndjson", "read_ndjson_auto",
    "read_ndjson_objects", "read_text", "read_blob", "glob", "sniff_csv", "parquet_metadata",
    "parquet_schema", "parquet_file_metadata", "parquet_kv_metadata", "parquet_bloom_probe",
    "read_xlsx", "st_read", "iceberg_scan", "delta_scan", "query", "query_table", "getenv",
    "sqlite_scan", "sqlite_attach", "postgres_scan", "postgres_attach", "mysql_scan",
    "current_setting", "duckdb_settings", "duckdb_extensions", "duckdb_secrets",
})

_AGGREGATES = (
    "sum avg mean count count_star min max median mode quantile quantile_cont quantile_disc "
    "stddev stddev_samp stddev_pop variance var_samp var_pop count_if countif bool_and bool_or "
    "any_value first last arg_min arg_max argmin argmax min_by max_by product skewness kurtosis "
    "kurtosis_pop entropy approx_count_distinct corr covar_pop covar_samp regr_slope "
    "regr_intercept regr_r2 regr_count fsum favg sumkahan kahan_sum geomean geometric_mean"
)
_OPERATORS = "+ - * / // % ^ ** || ~~ !~~ ~~* !~~* ~~~ !~~~"
_MATH = (
    "abs sign round floor ceil ceiling trunc sqrt cbrt exp ln log log2 log10 pow power "
    "greatest least nullif ifnull if iff isnan isinf isfinite fmod divide radians degrees "
    "sin cos tan asin acos atan atan2 pi even"
)
_DATES = (
    "date_diff datediff date_sub datesub date_part datepart date_trunc datetrunc year month day "
    "dayofweek dayofyear dayofmonth weekday week weekofyear yearweek quarter hour minute second "
    "millisecond isodow isoyear era epoch epoch_ms epoch_us last_day make_date dayname monthname "
    "to_days to_hours to_minutes to_seconds to_months to_years to_weeks to_milliseconds "
    "to_microseconds to_centuries to_decades to_millennia"
)
_STRINGS = (
    "lower upper lcase ucase length len strlen char_length character_length trim ltrim rtrim "
    "substr substring left right starts_with ends_with prefix suffix contains strpos instr "
    "position concat concat_ws reverse ascii regexp_matches regexp_full_match like_escape "
    "ilike_escape hash md5"
)
#: the functions (and function-like operators) a definition may call, by DuckDB's parsed name
ALLOWED_FUNCTIONS: frozenset[str] = frozenset(
    " ".join((_AGGREGATES, _OPERATORS, _MATH, _DATES, _STRINGS)).split())

#: operator nodes (not functions in DuckDB's tree) a definition may use
_OPERATOR_TYPES = frozenset({
    "OPERATOR_NOT", "OPERATOR_IS_NULL", "OPERATOR_IS_NOT_NULL", "COMPARE_IN", "COMPARE_NOT_IN",
    "OPERATOR_COALESCE",
})
#: scalar types a definition may cast to
CAST_TYPES = frozenset({
    "BOOLEAN", "BOOL", "LOGICAL", "TINYINT", "INT1", "SMALLINT", "INT2", "SHORT", "INTEGER", "INT",
    "INT4", "SIGNED", "BIGINT", "INT8", "LONG", "HUGEINT", "INT128", "UTINYINT", "USMALLINT",
    "UINTEGER", "UBIGINT", "UHUGEINT", "FLOAT", "FLOAT4", "REAL", "DOUBLE", "FLOAT8", "DECIMAL",
    "NUMERIC", "VARCHAR", "TEXT", "STRING", "CHAR", "BPCHAR", "DATE", "TIME", "TIMESTAMP",
    "DATETIME", "TIMESTAMPTZ", "TIMESTAMP WITH TIME ZONE", "INTERVAL",
})
#: expression classes whose refusal has a name of its own
_REFUSED_CLASSES = {
    "SUBQUERY": "subquery not allowed (it could read rows after the cutoff or other customers' rows)",
    "WINDOW": "window function (OVER) not allowed",
    "STAR": "* / COLUMNS(...) not allowed (name the columns)",
    "LAMBDA": "lambda not allowed",
    "PARAMETER": "query parameter not allowed",
    "POSITIONAL_REFERENCE": "positional reference (#n) not allowed",
    "COLLATE": "COLLATE not allowed",
}

#: longest expression accepted (characters); a definition is one expression, not a program
MAX_EXPRESSION_CHARS = 8000
#: deepest nesting of the parse tree's JSON accepted (about half as many expression levels)
MAX_DEPTH = 256

_ALIAS = "__churn_feature__"
#: prefix of a problem that is a syntax error (reported as "does not run", not "is refused")
_PARSE = "does not run: "


def wrap(expression: str) -> str:
    """``expression`` as the builder splices it: parenthesised, with a newline before the
    closing parenthesis so a trailing ``-- comment`` cannot swallow the rest of the SQL."""
    return f"({expression}\n)"


def usable_columns(source: str) -> list[str]:
    """Columns an expression over ``source`` may use (the layout's, plus cutoff; activity
    also date and age_days)."""
    if source == "customers":
        return [*CUSTOMERS_SCHEMA.names, "cutoff"]
    if source == "activity":
        return [*ACTIVITY_SCHEMA.names, "date", "cutoff", "age_days"]
    return []


def shown(expression: str, limit: int = 160) -> str:
    """``expression`` on one line (whitespace runs, newlines included, become one space),
    cut to ``limit`` characters: how an error message quotes a definition."""
    text = " ".join(str(expression).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _refuse(where: str, expression: str, why: str, columns: Iterable[str] = ()) -> ChurnError:
    usable = f"usable columns: {', '.join(columns)}; " if columns else ""
    verdict = why if why.startswith(_PARSE) else f"is refused: {why}"
    return ChurnError(f"{where}: expression '{shown(expression)}' {verdict}; fix the expression: one SQL "
                      f"expression over its source table ({usable}see docs/security-features.md)")


def _parser_message(text: str) -> str:
    """DuckDB's parser message without the position lines (they show the wrapper)."""
    return " ".join(str(text).split("LINE ")[0].split())[:200]


_STRING_LITERAL = re.compile(r'"(?:[^"\\]|\\.)*"')
_DEPTH_STEP = {"{": 1, "[": 1, "}": -1, "]": -1}


def _json_depth(text: str) -> int:
    """Deepest nesting of the JSON ``text`` (strings skipped), counted without recursion."""
    bare = _STRING_LITERAL.sub("", text)
    return max(accumulate(_DEPTH_STEP.get(c, 0) for c in bare if c in _DEPTH_STEP), default=0)


_parsers = threading.local()


def _parser() -> duckdb.DuckDBPyConnection:
    """This thread's parsing connection (no tables, external access off, locked): it only
    runs ``json_serialize_sql``, which parses its argument and executes nothing of it."""
    con = getattr(_parsers, "con", None)
    if con is None:
        con = _parsers.con = lock_down(duckdb.connect(), (), {"memory_limit": "256MB", "threads": "1"})
    return con


def _serialize(sql: str) -> dict | str:
    """DuckDB's parse tree of ``sql`` as JSON, or a problem (too deep to read safely)."""
    text = _parser().execute("SELECT json_serialize_sql($1)", [sql]).fetchone()[0]
    if _json_depth(text) > MAX_DEPTH:
        return f"it is nested too deeply (more than about {MAX_DEPTH // 2} levels)"
    return json.loads(text)


def _allowed_names() -> str:
    return ("aggregates such as sum, avg, count, min, max, median, stddev; math; date parts and "
            "differences; string functions with bounded output; full list in "
            "docs/security-features.md")


def _node_problem(node: dict, columns: frozenset[str]) -> str | None:
    """Why one expression node of the tree is not allowed, or None."""
    cls = str(node.get("class"))
    if cls in _REFUSED_CLASSES:
        return _REFUSED_CLASSES[cls]
    if cls == "COLUMN_REF":
        names = node.get("column_names") or []
        if len(names) != 1:
            return (f"qualified column '{'.'.join(map(str, names))}' not allowed; use the bare "
                    "column name")
        if str(names[0]).lower() not in columns:
            return f'column "{names[0]}" not found among its source\'s usable columns'
        return None
    if cls == "FUNCTION":
        name = str(node.get("function_name", "?"))
        if node.get("schema") or node.get("catalog"):
            path = (node.get("qualified_name") or {}).get("path") or [name]
            return f"qualified function '{'.'.join(map(str, path))}' not allowed"
        if name.lower() in FILE_FUNCTIONS:
            return f"function {name}() is not allowed (it reads files, settings or the environment)"
        if name.lower() not in ALLOWED_FUNCTIONS:
            return f"function {name} is not allowed (allowed: {_allowed_names()})"
        return None
    if cls == "OPERATOR":
        kind = str(node.get("type"))
        if kind not in _OPERATOR_TYPES:
            return (f"operator {kind} is not allowed (no list / struct / map values or indexing)")
        return None
    if cls == "CAST":
        type_expr = node.get("type_expr") or {}
        type_name = str(type_expr.get("type_name", "?")).upper()
        if type_expr.get("schema") or type_expr.get("catalog") or type_name not in CAST_TYPES:
            return f"cast to {type_name} is not allowed (scalar types only)"
        return None
    if cls in ("CONSTANT", "COMPARISON", "CONJUNCTION", "CASE", "BETWEEN"):
        return None
    return f"construct {cls} is not allowed"


#: keys of an expression node that hold no expression (not walked)
_SKIP_KEYS = frozenset({"type_expr", "literal", "qualified_name", "column_names"})


def _tree_problem(root: dict, columns: frozenset[str]) -> str | None:
    """The first node below ``root`` (an expression) that is not allowed, walked with an
    explicit stack; None when every node is allowed."""
    stack: list[Any] = [root]
    while stack:
        cur = stack.pop()
        if isinstance(cur, list):
            stack.extend(cur)
            continue
        if not isinstance(cur, dict):
            continue
        if "class" in cur:
            problem = _node_problem(cur, columns)
            if problem is not None:
                return _table_function_in(cur) or problem
        stack.extend(v for k, v in cur.items() if k not in _SKIP_KEYS and isinstance(v, dict | list))
    return None


def _table_function_in(root: dict) -> str | None:
    """A refusal naming the first table function (a file read) below ``root``, if any: said
    before the subquery that holds it, so the message names the read."""
    for cur in _dict_nodes(root):
        if cur.get("type") == "TABLE_FUNCTION" and "class" not in cur:
            fn = (cur.get("function") or {}).get("function_name", "?")
            return f"table function {fn}() is not allowed (no subqueries, no file reads)"
    return None


def _dict_nodes(root: Any) -> Iterator[dict]:
    """Every dict of a parse tree below ``root`` (lists walked through), with an explicit stack."""
    stack: list[Any] = [root]
    while stack:
        cur = stack.pop()
        if isinstance(cur, list):
            stack.extend(cur)
        elif isinstance(cur, dict):
            yield cur
            stack.extend(v for v in cur.values() if isinstance(v, dict | list))


@lru_cache(maxsize=1024)
def _problem(expression: str, source: str) -> str | None:
    """Why ``expression`` is not an allowed expression over ``source``, or None."""
    if source not in DECLARED_TABLES:
        return f"source '{source}' has no table to run SQL on"
    if not isinstance(expression, str) or not expression.strip():
        return "the expression is empty"
    if len(expression) > MAX_EXPRESSION_CHARS:
        return f"it is {len(expression):,} characters long (at most {MAX_EXPRESSION_CHARS:,})"
    if "\x00" in expression:
        return "the expression holds a NUL character"
    sql = f"SELECT {wrap(expression)} AS {_ALIAS} FROM {source}"
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
    if isinstance(tree, str):
        return tree
    if tree.get("error"):
        return _PARSE + _parser_message(tree.get("error_message", "?"))
    stmts = tree.get("statements") or []
    node = stmts[0].get("node", {}) if len(stmts) == 1 else {}
    select = node.get("select_list") or []
    frm = node.get("from_table") or {}
    if frm.get("sample") or node.get("sample"):
        return "TABLESAMPLE / USING SAMPLE not allowed"
    shape_ok = (
        node.get("type") == "SELECT_NODE" and len(select) == 1
        and isinstance(select[0], dict) and select[0].get("alias") == _ALIAS
        and frm.get("type") == "BASE_TABLE" and frm.get("table_name") == source
        and not frm.get("alias") and not frm.get("schema_name") and not frm.get("catalog_name")
        and not node.get("where_clause") and not node.get("group_expressions")
        and not node.get("having") and not node.get("qualify") and not node.get("modifiers")
        and not (node.get("cte_map") or {}).get("map")
    )
    if not shape_ok:
        return "it reaches outside its parentheses (extra columns, FROM, WHERE, UNION, LIMIT, ...)"
    return _tree_problem(select[0], frozenset(c.lower() for c in usable_columns(source)))


@lru_cache(maxsize=1024)
def called_names(expression: str, source: str) -> tuple[frozenset[str], frozenset[str]]:
    """(function names, cast type names) ``expression`` uses, by DuckDB's parse tree (lower-case
    functions, upper-case types); call it on an expression :func:`problem` accepts."""
    tree = _serialize(f"SELECT {wrap(expression)} AS {_ALIAS} FROM {source}")
    if isinstance(tree, str):
        raise ChurnError(tree)
    functions, casts = set(), set()
    for cur in _dict_nodes(tree):
        if cur.get("class") == "FUNCTION":
            functions.add(str(cur.get("function_name")).lower())
        elif cur.get("class") == "CAST":
            casts.add(str((cur.get("type_expr") or {}).get("type_name", "?")).upper())
    return frozenset(functions), frozenset(casts)


def problem(expression: str, source: str) -> str | None:
    """Why ``expression`` is refused over ``source`` (one line), or None when it is allowed.

    Never raises: an unexpected failure of the parser or of the walk is itself the problem.
    """
    try:
        return _problem(expression, source)
    except (duckdb.Error, ValueError, TypeError, KeyError, AttributeError, RecursionError,
            MemoryError, OverflowError) as exc:
        return f"it could not be checked ({type(exc).__name__}: {first_line(exc, 160)})"


def check_expression(expression: str, source: str, where: str, columns: Iterable[str] = ()) -> None:
    """Raise ChurnError (prefixed ``where``, e.g. "feature 'x' (v1) in defs.yaml", listing
    ``columns`` as the usable ones) unless ``expression`` is one allowed SQL expression over
    ``source``'s table."""
    found = problem(expression, source)
    if found is not None:
        raise _refuse(where, expression, found, columns)


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


# --- resource limits ------------------------------------------------------------------------

@dataclass(frozen=True)
class QueryLimits:
    """DuckDB limits of every feature query (config ``features.query_*``)."""

    memory_limit: str = "2GB"
    threads: int = 2
    timeout_seconds: float = 900.0

    def settings(self) -> dict[str, str]:
        """The connection settings :func:`lock_down` applies before locking."""
        return {"memory_limit": self.memory_limit, "threads": str(self.threads)}


_limits = QueryLimits()
_limits_lock = threading.Lock()


def query_limits() -> QueryLimits:
    """The limits feature queries of this process run with."""
    return _limits


def set_query_limits(limits: QueryLimits) -> QueryLimits:
    """Make ``limits`` the process's feature query limits; returns the previous ones."""
    global _limits
    with _limits_lock:
        previous, _limits = _limits, limits
    return previous


def limits_of(features_cfg: Any) -> QueryLimits:
    """The QueryLimits of a ``features`` config section (defaults for keys it lacks)."""
    base = QueryLimits()
    return QueryLimits(
        memory_limit=str(getattr(features_cfg, "query_memory_limit", base.memory_limit)),
        threads=int(getattr(features_cfg, "query_threads", base.threads)),
        timeout_seconds=float(getattr(features_cfg, "query_timeout_seconds", base.timeout_seconds)),
    )


def _is_arrow_interrupt(exc: OSError) -> bool:
    """Whether ``exc`` is DuckDB's interrupt come back through pyarrow (a streamed Arrow read).

    The one place the package reads an exception's text to decide: pyarrow turns the
    InterruptException DuckDB raises inside its record-batch reader into a plain
    ``OSError`` (``ArrowIOError``) whose only trace of the cause is the message
    ("INTERRUPT Error: Interrupted!"): neither library offers a type or a code for it."""
    return "INTERRUPT" in str(exc).upper()


@contextmanager
def limited(con: duckdb.DuckDBPyConnection, what: str,
            limits: QueryLimits | None = None) -> Iterator[None]:
    """Run the body (queries on ``con``) under the wall-clock limit: a watcher thread
    interrupts ``con`` once ``limits.timeout_seconds`` pass (and again every 50 ms until the
    body ends). A query stopped by the timer,
    or one that ran out of ``memory_limit``, raises one-line ChurnError naming ``what``
    (e.g. the query's definitions) and the limit; other errors pass through."""
    limits = limits or _limits
    stop = threading.Event()
    lock = threading.Lock()
    state = {"running": True, "fired": False}

    def watch() -> None:
        if stop.wait(limits.timeout_seconds):
            return
        # DuckDB drops an interrupt that arrives between two queries, so it is repeated until
        # the body ends; never after it (a late interrupt would hit another query)
        while True:
            with lock:
                if not state["running"]:
                    return
                state["fired"] = True
                con.interrupt()
            if stop.wait(0.05):
                return

    watcher = threading.Thread(target=watch, name="feature-query-timeout", daemon=True)
    watcher.start()
    timed_out = (f"{what} stopped: it hit features.query_timeout_seconds = {limits.timeout_seconds:g} s; "
                 "simplify the definition or raise the limit")
    try:
        yield
    except duckdb.InterruptException:
        if state["fired"]:
            raise ChurnError(timed_out) from None
        raise
    except OSError as exc:  # a streamed Arrow read: DuckDB's interrupt comes back through pyarrow
        if state["fired"] and _is_arrow_interrupt(exc):
            raise ChurnError(timed_out) from None
        raise
    except duckdb.OutOfMemoryException as exc:
        raise ChurnError(
            f"{what} stopped: it hit features.query_memory_limit = {limits.memory_limit} "
            f"({first_line(exc, 160)}); simplify the definition or raise the limit") from None
    finally:
        with lock:
            state["running"] = False
        stop.set()


def lock_down(con: duckdb.DuckDBPyConnection, allowed_directories: Iterable[Path | str] = (),
              settings: dict[str, str] | None = None) -> duckdb.DuckDBPyConnection:
    """Apply ``settings`` (e.g. TimeZone, memory_limit, threads, temp_directory), allow
    reading only below ``allowed_directories``, turn external access off and lock the
    configuration.

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


__all__ = [
    "ALLOWED_FUNCTIONS", "CAST_TYPES", "DECLARED_TABLES", "FILE_FUNCTIONS", "MAX_DEPTH",
    "MAX_EXPRESSION_CHARS", "QueryLimits", "called_names", "check_expression", "check_statement", "limited",
    "limits_of", "lock_down", "problem", "query_limits", "set_query_limits", "shown", "usable_columns",
    "wrap",
]
