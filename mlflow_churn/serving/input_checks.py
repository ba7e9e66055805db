"""Input checks at serving: a request's feature values against the model's training profile.

The reference profile a version's training run logged (``reference/profile.json``,
:mod:`mlflow_churn.training.profile`) says, per feature, what training saw: the categories
of a categorical, the observed ``min`` / ``max`` of a numeric, the share of nulls. An
:class:`InputChecker` built from it finds, in the rows a request scores:

- ``unknown_category``: a categorical value training never saw (the model reads it as
  missing); the allowed values are the profile's categories;
- ``out_of_range``: a number outside ``[min - m, max + m]`` with ``m = range_margin x
  (max - min)`` (``serving.range_margin``, a fraction of the observed range);
- ``null``: a null where training had none (the profile's ``null_rate`` is 0).

Each finding is an :class:`InputIssue` (row, feature, kind, value, the allowed values or
range, a one-line message). What is not a number or not present is left to the encoder,
which answers 422 for it (:mod:`mlflow_churn.serving.encoding`). Profiles written before a
field existed are read as far as they go: no ``min`` / ``max`` -> the ends of the profile's
sorted sample, no ``null_rate`` -> nulls are not judged, no categories -> categories are not
judged (:attr:`InputChecker.unchecked` names what could not be checked).

The scoring service (:mod:`mlflow_churn.serving.service`) runs the checker of the version
that scores each row and, by ``serving.on_invalid``, adds the issues to the answer
(``flag``) or answers 422 (``reject``); :func:`encode_warnings` / :func:`warning_counts` are
the compact form the prediction log keeps per row and its counts per feature, which the
monitor run logs (:func:`served_warning_counts`).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from mlflow_churn.errors import ChurnError
from mlflow_churn.stats.drift import ColumnKind

Kind = Literal["unknown_category", "out_of_range", "null"]
KINDS: tuple[Kind, ...] = ("unknown_category", "out_of_range", "null")
#: longest string value quoted back in an issue
_QUOTE = 60
#: categories listed in a message at most (the issue's ``allowed`` holds them all)
_SHOW_CATEGORIES = 20
_ABSENT = object()


@dataclass(frozen=True)
class FieldRule:
    """What training saw of one feature (from its profile entry)."""

    feature: str
    kind: ColumnKind
    nullable: bool | None  # None: the profile does not say (nulls not judged)
    categories: frozenset[str] | None = None  # categorical: allowed values (None: not judged)
    category_list: tuple[str, ...] = ()  # the same, in the profile's order (for messages)
    observed: tuple[float, float] | None = None  # numeric: (min, max) seen in training
    allowed: tuple[float, float] | None = None  # numeric: the range with the margin


@dataclass(frozen=True)
class InputIssue:
    """One invalid value: row (position in the request), feature, what is wrong, the value
    sent and what would have been accepted (categories, or the [low, high] range)."""

    row: int
    feature: str
    kind: Kind
    value: Any
    allowed: list[Any] | None
    message: str

    def to_dict(self) -> dict[str, Any]:
        """JSON form without the row (the prediction it belongs to says which customer)."""
        return {"feature": self.feature, "kind": self.kind, "value": self.value, "allowed": self.allowed,
                "message": self.message}


@dataclass
class CheckResult:
    """The issues of one request's rows."""

    issues: list[InputIssue] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.issues)

    def by_row(self) -> dict[int, list[InputIssue]]:
        out: dict[int, list[InputIssue]] = {}
        for issue in self.issues:
            out.setdefault(issue.row, []).append(issue)
        return out

    def counts(self) -> Counter[tuple[str, str]]:
        """(feature, kind) -> number of invalid values."""
        return Counter((i.feature, i.kind) for i in self.issues)


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        x = float(value)
    elif isinstance(value, str):
        try:
            x = float(value)
        except ValueError:
            return None
    else:
        return None
    return x if math.isfinite(x) else None


def _shown(value: Any) -> Any:
    """The value as an issue carries it: JSON scalars, long strings cut."""
    if isinstance(value, str) and len(value) > _QUOTE:
        return value[:_QUOTE] + "..."
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return repr(value)[:_QUOTE]


def _fmt(x: float) -> str:
    return f"{x:.6g}"


def _rule(feature: str, entry: Mapping[str, Any], margin: float) -> FieldRule:
    rate = entry.get("null_rate")
    nullable = None if rate is None else bool(rate > 0)
    if entry.get("kind") == ColumnKind.CATEGORICAL:
        cats = entry.get("categories")
        if not cats:
            return FieldRule(feature, ColumnKind.CATEGORICAL, nullable)
        listed = tuple(str(c) for c in cats)
        return FieldRule(feature, ColumnKind.CATEGORICAL, nullable, frozenset(listed), listed)
    low, high = entry.get("min"), entry.get("max")
    if low is None or high is None:  # an older profile: the ends of its sorted sample
        sample = entry.get("sample") or []
        low, high = (sample[0], sample[-1]) if sample else (None, None)
    if low is None or high is None:
        return FieldRule(feature, ColumnKind.NUMERIC, nullable)
    low, high = float(low), float(high)
    pad = margin * (high - low)
    return FieldRule(feature, ColumnKind.NUMERIC, nullable, observed=(low, high),
                     allowed=(low - pad, high + pad))


class InputChecker:
    """Checks feature rows against one version's training profile (see the module doc).

    ``columns``: the model's feature columns (only those are checked); ``range_margin``:
    the fraction of a numeric feature's observed range allowed beyond each end (>= 0).
    """

    def __init__(self, profile: Mapping[str, Any], columns: Sequence[str], range_margin: float,
                 version: str = "") -> None:
        if not (isinstance(range_margin, int | float) and math.isfinite(range_margin) and range_margin >= 0):
            raise ChurnError(f"serving.range_margin must be a finite number >= 0, got {range_margin!r}")
        feats = profile.get("features")
        if not isinstance(feats, Mapping):
            raise ChurnError("the reference profile has no 'features'; rebuild it with build_profile")
        self.version = version
        self.range_margin = float(range_margin)
        self.rules: dict[str, FieldRule] = {c: _rule(c, feats[c], self.range_margin)
                                            for c in columns if isinstance(feats.get(c), Mapping)}
        #: feature -> why (part of) it is not checked
        self.unchecked: dict[str, str] = {c: "not in the profile" for c in columns if c not in self.rules}
        for name, r in self.rules.items():
            lacking = [what for what, missing in (
                ("nulls", r.nullable is None),
                ("categories", r.kind == ColumnKind.CATEGORICAL and r.categories is None),
                ("range", r.kind == ColumnKind.NUMERIC and r.allowed is None)) if missing]
            if lacking:
                self.unchecked[name] = f"the profile does not record its {' / '.join(lacking)}"

    def check(self, rows: Sequence[Mapping[str, Any]], positions: Iterable[int] | None = None) -> CheckResult:
        """The issues of ``rows[i]`` for each ``i`` in ``positions`` (default: all rows)."""
        result = CheckResult()
        where = [int(i) for i in (range(len(rows)) if positions is None else positions)]
        for r in self.rules.values():  # feature by feature: a tight loop over the rows
            feature, categories, numeric = r.feature, r.categories, r.kind == ColumnKind.NUMERIC
            low, high = r.allowed or (-math.inf, math.inf)
            for i in where:
                value = rows[i].get(feature, _ABSENT)
                kind = type(value)
                if numeric and (kind is float or kind is int):
                    if low <= value <= high:  # NaN fails both: the slow path calls it null
                        continue
                elif (kind is str and categories is not None and value in categories) or value is _ABSENT:
                    continue  # an absent column: the encoder's 422
                issue = self._issue(i, r, value)
                if issue is not None:
                    result.issues.append(issue)
        return result

    def _issue(self, row: int, r: FieldRule, value: Any) -> InputIssue | None:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            if r.nullable is False:
                return InputIssue(row, r.feature, "null", None, None,
                                  f"null, but training had no nulls for '{r.feature}'; send a value")
            return None
        if r.kind == ColumnKind.CATEGORICAL:
            if r.categories is None or str(value) in r.categories:
                return None
            shown = ", ".join(repr(c) for c in r.category_list[:_SHOW_CATEGORIES])
            more = len(r.category_list) - _SHOW_CATEGORIES
            shown += f" and {more} more" if more > 0 else ""
            return InputIssue(row, r.feature, "unknown_category", _shown(value), list(r.category_list),
                              f"{_shown(value)!r} is not a category training saw; allowed: {shown}")
        x = _number(value)
        if x is None or r.allowed is None:
            return None  # not a number: the encoder's 422
        low, high = r.allowed
        if low <= x <= high:
            return None
        omin, omax = r.observed or r.allowed
        return InputIssue(row, r.feature, "out_of_range", _shown(value), [low, high],
                          f"{_fmt(x)} is outside the allowed range [{_fmt(low)}, {_fmt(high)}] (training saw "
                          f"{_fmt(omin)} .. {_fmt(omax)}, plus serving.range_margin {self.range_margin:g} of "
                          "that range on each side)")


# --------------------------------------------------------------------------- the log's form
def encode_warnings(issues: Sequence[InputIssue]) -> str | None:
    """The prediction log's ``input_warnings`` of one row: ``{"feature": "kind", ...}`` as
    compact JSON, None without issues."""
    if not issues:
        return None
    return json.dumps({i.feature: i.kind for i in issues}, separators=(",", ":"), sort_keys=True)


@dataclass
class WarningCounts:
    """Input warnings of the served rows in a window: rows looked at, rows with a warning,
    and the number of invalid values per (feature, kind)."""

    rows: int
    flagged_rows: int
    counts: dict[tuple[str, str], int]

    def metrics(self) -> dict[str, float]:
        """MLflow metrics: ``input_invalid.<feature>.<kind>``, ``input_invalid.<feature>``
        (all kinds), ``input_checked_rows``, ``input_flagged_rows``."""
        out = {"input_checked_rows": float(self.rows), "input_flagged_rows": float(self.flagged_rows)}
        per_feature: Counter[str] = Counter()
        for (feature, kind), n in self.counts.items():
            out[f"input_invalid.{feature}.{kind}"] = float(n)
            per_feature[feature] += n
        out.update({f"input_invalid.{f}": float(n) for f, n in per_feature.items()})
        return out


def warning_counts(encoded: Iterable[str | None], rows: int) -> WarningCounts:
    """Counts of the ``input_warnings`` values of ``rows`` logged rows (None / NaN = none);
    a value that is not what :func:`encode_warnings` writes raises ChurnError."""
    counts: Counter[tuple[str, str]] = Counter()
    flagged = 0
    for text in encoded:
        if text is None or (isinstance(text, float) and math.isnan(text)):
            continue
        try:
            parsed = json.loads(text)
        except (TypeError, ValueError):
            parsed = None
        if not isinstance(parsed, dict):
            raise ChurnError(f"prediction log: input_warnings {str(text)[:_QUOTE]!r} is not a JSON object of "
                             "feature -> kind")
        flagged += 1
        counts.update((str(f), str(k)) for f, k in parsed.items())
    return WarningCounts(rows, flagged, dict(counts))


def served_warning_counts(log: Any, since: datetime, until: datetime,
                          version: str | None = None) -> WarningCounts:
    """:func:`warning_counts` of the scored rows of ``log`` (a
    :class:`~mlflow_churn.serving.prediction_log.PredictionLog`) with ``since <= as_of < until``,
    of model ``version`` only when given."""
    frame = log.read(since=since, until=until)
    scored = frame[frame["status"] == "ok"]
    if version is not None:
        scored = scored[scored["model_version"].astype(str) == str(version)]
    column = scored["input_warnings"] if "input_warnings" in scored else []
    return warning_counts(column, len(scored))
