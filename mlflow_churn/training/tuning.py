"""Optuna (TPE, seeded) over ``xgboost.XGBClassifier`` (hist, native categoricals), every trial a
nested MLflow run.

Search space (:func:`suggest_params`): learning_rate [0.01, 0.3] (log), max_depth [2, 8],
min_child_weight [0.5, 20] (log), subsample [0.5, 1], colsample_bytree [0.4, 1],
reg_alpha [1e-3, 10] (log), reg_lambda [1e-3, 20] (log), n_estimators
[min(50, max_estimators), max_estimators] (log) with early stopping on validation AUC after
``early_stopping_rounds`` rounds without improvement.

Pruning: a :class:`optuna.pruners.MedianPruner` fed by a boosting callback that reports the
validation AUC every :data:`REPORT_EVERY` rounds (optuna-integration's
XGBoostPruningCallback does the same per round; reporting every 10th round keeps a shared
RDB study from turning every boosting round into a database write).

Distributed: with an RDB ``storage`` URL (``postgresql://...``, ``sqlite:///...``) several
processes call :func:`run_trials` on the same study; each trial logs a run under the same
parent (tag ``mlflow.parentRunId``) with :class:`~mlflow.tracking.MlflowClient`, so a worker
process needs no active run of its own.

Same data, seed and trial count give the same trials in one process (TPE is seeded and
XGBoost's hist method is deterministic); a ``timeout`` or several workers make the set of
trials depend on timing.
"""

from __future__ import annotations

import functools
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import optuna
import pandas as pd
import xgboost as xgb
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from mlflow_churn.config import ChurnConfig, sqlalchemy_url
from mlflow_churn.errors import ChurnError, NotFound, first_line
from mlflow_churn.tracking import client_run

REPORT_EVERY = 10
WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class TrialRecord:
    """One finished trial as the summary shows it."""

    number: int
    state: str
    val_auc: float | None
    n_trees: int | None
    worker: str
    run_id: str | None
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class TuningResult:
    """The study after this process's trials: best trial over every process's trials."""

    study_name: str
    best_params: dict[str, Any]
    best_value: float
    best_trial: int
    best_n_trees: int
    n_complete: int
    n_pruned: int
    n_failed: int
    trials: list[TrialRecord]


def suggest_params(trial: optuna.Trial, max_estimators: int) -> dict[str, Any]:
    """The search space (see the module doc); returns the sampled XGBClassifier params."""
    low_trees = min(50, max_estimators)
    return {
        "learning_rate": trial.suggest_float("learning_rate", 0.01, 0.3, log=True),
        "max_depth": trial.suggest_int("max_depth", 2, 8),
        "min_child_weight": trial.suggest_float("min_child_weight", 0.5, 20.0, log=True),
        "subsample": trial.suggest_float("subsample", 0.5, 1.0),
        "colsample_bytree": trial.suggest_float("colsample_bytree", 0.4, 1.0),
        "reg_alpha": trial.suggest_float("reg_alpha", 1e-3, 10.0, log=True),
        "reg_lambda": trial.suggest_float("reg_lambda", 1e-3, 20.0, log=True),
        "n_estimators": trial.suggest_int("n_estimators", low_trees, max_estimators, log=True),
    }


@dataclass(frozen=True)
class FitData:
    """Coerced training and validation frames (float64 + pd.Categorical) with labels;
    ``w_valid`` (None = all 1) weighs the validation AUC that early stopping and the trials'
    objective read (a targeted retrain weighs its segments there as in the fit)."""

    x_train: pd.DataFrame
    y_train: np.ndarray
    w_train: np.ndarray | None
    x_valid: pd.DataFrame
    y_valid: np.ndarray
    w_valid: np.ndarray | None = None


def make_classifier(params: dict[str, Any], seed: int, early_stopping_rounds: int,
                    callbacks: list[xgb.callback.TrainingCallback] | None = None,
                    nthread: int = 0) -> xgb.XGBClassifier:
    """An ``XGBClassifier`` of sampled ``params`` (hist, native categoricals, binary:logistic,
    early stopping on validation AUC); ``nthread`` 0 = all cores."""
    return xgb.XGBClassifier(
        **params, objective="binary:logistic", eval_metric="auc", tree_method="hist",
        enable_categorical=True, early_stopping_rounds=early_stopping_rounds, random_state=int(seed),
        n_jobs=int(nthread) or None, callbacks=callbacks, verbosity=0,
    )


class _PruningCallback(xgb.callback.TrainingCallback):
    """Report the validation AUC to the trial every REPORT_EVERY rounds; stop when pruned."""

    def __init__(self, trial: optuna.Trial) -> None:
        super().__init__()
        self.trial = trial
        self.pruned_at: int | None = None
        self.last_auc: float | None = None

    def after_iteration(self, model: xgb.Booster, epoch: int, evals_log: dict) -> bool:
        if (epoch + 1) % REPORT_EVERY:
            return False
        self.last_auc = float(next(iter(evals_log.values()))["auc"][-1])
        self.trial.report(self.last_auc, epoch)
        if self.trial.should_prune():
            self.pruned_at = epoch
            return True
        return False


def fit_classifier(params: dict[str, Any], data: FitData, seed: int, early_stopping_rounds: int,
                   callbacks: list[xgb.callback.TrainingCallback] | None = None,
                   nthread: int = 0) -> xgb.XGBClassifier:
    """Fit with early stopping on the validation AUC, weighted by ``data.w_valid`` when given
    (``best_iteration`` / ``best_score`` set)."""
    clf = make_classifier(params, seed, early_stopping_rounds, callbacks, nthread)
    clf.fit(data.x_train, data.y_train, sample_weight=data.w_train,
            eval_set=[(data.x_valid, data.y_valid)], verbose=False,
            sample_weight_eval_set=None if data.w_valid is None else [data.w_valid])
    return clf


def storage_url(url: str | None) -> str | None:
    """An Optuna storage URL SQLAlchemy can open here: a PostgreSQL one with psycopg 3
    (:func:`mlflow_churn.config.sqlalchemy_url`)."""
    return sqlalchemy_url(url) if url else None


@functools.lru_cache(maxsize=8)
def _rdb_storage(url: str) -> optuna.storages.RDBStorage:
    """The Optuna storage of ``url`` for this process, opened once: a study opened with a URL
    string gets a new SQLAlchemy engine (and its pool of connections) each time, so a loop
    waiting for the leader's study held one more PostgreSQL connection per poll."""
    return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})


def study_storage(url: str | None) -> optuna.storages.BaseStorage | None:
    """The storage of ``url`` (:func:`storage_url`) shared by every study this process opens on
    it; None (in memory) without one. Opening it creates Optuna's tables when they are missing."""
    plain = storage_url(url)
    return _rdb_storage(plain) if plain else None


def make_study(study_name: str, storage: str | None, seed: int | None, create: bool = True) -> optuna.Study:
    """Create (or, with ``create=False``, load) a maximising TPE study with a median pruner.
    NotFound when ``create=False`` and the storage has no such study; ChurnError when the
    storage cannot be opened."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = storage_url(storage)
    sampler = optuna.samplers.TPESampler(seed=seed)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=2 * REPORT_EVERY,
                                         interval_steps=REPORT_EVERY)
    try:
        storage = study_storage(url)
        if create:
            return optuna.create_study(study_name=study_name, storage=storage, sampler=sampler,
                                       pruner=pruner, direction="maximize", load_if_exists=True)
        return optuna.load_study(study_name=study_name, storage=storage, sampler=sampler, pruner=pruner)
    except KeyError:
        raise NotFound(f"no Optuna study '{study_name}' in {url}; start the leader "
                         "(`churn train --storage URL --study NAME`) first") from None
    except Exception as exc:  # SQLAlchemy / driver errors for an unreachable storage
        first = first_line(exc)
        raise ChurnError(f"cannot open Optuna storage {url}: {first[:200]}; "
                         "check --storage / training.storage") from None


def wait_for_study(study_name: str, storage: str, wait_seconds: float, poll: float = 1.0) -> optuna.Study:
    """Load ``study_name`` once its leader has published ``parent_run_id`` (ChurnError after
    ``wait_seconds``; a storage that cannot be opened fails at once: only a study not created
    yet, :class:`~mlflow_churn.errors.NotFound`, is waited for)."""
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            study = make_study(study_name, storage, seed=None, create=False)
            if "parent_run_id" in study.user_attrs:
                return study
        except NotFound:  # the leader has not created it yet
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise ChurnError(f"study '{study_name}' in {storage} has no parent run after "
                             f"{wait_seconds:.0f} s; start the leader first")
        time.sleep(poll)


def _log_trial_run(client: MlflowClient, cfg: ChurnConfig, experiment_id: str, parent_run_id: str,
                   study_name: str, trial: optuna.Trial, params: dict[str, Any], metrics: dict[str, float],
                   state: str) -> str:
    with client_run(client, cfg, f"trial-{trial.number}", experiment_id=experiment_id,
                    parent_run_id=parent_run_id,
                    tags={"optuna.study": study_name, "optuna.trial": str(trial.number),
                          "optuna.state": state, "worker": WORKER_ID}) as run_id:
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
                         params=[Param(k, str(v)) for k, v in params.items()])
    return run_id


def run_trials(study: optuna.Study, data: FitData, *, seed: int,
               max_estimators: int, early_stopping_rounds: int, n_trials: int | None,
               timeout: float | None, client: MlflowClient, experiment_id: str,
               parent_run_id: str, cfg: ChurnConfig, on_trial: Callable[[Any], None] | None = None,
               nthread: int = 0) -> None:
    """Run ``n_trials`` trials (or until ``timeout`` seconds) of ``study`` in this process,
    each logged as a nested run of ``parent_run_id`` (``cfg``: where a run the tracking
    server could not end FAILED is journalled, see :func:`mlflow_churn.tracking.client_run`)."""
    name = study.study_name

    def objective(trial: optuna.Trial) -> float:
        params = suggest_params(trial, max_estimators)
        pruning = _PruningCallback(trial)
        clf = fit_classifier(params, data, seed, early_stopping_rounds, [pruning], nthread)
        trial.set_user_attr("worker", WORKER_ID)
        if pruning.pruned_at is not None:
            run_id = _log_trial_run(client, cfg, experiment_id, parent_run_id, name, trial, params,
                                    {"val_auc": pruning.last_auc or 0.0,
                                     "n_trees": pruning.pruned_at + 1}, "PRUNED")
            trial.set_user_attr("run_id", run_id)
            raise optuna.TrialPruned(f"pruned at round {pruning.pruned_at + 1}")
        auc = float(clf.best_score)
        n_trees = int(clf.best_iteration) + 1
        trial.set_user_attr("n_trees", n_trees)
        run_id = _log_trial_run(client, cfg, experiment_id, parent_run_id, name, trial, params,
                                {"val_auc": auc, "n_trees": n_trees}, "COMPLETE")
        trial.set_user_attr("run_id", run_id)
        return auc

    callbacks = [(lambda _s, t: on_trial(t))] if on_trial else []
    study.optimize(objective, n_trials=n_trials, timeout=timeout, callbacks=callbacks,
                   gc_after_trial=False, show_progress_bar=False)


def wait_for_running(study: optuna.Study, wait_seconds: float, poll: float = 1.0) -> int:
    """Wait (at most ``wait_seconds``) until no trial of ``study`` is running; return how
    many still run (trials of other workers that the best-trial choice will not see)."""
    deadline = time.monotonic() + wait_seconds
    while True:
        running = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)))
        if running == 0 or time.monotonic() > deadline:
            return running
        time.sleep(poll)


def summarize(study: optuna.Study) -> TuningResult:
    """Best trial and per-trial records of ``study`` (all processes' trials)."""
    trials = study.get_trials(deepcopy=False)
    states = optuna.trial.TrialState
    complete = [t for t in trials if t.state == states.COMPLETE]
    if not complete:
        raise ChurnError(f"no trial of study '{study.study_name}' completed "
                         f"({len(trials)} trials, pruned or failed); raise --n-trials or --timeout")
    best = study.best_trial
    records = [
        TrialRecord(t.number, t.state.name, t.value if t.state == states.COMPLETE else
                    (t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None),
                    t.user_attrs.get("n_trees"), t.user_attrs.get("worker", ""), t.user_attrs.get("run_id"),
                    dict(t.params))
        for t in trials
    ]
    return TuningResult(
        study_name=study.study_name,
        best_params=dict(best.params),
        best_value=float(best.value),
        best_trial=best.number,
        best_n_trees=int(best.user_attrs.get("n_trees", best.params["n_estimators"])),
        n_complete=len(complete),
        n_pruned=sum(t.state == states.PRUNED for t in trials),
        n_failed=sum(t.state == states.FAIL for t in trials),
        trials=records,
    )


__all__ = [
    "REPORT_EVERY", "FitData", "TrialRecord", "TuningResult", "fit_classifier", "make_classifier",
    "storage_url",
    "study_storage",
    "make_study", "run_trials", "suggest_params", "summarize", "wait_for_running", "wait_for_study",
]
