"""The one declarative registry of features and feature sets.

A :class:`FeatureDefinition` names a customer-level value, its integer version, dtype and
the DuckDB SQL that computes it from a source table:

- ``source="customers"``: a scalar expression over the customer's static row; the column
  ``cutoff`` (the point in time, UTC) may be used, e.g. ``date_diff('day', signup_date,
  CAST(cutoff AS DATE))``;
- ``source="activity"``: an aggregate over the customer's daily activity rows whose
  ``event_timestamp`` lies in ``(cutoff - window_days, cutoff]``; the column ``age_days``
  (days between the row's event time and the cutoff, 0 = the day that ended at the cutoff)
  may be used, e.g. ``avg(minutes_used) FILTER (WHERE age_days < 14)``; ``default`` fills
  customers without rows in the window (0 for sums and counts);
- ``source="table"``: a column of a user's flat table (bring-your-own-data training).

Version 1 of ``monthly_usage`` is served as ``monthly_usage``; version N >= 2 as
``monthly_usage_vN``. A :class:`FeatureSet` pins the exact versions one model uses and has
a content hash; serving refuses a model whose set hash differs from the registry's.

Built-in definitions live in :data:`BUILTIN_FEATURES`; a YAML file (config
``features.definitions_file``) adds more::

    features:
      - {name: monthly_usage, version: 3, dtype: float64, source: activity, window_days: 28,
         expression: "sum(minutes_used)", default: 0, description: "minutes, last 28 days"}
    feature_sets:
      - {name: churn_v3, base: churn_default, replace: {monthly_usage: monthly_usage_v3}}

The file may add features and sets, never replace built-in ones: a feature already
defined (same name and version) or a set named like a built-in one is refused. Every
definition is first parsed by the feature SQL sandbox (:mod:`mlflow_churn.features.sandbox`:
one expression over its source's columns built from an allow-list of functions and operators,
no subqueries, no second statement; docs/security-features.md), then compiled when the registry loads, against
empty tables of the data layout (:mod:`mlflow_churn.data.tables`) on a locked connection, so
a bad or refused expression fails there, naming the feature.
Each definition has its own :attr:`FeatureDefinition.hash`; an online batch records them,
and the API and the scoring service refuse values computed under another definition.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from mlflow_churn.data.simulator import CONTRACTS, PAYMENTS, PLANS, REGIONS
from mlflow_churn.errors import ChurnError
from mlflow_churn.features.definitions import (  # noqa: F401 (re-exported: the registry's types)
    DTYPES,
    SOURCES,
    FeatureDefinition,
    FeatureSet,
    UnknownFeatureError,
)
from mlflow_churn.features.offline import validate_definitions  # offline imports this module
from mlflow_churn.features.sandbox import limits_of, set_query_limits


def _num(name: str, expr: str, description: str, *, version: int = 1, window: int | None = None,
         default: float | None = 0.0, dtype: str = "float64",
         tags: tuple[str, ...] = ()) -> FeatureDefinition:
    source = "activity" if window else "customers"
    return FeatureDefinition(
        name=name, version=version, dtype=dtype, description=description, source=source,
        expression=expr, window_days=window, default=default if window else None, tags=tags,
    )


def _cat(name: str, categories: Iterable[str], description: str) -> FeatureDefinition:
    return FeatureDefinition(
        name=name, version=1, dtype="category", description=description, source="customers",
        expression=name, categories=tuple(categories), tags=("segment",),
    )


def _builtin() -> tuple[FeatureDefinition, ...]:

    return (
        _cat("plan", PLANS, "tariff plan"),
        _cat("region", REGIONS, "home region"),
        _cat("contract", CONTRACTS, "contract type"),
        _cat("payment_method", PAYMENTS, "payment method"),
        _num("paperless_billing", "CAST(paperless_billing AS INTEGER)", "1 = paperless billing",
             dtype="int64"),
        _num("num_lines", "num_lines", "phone lines on the account", dtype="int64"),
        _num("age", "age", "customer age (years)", dtype="int64"),
        _num("monthly_charge", "monthly_charge", "monthly charge (currency units)"),
        _num("tenure_days", "date_diff('day', signup_date, CAST(cutoff AS DATE))",
             "days since signup at the cutoff", dtype="int64"),
        _num("monthly_usage", "sum(minutes_used)", "minutes used in the last 30 days", window=30,
             tags=("usage",)),
        _num("monthly_usage", "sum(minutes_used) * 30.0 / count(*)",
             "minutes per 30 active days in the last 30 days (new and returning customers are "
             "not penalised for days before signup)", version=2, window=30, tags=("usage",)),
        _num("minutes_7d", "sum(minutes_used)", "minutes used in the last 7 days", window=7),
        _num("usage_trend",
             "avg(minutes_used) FILTER (WHERE age_days < 14) / "
             "nullif(avg(minutes_used) FILTER (WHERE age_days >= 14), 0)",
             "mean daily minutes, last 14 days / days 15-60 (ratio)", window=60, default=None),
        _num("sessions_30d", "sum(sessions)", "sessions in the last 30 days", window=30),
        _num("sessions_trend",
             "avg(sessions) FILTER (WHERE age_days < 14) / "
             "nullif(avg(sessions) FILTER (WHERE age_days >= 14), 0)",
             "mean daily sessions, last 14 days / days 15-60 (ratio)", window=60, default=None),
        _num("data_mb_30d", "sum(data_used_mb)", "data used in the last 30 days (MB)", window=30,
             default=None),
        _num("support_calls_30d", "sum(support_calls)", "support calls, last 30 days", window=30),
        _num("support_calls_7d", "sum(support_calls)", "support calls, last 7 days", window=7),
        _num("failed_payments_30d", "sum(failed_payments)", "failed payments, last 30 days", window=30),
        _num("dropped_calls_30d", "sum(dropped_calls)", "dropped calls, last 30 days", window=30),
        _num("active_days_30d", "count(*)", "days with activity in the last 30 days", window=30),
    )


BUILTIN_FEATURES: tuple[FeatureDefinition, ...] = _builtin()
_DEFAULT_SET = tuple(f.full_name for f in BUILTIN_FEATURES if f.full_name != "monthly_usage_v2")
BUILTIN_SETS: dict[str, tuple[tuple[str, ...], str]] = {
    "churn_default": (_DEFAULT_SET, "the production set: monthly_usage v1 and 19 more"),
    "churn_v2": (
        tuple("monthly_usage_v2" if n == "monthly_usage" else n for n in _DEFAULT_SET),
        "churn_default with monthly_usage v2 (minutes per 30 active days)",
    ),
}


class FeatureRegistry:
    """Definitions by served name, and named feature sets over them."""

    def __init__(self, definitions: Iterable[FeatureDefinition],
                 sets: dict[str, tuple[Sequence[str], str]]) -> None:
        self._defs: dict[str, FeatureDefinition] = {}
        for d in definitions:
            if d.full_name in self._defs:
                raise ChurnError(f"feature '{d.full_name}' is defined twice; bump its version instead")
            self._defs[d.full_name] = d
        self._sets: dict[str, FeatureSet] = {}
        for name, (members, description) in sets.items():
            self._sets[name] = FeatureSet(name, tuple(self.get(m) for m in members), description)

    def definitions(self) -> list[FeatureDefinition]:
        return sorted(self._defs.values(), key=lambda d: (d.name, d.version))

    def names(self) -> list[str]:
        return [d.full_name for d in self.definitions()]

    def get(self, full_name: str) -> FeatureDefinition:
        try:
            return self._defs[full_name]
        except KeyError:
            raise UnknownFeatureError(
                f"unknown feature '{full_name}'; available: {', '.join(self.names())}", self.names()
            ) from None

    def versions(self, name: str) -> list[FeatureDefinition]:
        """Every version of the base name ``name``, oldest first."""
        found = [d for d in self.definitions() if d.name == name]
        if not found:
            self.get(name)
        return found

    def feature_set(self, name: str) -> FeatureSet:
        try:
            return self._sets[name]
        except KeyError:
            raise UnknownFeatureError(
                f"unknown feature set '{name}'; available: {', '.join(sorted(self._sets))}",
                sorted(self._sets),
            ) from None

    def feature_sets(self) -> list[FeatureSet]:
        return [self._sets[n] for n in sorted(self._sets)]


def _read_extra(path: Path) -> tuple[list[FeatureDefinition], dict[str, dict]]:
    """The definitions and the feature-set specs (by name) of a YAML file."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as exc:
        raise ChurnError(f"cannot read feature definitions file {path}: {exc.strerror}") from None
    except yaml.YAMLError:
        raise ChurnError(f"feature definitions file {path} is not valid YAML") from None
    if not isinstance(data, dict) or set(data) - {"features", "feature_sets"}:
        raise ChurnError(f"feature definitions file {path} must hold 'features' and/or 'feature_sets' lists")
    for key in ("features", "feature_sets"):
        items = data.get(key) or []
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise ChurnError(f"'{key}' in {path} must be a list of mappings (one per entry)")
    defs = [FeatureDefinition.from_dict(d) for d in data.get("features") or []]
    sets: dict[str, dict] = {}
    for spec in data.get("feature_sets") or []:
        name = spec.get("name")
        if not isinstance(name, str) or not name:
            raise ChurnError(f"a feature set in {path} has no 'name'; give each set a name")
        if name in BUILTIN_SETS:
            raise ChurnError(
                f"feature set '{name}' in {path} would redefine the built-in set of that name; "
                f"give yours another name (e.g. {name}_custom), with 'base: {name}' to start from it"
            )
        if name in sets:
            raise ChurnError(f"feature set '{name}' is defined twice in {path}; keep one")
        sets[name] = spec
    return defs, sets


def _resolve_set(spec: dict, sets: dict[str, tuple[Sequence[str], str]]) -> tuple[list[str], str]:
    if "features" in spec:
        members = list(spec["features"])
    elif "base" in spec:
        if spec["base"] not in sets:
            raise ChurnError(f"feature set '{spec['name']}': unknown base set '{spec['base']}'")
        members = list(sets[spec["base"]][0])
    else:
        raise ChurnError(f"feature set '{spec.get('name')}' needs 'features' or 'base'")
    for old, new in (spec.get("replace") or {}).items():
        if old not in members:
            raise ChurnError(f"feature set '{spec['name']}': cannot replace '{old}', not in the set")
        members[members.index(old)] = new
    members += [m for m in spec.get("add") or [] if m not in members]
    return members, spec.get("description", "")


@lru_cache(maxsize=8)
def _load(extra_file: str | None, mtime: float | None) -> FeatureRegistry:
    defs = list(BUILTIN_FEATURES)
    sets: dict[str, tuple[Sequence[str], str]] = dict(BUILTIN_SETS)
    if extra_file:
        extra_defs, extra_sets = _read_extra(Path(extra_file))
        defs += extra_defs
        for name, spec in extra_sets.items():
            sets[name] = _resolve_set(spec, sets)
    registry = FeatureRegistry(defs, sets)

    validate_definitions(registry.definitions(), extra_file or "the built-in registry")
    return registry


def load_registry(extra_file: Path | str | None = None) -> FeatureRegistry:
    """The built-in definitions plus those of ``extra_file`` (YAML), if given."""
    if extra_file is None:
        return _load(None, None)
    path = Path(extra_file)
    if not path.is_file():
        raise ChurnError(f"feature definitions file {path} does not exist; fix features.definitions_file")
    return _load(str(path.resolve()), path.stat().st_mtime)


def registry_for(cfg: Any) -> FeatureRegistry:
    """The registry configured by ``cfg.features.definitions_file``; also makes
    ``cfg.features.query_*`` the process's feature query limits (every command that computes
    features resolves its definitions here first)."""
    set_query_limits(limits_of(cfg.features))
    return load_registry(cfg.features.definitions_file)


def table_feature_set(name: str, frame: pd.DataFrame) -> FeatureSet:
    """A feature set describing the columns of a user's flat table (categoricals: the
    categories seen, sorted; everything else float64)."""
    feats = []
    for col in frame.columns:
        s = frame[col]
        if isinstance(s.dtype, pd.CategoricalDtype) or s.dtype == object:
            cats = sorted({str(v) for v in s.dropna().unique()})
            feats.append(FeatureDefinition(col, 1, "category", f"column {col}", "table", col,
                                           categories=tuple(cats)))
        else:
            dtype = "int64" if np.issubdtype(s.dtype, np.integer) else "float64"
            feats.append(FeatureDefinition(col, 1, dtype, f"column {col}", "table", col))
    return FeatureSet(name, tuple(feats), "inferred from a flat table")


__all__ = [
    "BUILTIN_FEATURES", "FeatureDefinition", "FeatureRegistry", "FeatureSet", "UnknownFeatureError",
    "load_registry", "registry_for", "table_feature_set",
]
