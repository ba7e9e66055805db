"""Bring your own table: a flat CSV / Parquet file -> features, label and inferred schema.

Rules, in order:

- blanks (empty or whitespace-only strings) are missing values; strings are stripped;
- the ``--label`` column maps Yes/No, True/False, Y/N, 1/0 (any case) to 1/0; any other
  value, a blank label, a missing column or a single class is a ChurnError;
- the ``--id`` column is kept out of the features;
- an object column whose non-missing values are mostly numbers (>= 90 %) is numeric
  (``TotalCharges`` of the Telco table has blanks); the values that do not parse are
  garbage and raise a ChurnError naming the column, the value and its row;
- other object / boolean / categorical columns are categoricals (XGBoost handles them
  natively), numbers are float64.

A flat table has no time axis, so validation is a seeded, stratified holdout of
``training.validation_fraction`` of the rows (simulator data is split by time instead).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mlflow_churn.errors import ChurnError, first_line
from mlflow_churn.features.registry import FeatureSet, table_feature_set

TRUE_WORDS = frozenset({"yes", "y", "true", "t", "1", "1.0"})
FALSE_WORDS = frozenset({"no", "n", "false", "f", "0", "0.0"})
NUMERIC_SHARE = 0.9


@dataclass
class TableData:
    """A flat table ready to train: features (raw: strings / float64), label, schema."""

    path: Path
    features: pd.DataFrame
    label: np.ndarray
    ids: pd.Series | None
    feature_set: FeatureSet
    schema: dict[str, Any] = field(default_factory=dict)


def read_table(path: Path | str) -> pd.DataFrame:
    """Read a CSV or Parquet file (by suffix; anything else is tried as CSV) as strings-or-numbers."""
    path = Path(path)
    if not path.is_file():
        raise ChurnError(f"table {path} does not exist; pass --table PATH to a CSV or Parquet file")
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            return pd.read_parquet(path)
        return pd.read_csv(path, na_values=[""], keep_default_na=True, low_memory=False)
    except Exception as exc:  # pandas / pyarrow raise many types for unreadable files
        first = first_line(exc)
        raise ChurnError(f"cannot read table {path}: {first[:200]}") from None


def _blank_to_na(col: pd.Series) -> pd.Series:
    if col.dtype != object:
        return col
    stripped = col.map(lambda v: v.strip() if isinstance(v, str) else v)
    return stripped.mask(stripped.map(lambda v: isinstance(v, str) and v == ""))


def map_label(col: pd.Series, name: str) -> np.ndarray:
    """Yes/No, True/False, Y/N, 1/0 -> int8 1/0; ChurnError for blanks or other values."""
    values = _blank_to_na(col)
    if values.isna().any():
        row = int(np.flatnonzero(values.isna().to_numpy())[0])
        raise ChurnError(f"label column '{name}' is blank in row {row + 1} ({int(values.isna().sum())} "
                         "blank rows); fill or drop them")
    words = values.map(lambda v: str(v).strip().lower())
    out = np.full(len(words), -1, dtype="int8")
    out[words.isin(TRUE_WORDS).to_numpy()] = 1
    out[words.isin(FALSE_WORDS).to_numpy()] = 0
    if (out < 0).any():
        bad = values.iloc[int(np.flatnonzero(out < 0)[0])]
        raise ChurnError(f"label column '{name}' holds {bad!r}; expected Yes/No, True/False or 1/0")
    classes = np.unique(out)
    if len(classes) < 2:
        raise ChurnError(f"label column '{name}' has a single class ({int(classes[0])} for all "
                         f"{len(out)} rows); a churn model needs churners and non-churners")
    return out


def _infer_column(col: pd.Series, name: str) -> tuple[pd.Series, dict[str, Any]]:
    """(converted column, schema entry) for one feature column."""
    col = _blank_to_na(col)
    nulls = int(col.isna().sum())
    if pd.api.types.is_bool_dtype(col):
        col = col.astype("object").where(col.notna(), None).map(lambda v: None if v is None else str(v))
    if pd.api.types.is_numeric_dtype(col):
        return col.astype("float64"), {"kind": "numeric", "source_dtype": str(col.dtype), "nulls": nulls}
    if col.dtype == object or isinstance(col.dtype, pd.CategoricalDtype) or pd.api.types.is_string_dtype(col):
        present = col.dropna()
        parsed = pd.to_numeric(present.astype(str), errors="coerce")
        share = float(parsed.notna().mean()) if len(present) else 0.0
        if len(present) and share >= NUMERIC_SHARE:
            if share < 1.0:
                bad_idx = parsed.index[parsed.isna()][0]
                row = int(col.index.get_loc(bad_idx))
                raise ChurnError(
                    f"column '{name}' is numeric but row {row + 1} holds {present.loc[bad_idx]!r} "
                    f"({int(parsed.isna().sum())} such values); fix the value or leave it blank"
                )
            out = pd.to_numeric(col.astype("object"), errors="coerce").astype("float64")
            return out, {"kind": "numeric", "source_dtype": "string", "nulls": nulls}
        out = col.astype("object").where(col.notna(), None).map(lambda v: None if v is None else str(v))
        cats = sorted({v for v in out if v is not None})
        return out, {"kind": "categorical", "source_dtype": str(col.dtype), "nulls": nulls,
                     "categories": cats}
    raise ChurnError(f"column '{name}' has type {col.dtype}, which is neither numeric nor text; "
                     "convert or drop it")


def load_table(path: Path | str, label: str, id_column: str | None = None) -> TableData:
    """Read ``path`` and split it into features, a 0/1 label and the ids (see module doc)."""
    if not label:
        raise ChurnError("--label COL is required with --table (the column that says who churned)")
    frame = read_table(path)
    if label not in frame.columns:
        raise ChurnError(f"label column '{label}' is not in {path}; columns: "
                         f"{', '.join(map(str, frame.columns))}")
    if id_column and id_column not in frame.columns:
        raise ChurnError(f"id column '{id_column}' is not in {path}; columns: "
                         f"{', '.join(map(str, frame.columns))}")
    if len(frame) < 20:
        raise ChurnError(f"table {path} has {len(frame)} rows; training needs at least 20")
    y = map_label(frame[label], label)
    ids = frame[id_column].reset_index(drop=True) if id_column else None
    feats: dict[str, pd.Series] = {}
    columns: dict[str, Any] = {}
    for name in frame.columns:
        if name in (label, id_column):
            continue
        feats[str(name)], columns[str(name)] = _infer_column(frame[name].reset_index(drop=True), str(name))
    if not feats:
        raise ChurnError(f"table {path} has no feature columns besides the label and the id")
    x = pd.DataFrame(feats)
    fs = table_feature_set(f"table_{Path(path).name.split('.')[0]}".replace("-", "_"), x)  # x.csv.gz -> x
    schema = {
        "table": str(Path(path)),
        "rows": int(len(frame)),
        "label": {"column": label, "positive": int(y.sum()), "negative": int(len(y) - y.sum()),
                  "mapping": "Yes/True/Y/1 -> 1, No/False/N/0 -> 0"},
        "id": id_column,
        "columns": columns,
        "feature_set": fs.name,
        "feature_set_hash": fs.hash,
        "validation": "seeded stratified holdout (the table has no time axis)",
    }
    return TableData(Path(path), x, y, ids, fs, schema)


__all__ = ["TableData", "load_table", "map_label", "read_table"]
