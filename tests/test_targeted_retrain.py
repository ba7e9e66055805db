"""Targeted retrain (issue 23 item 3): a decision naming segments weights those segments'
recent rows in training, and the run and version record what was targeted."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from mlflow_churn.config import ChurnConfig, load_config
from mlflow_churn.errors import ChurnError
from mlflow_churn.monitoring.retrain import RETRAINED, retrain
from mlflow_churn.registry.aliases import CHAMPION
from mlflow_churn.training.targeting import (
    TARGETS_TAG,
    WEIGHT_TAG,
    SegmentTargets,
    segment_mask,
    segment_targets,
)
from mlflow_churn.training.train import WEIGHT, _fit_data, prepare_window

AS_OF = datetime(2026, 5, 1, tzinfo=UTC)


@pytest.fixture
def window_cfg(workspace: Path, small_data: Path) -> ChurnConfig:
    """small_data with a 21-day production window (cutoffs 03-11, 03-18, 03-25), 7 days of
    history (03-04, weight 0.5) and targeted rows at cutoffs within 14 days of the newest."""
    cfg = load_config(workspace=workspace, environ={},
                      overrides={"training.window_days": 21, "training.history_days": 7,
                                 "training.history_weight": 0.5, "training.segment_weight": 4.0,
                                 "training.segment_recent_days": 14})
    os.symlink(small_data, cfg.data_dir)
    return cfg


def test_weights_exactly_the_named_segments_recent_rows(window_cfg: ChurnConfig) -> None:
    targets = segment_targets(["region=pacific", "contract=two-year", "region=pacific"],
                              window_cfg.training.segment_weight)
    assert targets == SegmentTargets(("region=pacific", "contract=two-year"), 4.0)
    prep = prepare_window(window_cfg, AS_OF, targets)
    plain = prepare_window(window_cfg, AS_OF)
    assert prep.params["history_start"].startswith("2026-03-04")
    assert prep.params["window_start"].startswith("2026-03-11")
    for frame in (prep.train, prep.valid):
        cutoff = frame["cutoff"].dt.tz_localize(None)
        in_history = (cutoff == pd.Timestamp("2026-03-04")).to_numpy()
        recent = (cutoff >= pd.Timestamp("2026-03-18")).to_numpy()  # 03-11 is production, not recent
        named = ((frame["region"].astype(str) == "pacific") | (frame["contract"].astype(str) == "two-year"))
        named = named.to_numpy()
        assert (in_history.any() and (~recent & ~in_history & named).any()) or frame is prep.valid
        expected = np.where(in_history, 0.5, np.where(named & recent, 4.0, 1.0))
        np.testing.assert_array_equal(frame[WEIGHT].to_numpy(), expected)
    # the same rows as a plain retrain, which keeps 1 (0.5 on history) everywhere
    assert len(plain.train) == len(prep.train)
    assert set(np.unique(plain.train[WEIGHT])) == {0.5, 1.0}
    # both kinds of targeted rows, and untargeted rows, in the production window
    prod = prep.train[prep.train[WEIGHT] != 0.5]
    assert (prod["region"].astype(str) == "pacific").sum() > 0 and (prod[WEIGHT] == 1.0).sum() > 0
    # the objective weighs validation rows the same way; a plain retrain's objective is plain AUC
    data = _fit_data(prep)
    np.testing.assert_array_equal(data.w_valid, prep.valid[WEIGHT].to_numpy())
    assert set(np.unique(data.w_valid)) == {1.0, 4.0}
    assert _fit_data(plain).w_valid is None
    # recorded: params, recipe (a distributed worker rebuilds the same weights), tags
    train_rows = prep.train[(prep.train[WEIGHT] == 4.0).to_numpy()
                            & (prep.train["region"].astype(str) == "pacific").to_numpy()]
    assert prep.params["target_segments"] == "region=pacific,contract=two-year"
    assert prep.params["segment_weight"] == "4" and prep.params["segment_recent_days"] == "14"
    assert f"region=pacific:{len(train_rows)}" in prep.params["target_rows"]
    assert prep.recipe["target_segments"] == ["region=pacific", "contract=two-year"]
    assert prep.data_hash != plain.data_hash
    assert SegmentTargets.from_tags(targets.to_tags()) == targets


def test_targets_bad_input(window_cfg: ChurnConfig) -> None:
    assert segment_targets(["region=pacific"], 1.0) is None  # weight 1 = a plain retrain
    assert segment_targets([], 3.0) is None and segment_targets(None, 3.0) is None
    with pytest.raises(ChurnError, match="'pacific' is not 'column=value'"):
        segment_targets(["pacific"], 3.0)
    frame = pd.DataFrame({"region": ["pacific", "north"], "tenure_days": [10.0, 400.0]})
    assert segment_mask(frame, ["tenure_bucket=0-90d"]).tolist() == [True, False]  # derived column
    with pytest.raises(ChurnError, match="no column 'colour'"):
        segment_mask(frame, ["colour=red"])
    with pytest.raises(ChurnError, match="region=atlantis.*no row.*segment_weight: 1"):
        prepare_window(window_cfg, AS_OF, SegmentTargets(("region=atlantis",), 3.0))
    with pytest.raises(ChurnError, match="unreadable"):
        SegmentTargets.from_tags({TARGETS_TAG: "region=pacific", WEIGHT_TAG: "3"})
    assert SegmentTargets.from_tags({"other": "x"}) is None


@pytest.mark.slow
def test_targeted_retrain_records_its_targets(workspace: Path, register_version, tmp_path: Path) -> None:
    cfg = load_config(workspace=workspace, environ={},
                      overrides={"training.n_trials": 2, "training.max_estimators": 40,
                                 "training.early_stopping_rounds": 10, "training.nthread": 1})
    champ = register_version(cfg, alias=CHAMPION)
    decision = {"action": "retrain", "reasons": ["segment region=pacific AUC dropped"],
                "features": [], "segments": ["region=pacific"], "fired": ["auc_drop > 0.05"],
                "as_of": AS_OF.isoformat(), "run_id": "decision-run", "model_version": str(champ.version)}
    result = retrain(cfg, AS_OF, force=True, decision=decision, gate=False)
    assert result.action == RETRAINED and result.gate is None
    assert result.train.targets == SegmentTargets(("region=pacific",), 3.0)  # the default weight
    client = MlflowClient(cfg.mlflow_tracking_uri)
    run = client.get_run(result.train.run_id)
    assert json.loads(run.data.tags[TARGETS_TAG]) == ["region=pacific"] and run.data.tags[WEIGHT_TAG] == "3"
    assert run.data.params["target_segments"] == "region=pacific"
    assert run.data.params["segment_weight"] == "3"
    assert int(run.data.params["target_rows"].split(":")[1]) > 0
    mv = client.get_model_version(cfg.training.model_name, str(result.train.version))
    assert mv.tags[TARGETS_TAG] == run.data.tags[TARGETS_TAG] and mv.run_id == run.info.run_id
    parent = client.get_run(result.run_id)
    assert parent.data.tags["retrain.target_segments"] == "region=pacific"
    saved = json.loads(Path(client.download_artifacts(result.run_id, "decision.json", str(tmp_path)))
                       .read_text())
    assert saved["train"]["target_segments"] == ["region=pacific"] and saved["train"]["segment_weight"] == 3.0
