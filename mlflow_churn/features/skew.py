"""Training/serving skew check: recompute a sample of online rows offline and compare.

The serving batch says at which ``as_of`` its values were computed; :func:`check_skew`
recomputes a random sample of its customers with
:func:`mlflow_churn.features.offline.compute_latest` (the training SQL) at that instant and
reports every value that differs. Causes: data rewritten or arriving late after the batch,
a definition edited without a version bump (the batch's definition hashes show it too), or
a bug in a store or in incremental materialization.

:func:`check_served_skew` does the same for values a model was actually served (read back
from the prediction log by monitoring): each sampled row is recomputed at its own instant
with :func:`mlflow_churn.features.offline.compute_at` and compared value by value with the
same rule (:func:`same_value`); per feature it reports the mismatch rate and the PSI of the
served values against the recomputed ones.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mlflow_churn.errors import ChurnError
from mlflow_churn.features.definitions import FeatureDefinition
from mlflow_churn.features.offline import compute_at, compute_latest
from mlflow_churn.features.online import OnlineStore, open_store
from mlflow_churn.features.registry import registry_for
from mlflow_churn.stats import drift


@dataclass(frozen=True)
class Mismatch:
    """One value that differs: online (served) vs offline (recomputed); ``at``: the instant it
    was recomputed at (ISO, served-data checks only)."""

    customer_id: int
    feature: str
    online: Any
    offline: Any
    at: str | None = None


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


def _scalar(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def row_mismatches(customer_id: int, served: Mapping[str, Any], truth: Mapping[str, Any] | pd.Series,
                   features: Sequence[str], rel_tol: float = 1e-9, at: str | None = None) -> list[Mismatch]:
    """The values of ``features`` in ``served`` that differ from ``truth`` (:func:`same_value`);
    a feature absent from ``served`` is not compared."""
    out = []
    for name in features:
        if name not in served:
            continue
        value = _scalar(truth[name])
        if not same_value(served[name], value, rel_tol):
            out.append(Mismatch(customer_id, name, served[name], value, at))
    return out


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
        served = {name: row.values.get(name) for name in batch.features}
        mismatches += row_mismatches(cid, served, off, batch.features, rel_tol)
        off_time = off["event_time"].to_pydatetime() if not _missing(off["event_time"]) else None
        if row.event_time != off_time:
            mismatches.append(Mismatch(
                cid, "event_time", row.event_time.isoformat() if row.event_time else None,
                off_time.isoformat() if off_time else None))
    return SkewReport(batch.batch_id, batch.as_of.isoformat(), len(chosen), compared,
                      tuple(batch.features), mismatches, missing)


@dataclass
class ServedSkewReport:
    """Outcome of :func:`check_served_skew` on a sample of served rows.

    ``sampled``: served rows drawn; ``compared``: of those, the rows the offline path
    recomputes (the customer alive at the row's instant); ``not_recomputed``: the others;
    per feature: ``compared_values`` (rows holding that feature), ``mismatch_rate``
    (mismatching / compared values, 0..1) and ``psi`` (served values against the recomputed
    ones, reference = recomputed; absent when a side has no value); ``mismatches``: every
    value that differs (customer, feature, served, recomputed, instant).
    """

    sampled: int
    compared: int
    not_recomputed: int
    features: tuple[str, ...]
    compared_values: dict[str, int] = field(default_factory=dict)
    mismatch_rate: dict[str, float] = field(default_factory=dict)
    psi: dict[str, float] = field(default_factory=dict)
    mismatches: list[Mismatch] = field(default_factory=list)

    def to_dict(self, limit: int = 1000) -> dict[str, Any]:
        return {
            "sampled": self.sampled, "compared": self.compared, "not_recomputed": self.not_recomputed,
            "features": list(self.features), "compared_values": self.compared_values,
            "mismatch_rate": self.mismatch_rate, "psi": self.psi,
            "mismatches": [m.__dict__ for m in self.mismatches[:limit]],
            "mismatches_total": len(self.mismatches),
        }


def _served_psi(definition: FeatureDefinition, served: pd.Series, truth: pd.Series, bins: int,
                epsilon: float) -> float | None:
    """PSI of ``served`` against ``truth`` (the reference), None when a side has no value."""
    if definition.dtype == "category":
        ref, cur = truth.dropna(), served.dropna()
        if ref.empty or cur.empty:
            return None
        return drift.categorical_psi(ref.astype(str), cur.astype(str), epsilon)
    ref = pd.to_numeric(truth, errors="coerce")
    cur = pd.to_numeric(served, errors="coerce")
    if ref.notna().sum() == 0 or cur.notna().sum() == 0:
        return None
    return drift.psi(ref, cur, bins=bins, epsilon=epsilon)


def check_served_skew(
    data_dir: Path,
    definitions: Sequence[FeatureDefinition],
    served: pd.DataFrame,
    sample: int = 500,
    seed: int = 0,
    rel_tol: float = 1e-9,
    bins: int = 10,
    epsilon: float = drift.DEFAULT_EPSILON,
) -> ServedSkewReport:
    """Recompute ``sample`` random rows of ``served`` offline and compare them per feature.

    ``served``: one row per served prediction with ``customer_id``, ``at`` (the UTC instant
    the values are recomputed at) and ``values`` (a mapping feature name -> served raw value;
    a feature of ``definitions`` absent from it was not served in that row and is not
    compared, a null value is compared). Raises ChurnError for ``sample < 1`` or without rows.
    """
    if sample < 1:
        raise ChurnError(f"the serving-skew sample must be >= 1 row, got {sample}")
    if served.empty:
        raise ChurnError("no served rows to check; serve predictions (churn serve) with "
                         "serving.log_features_sample_rate > 0 first")
    present = set().union(*(set(v) for v in served["values"]))
    defs = [d for d in definitions if d.full_name in present]
    names = tuple(d.full_name for d in defs)
    if not defs:
        raise ChurnError("the served rows hold no registered feature (features.definitions_file); "
                         f"served keys: {', '.join(sorted(present)[:10]) or 'none'}")
    rng = np.random.default_rng(seed)
    picked = served.iloc[np.sort(rng.choice(len(served), size=min(sample, len(served)), replace=False))]
    picked = picked.reset_index(drop=True)
    at = pd.to_datetime(picked["at"], utc=True)
    truth = compute_at(data_dir, defs, pd.DataFrame({"customer_id": picked["customer_id"], "cutoff": at}))
    truth = truth.set_index(["customer_id", "cutoff"])
    report = ServedSkewReport(len(picked), 0, 0, names)
    pairs: dict[str, tuple[list[Any], list[Any]]] = {n: ([], []) for n in names}
    for i, row in enumerate(picked.itertuples(index=False)):
        key = (int(row.customer_id), at.iloc[i])
        if key not in truth.index:
            report.not_recomputed += 1
            continue
        report.compared += 1
        off = truth.loc[key]
        values = {n: _scalar(v) for n, v in row.values.items() if n in pairs}
        report.mismatches += row_mismatches(key[0], values, off, names, rel_tol, key[1].isoformat())
        for n in values:
            pairs[n][0].append(values[n])
            pairs[n][1].append(_scalar(off[n]))
    wrong = pd.Series([m.feature for m in report.mismatches], dtype="object").value_counts()
    for d in defs:
        got, want = pairs[d.full_name]
        if not got:
            continue
        n = d.full_name
        report.compared_values[n] = len(got)
        report.mismatch_rate[n] = float(wrong.get(n, 0)) / len(got)
        value = _served_psi(d, pd.Series(got, dtype="object"), pd.Series(want, dtype="object"), bins, epsilon)
        if value is not None:
            report.psi[n] = value
    return report


__all__ = ["Mismatch", "ServedSkewReport", "SkewReport", "check_served_skew", "check_skew", "row_mismatches",
           "same_value"]
