"""Training/serving skew check: recompute a sample of online rows offline and compare.

The serving batch says at which ``as_of`` its values were computed; :func:`check_skew`
recomputes a random sample of its customers with
:func:`mlflow_churn.features.offline.compute_latest` (the training SQL) at that instant and
reports every value that differs. Causes: data rewritten or arriving late after the batch,
a definition edited without a version bump (the batch's definition hashes show it too), or
a bug in a store or in incremental materialization.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from mlflow_churn.errors import ChurnError
from mlflow_churn.features.offline import compute_latest
from mlflow_churn.features.online import OnlineStore, open_store
from mlflow_churn.features.registry import registry_for


@dataclass(frozen=True)
class Mismatch:
    """One value that differs: online (served) vs offline (recomputed)."""

    customer_id: int
    feature: str
    online: Any
    offline: Any


@dataclass(frozen=True)
class SkewReport:
    """Outcome of one skew check on batch ``batch_id`` (values at ``as_of``).

    ``sampled``: customers drawn from the batch; ``compared``: of those, the ones the
    offline recomputation also returns; ``missing_offline``: ids served online that the
    offline path does not return (e.g. churn recorded after the batch);
    ``mismatch_rate``: mismatching values / compared values (0..1).
    """

    batch_id: str
    as_of: str
    sampled: int
    compared: int
    features: tuple[str, ...]
    mismatches: list[Mismatch] = field(default_factory=list)
    missing_offline: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches and not self.missing_offline

    @property
    def mismatch_rate(self) -> float:
        total = self.compared * (len(self.features) + 1)
        return len(self.mismatches) / total if total else 0.0

    def by_feature(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for m in self.mismatches:
            out[m.feature] = out.get(m.feature, 0) + 1
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch_id": self.batch_id, "as_of": self.as_of, "sampled": self.sampled,
            "compared": self.compared, "features": list(self.features), "ok": self.ok,
            "mismatch_rate": self.mismatch_rate, "by_feature": self.by_feature(),
            "missing_offline": self.missing_offline[:100],
            "mismatches": [m.__dict__ for m in self.mismatches[:100]],
        }


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NaT


def same_value(online: Any, offline: Any, rel_tol: float = 1e-9) -> bool:
    """Equal as served values: both missing, equal strings, or numbers within ``rel_tol``."""
    if _missing(online) or _missing(offline):
        return _missing(online) and _missing(offline)
    if isinstance(online, str) or isinstance(offline, str):
        return str(online) == str(offline)
    return math.isclose(float(online), float(offline), rel_tol=rel_tol, abs_tol=1e-9)


def check_skew(
    cfg: Any,
    sample: int = 1000,
    seed: int = 0,
    store: OnlineStore | None = None,
    rel_tol: float = 1e-9,
) -> SkewReport:
    """Recompute ``sample`` random customers of the serving batch offline and compare.

    Every feature of the batch and each row's event time are compared; numbers within
    ``rel_tol`` (relative) are equal. Raises ChurnError without a batch, or when a feature
    of the batch is no longer registered.
    """
    if sample < 1:
        raise ChurnError(f"--sample must be >= 1, got {sample}")
    own = store is None
    store = open_store(cfg, must_exist=True) if own else store
    try:
        batch = store.current_batch()
        if batch is None:
            raise ChurnError(f"{store.location} has no batch yet; run `churn features materialize`")
        registry = registry_for(cfg)
        defs = [registry.get(name) for name in batch.features]
        ids = store.customer_ids(batch.batch_id)
        rng = np.random.default_rng(seed)
        picked = rng.choice(ids, size=min(sample, len(ids)), replace=False) if ids else []
        chosen = sorted(int(i) for i in picked)
        online = store.get(chosen, batch_id=batch.batch_id)
    finally:
        if own:
            store.close()
    offline = compute_latest(cfg.data_dir, defs, batch.as_of, customer_ids=chosen).frame
    offline = offline.set_index("customer_id")
    mismatches: list[Mismatch] = []
    missing: list[int] = []
    compared = 0
    for cid in chosen:
        row = online.get(cid)
        if row is None:
            continue
        if cid not in offline.index:
            missing.append(cid)
            continue
        compared += 1
        off = offline.loc[cid]
        for name in batch.features:
            value = off[name]
            value = value.item() if hasattr(value, "item") else value
            if not same_value(row.values.get(name), value, rel_tol):
                mismatches.append(Mismatch(cid, name, row.values.get(name), value))
        off_time = off["event_time"].to_pydatetime() if not _missing(off["event_time"]) else None
        if row.event_time != off_time:
            mismatches.append(Mismatch(
                cid, "event_time", row.event_time.isoformat() if row.event_time else None,
                off_time.isoformat() if off_time else None))
    return SkewReport(batch.batch_id, batch.as_of.isoformat(), len(chosen), compared,
                      tuple(batch.features), mismatches, missing)


__all__ = ["Mismatch", "SkewReport", "check_skew", "same_value"]
