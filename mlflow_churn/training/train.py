"""The train entry point: window (or flat table) -> Optuna x XGBoost -> registered challenger.

Two sources share one path, :func:`_fit_and_register`:

- :func:`train` (``source=simulator``): point-in-time frames of the feature store for the
  cutoffs of :func:`~mlflow_churn.training.window.training_window`; validation is the
  newest ``validation_fraction`` of the production cutoffs, restricted to validation
  customers whom training never sees, and holdout customers are left out for the gate
  (:mod:`mlflow_churn.data.groups` says why); history rows carry ``history_weight``; a
  targeted retrain (``targets``, :mod:`~mlflow_churn.training.targeting`) gives the named
  segments' recent rows (production cutoffs within ``training.segment_recent_days`` of the
  newest) and validation rows ``training.segment_weight``.
- :func:`train_table` (``source=table``): a user's CSV / Parquet
  (:mod:`~mlflow_churn.training.table`); validation is a seeded stratified holdout, since a
  flat table has no time axis.

The parent MLflow run (``MLFLOW_RUN_ID`` inside ``mlflow run``, or ``parent_run_id``, else
a new run) gets params (window bounds, feature set + hash, best params), metrics (val_auc,
val_pr_auc, val_log_loss), the dataset (``mlflow.log_input``), a feature-importance PNG,
``reference/profile.json`` (:func:`mlflow_churn.training.profile.build_profile` on every
customer at the newest training cutoff, and the model's scores) and the model
(:func:`~mlflow_churn.training.model.log_churn_model`).
Each Optuna trial is a nested run. The model is registered as a new version of
``training.model_name`` with the tags of the contract and alias ``challenger``
(:func:`mlflow_churn.registry.versions.registered_version`: on a tracking server too); a
failure after the version exists deletes it again. A tracking server that fails mid-way
ends the command in seconds with one line naming it; the parent run is marked FAILED, or
journalled for the next command when the server is gone (:mod:`mlflow_churn.tracking`).

Distributed tuning: the leader (``storage`` = an Optuna RDB URL) publishes its parent run
id, the data recipe and the tuning settings as study user attributes; ``worker=True``
processes (:func:`run_worker`) load the study by name, rebuild the same frame (its
``data_hash`` must match), run trials nested under the leader's parent run and exit. The
leader waits for running trials before choosing the best one.
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient
from sklearn.metrics import average_precision_score, log_loss, roc_auc_score

from mlflow_churn.config import ChurnConfig
from mlflow_churn.data.groups import holdout_mask, validation_mask
from mlflow_churn.errors import ChurnError
from mlflow_churn.features.registry import FeatureSet, registry_for
from mlflow_churn.progress import ProgressArg, resolve
from mlflow_churn.registry.aliases import CHALLENGER
from mlflow_churn.registry.versions import registered_version
from mlflow_churn.tags import TRAIN_RUN_TAG
from mlflow_churn.tracking import fail_fast, failed_on_error, setup_mlflow, step_run
from mlflow_churn.training import tuning
from mlflow_churn.training.baseline import training_baselines
from mlflow_churn.training.frames import TrainingFrames
from mlflow_churn.training.model import log_churn_model, predict_proba
from mlflow_churn.training.profile import PROFILE_ARTIFACT, build_profile, profile_json
from mlflow_churn.training.spark_window import training_frame
from mlflow_churn.training.table import load_table
from mlflow_churn.training.targeting import SegmentTargets, segment_mask, target_weights
from mlflow_churn.training.window import TrainingWindow, training_window

LABEL, WEIGHT = "label", "weight"
DEFAULT_WAIT_SECONDS = 600.0
_log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a training run produced (``version``/``model_uri`` are None for a worker)."""

    run_id: str
    model_uri: str | None
    version: str | None
    val_auc: float
    best_params: dict[str, Any]
    feature_set_hash: str
    window_start: str
    window_end: str
    val_pr_auc: float | None = None
    val_log_loss: float | None = None
    n_trees: int | None = None
    study_name: str = ""
    n_complete: int = 0
    n_pruned: int = 0
    rows_train: int = 0
    rows_valid: int = 0
    data_hash: str = ""
    source: str = "simulator"
    feature_set: str = ""
    profile_logged: bool = False
    trials: list[tuning.TrialRecord] = field(default_factory=list)
    targets: SegmentTargets | None = None


def _check_classes(y: np.ndarray, what: str) -> None:
    classes = np.unique(y)
    if len(classes) < 2:
        only = int(classes[0]) if len(classes) else "-"
        raise ChurnError(f"the {what} rows ({len(y)}) hold a single class ({only}); "
                         "widen the window (training.window_days / history_days) or use more data")


def time_split(frame: pd.DataFrame, window: TrainingWindow, fraction: float,
               cfg: ChurnConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, valid) of the training window's rows, see :mod:`mlflow_churn.data.groups`:

    - holdout customers are dropped (the gate scores them later);
    - valid = validation customers at the newest ``round(fraction * n)`` production
      cutoffs (at least one): the most recent slice, of customers training never sees;
    - train = every other customer at every cutoff, history included.
    """
    prod = list(window.production_cutoffs)
    n_valid = max(1, round(fraction * len(prod)))
    if len(window.cutoffs) - n_valid < 1:
        raise ChurnError(
            f"the training window holds {len(window.cutoffs)} cutoff(s) ({window.window_start.date()} .. "
            f"{window.window_end.date()}), too few for a time-based validation split; raise "
            "training.window_days or lower training.cutoff_every_days"
        )
    ids = frame["customer_id"]
    holdout, validation = holdout_mask(ids, cfg), validation_mask(ids, cfg)
    newest = (frame["cutoff"] >= pd.Timestamp(prod[-n_valid])).to_numpy()
    train = frame[~holdout & ~validation]
    valid = frame[validation & newest]
    return train.reset_index(drop=True), valid.reset_index(drop=True)


def prepare_window(cfg: ChurnConfig, as_of: datetime,
                   targets: SegmentTargets | None = None) -> TrainingFrames:
    """Frames of the training window ending before ``as_of`` (see the module doc); with
    ``targets``, the targeted segments' rows at the production cutoffs weigh ``targets.weight``."""
    window = training_window(as_of, cfg)
    fs = registry_for(cfg).feature_set(cfg.features.feature_set)
    frame = training_frame(cfg, fs, window.cutoffs, cfg.features.label_horizon_days)
    if frame.empty:
        raise ChurnError(f"the training window {window.window_start.date()} .. {window.window_end.date()} "
                         f"has no customers in {cfg.data_dir}; check the data or --as-of")
    in_history = frame["cutoff"].isin(pd.to_datetime(list(window.history_cutoffs), utc=True)).to_numpy()
    recent_from = window.window_end - timedelta(days=cfg.training.segment_recent_days)
    recent = ~in_history & (frame["cutoff"] > pd.Timestamp(recent_from)).to_numpy()
    frame[WEIGHT], _ = target_weights(frame, np.where(in_history, window.history_weight, 1.0), recent,
                                      targets)
    train, valid = time_split(frame, window, cfg.training.validation_fraction, cfg)
    # the monitoring reference: every customer at the newest cutoff, one row each, like the
    # population that production scores (trained customers included, as in production)
    reference = frame[frame["cutoff"] == frame["cutoff"].max()]
    _check_classes(train[LABEL].to_numpy(), "training")
    _check_classes(valid[LABEL].to_numpy(), "validation")
    params = window.to_params() | {"horizon_days": str(cfg.features.label_horizon_days),
                                   "history_weight": str(window.history_weight),
                                   "validation_from": valid["cutoff"].min().isoformat(),
                                   "validation": "newest cutoffs of validation customers (never trained on)",
                                   "holdout_customer_fraction": str(cfg.evaluation.holdout_customer_fraction),
                                   "validation_customer_fraction":
                                       str(cfg.training.validation_customer_fraction)}
    recipe: dict[str, Any] = {"source": "simulator", "as_of": window.as_of.isoformat()}
    if targets is not None:
        weighted = (train[WEIGHT] == targets.weight).to_numpy()  # the training rows that got it
        rows = {k: int((segment_mask(train, [k]) & weighted).sum()) for k in targets.segments}
        params |= {"target_segments": ",".join(targets.segments), "segment_weight": f"{targets.weight:g}",
                   "target_rows": ",".join(f"{k}:{n}" for k, n in rows.items()),
                   "segment_recent_days": str(cfg.training.segment_recent_days)}
        recipe |= {"target_segments": list(targets.segments), "segment_weight": targets.weight}
    return TrainingFrames(
        source="simulator", feature_set=fs, train=train, valid=valid,
        dataset_source=str(cfg.data_dir.resolve()), params=params, recipe=recipe,
        window_start=window.window_start.isoformat(), window_end=window.window_end.isoformat(),
        as_of=window.as_of.isoformat(),
        segments=tuple(s for s in cfg.monitoring.segments if s in fs.columns),
        reference=reference.reset_index(drop=True), targets=targets,
    )


def prepare_table(cfg: ChurnConfig, path: Path | str, label: str,
                  id_column: str | None = None) -> TrainingFrames:
    """Frames of a flat table with a seeded stratified holdout (see :mod:`.table`)."""
    from sklearn.model_selection import train_test_split

    data = load_table(path, label, id_column)
    fs = data.feature_set
    frame = data.features.copy()
    if data.ids is not None:
        frame.insert(0, "row_id", data.ids.astype(str).to_numpy())
    frame[LABEL] = data.label
    frame[WEIGHT] = 1.0
    counts = np.bincount(data.label, minlength=2)
    stratify = data.label if counts.min() >= 2 else None
    train, valid = train_test_split(frame, test_size=cfg.training.validation_fraction,
                                    random_state=cfg.training.seed, stratify=stratify)
    train, valid = train.reset_index(drop=True), valid.reset_index(drop=True)
    _check_classes(train[LABEL].to_numpy(), "training")
    _check_classes(valid[LABEL].to_numpy(), "validation")
    resolved = str(Path(path).resolve())
    return TrainingFrames(
        source="table", feature_set=fs, train=train, valid=valid, dataset_source=resolved,
        params={"table": resolved, "label_column": label, "id_column": id_column or "",
                "validation": "seeded stratified holdout"},
        recipe={"source": "table", "table": resolved, "label": label, "id": id_column or ""},
        artifacts={"schema.json": data.schema},
        segments=(),
    )


def _prepare_from_recipe(cfg: ChurnConfig, recipe: dict[str, Any]) -> TrainingFrames:
    if recipe.get("source") == "table":
        return prepare_table(cfg, recipe["table"], recipe["label"], recipe.get("id") or None)
    targets = (SegmentTargets(tuple(recipe["target_segments"]), float(recipe["segment_weight"]))
               if recipe.get("target_segments") else None)
    return prepare_window(cfg, datetime.fromisoformat(recipe["as_of"]), targets)


def _log_params_merging(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    """Log params; one already set to another value (e.g. by ``mlflow run`` from the
    MLproject's parameters) keeps it and gets the resolved value as a tag of the same name."""
    existing = client.get_run(run_id).data.params
    fresh = {k: str(v)[:6000] for k, v in params.items() if k not in existing}
    if fresh:
        mlflow.log_params(fresh)
    for key, value in params.items():
        if key in existing and existing[key] != str(value):
            mlflow.set_tag(key, str(value))


def _importance_figure(booster: Any, title: str) -> Any:
    from matplotlib.figure import Figure

    gain = booster.get_score(importance_type="gain")
    items = sorted(gain.items(), key=lambda kv: kv[1])[-25:]
    fig = Figure(figsize=(7, max(2.5, 0.3 * len(items) + 1)))
    ax = fig.subplots()
    ax.barh([k for k, _ in items], [v for _, v in items], color="#3b6ea5")
    ax.set_xlabel("total gain / split (XGBoost 'gain')")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def _log_profile(prep: TrainingFrames, booster: Any, bins: int, extras: dict[str, Any]) -> bool:
    """Log ``reference/profile.json`` of ``prep.reference`` (every customer at the newest
    cutoff; for a table, the validation rows) with the model's scores and ``extras``
    (calibration, source null rates)."""
    rows = prep.valid if prep.reference is None else prep.reference
    scores = predict_proba(booster, prep.feature_set, prep.feature_set.coerce(rows))
    profile = build_profile(rows, prep.feature_set, scores, bins=bins, segments=prep.segments, **extras)
    mlflow.log_text(profile_json(profile), PROFILE_ARTIFACT)
    return True


def _fit_data(prep: TrainingFrames) -> tuning.FitData:
    """The coerced frames the tuner fits on (training rows carry their sample weights; the
    validation rows too when a targeted retrain weighs them, else the objective is plain AUC)."""
    fs = prep.feature_set
    w_valid = prep.valid[WEIGHT].to_numpy(dtype="float64")
    return tuning.FitData(x_train=fs.coerce(prep.train), y_train=prep.train[LABEL].to_numpy(),
                          w_train=prep.train[WEIGHT].to_numpy(), x_valid=fs.coerce(prep.valid),
                          y_valid=prep.valid[LABEL].to_numpy(),
                          w_valid=None if np.all(w_valid == 1.0) else w_valid)


def _tune(cfg: ChurnConfig, prep: TrainingFrames, client: MlflowClient, run: Any, data: tuning.FitData,
          n_trials: int, timeout: float | None, storage: str | None, study_name: str,
          progress: ProgressArg, wait_seconds: float) -> tuning.TuningResult:
    """Step 1: the Optuna study (every trial a nested run of ``run``), its settings as params."""
    t, fs, run_id = cfg.training, prep.feature_set, run.info.run_id
    study = tuning.make_study(study_name, storage, t.seed)
    if storage:
        _log.warning("study %s: add workers with `churn train --worker --study %s --storage <same URL>`",
                     study_name, study_name)
    settings = {"seed": t.seed, "max_estimators": t.max_estimators,
                "early_stopping_rounds": t.early_stopping_rounds}
    for key, value in {"parent_run_id": run_id, "experiment_id": run.info.experiment_id,
                       "recipe": prep.recipe, "data_hash": prep.data_hash, "settings": settings}.items():
        study.set_user_attr(key, value)
    _log_params_merging(client, run_id, prep.params | {
        "source": prep.source, "feature_set": fs.name, "feature_set_hash": fs.hash,
        "data_hash": prep.data_hash, "rows_train": len(prep.train), "rows_valid": len(prep.valid),
        "n_trials": n_trials, "timeout": timeout or 0, "seed": t.seed, "study_name": study_name,
        "storage": (storage.split("@")[-1] if storage else "in-memory"),
        "max_estimators": t.max_estimators, "early_stopping_rounds": t.early_stopping_rounds,
    })
    mlflow.set_tags({"source": prep.source, "feature_set": fs.name, "feature_set_hash": fs.hash,
                     "data_hash": prep.data_hash, "optuna.study": study_name}
                    | (prep.targets.to_tags() if prep.targets is not None else {}))
    with resolve(progress)(f"tuning: {n_trials} trials", n_trials) as tick:
        tuning.run_trials(
            study, data, seed=t.seed, max_estimators=t.max_estimators,
            early_stopping_rounds=t.early_stopping_rounds, n_trials=n_trials, timeout=timeout,
            client=client, experiment_id=run.info.experiment_id, parent_run_id=run_id,
            cfg=cfg, on_trial=lambda _trial: tick(1), nthread=t.nthread)
    if storage:
        tuning.wait_for_running(study, wait_seconds)
    return tuning.summarize(study)


def _fit_best(cfg: ChurnConfig, prep: TrainingFrames, data: tuning.FitData,
              tuned: tuning.TuningResult) -> tuple[Any, np.ndarray, dict[str, float]]:
    """Step 2: the best trial refitted, cut at its best iteration: (booster, validation
    scores, validation metrics)."""
    t = cfg.training
    clf = tuning.fit_classifier(tuned.best_params, data, t.seed, t.early_stopping_rounds, nthread=t.nthread)
    n_trees = int(clf.best_iteration) + 1
    booster = clf.get_booster()[:n_trees]
    y_valid = data.y_valid
    scores = predict_proba(booster, prep.feature_set, data.x_valid)
    metrics = {
        "val_auc": float(roc_auc_score(y_valid, scores)),
        "val_pr_auc": float(average_precision_score(y_valid, scores)),
        "val_log_loss": float(log_loss(y_valid, np.clip(scores, 1e-7, 1 - 1e-7), labels=[0, 1])),
        "val_churn_rate": float(y_valid.mean()), "n_trees": n_trees,
        "n_trials_complete": tuned.n_complete, "n_trials_pruned": tuned.n_pruned,
        "best_trial": tuned.best_trial,
    }
    return booster, scores, metrics


def _log_evidence(cfg: ChurnConfig, prep: TrainingFrames, client: MlflowClient, run_id: str, booster: Any,
                  metrics: dict[str, float], tuned: tuning.TuningResult,
                  profile_extras: dict[str, Any]) -> bool:
    """Step 3: metrics, best params, the importance plot, the training dataset, the feature
    set and the reference profile into the active run; True when the profile was logged."""
    fs = prep.feature_set
    mlflow.log_metrics(metrics)
    _log_params_merging(client, run_id, {f"best_{k}": v for k, v in tuned.best_params.items()})
    mlflow.log_figure(_importance_figure(booster, f"feature importance: {fs.name}"),
                      "plots/feature_importance.png")
    with warnings.catch_warnings():  # source-kind ambiguity and int-column hints: not actionable
        warnings.simplefilter("ignore", UserWarning)
        dataset = mlflow.data.from_pandas(prep.frame, source=prep.dataset_source, targets=LABEL,
                                          name=f"{fs.name}-{prep.data_hash[:12]}")
        mlflow.log_input(dataset, context="training")
    mlflow.log_dict(fs.to_dict(), "feature_set.json")
    for name, payload in prep.artifacts.items():
        mlflow.log_dict(payload, name)
    return _log_profile(prep, booster, cfg.monitoring.bins, profile_extras)


def _fit_and_register(cfg: ChurnConfig, prep: TrainingFrames, *, n_trials: int | None, timeout: float | None,
                      storage: str | None, study_name: str | None, progress: ProgressArg,
                      parent_run_id: str | None,
                      wait_seconds: float = DEFAULT_WAIT_SECONDS) -> TrainResult:
    """Tune, fit the best trial, log everything to the parent run, register a challenger."""
    t = cfg.training
    n_trials = n_trials if n_trials is not None else t.n_trials
    timeout = timeout if timeout is not None else t.timeout_seconds
    storage = storage or t.storage
    if n_trials < 1:
        raise ChurnError(f"n_trials must be >= 1, got {n_trials}")
    exp_id = setup_mlflow(cfg)
    client = MlflowClient()
    fs = prep.feature_set
    data = _fit_data(prep)
    run_name = f"train-{prep.source}-{prep.as_of[:10] or Path(prep.dataset_source).stem}"
    with fail_fast(cfg, f"training '{t.model_name}'"), \
            step_run(run_name, exp_id, parent_run_id, resume=True) as run, failed_on_error(cfg):
        run_id = run.info.run_id
        study_name = study_name or f"churn-{run_id}"
        tuned = _tune(cfg, prep, client, run, data, n_trials, timeout, storage, study_name, progress,
                      wait_seconds)
        booster, scores, metrics = _fit_best(cfg, prep, data, tuned)
        # what monitoring compares with
        baselines = training_baselines(cfg, prep, booster, data.y_valid, scores)
        metrics |= baselines.metrics
        profile_logged = _log_evidence(cfg, prep, client, run_id, booster, metrics, tuned,
                                       baselines.profile_extras)
        info = log_churn_model(booster, fs, prep.valid)
        tags = {
            "feature_set": fs.name, "feature_set_hash": fs.hash, "window_start": prep.window_start,
            "window_end": prep.window_end, "as_of": prep.as_of,
            "horizon_days": str(cfg.features.label_horizon_days) if prep.source == "simulator" else "",
            "val_auc": f"{metrics['val_auc']:.6f}", "data_hash": prep.data_hash, TRAIN_RUN_TAG: run_id,
            "source": prep.source,
        } | baselines.tags | (prep.targets.to_tags() if prep.targets is not None else {})
        description = f"Trained on {fs.name} ({prep.source}); val AUC {metrics['val_auc']:.4f}; run {run_id}."
        with registered_version(client, t.model_name, info, run_id, tags, description=description,
                                alias=CHALLENGER) as mv:
            mlflow.set_tags({"registered_model": t.model_name, "registered_version": mv.version})
    return TrainResult(
        run_id=run_id, model_uri=f"models:/{t.model_name}/{mv.version}", version=str(mv.version),
        val_auc=metrics["val_auc"], best_params=tuned.best_params, feature_set_hash=fs.hash,
        window_start=prep.window_start, window_end=prep.window_end, val_pr_auc=metrics["val_pr_auc"],
        val_log_loss=metrics["val_log_loss"], n_trees=int(metrics["n_trees"]), study_name=study_name,
        n_complete=tuned.n_complete, n_pruned=tuned.n_pruned, rows_train=len(prep.train),
        rows_valid=len(prep.valid), data_hash=prep.data_hash, source=prep.source, feature_set=fs.name,
        profile_logged=profile_logged, trials=tuned.trials, targets=prep.targets,
    )


def run_worker(cfg: ChurnConfig, study_name: str, storage: str | None = None, n_trials: int | None = None,
               timeout: float | None = None, progress: ProgressArg = None,
               wait_seconds: float = DEFAULT_WAIT_SECONDS) -> TrainResult:
    """Join the leader's study ``study_name`` in ``storage``: rebuild its data, run trials
    nested under its parent run, register nothing."""
    storage = storage or cfg.training.storage
    if not storage:
        raise ChurnError("a worker needs --storage URL (or training.storage): the Optuna RDB the leader uses")
    if not study_name:
        raise ChurnError("a worker needs --study NAME: the study the leader printed (churn-<parent run id>)")
    setup_mlflow(cfg)
    attrs = tuning.wait_for_study(study_name, storage, wait_seconds).user_attrs
    prep = _prepare_from_recipe(cfg, attrs["recipe"])
    if prep.data_hash != attrs["data_hash"]:
        raise ChurnError(f"this worker's data (hash {prep.data_hash[:12]}) differs from the leader's "
                         f"({attrs['data_hash'][:12]}); point --workspace at the leader's data")
    settings = attrs["settings"]
    study = tuning.make_study(study_name, storage, seed=None, create=False)
    n_trials = n_trials if n_trials is not None else cfg.training.n_trials
    fs = prep.feature_set
    data = _fit_data(prep)
    client = MlflowClient()
    with resolve(progress)(f"worker {tuning.WORKER_ID}: {n_trials} trials", n_trials) as tick:
        tuning.run_trials(
            study, data, seed=int(settings["seed"]), max_estimators=int(settings["max_estimators"]),
            early_stopping_rounds=int(settings["early_stopping_rounds"]), n_trials=n_trials,
            timeout=timeout, client=client, experiment_id=attrs["experiment_id"],
            parent_run_id=attrs["parent_run_id"], cfg=cfg, on_trial=lambda _trial: tick(1),
            nthread=cfg.training.nthread)
    tuned = tuning.summarize(study)
    return TrainResult(
        run_id=attrs["parent_run_id"], model_uri=None, version=None, val_auc=tuned.best_value,
        best_params=tuned.best_params, feature_set_hash=fs.hash, window_start=prep.window_start,
        window_end=prep.window_end, study_name=study_name, n_complete=tuned.n_complete,
        n_pruned=tuned.n_pruned, rows_train=len(prep.train), rows_valid=len(prep.valid),
        data_hash=prep.data_hash, source=prep.source, feature_set=fs.name, trials=tuned.trials,
    )


def train(cfg: ChurnConfig, as_of: datetime | None, n_trials: int | None = None, timeout: float | None = None,
          storage: str | None = None, worker: bool = False, progress: ProgressArg = None,
          parent_run_id: str | None = None, study_name: str | None = None,
          wait_seconds: float = DEFAULT_WAIT_SECONDS, targets: SegmentTargets | None = None) -> TrainResult:
    """Train on the window ending before ``as_of`` (tz-aware UTC) and register a challenger.

    ``n_trials``/``timeout`` (seconds)/``storage`` default to the ``training`` config.
    ``worker=True`` joins the study ``study_name`` instead (``as_of`` comes from the leader).
    ``targets``: a targeted retrain (:mod:`~mlflow_churn.training.targeting`), recorded on
    the run and the version; None trains plainly.
    """
    if worker:
        return run_worker(cfg, study_name or "", storage, n_trials, timeout, progress, wait_seconds)
    if as_of is None:
        raise ChurnError("as_of is required (the CLI defaults it to the newest event of the data)")
    training_window(as_of, cfg)  # a bad as_of fails before the tracking store is touched
    setup_mlflow(cfg)  # an unreachable tracking store fails before the frame is built
    prep = prepare_window(cfg, as_of, targets)
    return _fit_and_register(cfg, prep, n_trials=n_trials, timeout=timeout, storage=storage,
                             study_name=study_name, progress=progress, parent_run_id=parent_run_id,
                             wait_seconds=wait_seconds)


def table_model_name(cfg: ChurnConfig, path: Path | str) -> str:
    """The registered model a flat table trains into by default:
    ``<training.model_name>-table-<file stem>`` (stem reduced to letters, digits, ``.``, ``_``
    and ``-``), e.g. ``churn-model-table-telco-customer-churn``. Never the production model,
    so a table experiment cannot move its ``challenger`` alias."""
    name = Path(path).name
    for suffix in (".gz", ".bz2", ".zst", ".csv", ".parquet", ".pq"):  # x.csv.gz -> x
        name = name[: -len(suffix)] if name.lower().endswith(suffix) and len(name) > len(suffix) else name
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "data"
    return f"{cfg.training.model_name}-table-{stem}"[:200]


def train_table(cfg: ChurnConfig, path: Path | str, label: str, id_column: str | None = None,
                n_trials: int | None = None, timeout: float | None = None, storage: str | None = None,
                worker: bool = False, progress: ProgressArg = None, parent_run_id: str | None = None,
                study_name: str | None = None, wait_seconds: float = DEFAULT_WAIT_SECONDS,
                model_name: str | None = None) -> TrainResult:
    """Train on a flat CSV / Parquet table (``label`` column, optional ``id_column``) and register
    into ``model_name`` (default :func:`table_model_name`, never ``training.model_name``)."""
    if worker:
        return run_worker(cfg, study_name or "", storage, n_trials, timeout, progress, wait_seconds)
    name = model_name or table_model_name(cfg, path)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}", name):
        raise ChurnError(f"model name '{name}' must be letters, digits, '.', '_' and '-' (at most 200)")
    cfg = cfg.model_copy(update={"training": cfg.training.model_copy(update={"model_name": name})})
    prep = prepare_table(cfg, path, label, id_column)
    return _fit_and_register(cfg, prep, n_trials=n_trials, timeout=timeout, storage=storage,
                             study_name=study_name, progress=progress, parent_run_id=parent_run_id,
                             wait_seconds=wait_seconds)


def train_on_frame(cfg: ChurnConfig, train_frame: pd.DataFrame, valid_frame: pd.DataFrame,
                   feature_set: FeatureSet, *, source: str = "table", dataset_source: str = "in-memory",
                   n_trials: int | None = None, timeout: float | None = None, progress: ProgressArg = None,
                   parent_run_id: str | None = None) -> TrainResult:
    """Tune, log and register from ready frames: ``feature_set`` columns plus ``label``
    (0/1) and optionally ``weight``; ``valid_frame`` is the validation slice."""
    for name, frame in (("train_frame", train_frame), ("valid_frame", valid_frame)):
        if LABEL not in frame.columns:
            raise ChurnError(f"{name} lacks the '{LABEL}' column (0/1 churn)")
    train_frame = train_frame.assign(**({} if WEIGHT in train_frame else {WEIGHT: 1.0}))
    valid_frame = valid_frame.assign(**({} if WEIGHT in valid_frame else {WEIGHT: 1.0}))
    _check_classes(train_frame[LABEL].to_numpy(), "training")
    _check_classes(valid_frame[LABEL].to_numpy(), "validation")
    prep = TrainingFrames(source=source, feature_set=feature_set, train=train_frame.reset_index(drop=True),
                    valid=valid_frame.reset_index(drop=True), dataset_source=dataset_source,
                    params={}, recipe={"source": "frame"})
    return _fit_and_register(cfg, prep, n_trials=n_trials, timeout=timeout, storage=None,
                             study_name=None, progress=progress, parent_run_id=parent_run_id)


__all__ = [
    "TrainingFrames", "TrainResult", "prepare_table", "prepare_window", "registered_version", "run_worker",
    "time_split", "train", "train_on_frame", "train_table",
]
