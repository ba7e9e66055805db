"""Backtest of the canary judge: simulated rollouts' first step, replayed many times.

:func:`judge_backtest` measures how the judge (:mod:`mlflow_churn.serving.judge`) decides the
first step of a rollout on traffic whose truth is known:

1. **Models** (real XGBoost boosters on the real features of ``data_dir``, the offline builder):
   the champion and a *good* challenger (same recipe, another seed and row sample) are trained
   on the customers no model validates on, at weekly cutoffs ending ``label_horizon_days + 1``
   days before the data's newest day; the *bad model* is a worse one (one shallow tree per
   round, few rounds, trained on the static account columns only: no usage, sessions,
   support or payment history). Each gets a Platt calibration (its validation customers'
   labels), as training stores in the profile, for the label-free AUC / recall@k estimate.
2. **Traffic**: the customers active on each of the data's last 7 days, scored once by every
   model; ``bad_feature`` is the good challenger reading one feature scaled wrong (the
   challenger's highest-gain numeric feature x ``feature_scale``, default 0.01: an integration
   bug, e.g. a count read in hundreds). Each request also gets a latency (log-normal, the same for both arms),
   a 0.1 % error chance and a 2 % chance of an unknown customer (``not_found``).
3. **Replays**: per scenario and replay, customers are drawn at random (with replacement) into
   the canary arm (``min_requests`` = ``canary.min_requests``, else
   ``serving.min_canary_samples``) and the champion arm (in the ratio of the first rollout
   step's weight, ``canary.steps[0].weight``). The judge looks after every ``look_every``
   canary requests: ``fail`` rolls back at once (the requests needed = that look); after the
   last look ``pass`` promotes (advances the rollout), ``marginal`` pauses.

Scenarios: ``good`` (the good challenger), ``bad_feature``, ``bad_model``, ``aa`` (the
champion in both arms: every rollback is a false one). Labels have not matured during a
first step, so performance is the judge's label-free estimate.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xgboost as xgb
from sklearn.metrics import roc_auc_score

from mlflow_churn.config import ChurnConfig
from mlflow_churn.data.bounds import latest_as_of
from mlflow_churn.data.groups import holdout_mask, validation_mask
from mlflow_churn.errors import ChurnError
from mlflow_churn.features.offline import build_training_frame, daily_cutoffs
from mlflow_churn.features.registry import FeatureSet, registry_for
from mlflow_churn.jsonable import jsonable
from mlflow_churn.progress import ProgressArg, resolve
from mlflow_churn.serving.judge import JudgeGrade, MetricCall, judge
from mlflow_churn.stats.performance import fit_calibration
from mlflow_churn.training.model import predict_proba

SCENARIOS = ("good", "bad_feature", "bad_model", "aa")
#: what the bad model may read: the account's static columns (no behaviour)
STATIC_COLUMNS = ("plan", "region", "contract", "payment_method", "paperless_billing", "num_lines", "age",
                  "monthly_charge", "tenure_days")
ERROR_RATE = 0.001
NOT_FOUND_RATE = 0.02
LATENCY_MEDIAN_MS = 8.0
LATENCY_SIGMA = 0.35


@dataclass
class ScenarioResult:
    """How the judge decided one scenario's replays: shares promoted / rolled back / paused,
    the canary requests each decision needed (rollbacks stop early; the others take the step)."""

    scenario: str
    replays: int
    promoted: float
    rolled_back: float
    paused: float
    requests_median: float
    rollback_requests_median: float  # NaN without a rollback
    rolled_back_first_look: float  # share of replays rolled back at the first look
    failed_metrics: dict[str, int] = field(default_factory=dict)  # metric -> replays it failed in


@dataclass
class JudgeBacktest:
    """Every scenario's result and the setup they share."""

    scenarios: list[ScenarioResult]
    min_requests: int
    canary_weight: float
    look_every: int
    champion_requests: int
    feature: str  # bad_feature: the feature scaled wrong
    feature_scale: float
    holdout_auc: dict[str, float]  # model -> AUC on the labelled traffic customers

    def to_dict(self) -> dict[str, Any]:
        return jsonable(asdict(self))

    def scenario(self, name: str) -> ScenarioResult:
        for s in self.scenarios:
            if s.scenario == name:
                return s
        raise KeyError(name)


@dataclass
class _Pool:
    """The traffic: each model's score per customer-day, and the bad_feature setup."""

    scores: dict[str, np.ndarray]  # champion | good | bad_model | bad_feature
    calibration: dict[str, dict[str, Any]]
    feature: str
    holdout_auc: dict[str, float]


def _fit(fs: FeatureSet, frame: pd.DataFrame, rounds: int, depth: int, seed: int, subsample: float = 1.0,
         columns: tuple[str, ...] | None = None) -> xgb.Booster:
    x = fs.coerce(frame)
    if columns is not None:  # the other columns present but empty: the model cannot use them
        x = x.copy()
        for c in x.columns:
            if c not in columns:
                x[c] = np.nan if x[c].dtype.kind == "f" else x[c].iloc[:0].reindex(x.index)
    params = {"objective": "binary:logistic", "max_depth": depth, "eta": 0.1, "seed": seed, "nthread": 1,
              "subsample": subsample}
    return xgb.train(params, xgb.DMatrix(x, label=frame["label"].to_numpy(), enable_categorical=True), rounds)


def _top_numeric(booster: xgb.Booster, fs: FeatureSet, frame: pd.DataFrame) -> str:
    gain = booster.get_score(importance_type="total_gain")
    numeric = [c for c in fs.columns
               if pd.api.types.is_float_dtype(frame[c]) or pd.api.types.is_integer_dtype(frame[c])]
    ranked = sorted((c for c in numeric if c in gain), key=lambda c: -gain[c])
    if not ranked:
        raise ChurnError("judge backtest: the challenger uses no numeric feature; bad_feature has nothing "
                         "to scale")
    return ranked[0]


def build_pool(cfg: ChurnConfig, data_dir: Path, feature_scale: float = 0.01, seed: int = 0) -> _Pool:
    """Train the models on ``data_dir`` and score the traffic once (see the module doc)."""
    fs = registry_for(cfg).feature_set(cfg.features.feature_set)
    horizon = cfg.features.label_horizon_days
    newest = latest_as_of(data_dir)
    end = newest - timedelta(days=horizon + 1)
    cutoffs = daily_cutoffs(end - timedelta(days=28), end, cfg.training.cutoff_every_days)
    full = build_training_frame(data_dir, fs, cutoffs, horizon)
    held = holdout_mask(full["customer_id"], cfg)
    frame, test = full[~held].reset_index(drop=True), full[held]
    if frame["label"].sum() < 20:
        raise ChurnError(f"judge backtest: {int(frame['label'].sum())} churners in the training window of "
                         f"{data_dir}; simulate more customers or days (churn simulate)")
    val = validation_mask(frame["customer_id"], cfg)
    train, valid = frame[~val], frame[val]
    models = {
        "champion": _fit(fs, train, 40, 4, seed, 0.8),
        "good": _fit(fs, train, 40, 4, seed + 1, 0.8),
        "bad_model": _fit(fs, train, 10, 1, seed + 2, 0.8, columns=STATIC_COLUMNS),
    }
    calibration = {m: fit_calibration(predict_proba(b, fs, valid), valid["label"].to_numpy())
                   for m, b in models.items()}
    traffic_days = daily_cutoffs(newest - timedelta(days=6), newest, 1)
    traffic = build_training_frame(data_dir, fs, traffic_days, horizon, label=False)
    feature = _top_numeric(models["good"], fs, train)
    scaled = traffic.copy()
    scaled[feature] = scaled[feature] * feature_scale
    scores = {m: predict_proba(b, fs, traffic) for m, b in models.items()}
    scores["bad_feature"] = predict_proba(models["good"], fs, scaled)
    calibration["bad_feature"] = calibration["good"]
    # how good each model is: the training cutoffs' holdout customers (never trained or validated on)
    test_scaled = test.copy()
    test_scaled[feature] = test_scaled[feature] * feature_scale
    auc = {m: float(roc_auc_score(test["label"], predict_proba(b, fs, test))) for m, b in models.items()}
    auc["bad_feature"] = float(roc_auc_score(test["label"], predict_proba(models["good"], fs, test_scaled)))
    return _Pool(scores, calibration, feature, auc)


def _arm(scores: np.ndarray, n: int, rng: np.random.Generator) -> pd.DataFrame:
    """``n`` requests of one arm: customers drawn from the traffic, their status and latency."""
    u = rng.random(n)
    status = np.where(u < NOT_FOUND_RATE, "not_found",
                      np.where(u < NOT_FOUND_RATE + ERROR_RATE, "error", "ok"))
    score = scores[rng.integers(0, scores.size, n)]
    return pd.DataFrame({"status": status, "score": np.where(status == "ok", score, np.nan),
                         "latency_ms": rng.lognormal(math.log(LATENCY_MEDIAN_MS), LATENCY_SIGMA, n)})


def replay(pool: _Pool, scenario: str, cfg: ChurnConfig, rng: np.random.Generator, min_requests: int,
           champion_per_canary: float, look_every: int) -> tuple[str, int, list[str]]:
    """One replay of a first step: ``(promoted | rolled_back | paused, canary requests needed,
    failed metrics at the decision)``."""
    model = "champion" if scenario == "aa" else scenario
    champ_all = _arm(pool.scores["champion"], int(math.ceil(min_requests * champion_per_canary)), rng)
    canary_all = _arm(pool.scores[model], min_requests, rng)
    calibration = {"champion": pool.calibration["champion"], "canary": pool.calibration[model]}
    looks = list(range(look_every, min_requests, look_every)) + [min_requests]
    for k in looks:
        v = judge(champ_all.iloc[: int(math.ceil(k * champion_per_canary))], canary_all.iloc[:k], cfg,
                  calibration=calibration)
        failed = [m.name for m in v.metrics if m.decision == MetricCall.FAIL]
        if v.verdict == JudgeGrade.FAIL:
            return "rolled_back", k, failed
    return ("promoted" if v.verdict == JudgeGrade.PASS else "paused"), min_requests, failed


def judge_backtest(cfg: ChurnConfig, data_dir: Path, scenarios: tuple[str, ...] = SCENARIOS,
                   replays: int = 200, look_every: int | None = None, feature_scale: float = 0.01,
                   seed: int = 0, progress: ProgressArg = None) -> JudgeBacktest:
    """Replay ``replays`` first rollout steps of each of ``scenarios`` through the judge.

    ``data_dir``: a simulated (or real) dataset (``churn simulate``); ``look_every``: canary
    requests between two looks of the judge (default ``min_requests // 5``);
    ``feature_scale``: the bad_feature factor. Deterministic for a ``seed``.
    """
    unknown = [s for s in scenarios if s not in SCENARIOS]
    if unknown or not scenarios:
        raise ChurnError(f"unknown scenario(s) {unknown or '(none)'}; use one or more of "
                         f"{', '.join(SCENARIOS)}")
    if replays < 1:
        raise ChurnError(f"replays must be >= 1, got {replays}")
    if not (math.isfinite(feature_scale) and feature_scale > 0 and feature_scale != 1):
        raise ChurnError(f"feature_scale must be a positive factor other than 1, got {feature_scale}")
    min_requests = cfg.canary.needed(cfg.serving)
    weight = float(cfg.canary.steps[0].weight or 100.0)
    champion_per_canary = (100.0 - weight) / weight if weight < 100 else 1.0
    look_every = look_every or max(1, min_requests // 5)
    if look_every < 1:
        raise ChurnError(f"look_every must be >= 1 canary requests, got {look_every}")
    pool = build_pool(cfg, Path(data_dir), feature_scale, seed)
    results = []
    with resolve(progress)("judge backtest", replays * len(scenarios)) as tick:
        for i, scenario in enumerate(scenarios):
            rng = np.random.default_rng([seed, i])
            outcomes, needed, fails = [], [], {}
            for _ in range(replays):
                outcome, k, failed = replay(pool, scenario, cfg, rng, min_requests, champion_per_canary,
                                            look_every)
                outcomes.append(outcome)
                needed.append(k)
                if outcome == "rolled_back":
                    for m in failed:
                        fails[m] = fails.get(m, 0) + 1
                tick(1)
            out = np.array(outcomes)
            req = np.array(needed)
            rolled = out == "rolled_back"
            results.append(ScenarioResult(
                scenario, replays, float((out == "promoted").mean()), float(rolled.mean()),
                float((out == "paused").mean()), float(np.median(req)),
                float(np.median(req[rolled])) if rolled.any() else float("nan"),
                float((rolled & (req == look_every)).mean()), fails))
    return JudgeBacktest(results, min_requests, weight, look_every,
                         int(math.ceil(min_requests * champion_per_canary)), pool.feature, feature_scale,
                         pool.holdout_auc)


__all__ = ["SCENARIOS", "JudgeBacktest", "ScenarioResult", "build_pool", "judge_backtest", "replay"]
