"""Input encoding of the scoring service: raw feature records -> the model's input matrix."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from mlflow_churn.errors import ChurnError
from mlflow_churn.features.registry import FeatureSet
from mlflow_churn.web import errors as web_errors


class InputEncoder:
    """Raw feature values (dicts, as the online store and clients hold them) -> the float
    matrix XGBoost scores: numerics as float64, categoricals as their category code in the
    feature set's category order, missing / unknown categories as NaN.

    The same values as :meth:`FeatureSet.coerce` followed by XGBoost's own categorical
    encoding (the tests compare with :meth:`Scorer.predict_proba`), without building pandas
    objects per request: one-customer scoring drops from milliseconds to tens of microseconds.
    """

    def __init__(self, feature_set: FeatureSet) -> None:
        self.columns = feature_set.columns
        cats = feature_set.categorical
        self._codes = [{v: float(i) for i, v in enumerate(cats[c])} if c in cats else None
                       for c in self.columns]

    def encode(self, rows: list[dict[str, Any]]) -> np.ndarray:
        """Matrix (len(rows) x features); ChurnError naming a non-numeric numeric feature."""
        out = np.full((len(rows), len(self.columns)), np.nan)
        for j, (col, codes) in enumerate(zip(self.columns, self._codes, strict=True)):
            for i, row in enumerate(rows):
                v = row.get(col)
                if v is None:
                    continue
                if codes is not None:
                    out[i, j] = codes.get(str(v), np.nan)
                    continue
                try:
                    out[i, j] = x = float(v)
                except (TypeError, ValueError, OverflowError):
                    x = math.nan
                if not math.isfinite(x):
                    raise ChurnError(f"feature '{col}' must be a finite number, got "
                                     f"{web_errors.quote(v)}") from None
        return out
