"""Stable customer groups that keep validation and the gate honest.

A row at cutoff ``c`` is labelled "churns in ``(c, c + horizon]``"; the same customer's rows
at nearby cutoffs share most of that label period and nearly the same features. A model
trained on a customer's row at ``c`` therefore "knows" whether that customer churns soon,
and scoring the customer again a week later measures memory, not skill (measured on the
simulator: AUC 0.91 on customers seen in training vs 0.74 on unseen customers at the next
cutoff, and 0.73 on everyone once the label periods no longer overlap).

So every customer gets a fixed unit number ``u = splitmix64(customer_id) / 2**64`` in
``[0, 1)`` (the same on every run and every machine) and one group:

- ``holdout``: ``u < h`` (``evaluation.holdout_customer_fraction``): no model ever trains
  or validates on them; the gate and ``churn compress`` score only them;
- ``validation``: ``h <= u < h + (1 - h) * v`` (``training.validation_customer_fraction``):
  the newest cutoffs of these customers validate a training run (early stopping, Optuna,
  the logged ``val_*`` metrics, the reference profile); training never sees them;
- ``train``: everyone else.

Production monitoring and scoring use every customer: the groups only decide what a model
may learn from.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from mlflow_churn.config import ChurnConfig

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def customer_unit(ids: np.ndarray | pd.Series) -> np.ndarray:
    """A uniform number in ``[0, 1)`` per customer id (splitmix64 of the int64 id)."""
    z = np.asarray(ids, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        z = z + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(2**53)


def holdout_mask(ids: np.ndarray | pd.Series, cfg: ChurnConfig) -> np.ndarray:
    """True for customers of the gate's holdout group (never trained or validated on)."""
    return customer_unit(ids) < cfg.evaluation.holdout_customer_fraction


def validation_mask(ids: np.ndarray | pd.Series, cfg: ChurnConfig) -> np.ndarray:
    """True for customers whose rows validate a training run (never trained on)."""
    h = cfg.evaluation.holdout_customer_fraction
    u = customer_unit(ids)
    return (u >= h) & (u < h + (1.0 - h) * cfg.training.validation_customer_fraction)


def holdout_rows(frame: pd.DataFrame, cfg: ChurnConfig) -> pd.DataFrame:
    """The rows of ``frame`` (with a ``customer_id`` column) that belong to holdout customers."""
    return frame[holdout_mask(frame["customer_id"], cfg)].reset_index(drop=True)


__all__ = ["customer_unit", "holdout_mask", "holdout_rows", "validation_mask"]
