"""Reference profile of a model's training data, computed once and logged with the model.

Training calls :func:`build_profile` on its validation (reference) frame and the model's
scores on it, and logs the result as ``reference/profile.json`` in the training run.
Monitoring reads it back with :func:`profile_for_version`, so it never re-reads the
training data.

Layout (JSON-able dict, typed as :class:`ReferenceProfile`)::

    {"schema_version": 1, "format": 1, "bins": 10, "rows": N, "feature_set": ..., "feature_set_hash": ...,
     "features": {name: ENTRY, ...},
     "score": ENTRY (numeric),
     "segments": {column: {value: {"count": n, "share": s,
                                    "features": {name: {"shares": [...], "null_rate": r,
                                                        "count": n}},
                                    "score": {"shares": [...], "count": n, "null_rate": r}}}},
     "calibration": {"method": "platt", "a": .., "b": .., "rows": n, "positives": k} | None,
     "sources": {"activity.<column>": {"null_rate": r, "rows": n}} | None}

    numeric ENTRY:     {"kind": "numeric", "edges": [interior quantile edges],
                        "shares": [len(edges)+1 reference shares], "count": non-missing rows,
                        "null_rate": r, "sample": [sorted sample, <= sample_size],
                        "mean", "std", "min", "max"}
    categorical ENTRY: {"kind": "categorical", "categories": [...],
                        "shares": [per category ..., share of __unseen__ (0)],
                        "count": n, "null_rate": r}

Segment entries reuse the population's bins (edges / categories), so a segment's current
window is binned exactly like the population; their ``count`` feeds the size-aware
PSI threshold (:func:`mlflow_churn.stats.drift.psi_threshold`). ``calibration`` (the
Platt map of the scores, fitted on the validation rows) and ``sources`` (null rates of the
raw source columns over the training window, :mod:`mlflow_churn.data.sources`) are
given by training (:mod:`mlflow_churn.training.baseline`); older profiles lack them.

The profile is a payload training writes and evaluation, monitoring, serving and retrain
read: it is written by :func:`profile_json` only (:func:`save_profile` and training's
``reference/profile.json`` both use it) and read by :func:`profile_from_dict` only
(:func:`load_profile`, :func:`profile_for_version`). ``schema_version`` is
:data:`PROFILE_SCHEMA_VERSION`; a profile without one (written by an earlier release) is
version 1, a newer version than this release knows is a ChurnError. ``format`` (1) stays for
the readers of earlier releases.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import pandas as pd

from mlflow_churn.errors import ChurnError, NotFound, is_missing
from mlflow_churn.features.registry import FeatureSet
from mlflow_churn.stats import drift
from mlflow_churn.stats.drift import ColumnKind
from mlflow_churn.tags import TRAIN_RUN_TAG
from mlflow_churn.tracking import download_artifact, server_failure

PROFILE_FORMAT = 1
#: the ``schema_version`` :func:`build_profile` writes; a profile without one is version 1
PROFILE_SCHEMA_VERSION = 1
PROFILE_ARTIFACT = "reference/profile.json"
SCORE = "__score__"


class ProfileEntry(TypedDict, total=False):
    """One column's reference distribution (see the module doc): ``kind`` numeric (``edges``,
    ``sample``, ``mean``, ``std``, ``min``, ``max``) or categorical (``categories``), with the
    bins' ``shares``, the non-missing ``count`` and the ``null_rate``."""

    kind: str
    edges: list[float]
    categories: list[str]
    shares: list[float]
    count: int
    null_rate: float
    sample: list[float]
    mean: float | None
    std: float | None
    min: float | None
    max: float | None


class SegmentProfile(TypedDict):
    """One segment value's rows: their count and share, and each feature's and the score's
    shares in the population's bins."""

    count: int
    share: float
    features: dict[str, dict[str, Any]]
    score: dict[str, Any]


class ReferenceProfile(TypedDict):
    """The reference profile of a model's training data (module doc: layout and versions)."""

    schema_version: int
    format: int
    bins: int
    rows: int
    feature_set: str
    feature_set_hash: str
    features: dict[str, ProfileEntry]
    score: ProfileEntry
    segments: dict[str, dict[str, SegmentProfile]]
    calibration: dict[str, Any] | None
    sources: dict[str, Any] | None


class NoProfile(ChurnError):
    """There is no usable reference profile: the version's training run logged none (a model
    trained before profiles, or registered from elsewhere) or the file is not a profile.
    Not an outage of the store (that is a plain ChurnError): asking again will not help."""


def _numeric_entry(values: Any, bins: int, sample_size: int, rng: np.random.Generator,
                   row_bins: bool = True) -> tuple[dict[str, Any], np.ndarray | None]:
    """A numeric column's entry and the bin of each of its rows (-1 = missing; None unless
    ``row_bins``: only segments need them).

    One sort of the non-missing values gives the quantile edges (``np.quantile`` of sorted
    data is cheap and order-free) and the bin counts (one lookup per edge); the sample is
    drawn from the values in row order, as before, so the entry's numbers do not change."""
    arr = drift.as_float_array(values)
    missing = np.isnan(arr)
    finite = arr[~missing]
    ordered = np.sort(finite)
    edges = drift.quantile_edges(ordered, bins)
    below = np.searchsorted(ordered, edges, side="right")  # values <= each edge
    counts = np.diff(np.concatenate([[0], below, [ordered.size]]))
    if finite.size > sample_size:
        sample = np.sort(rng.choice(finite, size=sample_size, replace=False))
    else:
        sample = ordered
    idx = drift.edge_bins(arr, edges) if row_bins else None
    return {
        "kind": ColumnKind.NUMERIC.value,
        "edges": edges.tolist(),
        "shares": drift.shares(counts).tolist(),
        "count": int(finite.size),
        "null_rate": float(missing.mean()) if arr.size else 0.0,
        "sample": sample.tolist(),
        "mean": float(finite.mean()) if finite.size else None,
        "std": float(finite.std()) if finite.size else None,
        "min": float(finite.min()) if finite.size else None,
        "max": float(finite.max()) if finite.size else None,
    }, idx


def _codes(values: Any) -> tuple[np.ndarray, list[str]]:
    """Codes of a column's values (-1 = missing) and each code's value as a string; a pandas
    categorical by its codes, anything else by ``pd.factorize`` (no per-row string work)."""
    s = values if isinstance(values, pd.Series) else pd.Series(values)
    if isinstance(s.dtype, pd.CategoricalDtype):
        return s.cat.codes.to_numpy().astype("int64"), [str(c) for c in s.cat.categories]
    codes, uniques = pd.factorize(s)
    return codes.astype("int64"), [str(u) for u in pd.Series(uniques).astype("object")]


def _categorical_entry(values: Any, categories: Sequence[str]) -> tuple[dict[str, Any], np.ndarray]:
    """A categorical column's entry (the given categories, then the observed others sorted)
    and the bin of each of its rows (-1 = missing)."""
    codes, names = _codes(values)
    seen = np.bincount(codes[codes >= 0], minlength=len(names))
    cats = [str(c) for c in categories]
    known = set(cats)
    cats = cats + sorted({names[i] for i in np.flatnonzero(seen)} - known)
    pos = {c: i for i, c in enumerate(cats)}
    lookup = np.array([pos.get(name, len(cats)) for name in names] + [-1], dtype="int64")
    idx = lookup[codes]  # code -1 (missing) -> the appended -1
    counts = np.bincount(idx[idx >= 0], minlength=len(cats) + 1)
    return {
        "kind": ColumnKind.CATEGORICAL.value,
        "categories": cats,
        "shares": drift.shares(counts).tolist(),
        "count": int(counts.sum()),
        "null_rate": float(np.count_nonzero(codes < 0) / codes.size) if codes.size else 0.0,
    }, idx


def _segment_codes(values: Any) -> tuple[np.ndarray, list[str]]:
    """Each row's segment (-1 = missing) and the segments' values as strings, sorted."""
    codes, names = _codes(values)
    used = np.bincount(codes[codes >= 0], minlength=len(names)) > 0
    keys = sorted({n for n, u in zip(names, used, strict=True) if u})
    pos = {k: i for i, k in enumerate(keys)}
    lookup = np.array([pos.get(n, -1) for n in names] + [-1], dtype="int64")
    return lookup[codes], keys


def _segment_entries(idx: np.ndarray, isna: np.ndarray, seg: np.ndarray, rows: np.ndarray,
                     n_bins: int) -> list[dict[str, Any]]:
    """Per segment: the shares of a column's rows in the population's bins (``idx``), their
    non-missing count and the share of rows ``isna`` (pandas' missing values), from one
    ``bincount`` over (segment, bin)."""
    n_seg = rows.size  # rows of each segment
    counts = drift.grouped_counts(idx, seg, n_seg, n_bins)
    nulls = np.bincount(seg[(seg >= 0) & isna], minlength=n_seg) if isna.any() else np.zeros(n_seg)
    return [{"shares": drift.shares(counts[i]).tolist(), "count": int(counts[i].sum()),
             "null_rate": float(nulls[i] / rows[i]) if rows[i] else 0.0} for i in range(n_seg)]


def build_profile(
    frame: pd.DataFrame,
    feature_set: FeatureSet,
    scores: np.ndarray,
    bins: int = 10,
    segments: Sequence[str] = (),
    sample_size: int = 10_000,
    seed: int = 0,
    calibration: dict[str, Any] | None = None,
    sources: dict[str, Any] | None = None,
) -> ReferenceProfile:
    """The reference profile (see module doc) of ``frame``'s feature-set columns and scores.

    ``frame`` holds the set's columns (raw or coerced); ``scores`` are the model's
    P(churn) on the same rows (same order); ``segments`` are categorical columns of
    ``frame`` whose every value gets its own shares. Raises ChurnError on missing columns
    or a length mismatch. ``calibration`` / ``sources`` are stored as given (see the module
    doc; :func:`mlflow_churn.training.baseline.training_baselines` computes them).
    """
    missing = [c for c in feature_set.columns if c not in frame.columns]
    if missing:
        raise ChurnError(
            f"profile frame lacks feature column(s) {', '.join(missing)} of set '{feature_set.name}'"
        )
    bad_segments = [s for s in segments if s not in frame.columns]
    if bad_segments:
        raise ChurnError(
            f"segment column(s) {', '.join(bad_segments)} not in the frame; "
            f"use categorical columns such as {', '.join(feature_set.categorical) or 'plan'}"
        )
    score_arr = np.asarray(scores, dtype="float64").ravel()
    if score_arr.size != len(frame):
        raise ChurnError(f"scores has {score_arr.size} values but the frame has {len(frame)} rows")
    if len(frame) == 0:
        raise ChurnError("cannot profile an empty frame; pass the reference (validation) rows")
    rng = np.random.default_rng(seed)
    categorical = feature_set.categorical
    features: dict[str, dict[str, Any]] = {}
    bin_of: dict[str, Any] = {}  # row bins (None without segments)
    for name in feature_set.columns:
        if name in categorical:
            features[name], bin_of[name] = _categorical_entry(frame[name], categorical[name])
        else:
            features[name], bin_of[name] = _numeric_entry(frame[name], bins, sample_size, rng, bool(segments))
    score_entry, score_bins = _numeric_entry(score_arr, bins, sample_size, rng, bool(segments))

    seg_out: dict[str, dict[str, Any]] = {}
    n = len(frame)
    isna = {f: frame[f].isna().to_numpy() for f in feature_set.columns} if segments else {}
    for col in segments:
        seg, keys = _segment_codes(frame[col])
        rows = np.bincount(seg[seg >= 0], minlength=len(keys))
        per_feature = {f: _segment_entries(bin_of[f], isna[f], seg, rows, len(features[f]["shares"]))
                       for f in feature_set.columns}
        per_score = _segment_entries(score_bins, np.isnan(score_arr), seg, rows, len(score_entry["shares"]))
        seg_out[col] = {
            value: {
                "count": int(rows[i]),
                "share": float(rows[i] / n),
                "features": {f: per_feature[f][i] for f in feature_set.columns},
                "score": per_score[i],
            }
            for i, value in enumerate(keys)
        }
    return {
        "schema_version": PROFILE_SCHEMA_VERSION,
        "format": PROFILE_FORMAT,
        "bins": int(bins),
        "rows": int(n),
        "feature_set": feature_set.name,
        "feature_set_hash": feature_set.hash,
        "features": features,
        "score": score_entry,
        "segments": seg_out,
        "calibration": calibration,
        "sources": sources,
    }


def profile_json(profile: ReferenceProfile) -> str:
    """The JSON text of ``profile`` (compact, no NaN): the one way a profile is written.
    A profile without ``schema_version`` gets :data:`PROFILE_SCHEMA_VERSION`."""
    return json.dumps({"schema_version": PROFILE_SCHEMA_VERSION, **profile}, separators=(",", ":"),
                      allow_nan=False)


def profile_from_dict(data: Any, where: str = "the profile") -> ReferenceProfile:
    """``data`` (parsed JSON) as a :class:`ReferenceProfile`: the one way a profile is read.
    Without ``schema_version`` it is version 1 (an earlier release wrote it); ChurnError on a
    newer version than this release reads, :class:`NoProfile` if it is not a profile."""
    if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT or "features" not in data:
        raise NoProfile(
            f"{where} is not a format-{PROFILE_FORMAT} reference profile; rebuild it with build_profile"
        )
    version = data.get("schema_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise NoProfile(f"{where} has schema_version {version!r}, not a positive integer; rebuild it "
                        "with build_profile")
    if version > PROFILE_SCHEMA_VERSION:
        raise ChurnError(f"{where} has schema_version {version}, newer than the {PROFILE_SCHEMA_VERSION} "
                         "this release reads; upgrade mlflow-churn")
    return {**data, "schema_version": version}  # type: ignore[return-value, typeddict-item]


def save_profile(profile: ReferenceProfile, path: str | Path) -> Path:
    """Write ``profile`` (:func:`profile_json`) to ``path`` (parents created); returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(profile_json(profile))
    return p


def load_profile(path: str | Path) -> ReferenceProfile:
    """Read a profile written by :func:`save_profile`; ChurnError if unreadable,
    :class:`NoProfile` if it is not one."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except OSError as exc:
        raise ChurnError(
            f"cannot read profile {p}: {exc.strerror}; was the model trained with a profile?"
        ) from exc
    except json.JSONDecodeError as exc:
        raise NoProfile(f"profile {p} is not valid JSON ({exc.msg}); re-log it with save_profile") from exc
    return profile_from_dict(data, str(p))


def profile_for_version(client: Any, name: str, version: str | int) -> ReferenceProfile:
    """The profile logged by the training run of registered model ``name`` version ``version``.

    Uses the version's ``train_run_id`` tag (else the version's own run id) and downloads
    ``reference/profile.json``. Raises :class:`NoProfile` when the run has no profile
    (the run's artifact listing shows none) or the version has no run, ChurnError naming
    the version for anything else (version not found, the store unreachable).
    """
    import tempfile

    from mlflow.exceptions import MlflowException

    try:
        mv = client.get_model_version(name, str(version))
    except MlflowException as exc:
        if not is_missing(exc, or_invalid=True):
            raise  # an outage (the CLI names the tracking server) or a refusal
        raise NotFound(
            f"model '{name}' version {version} not found in the registry: {exc.message}"
        ) from exc
    run_id = (mv.tags or {}).get(TRAIN_RUN_TAG) or mv.run_id
    if not run_id:
        raise NoProfile(
            f"model '{name}' version {version} has no train_run_id tag nor run; cannot find its profile"
        )
    missing = (f"run {run_id} of model '{name}' version {version} has no {PROFILE_ARTIFACT}; "
               "retrain it (training logs the profile) or log one with save_profile")
    folder = PROFILE_ARTIFACT.rsplit("/", 1)[0]
    try:
        listed = {f.path for f in client.list_artifacts(run_id, folder)}
    except (MlflowException, OSError) as exc:
        if server_failure(exc) is not None:
            raise  # an outage: the CLI names the tracking server (exit 3)
        raise ChurnError(f"cannot list the artifacts of run {run_id} of model '{name}' version {version}: "
                         f"{getattr(exc, 'message', exc)}") from exc
    if PROFILE_ARTIFACT not in listed:
        raise NoProfile(missing)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = download_artifact(client, run_id, PROFILE_ARTIFACT, tmp)
        except (MlflowException, OSError) as exc:
            if server_failure(exc) is not None:
                raise
            raise ChurnError(f"cannot download {PROFILE_ARTIFACT} of run {run_id} (model '{name}' version "
                             f"{version}): {getattr(exc, 'message', exc)}") from exc
        return load_profile(local)
