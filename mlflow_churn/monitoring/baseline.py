"""What a model version's production performance is compared with, measured once at training.

Training (:func:`training_metrics`, :func:`profile_extras`) records, next to ``val_auc``:

- ``val_auc_se``: its Hanley-McNeil standard error (validation rows are distinct customers);
- ``val_auc_<d>d`` / ``val_auc_<d>d_se`` / ``val_churners_<d>d`` (``d`` =
  ``monitoring.early_label_days``, default 7): the AUC of the model's scores on *short*
  labels (churn within ``d`` days) of the customers no model trains on (holdout and
  validation groups) at the window's production cutoffs. It is the baseline of
  ``early_auc_drop``: the same horizon and the same kind of customers monitoring measures.
  The holdout customers widen the sample (few churn within 7 days); nothing is selected on
  this number, so using them leaks nothing into the gate;
- in the reference profile: the Platt calibration of the scores on the validation rows
  (for the CBPE estimate) and the raw source columns' null rates over the production window
  (for the integrity check).

Monitoring reads them back with :func:`version_baseline`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from mlflow_churn.config import ChurnConfig
from mlflow_churn.monitoring import performance


def early_key(days: int) -> str:
    """Metric / tag name of the short-horizon validation AUC: ``val_auc_7d`` for 7 days."""
    return f"val_auc_{int(days)}d"


def unseen_mask(customer_ids: Any, cfg: ChurnConfig) -> np.ndarray:
    """True for customers no model trains on (holdout and validation groups)."""
    from mlflow_churn.data.groups import holdout_mask, validation_mask

    ids = np.asarray(customer_ids)
    return holdout_mask(ids, cfg) | validation_mask(ids, cfg)


def _unseen_ids(data_dir: Path, cfg: ChurnConfig) -> list[int]:
    import pyarrow.parquet as pq

    from mlflow_churn.data.tables import TablePaths

    ids = pq.read_table(TablePaths(Path(data_dir)).customers, columns=["customer_id"])
    arr = ids.column("customer_id").to_numpy()
    return arr[unseen_mask(arr, cfg)].tolist()


def training_metrics(cfg: ChurnConfig, prep: Any, booster: Any, y_valid: Any,
                     valid_scores: Any) -> dict[str, float]:
    """The baselines of a training run (see module doc) as metrics; the short-horizon ones only
    for the feature-store source (``prep.source == "simulator"``)."""
    val = performance.auc_check(y_valid, valid_scores, None, None, None, 0.0)
    out = {"val_auc_se": val.se} if val is not None else {}
    if prep.source != "simulator":
        return out
    from mlflow_churn.features.offline import build_training_frame
    from mlflow_churn.training.model import predict_proba
    from mlflow_churn.training.window import training_window

    days = cfg.monitoring.early_label_days
    as_of = datetime.fromisoformat(prep.as_of)
    cutoffs = list(training_window(as_of, cfg).production_cutoffs)
    frame = build_training_frame(cfg.data_dir, prep.feature_set, cutoffs, days, label=True,
                                 label_as_of=as_of, customer_ids=_unseen_ids(cfg.data_dir, cfg))
    check = performance.auc_check(frame["label"].to_numpy(), predict_proba(booster, prep.feature_set, frame),
                                  frame["customer_id"].to_numpy(), None, None, 0.0)
    if check is not None:
        key = early_key(days)
        out |= {key: check.auc, f"{key}_se": check.se, f"val_churners_{days}d": float(check.churners)}
    return out


def profile_extras(cfg: ChurnConfig, prep: Any, valid_scores: Any) -> dict[str, Any]:
    """``calibration`` and ``sources`` arguments of :func:`~mlflow_churn.monitoring.profile.build_profile`."""
    from mlflow_churn.monitoring.sources import source_reference

    out: dict[str, Any] = {"calibration": performance.fit_calibration(valid_scores, prep.valid["label"])}
    if prep.source == "simulator" and prep.window_end:
        end = datetime.fromisoformat(prep.window_end)
        out["sources"] = source_reference(cfg.data_dir, end - timedelta(days=cfg.training.window_days), end)
    return out


@dataclass(frozen=True)
class Baseline:
    """A version's training-time baselines (None = not recorded)."""

    val_auc: float | None
    val_auc_se: float | None
    early_auc: float | None
    early_auc_se: float | None


def _float(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def version_baseline(client: Any, tags: dict[str, str], early_days: int) -> Baseline:
    """The baselines of the version with ``tags``: ``val_auc`` and ``val_auc_<d>d`` tags, their
    standard errors from the training run's metrics (``train_run_id``)."""
    metrics: dict[str, float] = {}
    if tags.get("train_run_id"):
        try:
            metrics = client.get_run(tags["train_run_id"]).data.metrics
        except Exception:  # a version whose training run was deleted: tags only
            metrics = {}
    key = early_key(early_days)
    return Baseline(
        val_auc=_float(tags.get("val_auc", metrics.get("val_auc"))),
        val_auc_se=_float(metrics.get("val_auc_se")),
        early_auc=_float(tags.get(key, metrics.get(key))),
        early_auc_se=_float(metrics.get(f"{key}_se")),
    )
