"""Point-in-time frames of monitoring windows, optionally cached per cutoff for replays.

One monitoring window builds up to three frames with the offline builder
(:func:`mlflow_churn.features.offline.build_training_frame`): the current cutoffs
(features only), the cutoffs whose short labels have matured (``early_label_days``) and
those whose full labels have matured. A replay stepping one day at a time shares six of
seven cutoffs with the previous window, so :class:`FrameCache` keeps the frame of each
(cutoff, label horizon) and builds only the missing cutoffs, in one query.

A cached frame is valid as long as the data below its cutoff does not change: a label
with horizon ``h`` of cutoff ``c`` only needs churn events up to ``c + h``, which a later
``label_as_of`` shows as well. Use one cache per replay, not across data rewrites.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import pandas as pd

from mlflow_churn.features.offline import build_training_frame
from mlflow_churn.features.registry import FeatureSet

#: cached (feature-set hash, cutoff, horizon) frames kept at most (LRU)
DEFAULT_ENTRIES = 64


class FrameCache:
    """An LRU of per-cutoff frames keyed by (feature-set hash, cutoff, label horizon or None)."""

    def __init__(self, max_entries: int = DEFAULT_ENTRIES) -> None:
        self.max_entries = max_entries
        self._items: OrderedDict[tuple[str, datetime, int | None], pd.DataFrame] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: tuple[str, datetime, int | None]) -> pd.DataFrame | None:
        frame = self._items.get(key)
        if frame is not None:
            self._items.move_to_end(key)
        return frame

    def put(self, key: tuple[str, datetime, int | None], frame: pd.DataFrame) -> None:
        self._items[key] = frame
        self._items.move_to_end(key)
        while len(self._items) > self.max_entries:
            self._items.popitem(last=False)


def window_frame(data_dir: Path, fs: FeatureSet, cutoffs: Sequence[datetime], horizon_days: int,
                 label_horizon: int | None = None, label_as_of: datetime | None = None,
                 cache: FrameCache | None = None) -> pd.DataFrame:
    """Rows of every live customer at ``cutoffs`` (oldest first): the feature set's columns and,
    with ``label_horizon``, ``label`` = churn within that many days (events up to
    ``label_as_of``). ``horizon_days`` is the feature store's horizon for unlabelled frames."""

    def build(cuts: list[datetime]) -> pd.DataFrame:
        return build_training_frame(data_dir, fs, cuts, label_horizon or horizon_days,
                                    label=label_horizon is not None, label_as_of=label_as_of)

    if cache is None:
        return build(list(cutoffs))
    keys = {c: (fs.hash, c, label_horizon) for c in cutoffs}
    missing = [c for c in cutoffs if cache.get(keys[c]) is None]
    if missing:
        fresh = build(missing)
        for c, part in fresh.groupby("cutoff", sort=False):
            cache.put((fs.hash, pd.Timestamp(c).to_pydatetime(), label_horizon), part)
        for c in missing:  # a cutoff without live customers is an empty part
            if cache.get(keys[c]) is None:
                cache.put(keys[c], fresh.iloc[0:0])
    parts = [cache.get(keys[c]) for c in sorted(cutoffs)]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
