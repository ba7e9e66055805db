r"""What a model version's production performance is compared with, measured once at training.

``val_auc`` is optimistic: early stopping and Optuna pick the iteration and trial that
score best on those very rows (the winner's curse; measured on the simulator with 8,000
customers and 3 trials: val_auc 0.854 vs 0.791 on holdout customers at the same cutoff,
and a realised AUC of 0.75-0.79 in the following windows). A drop against it alarms on a
healthy model. Training (:func:`training_baselines`) therefore also scores the **reference
rows**: customers no model trains on (holdout and validation groups,
:mod:`mlflow_churn.data.groups`) at the window's production cutoffs, without the rows
model selection looked at (a validation customer's row counts only when its label period
ends by the first validation cutoff). Logged as metrics of the training run (``*`` also as
version tags):

- ``val_auc_se``: the Hanley-McNeil standard error of ``val_auc``;
- ``val_auc_unselected``\* / ``_se`` / ``val_churners_unselected``: AUC on the reference
  rows with the training label horizon: the default ``auc_drop`` baseline
  (``monitoring.auc_baseline``);
- ``val_auc_<d>d``\* / ``_se`` / ``val_churners_<d>d`` (``d`` = ``monitoring.early_label_days``,
  default 7): AUC on the reference rows with *short* labels (churn within ``d`` days): the
  ``early_auc_drop`` baseline. Nothing is selected on these numbers, and the holdout
  customers' rows inside the training window are not the gate's (it scores later
  cutoffs), so using them leaks nothing;
- ``val_segment_<stat>.<column>.<value>`` (``stat``: ``auc``, ``auc_se``, ``churners``,
  ``estimated_auc``, ``estimated_auc_se``): per segment of ``monitoring.segments``, the same
  on the reference rows with the training horizon, and the calibrated label-free estimate:
  each segment's baseline for monitoring's segment rule
  (:func:`mlflow_churn.stats.performance.segment_performance`; a segment under
  ``monitoring.segment_min_rows`` / ``segment_min_churners`` gets none).

The reference profile gets the Platt calibration of the scores, fitted on the reference rows
with the training horizon (for the CBPE estimate: on the validation rows it would inherit
their selection and overshoot), and the raw source columns' null rates over the production
window (for the integrity check). Monitoring reads the baselines back with
:func:`version_baseline`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mlflow_churn.config import ChurnConfig
from mlflow_churn.data.groups import holdout_mask, validation_mask
from mlflow_churn.data.sources import source_reference
from mlflow_churn.data.tables import TablePaths
from mlflow_churn.errors import is_missing
from mlflow_churn.features.offline import build_training_frame
from mlflow_churn.stats import performance
from mlflow_churn.tags import TRAIN_RUN_TAG
from mlflow_churn.training.frames import TrainingFrames
from mlflow_churn.training.model import predict_proba
from mlflow_churn.training.window import training_window

UNSELECTED = "val_auc_unselected"


def early_key(days: int) -> str:
    """Metric / tag name of the short-horizon validation AUC: ``val_auc_7d`` for 7 days."""
    return f"val_auc_{int(days)}d"


def unseen_mask(customer_ids: Any, cfg: ChurnConfig) -> np.ndarray:
    """True for customers no model trains on (holdout and validation groups)."""

    ids = np.asarray(customer_ids)
    return holdout_mask(ids, cfg) | validation_mask(ids, cfg)


def _unseen_ids(data_dir: Path, cfg: ChurnConfig) -> list[int]:
    import pyarrow.parquet as pq

    ids = pq.read_table(TablePaths(Path(data_dir)).customers, columns=["customer_id"])
    arr = ids.column("customer_id").to_numpy()
    return arr[unseen_mask(arr, cfg)].tolist()


def _reference_mask(frame: Any, cfg: ChurnConfig, validation_from: datetime, horizon_days: int) -> np.ndarray:
    """Reference rows of ``frame`` (``customer_id``, ``cutoff``): unseen customers, except
    validation customers' rows whose label period ends after ``validation_from``."""

    ids = frame["customer_id"].to_numpy()
    ends = frame["cutoff"] + pd.Timedelta(days=horizon_days)
    selected = validation_mask(ids, cfg) & (ends > pd.Timestamp(validation_from)).to_numpy()
    return unseen_mask(ids, cfg) & ~selected


@dataclass
class TrainingBaselines:
    """What training records for monitoring: run ``metrics``, version ``tags`` and the
    ``calibration`` / ``sources`` arguments of the reference profile (``profile_extras``)."""

    metrics: dict[str, float]
    tags: dict[str, str]
    profile_extras: dict[str, Any]


def _reference_rows(cfg: ChurnConfig, prep: TrainingFrames, booster: Any, cutoffs: list[datetime],
                    horizon: int, as_of: datetime) -> tuple[np.ndarray, np.ndarray, np.ndarray, pd.DataFrame]:
    """(labels, scores, customer ids, the rows) of the reference rows with ``horizon``-day labels."""

    frame = build_training_frame(cfg.data_dir, prep.feature_set, cutoffs, horizon, label=True,
                                 label_as_of=as_of, customer_ids=_unseen_ids(cfg.data_dir, cfg))
    rows = frame[_reference_mask(frame, cfg, datetime.fromisoformat(prep.params["validation_from"]), horizon)]
    return (rows["label"].to_numpy(), predict_proba(booster, prep.feature_set, rows),
            rows["customer_id"].to_numpy(), rows)


def _auc_metrics(rows: tuple[np.ndarray, np.ndarray, np.ndarray, pd.DataFrame], key: str,
                 churners: str) -> dict[str, float]:
    check = performance.auc_check(*rows[:3], None, None, 0.0)
    return {} if check is None else {key: check.auc, f"{key}_se": check.se, churners: float(check.churners)}


def _segment_baselines(cfg: ChurnConfig, rows: tuple[np.ndarray, np.ndarray, np.ndarray, pd.DataFrame],
                       calibration: dict[str, Any] | None) -> dict[str, float]:
    """``val_segment_*`` metrics: each segment's realised AUC and calibrated estimate on the
    reference rows (module doc)."""
    _, scores, _, frame = rows
    mon = cfg.monitoring
    columns = [c for c in mon.segments if c in frame.columns or c == "tenure_bucket"]
    perfs = performance.segment_performance(columns, frame, scores, cfg.evaluation, matured=frame,
                                            matured_scores=scores, calibration=calibration,
                                            min_rows=mon.segment_min_rows,
                                            min_churners=mon.segment_min_churners)
    return performance.segment_baseline_metrics(perfs)


def training_baselines(cfg: ChurnConfig, prep: TrainingFrames, booster: Any, y_valid: Any,
                       valid_scores: Any) -> TrainingBaselines:
    """The baselines of a training run (see module doc). For the feature-store source
    (``prep.source == "simulator"``) from the reference rows: the unselected and short-horizon
    AUCs, the Platt calibration (fitted there: the validation rows are the ones early stopping
    chose the trees on) and the raw sources' null rates; for a flat table only ``val_auc_se``
    and a calibration on the validation rows."""
    val = performance.auc_check(y_valid, valid_scores, None, None, None, 0.0)
    metrics = {"val_auc_se": val.se} if val is not None else {}
    extras: dict[str, Any] = {"calibration": performance.fit_calibration(valid_scores, y_valid)}
    if prep.source == "simulator":

        as_of = datetime.fromisoformat(prep.as_of)
        cutoffs = list(training_window(as_of, cfg).production_cutoffs)
        days = cfg.monitoring.early_label_days
        full = _reference_rows(cfg, prep, booster, cutoffs, cfg.features.label_horizon_days, as_of)
        metrics |= _auc_metrics(full, UNSELECTED, "val_churners_unselected")
        metrics |= _auc_metrics(_reference_rows(cfg, prep, booster, cutoffs, days, as_of), early_key(days),
                                f"val_churners_{days}d")
        if 0 < full[0].sum() < full[0].size:
            extras["calibration"] = performance.fit_calibration(full[1], full[0])
        metrics |= _segment_baselines(cfg, full, extras["calibration"])
        end = datetime.fromisoformat(prep.window_end)
        start = end - timedelta(days=cfg.training.window_days)
        extras["sources"] = source_reference(cfg.data_dir, start, end)
    tags = {k: f"{metrics[k]:.6f}" for k in (UNSELECTED, early_key(cfg.monitoring.early_label_days))
            if k in metrics}
    return TrainingBaselines(metrics, tags, extras)


@dataclass(frozen=True)
class Baseline:
    """A version's training-time baselines (None = not recorded); ``segment_metrics``: its
    training run's ``val_segment_*`` metrics (empty for a version trained before they were)."""

    val_auc: float | None
    val_auc_se: float | None
    unselected_auc: float | None
    unselected_auc_se: float | None
    early_auc: float | None
    early_auc_se: float | None
    segment_metrics: dict[str, float] = field(default_factory=dict)

    def segment(self, key: str) -> performance.SegmentBaseline | None:
        """Segment ``key``'s (``column=value``) baseline recorded by training, or None."""
        return performance.segment_baseline(self.segment_metrics, key, "training")

    def auc(self, which: str) -> tuple[float | None, float | None]:
        """(baseline, its standard error) of ``monitoring.auc_baseline`` = ``which``."""
        if which == "val_auc":
            return self.val_auc, self.val_auc_se
        return self.unselected_auc, self.unselected_auc_se


def _float(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def version_baseline(client: Any, tags: dict[str, str], early_days: int) -> Baseline:
    """The baselines of the version with ``tags`` (its tags, else its training run's metrics,
    via ``train_run_id``) and their standard errors."""
    metrics: dict[str, float] = {}
    if tags.get(TRAIN_RUN_TAG):
        try:
            metrics = client.get_run(tags[TRAIN_RUN_TAG]).data.metrics
        except Exception as exc:  # a version whose training run was deleted: tags only
            if not is_missing(exc):  # anything else (the server down, a 5xx) is no answer
                raise
            metrics = {}

    def value(key: str) -> float | None:
        return _float(tags.get(key, metrics.get(key)))

    early = early_key(early_days)
    return Baseline(val_auc=value("val_auc"), val_auc_se=value("val_auc_se"),
                    unselected_auc=value(UNSELECTED), unselected_auc_se=value(f"{UNSELECTED}_se"),
                    early_auc=value(early), early_auc_se=value(f"{early}_se"),
                    segment_metrics={k: v for k, v in metrics.items()
                                     if k.startswith(performance.SEGMENT_BASELINE_PREFIX)})
