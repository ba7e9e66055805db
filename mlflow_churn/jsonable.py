"""Values made fit for JSON: the one converter every report, decision file and ``--json``
listing goes through."""

from __future__ import annotations

import json
import math
from datetime import date, datetime
from pathlib import PurePath
from typing import Any

import numpy as np


def jsonable(value: Any) -> Any:
    """``value`` with dict keys as text, tuples as lists, numpy scalars as Python numbers,
    NaN / inf as ``None``, dates as ISO text and paths as text (recursively)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):  # numpy scalars (a datetime64 becomes a datetime)
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, datetime | date):  # pandas Timestamps too
        return value.isoformat()
    if isinstance(value, PurePath):
        return str(value)
    return value


#: value types :func:`jsonable` returns unchanged (exact types: numpy scalars and subclasses convert)
_PLAIN = frozenset((str, int, bool, type(None)))


def _flat_plain(value: Any) -> bool:
    """True for a dict of text keys to plain values (finite floats included), which
    :func:`jsonable` would return equal: the common case on request paths (feature rows)."""
    return type(value) is dict and all(
        type(k) is str and (type(v) in _PLAIN or (type(v) is float and math.isfinite(v)))
        for k, v in value.items())


def dumps(value: Any, indent: int | None = 2) -> str:
    """``json.dumps`` of :func:`jsonable` (anything still unknown as its text); a flat dict of
    plain values is dumped as it is (the same text, without the converting copy)."""
    if _flat_plain(value):
        return json.dumps(value, indent=indent)
    return json.dumps(jsonable(value), indent=indent, default=str)


__all__ = ["dumps", "jsonable"]
