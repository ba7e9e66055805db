"""Point-in-time correct feature frames with DuckDB: one SQL path for training and serving.

For a *spine* of (customer_id, cutoff) pairs, every feature sees only rows whose
``event_timestamp`` is at or before the cutoff (activity within the feature's window,
the customer's static row if they had signed up by then). The label is 1 when the
customer's churn event falls in ``(cutoff, cutoff + horizon]``. Customers who signed up
after the cutoff or had churned by it are not in the spine.

:func:`build_training_frame` (many cutoffs, labels) and :func:`compute_latest` (one
cutoff = ``as_of``, values for the online store) share :func:`_feature_sql`, so the values
materialized online are exactly those a training frame holds for the same instant.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pandas as pd

from mlflow_churn.data.bounds import data_bounds
from mlflow_churn.data.tables import (
    TablePaths,
    register_empty_views,
    register_views,
)
from mlflow_churn.errors import ChurnError, first_line
from mlflow_churn.features.definitions import FeatureDefinition, FeatureSet
from mlflow_churn.features.sandbox import (
    check_expression,
    check_statement,
    limited,
    lock_down,
    query_limits,
    shown,
    usable_columns,
    wrap,
)
from mlflow_churn.features.spark_sql import filtered, spark_problem
from mlflow_churn.times import midnight, utc


@dataclass(frozen=True)
class LatestFeatures:
    """Newest feature values per live customer at ``as_of`` (raw values, strings for
    categoricals), each row's ``event_time`` (newest event it used) and the batch
    ``watermark`` (newest event time overall)."""

    frame: pd.DataFrame
    watermark: datetime | None
    as_of: datetime



def daily_cutoffs(start: datetime, end: datetime, every_days: int = 1) -> list[datetime]:
    """UTC midnights from ``end`` back to ``start`` every ``every_days`` days, oldest first."""
    start, end = utc(start, "start"), utc(end, "end")
    if every_days < 1:
        raise ChurnError(f"every_days must be >= 1, got {every_days}")
    cur = midnight(end.date())
    out = []
    while cur >= start:
        out.append(cur)
        cur -= timedelta(days=every_days)
    return out[::-1]


def longest_window(features: Sequence[FeatureDefinition]) -> int:
    """Longest activity window among ``features`` (days; 0 without activity features)."""
    return max((int(f.window_days or 0) for f in features if f.source == "activity"), default=0)


def check_cutoffs(data_dir: Path, features: Sequence[FeatureDefinition], cutoffs: Sequence[datetime]) -> None:
    """Raise ChurnError when a cutoff lies outside the data or too close to its start for
    the longest feature window (values would be silently truncated)."""
    bounds = data_bounds(data_dir)
    first_ok = bounds.first_event - timedelta(days=1) + timedelta(days=longest_window(features))
    early = min(cutoffs)
    late = max(cutoffs)
    if late > bounds.last_event:
        raise ChurnError(
            f"cutoff {late.isoformat()} is after the newest data ({bounds.last_event.isoformat()}); "
            f"choose an as_of at or before {bounds.last_day + timedelta(days=1)}"
        )
    if early < first_ok:
        raise ChurnError(
            f"cutoff {early.date()} has less than {longest_window(features)} days of activity before it "
            f"(data starts {bounds.first_day}); use cutoffs from {first_ok.date()} on"
        )


def _connect(data_dir: Path, settings: dict[str, str] | None = None) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with views of the tables under ``data_dir``, in the feature SQL
    sandbox: it reads files below ``data_dir`` only, external access off, configuration
    locked after the feature query limits (``memory_limit``, ``threads``: config
    ``features.query_*``) and ``settings`` (e.g. ``temp_directory``; they win) are applied."""
    con = duckdb.connect()
    try:
        register_views(con, TablePaths(Path(data_dir)))
        return lock_down(con, [data_dir],
                         {"TimeZone": "UTC", **query_limits().settings(), **(settings or {})})
    except BaseException:
        con.close()
        raise


def _where(feature: FeatureDefinition, where: str | Path) -> str:
    return f"feature '{feature.full_name}' (v{feature.version}, source {feature.source}) in {where}"


def _check_sandbox(features: Sequence[FeatureDefinition], where: str | Path) -> None:
    """Raise ChurnError naming the first offline definition whose expression is not one SQL
    expression over its declared source table (parsed, never run; see
    :mod:`mlflow_churn.features.sandbox`)."""
    for f in features:
        if f.source in ("customers", "activity"):
            check_expression(f.expression, f.source, _where(f, where), usable_columns(f.source))
            on_spark = spark_problem(f.expression, f.source)
            if on_spark is not None:  # both engines must be able to run every definition
                raise ChurnError(f"{_where(f, where)}: expression '{shown(f.expression)}' cannot run on "
                                 f"both engines: {on_spark}; rewrite it with functions of "
                                 "mlflow_churn/features/spark_sql.py SPARK_FUNCTIONS")


_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)



def _compile_error(con: duckdb.DuckDBPyConnection, feature: FeatureDefinition,
                   where: str) -> ChurnError | None:
    """ChurnError naming ``feature`` when its SQL does not run on ``con``'s tables, else None."""
    sql = f"SELECT * FROM ({_feature_sql([feature], _EPOCH, _EPOCH, False)}) LIMIT 0"
    check_statement(sql, _where(feature, where))
    try:
        with limited(con, _where(feature, where)):
            con.execute(sql)
        return None
    except duckdb.Error as exc:
        try:
            cols = [d[0] for d in con.execute(f"SELECT * FROM {feature.source} LIMIT 0").description]
        except duckdb.Error:
            cols = []
        extra = ["cutoff"] + (["age_days"] if feature.source == "activity" else [])
        return ChurnError(
            f"{_where(feature, where)}: expression '{shown(feature.expression)}' does not run: "
            f"{first_line(exc)}; fix the expression "
            f"(usable columns: {', '.join(cols + extra)})"
        )


def validate_definitions(features: Sequence[FeatureDefinition], where: str | Path) -> None:
    """Compile every offline (customers / activity) definition against empty tables of the data
    layout; raise ChurnError naming the first one whose SQL does not bind (bad column, syntax,
    a non-aggregate activity expression)."""
    offline = [f for f in features if f.source in ("customers", "activity")]
    if not offline:
        return
    _check_sandbox(offline, where)  # parsed first: nothing unreviewed is ever executed
    con = duckdb.connect()
    try:
        register_empty_views(con)
        con.execute("CREATE TEMP TABLE spine (customer_id BIGINT, cutoff TIMESTAMPTZ)")
        lock_down(con, (), {"TimeZone": "UTC", **query_limits().settings()})
        for f in offline:
            err = _compile_error(con, f, str(where))
            if err is not None:
                raise err
    finally:
        con.close()


def _query(con: duckdb.DuckDBPyConnection, sql: str, features: Sequence[FeatureDefinition],
           data_dir: Path) -> pd.DataFrame:
    """``sql`` as a frame; a DuckDB error becomes a ChurnError naming the failing feature
    (checked one by one on the same data) or, failing that, the data directory."""
    check_statement(sql, f"computing features on the data at {data_dir}")
    try:
        with limited(con, _what(features, data_dir)):
            return con.execute(sql).df()
    except duckdb.Error as exc:
        where = f"the data at {data_dir}"
        for f in features:
            err = _compile_error(con, f, where)
            if err is not None:
                raise err from None
        raise ChurnError(f"computing features on {where} failed: {first_line(exc)}; check the "
                         "tables against the layout in mlflow_churn/data/tables.py") from None


def _what(features: Sequence[FeatureDefinition], data_dir: Path) -> str:
    """The feature query of ``features`` on ``data_dir``, named for a limit's error."""
    names = [f.full_name for f in features if f.source in ("customers", "activity")]
    shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    what = f"feature '{names[0]}'" if len(names) == 1 else f"the feature query of {shown}"
    return f"{what} on the data at {data_dir}"


def _lit(ts: datetime) -> str:
    return f"TIMESTAMPTZ '{ts.isoformat()}'"


def _feature_sql(features: Sequence[FeatureDefinition], min_cutoff: datetime, max_cutoff: datetime,
                 with_event_time: bool, one_pass: bool = False) -> str:
    """SELECT over ``spine(customer_id, cutoff)`` computing ``features`` point-in-time.

    Every definition is checked by the sandbox's parser first (cached), wherever it came
    from (the registry, a model's logged feature set).

    The activity rows of the longest window are joined to the spine once (``act``); each
    window is then one aggregation over ``act`` (``w0``, ``w1``, ...; DuckDB computes ``act``
    once and reads it for each). ``one_pass`` (the Spark engine, which would recompute
    ``act`` for each reader) computes every window in one aggregation instead: each window's
    expressions with ``FILTER (WHERE age_days < window)`` on their aggregates
    (:func:`~mlflow_churn.features.spark_sql.filtered`), NULL when the window has no row
    (as the left join of ``w<i>`` gives): the same values."""
    _check_sandbox(features, "the feature set")
    static = [f for f in features if f.source == "customers"]
    by_window: dict[int, list[FeatureDefinition]] = {}
    for f in features:
        if f.source == "activity":
            by_window.setdefault(int(f.window_days or 0), []).append(f)
        elif f.source != "customers":
            raise ChurnError(f"feature '{f.full_name}' has source '{f.source}', which has no offline table")
    longest = max(by_window, default=1)
    # partition pruning: only days that any window of any cutoff can reach
    first_day = (min_cutoff - timedelta(days=longest + 1)).date().isoformat()
    last_day = max_cutoff.date().isoformat()
    ctes = [f"""act AS (
        SELECT a.*, (epoch(s.cutoff) - epoch(a.event_timestamp)) / 86400.0 AS age_days, s.cutoff
        FROM spine s JOIN activity a ON a.customer_id = s.customer_id
        WHERE a.date BETWEEN DATE '{first_day}' AND DATE '{last_day}'
          AND a.event_timestamp <= s.cutoff
          AND a.event_timestamp > s.cutoff - INTERVAL '{longest} days')"""]
    joins, cols = [], []
    if one_pass:
        aggs, cols = _one_pass_columns(by_window, with_event_time)
        if aggs:
            ctes.append(f"agg AS (SELECT customer_id, cutoff, {', '.join(aggs)} FROM act "
                        "GROUP BY customer_id, cutoff)")
            joins.append(_left_join("agg"))
    else:
        for i, (window, feats) in enumerate(sorted(by_window.items())):
            aggs = ", ".join(f'{wrap(f.expression)} AS "{f.full_name}"' for f in feats)
            ctes.append(f"""w{i} AS (SELECT customer_id, cutoff, {aggs} FROM act
            WHERE age_days < {window} GROUP BY customer_id, cutoff)""")
            joins.append(_left_join(f"w{i}"))
            cols += [_defaulted(f'w{i}."{f.full_name}"', f) for f in feats]
    static_cols = ", ".join(
        ["c.event_timestamp AS signup_time"] + [f'{wrap(f.expression)} AS "{f.full_name}"' for f in static]
    )
    ctes.append(f"stat AS (SELECT customer_id, cutoff, {static_cols} "
                "FROM spine JOIN customers c USING (customer_id))")
    if with_event_time and not one_pass:
        ctes.append("ev AS (SELECT customer_id, cutoff, max(event_timestamp) AS event_time "
                    "FROM act GROUP BY customer_id, cutoff)")
        joins.append(_left_join("ev"))
        cols.append("coalesce(ev.event_time, spine.signup_time) AS event_time")
    cols += [f'spine."{f.full_name}"' for f in static]
    select = ",\n  ".join(["spine.customer_id", "spine.cutoff"] + cols)
    return "WITH " + ",\n".join(ctes) + f"\nSELECT {select}\nFROM stat AS spine\n" + "\n".join(joins)


def _left_join(name: str) -> str:
    return f"LEFT JOIN {name} ON {name}.customer_id = spine.customer_id AND {name}.cutoff = spine.cutoff"


def _defaulted(value: str, f: FeatureDefinition) -> str:
    """The output column of window feature ``f`` from ``value`` (its default when NULL)."""
    if f.default is not None:
        value = f"coalesce({value}, {float(f.default)!r})"
    return f'{value} AS "{f.full_name}"'


def _one_pass_columns(by_window: dict[int, list[FeatureDefinition]],
                      with_event_time: bool) -> tuple[list[str], list[str]]:
    """The one-pass form's aggregates over ``act`` (``agg``, own column names: a feature may
    be called anything) and the output columns over ``agg``."""
    aggs, cols = [], []
    for i, (window, feats) in enumerate(sorted(by_window.items())):
        cond = f"age_days < {window}"
        aggs.append(f'count(*) FILTER (WHERE {cond}) AS "n{i}"')
        for j, f in enumerate(feats):
            aggs.append(f'{wrap(filtered(f.expression, cond))} AS "w{i}_{j}"')
            cols.append(_defaulted(f'CASE WHEN agg."n{i}" > 0 THEN agg."w{i}_{j}" END', f))
    if with_event_time:
        aggs.append('max(event_timestamp) AS "newest"')
        cols.append('coalesce(agg."newest", spine.signup_time) AS event_time')
    return aggs, cols


#: a customer ``c`` is in the spine at cutoff ``k.cutoff``: signed up by then, not churned yet
_ALIVE = """c.event_timestamp <= k.cutoff
          AND NOT EXISTS (SELECT 1 FROM churn_events e
                          WHERE e.customer_id = c.customer_id AND e.event_timestamp <= k.cutoff)"""


def _spine(con: duckdb.DuckDBPyConnection, cutoffs: Sequence[datetime],
           customer_ids: Sequence[int] | None) -> None:
    con.register("cutoffs_df", pd.DataFrame({"cutoff": pd.to_datetime(list(cutoffs), utc=True)}))
    id_filter = ""
    if customer_ids is not None:
        con.register("ids_df", pd.DataFrame({"customer_id": pd.Series(list(customer_ids), dtype="int64")}))
        id_filter = "AND c.customer_id IN (SELECT customer_id FROM ids_df)"
    with limited(con, "the spine (customers alive at the cutoffs)"):
        con.execute(f"""
            CREATE OR REPLACE TEMP TABLE spine AS
            SELECT c.customer_id, k.cutoff FROM customers c CROSS JOIN cutoffs_df k
            WHERE {_ALIVE} {id_filter}
        """)


def frame_cutoffs(cutoffs: Sequence[datetime], horizon_days: int, label: bool,
                  label_as_of: datetime | None) -> list[datetime]:
    """The sorted distinct UTC cutoffs of a training frame; ChurnError when there are none,
    the horizon is not positive or a label would mature after ``label_as_of``."""
    if not cutoffs:
        raise ChurnError("no cutoffs: the time window is empty; widen it or move --as-of")
    if horizon_days < 1:
        raise ChurnError(f"horizon_days must be >= 1, got {horizon_days}")
    cuts = sorted({utc(c, "cutoff") for c in cutoffs})
    if label and label_as_of is not None:
        label_as_of = utc(label_as_of, "label_as_of")
        late = [c for c in cuts if c + timedelta(days=horizon_days) > label_as_of]
        if late:
            raise ChurnError(
                f"labels of cutoff {late[0].date()} mature only at "
                f"{(late[0] + timedelta(days=horizon_days)).date()}, after {label_as_of.date()}; "
                "use earlier cutoffs"
            )
    return cuts


def labelled_sql(sql: str, horizon_days: int, label_as_of: datetime | None) -> str:
    """``sql`` (a feature query over the spine) with the ``label`` column (int8: a churn event
    in ``(cutoff, cutoff + horizon_days]``, known by ``label_as_of``)."""
    known = f"AND e.event_timestamp <= {_lit(utc(label_as_of, 'label_as_of'))}" if label_as_of else ""
    return f"""SELECT f.*, CAST(EXISTS (SELECT 1 FROM churn_events e
        WHERE e.customer_id = f.customer_id AND e.event_timestamp > f.cutoff
          AND e.event_timestamp <= f.cutoff + INTERVAL '{horizon_days} days' {known}) AS TINYINT)
        AS label FROM ({sql}) f"""


def coerce_frame(raw: pd.DataFrame, feature_set: FeatureSet, label: bool) -> pd.DataFrame:
    """A training frame from the raw query result ``raw`` (any engine): ``customer_id``
    (int64), ``cutoff`` (UTC), the set's columns coerced, ``label`` (int8) when ``label``."""
    out = pd.concat(
        [raw[["customer_id", "cutoff"]].reset_index(drop=True),
         feature_set.coerce(raw).reset_index(drop=True)],
        axis=1,
    )
    out["customer_id"] = out["customer_id"].astype("int64")
    out["cutoff"] = pd.to_datetime(out["cutoff"], utc=True)
    if label:
        out["label"] = raw["label"].astype("int8").to_numpy()
    return out


def build_training_frame(
    data_dir: Path,
    feature_set: FeatureSet,
    cutoffs: Sequence[datetime],
    horizon_days: int,
    label: bool = True,
    label_as_of: datetime | None = None,
    customer_ids: Sequence[int] | None = None,
) -> pd.DataFrame:
    """One row per (customer alive at the cutoff, cutoff) with the set's features, coerced.

    Columns: ``customer_id`` (int64), ``cutoff`` (UTC), the feature set's columns, and
    ``label`` (int8: churn in ``(cutoff, cutoff + horizon_days]``) when ``label``.
    ``label_as_of`` hides churn events after it (a backtest replaying that day); a cutoff
    whose horizon ends after it raises ChurnError, since its label is not known yet.
    The same frame on Spark: :func:`mlflow_churn.features.spark_frames.spark_training_frame`.
    """
    cuts = frame_cutoffs(cutoffs, horizon_days, label, label_as_of)
    check_cutoffs(data_dir, feature_set.features, cuts)
    con = _connect(data_dir)
    try:
        _spine(con, cuts, customer_ids)
        sql = _feature_sql(feature_set.features, cuts[0], cuts[-1], with_event_time=False)
        if label:
            sql = labelled_sql(sql, horizon_days, label_as_of)
        raw = _query(con, f"SELECT * FROM ({sql}) ORDER BY cutoff, customer_id", feature_set.features,
                     data_dir)
    finally:
        con.close()
    return coerce_frame(raw, feature_set, label)


def compute_at(data_dir: Path, features: Sequence[FeatureDefinition], pairs: pd.DataFrame) -> pd.DataFrame:
    """Raw feature values of each (``customer_id``, ``cutoff``) pair of ``pairs``, each at its own
    cutoff (UTC): the SQL of :func:`compute_latest`, one query for many instants (e.g. served
    rows recomputed at their business times). Pairs whose customer was not alive at the cutoff
    are left out. Columns: ``customer_id``, ``cutoff``, the features (strings for categoricals)."""
    if pairs.empty:
        return pd.DataFrame(columns=["customer_id", "cutoff", *(f.full_name for f in features)])
    spine = pd.DataFrame({"customer_id": pairs["customer_id"].astype("int64").to_numpy(),
                          "cutoff": pd.to_datetime(pairs["cutoff"], utc=True).to_numpy()}).drop_duplicates()
    spine["cutoff"] = pd.to_datetime(spine["cutoff"], utc=True)
    first, last = spine["cutoff"].min().to_pydatetime(), spine["cutoff"].max().to_pydatetime()
    check_cutoffs(data_dir, features, [first, last])
    con = _connect(data_dir)
    try:
        con.register("pairs_df", spine)
        with limited(con, "the spine (customers alive at the cutoffs)"):
            con.execute(f"""
                CREATE OR REPLACE TEMP TABLE spine AS
                SELECT k.customer_id, k.cutoff FROM pairs_df k JOIN customers c USING (customer_id)
                WHERE {_ALIVE}
            """)
        sql = _feature_sql(features, first, last, with_event_time=False)
        frame = _query(con, f"SELECT * FROM ({sql}) ORDER BY cutoff, customer_id", features, data_dir)
    finally:
        con.close()
    frame["customer_id"] = frame["customer_id"].astype("int64")
    frame["cutoff"] = pd.to_datetime(frame["cutoff"], utc=True)
    return frame


def compute_latest(
    data_dir: Path,
    features: Sequence[FeatureDefinition],
    as_of: datetime,
    customer_ids: Sequence[int] | None = None,
    with_event_time: bool = True,
) -> LatestFeatures:
    """Feature values of every customer alive at ``as_of`` (or of ``customer_ids``).

    Same SQL as :func:`build_training_frame` with the single cutoff ``as_of``; values are
    raw (strings for categoricals, floats or ints otherwise). ``with_event_time=False``
    leaves out the ``event_time`` column (and the watermark), which needs the activity
    of the longest window even for customer-level features.
    """
    as_of = utc(as_of, "as_of")
    con = _connect(data_dir)
    try:
        _spine(con, [as_of], customer_ids)
        sql = _feature_sql(features, as_of, as_of, with_event_time=with_event_time)
        frame = _query(con, f"SELECT * FROM ({sql}) ORDER BY customer_id", features, data_dir)
    finally:
        con.close()
    frame = frame.drop(columns=["cutoff"])
    frame["customer_id"] = frame["customer_id"].astype("int64")
    if not with_event_time:
        return LatestFeatures(frame=frame, watermark=None, as_of=as_of)
    frame["event_time"] = pd.to_datetime(frame["event_time"], utc=True)
    watermark = frame["event_time"].max() if len(frame) else None
    return LatestFeatures(
        frame=frame,
        watermark=watermark.to_pydatetime() if watermark is not None and not pd.isna(watermark) else None,
        as_of=as_of,
    )
