"""The frames a training run fits on, shared by training and its baselines."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from mlflow_churn.features.definitions import FeatureSet
from mlflow_churn.training.targeting import SegmentTargets


@dataclass
class TrainingFrames:
    """Training and validation rows of one source (feature store window or flat table), and
    what to record about them: what :func:`~mlflow_churn.training.train.train` fits on."""

    source: str
    feature_set: FeatureSet
    train: pd.DataFrame
    valid: pd.DataFrame
    dataset_source: str
    params: dict[str, str]
    recipe: dict[str, Any]
    window_start: str = ""
    window_end: str = ""
    as_of: str = ""
    artifacts: dict[str, Any] = field(default_factory=dict)
    segments: tuple[str, ...] = ()
    reference: pd.DataFrame | None = None  # the monitoring reference rows; None = ``valid``
    targets: SegmentTargets | None = None  # a targeted retrain's segments and weight; None = plain

    @property
    def frame(self) -> pd.DataFrame:
        """Every row used (training then validation) with a ``split`` column."""
        return pd.concat([self.train.assign(split="train"), self.valid.assign(split="valid")],
                         ignore_index=True)

    @property
    def data_hash(self) -> str:
        """sha256 (hex) of the frame's column names and row hashes."""
        frame = self.frame
        digest = hashlib.sha256("\x1f".join(map(str, frame.columns)).encode())
        digest.update(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())
        return digest.hexdigest()
