"""`churn compress`: the fewest trees whose holdout AUC stays within a loss budget.

A boosted model's first trees carry most of its ranking power; the later ones buy little
AUC and cost latency and bytes. :func:`compress` scores a matured holdout
(:func:`mlflow_churn.evaluation.holdout.holdout_cutoffs` after the version's training
``window_end``) with growing iteration ranges ``[0, k)``, takes the smallest ``k`` whose
AUC is at least ``full AUC - budget`` (``serving.auc_loss_budget``, default 0.002),
saves ``booster[:k]`` as a new model and registers it with tags: ``parent_version``,
``trees``, ``parent_trees``, ``auc``, ``parent_auc``, ``auc_loss``, ``size_bytes``,
``parent_size_bytes``, ``latency_p50_ms`` / ``latency_p99_ms`` (one-row in-process
scoring, measured here) and the parent's training tags (feature set, window, data...)
so serving, monitoring and the gate treat it like any trained version.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import xgboost as xgb
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mlflow_churn.config import ChurnConfig
from mlflow_churn.errors import ChurnError, NotFound, is_missing
from mlflow_churn.evaluation.holdout import holdout_cutoffs, holdout_frame, parse_tag_time
from mlflow_churn.features.registry import FeatureSet
from mlflow_churn.registry.versions import register_model_version
from mlflow_churn.serving.canary import decision_run, log_json
from mlflow_churn.stats.metrics import classification_metrics
from mlflow_churn.tags import TRAIN_RUN_TAG
from mlflow_churn.tracking import fail_fast, failed_on_error, setup_mlflow
from mlflow_churn.training.model import input_example, load_scorer, log_churn_model, predict_proba

#: training tags copied from the parent version to the compressed one
INHERITED_TAGS = ("feature_set", "feature_set_hash", "window_start", "window_end", "as_of", "horizon_days",
                  "data_hash", TRAIN_RUN_TAG, "source")


@dataclass
class CompressResult:
    """The registered smaller version and what it costs / saves."""

    model_name: str
    parent_version: str
    version: str
    trees: int
    parent_trees: int
    auc: float
    parent_auc: float
    budget: float
    size_bytes: int
    parent_size_bytes: int
    latency_p50_ms: float
    latency_p99_ms: float
    parent_latency_p50_ms: float
    parent_latency_p99_ms: float
    holdout_rows: int
    run_id: str
    curve: list[tuple[int, float]]  # (trees, AUC) evaluated

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _auc(y: np.ndarray, p: np.ndarray, cfg: ChurnConfig) -> float:

    return float(classification_metrics(y, p, cfg.evaluation)["roc_auc"])


def _smallest_within_budget(booster: xgb.Booster, feature_set: FeatureSet, frame: pd.DataFrame,
                           y: np.ndarray, cfg: ChurnConfig, budget: float) -> tuple[int, float, float,
                                                                                    list[tuple[int, float]]]:
    """``(k, auc_k, full_auc, curve)``: the smallest tree count ``k`` with
    AUC(first k trees) >= full AUC - ``budget`` on ``frame`` / labels ``y``.

    Coarse pass over ~40 evenly spaced ``k``, then every ``k`` in the step below the
    first coarse hit (AUC is not monotone in ``k``, so this finds the smallest on the grid
    and exactly within the last step).
    """
    n = booster.num_boosted_rounds()
    if n < 1:
        raise ChurnError("the model has no trees to prune")
    x = feature_set.coerce(frame)
    cache: dict[int, float] = {}

    def auc_at(k: int) -> float:
        if k not in cache:
            cache[k] = _auc(y, predict_proba(booster, feature_set, x, iteration_range=(0, k)), cfg)
        return cache[k]

    full = auc_at(n)
    target = full - budget
    step = max(1, n // 40)
    grid = sorted(set(range(step, n, step)) | {n})
    hit = next(k for k in grid if auc_at(k) >= target)
    lo = max(1, hit - step + 1)
    best = next(k for k in range(lo, hit + 1) if auc_at(k) >= target)
    return best, auc_at(best), full, sorted(cache.items())


def _single_row_latency_ms(booster: xgb.Booster, feature_set: FeatureSet, frame: pd.DataFrame,
                          repeats: int = 200) -> tuple[float, float]:
    """(p50, p99) milliseconds of scoring one raw row in process, ``repeats`` times, with one
    thread per prediction as the online service scores (``booster`` is set to nthread=1)."""
    booster.set_param({"nthread": 1})
    rows = [frame.iloc[[i % len(frame)]] for i in range(min(repeats, 50))]
    for r in rows[:5]:  # warm-up
        predict_proba(booster, feature_set, r)
    times = np.empty(repeats)
    for i in range(repeats):
        row = rows[i % len(rows)]
        t0 = time.perf_counter()
        predict_proba(booster, feature_set, row)
        times[i] = (time.perf_counter() - t0) * 1000.0
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def compress(cfg: ChurnConfig, version: str | int, as_of: datetime, budget: float | None = None,
             alias: str | None = None, progress: bool = False) -> CompressResult:
    """Register the smallest-iteration-range copy of ``version`` within the AUC budget.

    ``as_of`` (tz-aware UTC): labels known up to then define the holdout (cutoffs after
    the version's ``window_end`` tag, see :func:`holdout_cutoffs`). ``budget``: allowed
    AUC loss (default ``serving.auc_loss_budget``). ``alias``: optionally point this
    alias (e.g. ``challenger``) at the new version.
    """

    budget = cfg.serving.auc_loss_budget if budget is None else float(budget)
    if budget < 0:
        raise ChurnError(f"the AUC-loss budget must be >= 0, got {budget}")
    setup_mlflow(cfg)
    uri = cfg.mlflow_tracking_uri
    client = MlflowClient(uri, uri)
    name = cfg.training.model_name
    try:
        parent = client.get_model_version(name, str(version))
    except MlflowException as exc:
        if not is_missing(exc, or_invalid=True):
            raise  # the registry did not answer: an outage, not a missing version
        raise NotFound(f"model '{name}' has no version '{version}'; see `churn canary status`") from None
    scorer = load_scorer(f"models:/{name}/{parent.version}", parent.version)
    fs, booster = scorer.feature_set, scorer.booster
    if fs.from_table:
        raise ChurnError(f"version {parent.version} was trained on a flat table; compress needs the "
                         "simulator/feature-store data to build a holdout")
    window_end = parse_tag_time(parent.tags.get("window_end"), f"tag window_end of version {parent.version}")
    cutoffs = holdout_cutoffs(as_of, cfg, window_end)
    frame = holdout_frame(cfg, fs, cutoffs, label_as_of=as_of)
    y = frame["label"].to_numpy()
    if len(frame) == 0 or y.min() == y.max():
        raise ChurnError(f"the holdout ({cutoffs[0].date()}..{cutoffs[-1].date()}) needs churners and "
                         "non-churners; move --as-of")
    k, auc_k, full_auc, curve = _smallest_within_budget(booster, fs, frame, y, cfg, budget)
    small = booster[0:k]
    parent_size = len(booster.save_raw("ubj"))
    size = len(small.save_raw("ubj"))
    raw = frame[fs.columns]
    p50, p99 = _single_row_latency_ms(small, fs, raw)
    pp50, pp99 = _single_row_latency_ms(booster, fs, raw)
    tags = {t: parent.tags[t] for t in INHERITED_TAGS if t in parent.tags}
    tags.update({
        "parent_version": str(parent.version), "compressed": "true", "trees": str(k),
        "parent_trees": str(booster.num_boosted_rounds()), "auc": f"{auc_k:.6f}",
        "parent_auc": f"{full_auc:.6f}", "auc_loss": f"{full_auc - auc_k:.6f}",
        "auc_loss_budget": str(budget), "size_bytes": str(size), "parent_size_bytes": str(parent_size),
        "latency_p50_ms": f"{p50:.4f}", "latency_p99_ms": f"{p99:.4f}",
        "holdout": f"{cutoffs[0].date()}..{cutoffs[-1].date()}",
    })

    with fail_fast(cfg, f"registering the compressed v{parent.version} of '{name}'"), \
            decision_run(cfg, f"compress v{parent.version}") as run, failed_on_error(cfg):
        mlflow.set_tags({"kind": "compress", "decision": "compressed", "model_name": name,
                         "parent_version": str(parent.version)})
        mlflow.log_params({"parent_version": parent.version, "budget": budget, "as_of": as_of.isoformat(),
                           "holdout_start": cutoffs[0].isoformat(), "holdout_end": cutoffs[-1].isoformat()})
        mlflow.log_metrics({"trees": k, "parent_trees": booster.num_boosted_rounds(), "auc": auc_k,
                            "parent_auc": full_auc, "auc_loss": full_auc - auc_k, "size_bytes": size,
                            "parent_size_bytes": parent_size, "latency_p50_ms": p50, "latency_p99_ms": p99,
                            "parent_latency_p50_ms": pp50, "parent_latency_p99_ms": pp99,
                            "holdout_rows": len(frame)})
        for trees, auc in curve:
            mlflow.log_metric("auc_by_trees", auc, step=trees)
        info = log_churn_model(small, fs, input_example(fs, raw))
        mv = register_model_version(
            client, name, info, run_id=run.info.run_id, tags={**tags, "compress_run_id": run.info.run_id},
            description=f"v{parent.version} cut to its first {k} trees (holdout AUC {auc_k:.4f}, "
                        f"parent {full_auc:.4f}); run {run.info.run_id}.",
            alias=alias, mirror_stages=cfg.evaluation.mirror_stages)
        result = CompressResult(name, str(parent.version), str(mv.version), k, booster.num_boosted_rounds(),
                                auc_k, full_auc, budget, size, parent_size, p50, p99, pp50, pp99, len(frame),
                                run.info.run_id, curve)
        log_json({**result.to_dict(), "alias": alias, "tags": tags}, "decision.json")
    return result
