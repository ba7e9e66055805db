"""Reference profile: built from a real offline frame, saved, loaded, fetched from MLflow."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from mlflow_churn.errors import ChurnError
from mlflow_churn.features.offline import build_training_frame
from mlflow_churn.features.registry import load_registry
from mlflow_churn.stats import drift
from mlflow_churn.tracking import setup_mlflow
from mlflow_churn.training.profile import (
    PROFILE_ARTIFACT,
    PROFILE_SCHEMA_VERSION,
    NoProfile,
    build_profile,
    load_profile,
    profile_for_version,
    profile_from_dict,
    profile_json,
    save_profile,
)


@pytest.fixture(scope="module")
def ref_frame(small_data: Path) -> tuple[pd.DataFrame, object, np.ndarray]:
    fs = load_registry().feature_set("churn_default")
    cutoffs = [datetime(2026, 3, 10, tzinfo=UTC), datetime(2026, 3, 17, tzinfo=UTC)]
    frame = build_training_frame(small_data, fs, cutoffs, 30, label=False)
    rng = np.random.default_rng(1)
    scores = rng.beta(1, 8, size=len(frame))
    return frame, fs, scores


def test_profile_numeric_entries_match_drift_binning(ref_frame) -> None:
    frame, fs, scores = ref_frame
    prof = build_profile(frame, fs, scores, bins=10, segments=["region", "plan"])
    assert prof["rows"] == len(frame)
    assert prof["feature_set_hash"] == fs.hash
    assert set(prof["features"]) == set(fs.columns)
    e = prof["features"]["monthly_usage"]
    values = frame["monthly_usage"].to_numpy(float)
    # edges are the reference's deciles, shares ~ 1/10 each for a continuous feature
    np.testing.assert_allclose(e["edges"], drift.quantile_edges(values, 10))
    assert len(e["shares"]) == len(e["edges"]) + 1 == 10
    np.testing.assert_allclose(e["shares"], np.full(10, 0.1), atol=0.01)
    assert sum(e["shares"]) == pytest.approx(1.0)
    assert e["sample"] == sorted(e["sample"]) and len(e["sample"]) <= 10_000
    assert e["count"] == int(np.isfinite(values).sum())
    # PSI of the reference against its own profile is 0
    assert drift.feature_psi_against_profile(e, values) == pytest.approx(0.0, abs=1e-12)
    # scores are profiled like a numeric feature
    assert prof["score"]["count"] == len(scores)
    assert drift.feature_psi_against_profile(prof["score"], scores) == pytest.approx(0.0, abs=1e-12)


def test_profile_categorical_and_segments(ref_frame) -> None:
    frame, fs, scores = ref_frame
    prof = build_profile(frame, fs, scores, segments=["region"])
    reg = prof["features"]["region"]
    assert reg["kind"] == "categorical"
    assert reg["categories"][: len(fs.categorical["region"])] == fs.categorical["region"]
    # last share is the unseen bucket, empty in the reference
    assert reg["shares"][-1] == 0.0
    observed = frame["region"].astype(str).value_counts(normalize=True)
    for cat, share in zip(reg["categories"], reg["shares"][:-1], strict=True):
        assert share == pytest.approx(observed.get(cat, 0.0))
    segs = prof["segments"]["region"]
    assert sum(s["count"] for s in segs.values()) == len(frame)
    assert "pacific" in segs
    pac = segs["pacific"]
    mask = frame["region"].astype(str) == "pacific"
    assert pac["count"] == int(mask.sum())
    assert pac["share"] == pytest.approx(mask.mean())
    # segment shares use the population's bins
    expected = drift.shares(drift.bin_counts(frame.loc[mask, "monthly_usage"],
                                             np.array(prof["features"]["monthly_usage"]["edges"])))
    np.testing.assert_allclose(pac["features"]["monthly_usage"]["shares"], expected)
    np.testing.assert_allclose(
        pac["score"]["shares"],
        drift.shares(drift.bin_counts(scores[mask.to_numpy()], np.array(prof["score"]["edges"]))),
    )


def test_profile_round_trip_and_bad_input(ref_frame, tmp_path: Path) -> None:
    frame, fs, scores = ref_frame
    prof = build_profile(frame, fs, scores, segments=["plan"])
    path = save_profile(prof, tmp_path / "ref" / "profile.json")
    assert load_profile(path) == json.loads(json.dumps(prof))
    with pytest.raises(ChurnError, match="scores has"):
        build_profile(frame, fs, scores[:-1])
    with pytest.raises(ChurnError, match="lacks feature column"):
        build_profile(frame.drop(columns=["age"]), fs, scores)
    with pytest.raises(ChurnError, match="segment column"):
        build_profile(frame, fs, scores, segments=["galaxy"])
    (tmp_path / "bad.json").write_text("{\"x\": 1}")
    with pytest.raises(ChurnError, match="not a format-1"):
        load_profile(tmp_path / "bad.json")
    with pytest.raises(ChurnError, match="cannot read profile"):
        load_profile(tmp_path / "none.json")


def test_profile_schema_version_old_and_newer(ref_frame, tmp_path: Path) -> None:
    """A profile carries its schema version; one an earlier release wrote (no schema_version)
    still reads as version 1, one a newer release wrote is refused naming the version."""
    frame, fs, scores = ref_frame
    prof = build_profile(frame, fs, scores)
    assert prof["schema_version"] == PROFILE_SCHEMA_VERSION == 1
    assert json.loads(profile_json(prof))["schema_version"] == 1
    previous_release = {k: v for k, v in json.loads(profile_json(prof)).items() if k != "schema_version"}
    (tmp_path / "old.json").write_text(json.dumps(previous_release))
    old = load_profile(tmp_path / "old.json")
    assert old["schema_version"] == 1 and old["features"] == previous_release["features"]
    assert profile_from_dict(previous_release)["score"] == previous_release["score"]
    (tmp_path / "newer.json").write_text(json.dumps({**previous_release, "schema_version": 2}))
    with pytest.raises(ChurnError, match="schema_version 2, newer than the 1") as caught:
        load_profile(tmp_path / "newer.json")
    assert not isinstance(caught.value, NoProfile)  # not "no profile": a release too old to read it
    with pytest.raises(NoProfile, match="not a positive integer"):
        profile_from_dict({**previous_release, "schema_version": "2"})


def test_profile_for_version_reads_the_training_runs_artifact(ref_frame, config, tmp_path: Path) -> None:
    frame, fs, scores = ref_frame
    prof = build_profile(frame, fs, scores, segments=["region"])
    setup_mlflow(config)
    client = MlflowClient()
    with mlflow.start_run() as run:
        local = save_profile(prof, tmp_path / "profile.json")
        mlflow.log_artifact(str(local), artifact_path="reference")
    name = "churn-model"
    client.create_registered_model(name)
    mv = client.create_model_version(
        name,
        source=f"runs:/{run.info.run_id}/reference",
        run_id=run.info.run_id,
        tags={"train_run_id": run.info.run_id},
    )
    got = profile_for_version(client, name, mv.version)
    assert got["features"]["monthly_usage"] == json.loads(json.dumps(prof))["features"]["monthly_usage"]
    assert got["segments"]["region"].keys() == prof["segments"]["region"].keys()
    # a version whose run has no profile: a ChurnError naming the artifact
    with mlflow.start_run() as bare:
        mlflow.log_param("x", 1)
    mv2 = client.create_model_version(name, source=f"runs:/{bare.info.run_id}/m", run_id=bare.info.run_id)
    with pytest.raises(ChurnError, match=PROFILE_ARTIFACT):
        profile_for_version(client, name, mv2.version)
    with pytest.raises(ChurnError, match="not found"):
        profile_for_version(client, name, 99)
