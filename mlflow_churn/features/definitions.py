"""Feature definitions and feature sets: the value types of the feature store.

A :class:`FeatureDefinition` is one versioned feature (name, version, source, SQL
expression, dtype); a :class:`FeatureSet` is an ordered list of them with a content hash.
The registry of named definitions and sets is :mod:`mlflow_churn.features.registry`; the
offline builder (:mod:`mlflow_churn.features.offline`) turns definitions into SQL.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Any

import pandas as pd

from mlflow_churn.errors import ChurnError

DTYPES = ("float64", "int64", "category")
SOURCES = ("customers", "activity", "table")
#: names of features computed by SQL: they become quoted column names of the offline query
_SQL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


class UnknownFeatureError(ChurnError):
    """A feature, version or feature set that the registry does not hold."""

    def __init__(self, message: str, available: Sequence[str]) -> None:
        super().__init__(message)
        self.available = list(available)


@dataclass(frozen=True)
class FeatureDefinition:
    """One versioned feature of the customer entity."""

    name: str
    version: int
    dtype: str
    description: str
    source: str
    expression: str
    window_days: int | None = None
    default: float | None = None
    entity: str = "customer_id"
    owner: str = "churn-team"
    tags: tuple[str, ...] = ()
    categories: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        where = f"feature '{self.name}' v{self.version}"
        if not isinstance(self.version, int) or isinstance(self.version, bool):
            raise ChurnError(f"{where}: version must be an integer >= 1, got {self.version!r}")
        if self.window_days is not None and (not isinstance(self.window_days, int)
                                             or isinstance(self.window_days, bool)
                                             or not 1 <= self.window_days <= 3660):
            raise ChurnError(
                f"{where}: window_days must be an integer in [1, 3660], got {self.window_days!r}")
        if self.default is not None and (isinstance(self.default, bool)
                                         or not isinstance(self.default, int | float)
                                         or not math.isfinite(self.default)):
            raise ChurnError(f"{where}: default must be a finite number (or left out), got {self.default!r}")
        if self.version < 1:
            raise ChurnError(f"{where}: version must be >= 1")
        if self.dtype not in DTYPES:
            raise ChurnError(f"{where}: dtype '{self.dtype}' is not one of {', '.join(DTYPES)}")
        if self.source not in SOURCES:
            raise ChurnError(f"{where}: source '{self.source}' is not one of {', '.join(SOURCES)}")
        if self.source in ("customers", "activity") and not (
                isinstance(self.name, str) and _SQL_NAME.fullmatch(self.name)):
            raise ChurnError(f"{where}: name must be letters, digits and _ (not starting with a digit)")
        if not isinstance(self.expression, str):
            raise ChurnError(f"{where}: expression must be a string of SQL, got {self.expression!r}")
        if self.source == "activity" and not self.window_days:
            raise ChurnError(f"{where}: an activity feature needs window_days >= 1")
        if self.dtype == "category" and not self.categories and self.source != "table":
            raise ChurnError(f"{where}: a category feature needs its list of categories")

    @property
    def full_name(self) -> str:
        """Served column name: ``name`` for v1, ``name_vN`` for N >= 2."""
        return self.name if self.version == 1 else f"{self.name}_v{self.version}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (round-trips through :meth:`from_dict`)."""
        out = asdict(self)
        out["tags"] = list(self.tags)
        out["categories"] = list(self.categories) if self.categories is not None else None
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureDefinition:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ChurnError(
                f"feature '{data.get('name')}': unknown keys {', '.join(unknown)}; "
                f"known: {', '.join(sorted(known))}"
            )
        required = ("name", "version", "dtype", "description", "source", "expression")
        lacking = [k for k in required if k not in data]
        if lacking:
            raise ChurnError(f"feature '{data.get('name')}': missing key(s) {', '.join(lacking)}")
        d = dict(data)
        d["tags"] = tuple(d.get("tags") or ())
        if d.get("categories") is not None:
            d["categories"] = tuple(str(c) for c in d["categories"])
        return cls(**d)

    def _identity(self) -> dict[str, Any]:
        """What the hash covers: everything that changes the value, not the prose."""
        d = self.to_dict()
        for cosmetic in ("description", "owner", "tags"):
            d.pop(cosmetic)
        return d

    @cached_property
    def hash(self) -> str:
        """sha256 (hex) of this definition's value-changing fields (not description, owner,
        tags); an online batch records it per feature."""
        canon = json.dumps(self._identity(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canon.encode()).hexdigest()


@dataclass(frozen=True)
class FeatureSet:
    """The exact feature versions one model uses, in model column order."""

    name: str
    features: tuple[FeatureDefinition, ...]
    description: str = ""

    @property
    def columns(self) -> list[str]:
        return [f.full_name for f in self.features]

    @property
    def categorical(self) -> dict[str, list[str]]:
        return {f.full_name: list(f.categories or ()) for f in self.features if f.dtype == "category"}

    @property
    def hash(self) -> str:
        """sha256 (hex) of the canonical definitions, in order."""
        canon = json.dumps([f._identity() for f in self.features], sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canon.encode()).hexdigest()

    @property
    def from_table(self) -> bool:
        """True for a set inferred from a user's flat table (no registry definition)."""
        return any(f.source == "table" for f in self.features)

    def coerce(self, df: pd.DataFrame) -> pd.DataFrame:
        """Model input: the set's columns in order, float64 numerics, fixed categoricals.

        Raw values are accepted (strings for categoricals, ints, None); values outside a
        categorical's categories become missing. Raises ChurnError naming missing columns
        or a column that is not numeric.
        """
        missing = [c for c in self.columns if c not in df.columns]
        if missing:
            raise ChurnError(
                f"input lacks feature column(s) {', '.join(missing)} of feature set '{self.name}'"
            )
        out = {}
        for f in self.features:
            col = df[f.full_name]
            if f.dtype == "category":
                cats = list(f.categories or ())
                values = col.astype("object").where(col.notna(), None)
                values = values.map(lambda v: None if v is None else str(v))
                out[f.full_name] = pd.Categorical(values, categories=cats)
            else:
                try:
                    out[f.full_name] = pd.to_numeric(col, errors="raise").astype("float64").to_numpy()
                except (ValueError, TypeError):
                    bad = col[pd.to_numeric(col, errors="coerce").isna() & col.notna()].iloc[0]
                    raise ChurnError(
                        f"feature '{f.full_name}' must be numeric, got {bad!r}"
                    ) from None
        return pd.DataFrame(out, index=df.index)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "hash": self.hash,
            "features": [f.to_dict() for f in self.features],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureSet:
        return cls(
            name=data["name"],
            description=data.get("description", ""),
            features=tuple(FeatureDefinition.from_dict(f) for f in data["features"]),
        )
