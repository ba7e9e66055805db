"""Served data: monitoring windows built from what the scoring service actually served.

The prediction log (:mod:`mlflow_churn.serving.prediction_log`) keeps, for a sampled share
of its rows, the feature values the model was given and when they were computed. This
module turns a window of those rows into what monitoring needs:

- :func:`read_served`: the rows of the window ``(as_of - window_days, as_of]`` (by the
  rows' business time ``as_of``) that hold served values, parsed;
- :func:`choose_source`: ``served`` | ``offline`` | ``auto`` (served when the window holds
  at least ``monitoring.min_served_rows`` rows of the monitored version, else offline; the
  reason says which and why). ``served`` with fewer rows is a ChurnError naming the count and
  the fixes, never an empty window;
- :func:`served_frame`: the same frame shape the offline builder gives monitoring
  (``customer_id``, ``cutoff``, the feature set's columns coerced) and the scores the
  monitored version served. A row counts for the window's daily cutoff at or after its
  ``as_of`` (cutoffs are ``as_of - i`` days, as offline); a customer served several times
  in one day counts once (the newest row), as the offline frame has one row per customer
  and cutoff (records sent without a customer id all count). Rows of other versions (the
  canary, a champion replaced in the window) are left out: their scores are another model's;
- :func:`serving_skew`: the serving-skew check. A sample of the window's served rows (any
  version; ``monitoring.serving_skew_sample``) is recomputed offline
  (:func:`mlflow_churn.features.skew.check_served_skew`) at the instant the values should
  describe: the instant they were computed at (``features_as_of``, the online batch's
  ``as_of``) while they are fresh, i.e. at most ``features.freshness_sla_hours`` older than
  the request's ``as_of``; the request's ``as_of`` itself when they are older (a stale
  store: the truth moved on, the served values did not) or were sent by the client. Per
  feature: mismatch rate and PSI (served vs recomputed). Rows whose instant lies outside
  the data (before the longest feature window, after the newest event) are not recomputed.

A real-time service that logs the online batch's ``as_of`` as every request's business time
(no ``as_of`` in the request) compares fresh values with their own instant; the age of its
values is what the freshness check watches (the scheduler's ``freshness`` job). A client (or
a replay) that sends the request's business time makes a stopped materialization visible here
as well.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from mlflow_churn.config import ChurnConfig, is_postgres_url, mask_text
from mlflow_churn.data.bounds import data_bounds
from mlflow_churn.errors import ChurnError, Unavailable, first_line
from mlflow_churn.features.definitions import FeatureSet
from mlflow_churn.features.offline import longest_window
from mlflow_churn.features.registry import registry_for
from mlflow_churn.features.skew import ServedSkewReport, check_served_skew
from mlflow_churn.serving.prediction_log import PredictionLog, served_values

Source = Literal["auto", "served", "offline"]
SOURCES: tuple[str, ...] = ("auto", "served", "offline")
ANONYMOUS_ID = -1  # the log's customer_id of a record sent without one


@dataclass
class ServedRows:
    """The window's served rows that hold values: the log's columns plus ``values`` (dict
    feature -> raw value); ``counts``: the window's rows by what they hold (all versions:
    ``rows``, ``with_features``, ``omitted`` over the size bound)."""

    rows: pd.DataFrame
    counts: dict[str, int] = field(default_factory=dict)

    def of_version(self, version: str) -> pd.DataFrame:
        """Scored rows (status ok) the monitored ``version`` served."""
        r = self.rows
        if r.empty:
            return r
        keep = (r["model_version"].astype(str) == str(version)) & (r["status"] == "ok") & r["score"].notna()
        return r[keep]


def read_served(log_url: str, as_of: datetime, window_days: int) -> ServedRows:
    """Rows of the prediction log at ``log_url`` with ``as_of`` in ``(as_of - window_days, as_of]``
    and stored values. A SQLite log that does not exist yet is empty (nothing was served);
    a log that cannot be opened or read raises ChurnError."""
    if not is_postgres_url(str(log_url)) and not Path(log_url).exists():
        return ServedRows(pd.DataFrame(columns=["customer_id", "as_of", "values"]),
                          {"rows": 0, "with_features": 0, "omitted": 0})
    eps = timedelta(microseconds=1)
    since, until = as_of - timedelta(days=window_days) + eps, as_of + eps
    log = PredictionLog(log_url)
    try:
        rows = log.read(since=since, until=until, only_with_features=True)
        counts = log.feature_counts(since=since, until=until)
    except ChurnError:
        raise
    except Exception as exc:  # sqlite3 / psycopg errors: an outage is a failure, never an empty window
        what = f"cannot read the prediction log at {log_url}: {first_line(exc)}"
        raise Unavailable(mask_text(what), "prediction log") from None
    finally:
        log.close()
    rows["values"] = served_values(rows)
    return ServedRows(rows.drop(columns=["features"]).reset_index(drop=True), counts)


def choose_source(requested: str, served: ServedRows, version: str, min_rows: int) -> tuple[str, str]:
    """``(source, reason)`` for ``requested`` = auto | served | offline (see the module doc); the
    reason counts the window's served rows of ``version``."""
    if requested not in SOURCES:
        raise ChurnError(f"--source must be one of {', '.join(SOURCES)}, got '{requested}'")
    n = len(served.of_version(version))
    omitted = served.counts.get("omitted", 0)
    have = (f"{n} served row(s) with feature values of version {version} in the window "
            f"(monitoring.min_served_rows {min_rows})")
    if requested == "offline":
        return "offline", f"asked for; {have}"
    if n >= min_rows:
        return "served", have
    if requested == "served":
        hint = (f"; {omitted} row(s) had values over serving.log_features_max_bytes" if omitted else "")
        raise ChurnError(
            f"--source served: only {have}{hint}; serve more traffic through `churn serve` (with "
            "serving.log_features_sample_rate > 0), lower monitoring.min_served_rows, or use "
            "--source offline")
    return "offline", f"only {have}"


def served_frame(served: ServedRows, fs: FeatureSet, version: str, as_of: datetime,
                 window_days: int) -> tuple[pd.DataFrame, np.ndarray]:
    """``(frame, scores)`` of the rows ``version`` served in the window (see the module doc)."""
    rows = served.of_version(version).copy()
    lag = (pd.Timestamp(as_of) - rows["as_of"]) // pd.Timedelta(days=1)  # whole days before as_of
    rows["cutoff"] = pd.Timestamp(as_of) - pd.to_timedelta(lag.clip(0, window_days - 1), unit="D")
    rows = rows.sort_values(["as_of", "served_at"])
    known = rows["customer_id"] != ANONYMOUS_ID  # records sent without an id are all kept
    rows = pd.concat([rows[known].drop_duplicates(["customer_id", "cutoff"], keep="last"), rows[~known]])
    rows = rows.sort_values(["cutoff", "customer_id"], kind="stable").reset_index(drop=True)
    values = pd.DataFrame.from_records(list(rows["values"]), index=rows.index)
    present = [c for c in fs.columns if c in values.columns]
    for c in fs.columns:
        if c not in values.columns:
            values[c] = None
    coerced = fs.coerce(values)[present]  # a column never served stays out: integrity names it
    frame = pd.concat([rows[["customer_id", "cutoff"]], coerced], axis=1)
    frame["customer_id"] = frame["customer_id"].astype("int64")
    frame["cutoff"] = pd.to_datetime(frame["cutoff"], utc=True).astype("datetime64[us, UTC]")  # as offline
    return frame, rows["score"].to_numpy(dtype="float64")


@dataclass
class ServingSkew:
    """The serving-skew check of one window: the report, how many rows could not be
    recomputed (outside the data, anonymous), and the age of the values checked (hours
    between when they were computed and the request's ``as_of``; None for client values)."""

    report: ServedSkewReport
    outside: int
    values_age_hours: float | None

    def to_dict(self) -> dict[str, Any]:
        return {**self.report.to_dict(), "outside_data": self.outside,
                "values_age_hours_max": self.values_age_hours}


def skew_instants(rows: pd.DataFrame, sla_hours: float) -> pd.Series:
    """Per row, the instant its values are recomputed at (see the module doc)."""
    computed = rows["features_as_of"]
    age = rows["as_of"] - computed
    fresh = computed.notna() & (age <= pd.Timedelta(hours=sla_hours))
    return rows["as_of"].where(~fresh, computed)


def serving_skew(cfg: ChurnConfig, served: ServedRows, seed: int = 0) -> ServingSkew | None:
    """The serving-skew check on ``served`` (None when the window holds no served values or the
    check is off, ``monitoring.serving_skew_sample: 0``)."""
    sample = cfg.monitoring.serving_skew_sample
    rows = served.rows
    if sample == 0 or rows.empty:
        return None
    rows = rows[rows["customer_id"] != ANONYMOUS_ID].copy()
    rows["at"] = skew_instants(rows, cfg.features.freshness_sla_hours)
    registry = registry_for(cfg)
    defs = [d for d in registry.definitions() if d.source in ("customers", "activity")]
    bounds = data_bounds(cfg.data_dir)
    first = bounds.first_event - timedelta(days=1) + timedelta(days=longest_window(defs))
    inside = (rows["at"] >= pd.Timestamp(first)) & (rows["at"] <= pd.Timestamp(bounds.last_event))
    outside = int((~inside).sum()) + int((served.rows["customer_id"] == ANONYMOUS_ID).sum())
    rows = rows[inside]
    if rows.empty:
        return None
    report = check_served_skew(cfg.data_dir, defs, rows[["customer_id", "at", "values"]], sample, seed,
                               bins=cfg.monitoring.bins, epsilon=cfg.monitoring.psi_epsilon)
    age = (rows["as_of"] - rows["features_as_of"]).dropna()
    age_h = float(age.max() / pd.Timedelta(hours=1)) if len(age) else None
    return ServingSkew(report, outside, age_h)


def skew_figure(skew: ServingSkew, title: str, limits: tuple[float, float] | None = None) -> Any:
    """Per feature: the share of sampled served values that differ from their offline
    recomputation (left) and the PSI of served against recomputed values (right); ``limits``
    (mismatch rate, PSI) dashed."""
    from matplotlib.figure import Figure

    rep = skew.report
    order = sorted(rep.mismatch_rate, key=lambda k: (-rep.mismatch_rate[k], k))
    fig = Figure(figsize=(12, max(3.0, 0.28 * len(order) + 1.5)))
    ax1, ax2 = fig.subplots(1, 2, sharey=True)
    y = np.arange(len(order))[::-1]
    ax1.barh(y, [rep.mismatch_rate[k] for k in order], color="tab:red")
    ax1.set_yticks(y, order, fontsize=7)
    ax1.set_xlim(0, 1)
    ax1.set_xlabel("share of served values != offline recomputation")
    ax2.barh(y, [rep.psi.get(k, 0.0) for k in order], color="tab:purple")
    ax2.set_xlabel("PSI served vs recomputed")
    if limits is not None:
        ax1.axvline(limits[0], color="k", ls="--", lw=1, label="policy.max_serving_mismatch_rate")
        ax2.axvline(limits[1], color="k", ls="--", lw=1, label="policy.max_serving_skew_psi")
        ax1.legend(fontsize=7, loc="lower right")
        ax2.legend(fontsize=7, loc="lower right")
    ax1.set_title(f"serving skew ({rep.compared} of {rep.sampled} sampled rows compared): {title}",
                  fontsize=9)
    fig.tight_layout()
    return fig


__all__ = ["SOURCES", "ServedRows", "ServingSkew", "choose_source", "read_served", "served_frame",
           "serving_skew", "skew_figure", "skew_instants"]
