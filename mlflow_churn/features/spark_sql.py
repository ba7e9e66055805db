"""Feature SQL on Spark: the DuckDB definitions transpiled to Spark SQL with sqlglot.

Pure Python (sqlglot and DuckDB's parser; no JVM), so the check runs wherever a definition
is registered. A definition runs on both engines only when

- every function it calls is in :data:`SPARK_FUNCTIONS` (DuckDB name -> a sample expression:
  tests/test_features_spark.py evaluates each sample on DuckDB and on Spark and requires
  equal results); every other entry of the sandbox's allow-list is in
  :data:`SPARK_REFUSED` with the reason (no Spark function, different semantics, or
  non-deterministic), so a definition calling one is refused at registration naming it;
- every type it casts to is in :data:`SPARK_CAST_TYPES`;
- sqlglot transpiles it duckdb -> spark with ``unsupported_level=RAISE``.

:func:`to_spark` transpiles the offline builder's whole generated query
(:func:`mlflow_churn.features.offline._feature_sql`), so both engines run the builder's
query: Spark its one-pass form (``one_pass=True``), which computes every window of a
customer in one aggregation instead of one per window, with :func:`filtered` adding each
window's condition to every aggregate of its expressions.
"""

from __future__ import annotations

from functools import lru_cache

import sqlglot
from sqlglot import exp
from sqlglot.errors import ErrorLevel, SqlglotError

from mlflow_churn.errors import ChurnError, first_line
from mlflow_churn.features.sandbox import ALLOWED_FUNCTIONS, called_names

#: DuckDB function (parsed name) -> a sample expression over the ``customers`` (scalar) or
#: ``activity`` (aggregate) test rows; each evaluates equal on DuckDB and Spark (tested)
SPARK_FUNCTIONS: dict[str, str] = {
    # aggregates (over activity rows)
    "sum": "sum(minutes_used)", "avg": "avg(sessions)", "mean": "mean(minutes_used)",
    "count": "count(data_used_mb)", "count_star": "count(*)", "min": "min(minutes_used)",
    "max": "max(event_timestamp)", "stddev": "stddev(minutes_used)",
    "stddev_samp": "stddev_samp(sessions)", "stddev_pop": "stddev_pop(sessions)",
    "variance": "variance(minutes_used)", "var_samp": "var_samp(sessions)",
    "var_pop": "var_pop(sessions)", "count_if": "count_if(sessions > 2)",
    "bool_and": "bool_and(sessions > 0)", "bool_or": "bool_or(support_calls > 0)",
    "corr": "corr(sessions, minutes_used)", "covar_pop": "covar_pop(sessions, minutes_used)",
    "covar_samp": "covar_samp(sessions, minutes_used)",
    "arg_max": "arg_max(sessions, minutes_used)", "arg_min": "arg_min(sessions, minutes_used)",
    "max_by": "max_by(sessions, minutes_used)", "min_by": "min_by(sessions, minutes_used)",
    "regr_slope": "regr_slope(minutes_used, sessions)",
    "regr_intercept": "regr_intercept(minutes_used, sessions)",
    "regr_r2": "regr_r2(minutes_used, sessions)", "regr_count": "regr_count(minutes_used, sessions)",
    # operators
    "+": "age + num_lines", "-": "age - monthly_charge", "*": "age * monthly_charge",
    "/": "age / num_lines", "//": "age // num_lines", "%": "age % num_lines", "^": "num_lines ^ 2",
    "**": "num_lines ** 3", "||": "plan || region", "~~": "plan LIKE 'st%'",
    "!~~": "plan NOT LIKE 'st%'",
    # math
    "abs": "abs(monthly_charge - 60)", "sign": "sign(monthly_charge - 60)",
    "round": "round(monthly_charge, 1)", "floor": "floor(monthly_charge)",
    "ceil": "ceil(monthly_charge)", "ceiling": "ceiling(monthly_charge)",
    "sqrt": "sqrt(monthly_charge)", "cbrt": "cbrt(monthly_charge)", "exp": "exp(num_lines)",
    "ln": "ln(monthly_charge)", "log2": "log2(monthly_charge)", "log10": "log10(monthly_charge)",
    "pow": "pow(monthly_charge, 2)", "power": "power(age, 0.5)",
    "greatest": "greatest(age, num_lines * 20)", "least": "least(age, num_lines * 20)",
    "nullif": "nullif(num_lines, 2)", "ifnull": "ifnull(nullif(num_lines, 2), 0)",
    "if": "if(age > 40, 1, 0)", "isnan": "isnan(monthly_charge)",
    "radians": "radians(age)", "degrees": "degrees(monthly_charge)", "sin": "sin(age)",
    "cos": "cos(age)", "tan": "tan(age)", "asin": "asin(num_lines / 10.0)",
    "acos": "acos(num_lines / 10.0)", "atan": "atan(age)", "atan2": "atan2(age, monthly_charge)",
    "pi": "pi() * age",
    # dates
    "date_diff": "date_diff('day', signup_date, CAST(cutoff AS DATE))",
    "datediff": "datediff('day', signup_date, CAST(cutoff AS DATE))",
    "year": "year(signup_date)", "month": "month(signup_date)", "day": "day(signup_date)",
    "dayofmonth": "dayofmonth(signup_date)", "dayofyear": "dayofyear(signup_date)",
    "quarter": "quarter(signup_date)", "hour": "hour(cutoff)", "minute": "minute(cutoff)",
    "last_day": "last_day(signup_date)", "make_date": "make_date(2026, month(signup_date), 1)",
    "weekofyear": "weekofyear(signup_date)",
    "epoch": "epoch(cutoff) - epoch(event_timestamp)",
    # strings
    "lower": "lower(plan)", "upper": "upper(region)", "lcase": "lcase(plan)", "ucase": "ucase(plan)",
    "length": "length(plan)", "char_length": "char_length(plan)",
    "character_length": "character_length(plan)", "trim": "trim(plan)", "ltrim": "ltrim(plan)",
    "rtrim": "rtrim(plan)", "substr": "substr(plan, 2, 3)", "substring": "substring(region, 1, 2)",
    "left": "left(plan, 2)", "right": "right(plan, 2)", "starts_with": "starts_with(plan, 'st')",
    "ends_with": "ends_with(plan, 'rd')", "contains": "contains(plan, 'and')",
    "strpos": "strpos(plan, 'a')", "instr": "instr(plan, 'a')",
    "concat": "concat(plan, '-', region)", "concat_ws": "concat_ws('/', plan, region)",
    "reverse": "reverse(plan)", "ascii": "ascii(plan)",
    "regexp_matches": "regexp_matches(plan, 'a.d')", "md5": "md5(plan)",
}

#: the aggregate functions of :data:`SPARK_FUNCTIONS` (a window's feature calls them over its rows)
AGGREGATES = frozenset({
    "sum", "avg", "mean", "count", "count_star", "min", "max", "stddev", "stddev_samp", "stddev_pop",
    "variance", "var_samp", "var_pop", "count_if", "bool_and", "bool_or", "corr", "covar_pop",
    "covar_samp", "arg_max", "arg_min", "max_by", "min_by", "regr_slope", "regr_intercept", "regr_r2",
    "regr_count"})

_NO_SPARK = "no Spark SQL function gives the same result (sqlglot has no mapping)"
_SEMANTICS = "DuckDB and Spark disagree on it"
_RANDOM = "not deterministic (the engines may pick different rows)"
#: allow-listed DuckDB functions a definition may not use when it must run on Spark too
SPARK_REFUSED: dict[str, str] = {
    **dict.fromkeys(("log", "dayofweek", "weekday", "isodow", "kurtosis", "kurtosis_pop", "hash",
                     "mode", "quantile", "quantile_cont", "quantile_disc", "product", "trunc",
                     "second", "date_trunc", "datetrunc", "date_part", "datepart", "yearweek",
                     "isoyear", "era", "even", "fmod", "divide", "isinf", "isfinite", "strlen",
                     "len", "position", "prefix", "suffix", "regexp_full_match", "epoch_ms",
                     "epoch_us", "dayname", "monthname", "millisecond", "date_sub", "datesub",
                     "countif", "argmin", "argmax", "fsum", "favg", "sumkahan", "kahan_sum",
                     "geomean", "geometric_mean", "entropy", "~~*", "!~~*", "~~~", "!~~~",
                     "like_escape", "ilike_escape"), _SEMANTICS),
    "median": f"{_SEMANTICS} (interpolation, float precision)",
    "skewness": f"{_SEMANTICS} (sample vs population skewness)",
    "week": "Spark has no WEEK function (use weekofyear)",
    "iff": "DuckDB has no function iff (use if)",
    **dict.fromkeys(("any_value", "first", "last", "approx_count_distinct"), _RANDOM),
    **dict.fromkeys(("to_days", "to_hours", "to_minutes", "to_seconds", "to_months", "to_years",
                     "to_weeks", "to_milliseconds", "to_microseconds", "to_centuries",
                     "to_decades", "to_millennia"), _NO_SPARK),
}

#: cast targets that mean the same on both engines
SPARK_CAST_TYPES = frozenset({
    "BOOLEAN", "BOOL", "TINYINT", "INT1", "SMALLINT", "INT2", "SHORT", "INTEGER", "INT", "INT4",
    "SIGNED", "BIGINT", "INT8", "LONG", "FLOAT", "FLOAT4", "REAL", "DOUBLE", "FLOAT8", "VARCHAR",
    "TEXT", "STRING", "DATE", "TIMESTAMP", "DATETIME", "TIMESTAMPTZ", "TIMESTAMP WITH TIME ZONE",
})


def _epoch_seconds(node: exp.Expression) -> exp.Expression:
    """DuckDB's ``epoch(ts)`` (fractional seconds) as Spark ``unix_micros(ts) / 1e6``
    (``UNIX_TIMESTAMP``, sqlglot's choice, drops the fraction)."""
    if isinstance(node, exp.TimeToUnix):
        micros = exp.Anonymous(this="unix_micros", expressions=[node.this])
        return exp.Div(this=exp.Cast(this=micros, to=exp.DataType.build("double")),
                       expression=exp.Literal.number("1000000.0"))
    return node


def to_spark(sql: str) -> str:
    """``sql`` (DuckDB dialect: a definition's expression or the builder's whole query) in
    Spark SQL; ChurnError when sqlglot cannot transpile it faithfully."""
    try:
        tree = sqlglot.parse_one(sql, read="duckdb")
        tree = tree.transform(_epoch_seconds)
        return tree.sql(dialect="spark", unsupported_level=ErrorLevel.RAISE)
    except SqlglotError as exc:
        raise ChurnError(f"cannot transpile to Spark SQL: {first_line(exc, 200)}") from None


def _is_aggregate(node: exp.Expression) -> bool:
    """An aggregate call (sqlglot knows all of :data:`AGGREGATES` but ``mean`` as AggFunc)."""
    return isinstance(node, exp.AggFunc) or (isinstance(node, exp.Anonymous)
                                             and node.name.lower() in AGGREGATES)


@lru_cache(maxsize=1024)
def filtered(expression: str, condition: str) -> str:
    """``expression`` (DuckDB SQL over rows of the activity) with ``condition`` added to every
    aggregate call it makes, as DuckDB SQL: ``sum(x) / count(*)`` with ``age_days < 7`` is
    ``SUM(x) FILTER(WHERE age_days < 7) / COUNT(*) FILTER(WHERE age_days < 7)``; an existing
    ``FILTER (WHERE c)`` becomes ``FILTER (WHERE (c) AND condition)``. Over a group with at
    least one row meeting ``condition`` it gives what ``expression`` gives over those rows."""
    try:
        tree = sqlglot.parse_one(expression, read="duckdb")
        cond = sqlglot.parse_one(condition, read="duckdb")
    except SqlglotError as exc:
        raise ChurnError(f"cannot parse {expression!r}: {first_line(exc, 200)}") from None

    def add(node: exp.Expression) -> exp.Expression:
        if isinstance(node, exp.Filter):
            node.expression.set("this", exp.and_(exp.paren(node.expression.this.copy()), cond.copy()))
        elif _is_aggregate(node) and not isinstance(node.parent, exp.Filter):
            return exp.Filter(this=node.copy(), expression=exp.Where(this=cond.copy()))
        return node

    return tree.transform(add).sql(dialect="duckdb")


@lru_cache(maxsize=1024)
def spark_problem(expression: str, source: str) -> str | None:
    """Why ``expression`` (already accepted by the sandbox over ``source``) cannot run on
    Spark too, naming the construct; None when it can."""
    functions, casts = called_names(expression, source)
    for name in sorted(functions):
        if name in SPARK_REFUSED:
            return f"function {name} cannot run on Spark: {SPARK_REFUSED[name]}"
        if name not in SPARK_FUNCTIONS:
            return f"function {name} has no tested Spark equivalent"
    for cast in sorted(casts):
        if cast not in SPARK_CAST_TYPES:
            return f"cast to {cast} has no Spark equivalent"
    try:
        to_spark(f"SELECT {expression} AS f FROM {source}")
    except ChurnError as exc:
        return str(exc)
    return None


def unmapped_functions() -> list[str]:
    """Allow-listed functions in neither table (the test wants none)."""
    return sorted(ALLOWED_FUNCTIONS - set(SPARK_FUNCTIONS) - set(SPARK_REFUSED))


__all__ = ["AGGREGATES", "SPARK_CAST_TYPES", "SPARK_FUNCTIONS", "SPARK_REFUSED", "filtered", "spark_problem",
           "to_spark", "unmapped_functions"]
