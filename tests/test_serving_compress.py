"""`churn compress`: fewer trees within the AUC-loss budget, registered with its measurements."""

from __future__ import annotations

import json

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from serving_support import LABELS_AS_OF, run_cli
from sklearn.metrics import roc_auc_score

from mlflow_churn.evaluation.holdout import holdout_cutoffs, holdout_frame, parse_tag_time
from mlflow_churn.serving.compress import compress
from mlflow_churn.training.model import load_scorer, predict_proba


@pytest.mark.slow
def test_compress_registers_smaller_version_within_budget(config, register_version) -> None:
    parent = register_version(config, quality="good", alias="champion")
    name = config.training.model_name
    res = run_cli(config, ["compress", "--version", str(parent.version), "--as-of", LABELS_AS_OF.isoformat(),
                           "--budget", "0.01", "--alias", "challenger", "--json"])
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    full = load_scorer(f"models:/{name}/{parent.version}")
    n = full.booster.num_boosted_rounds()
    assert out["parent_trees"] == n and 1 <= out["trees"] < n
    assert out["auc"] >= out["parent_auc"] - 0.01
    assert out["size_bytes"] < out["parent_size_bytes"]
    assert out["latency_p50_ms"] > 0 and out["latency_p99_ms"] >= out["latency_p50_ms"]
    # the registered model is the parent's first k trees, and its AUC is what the tag says
    small = load_scorer(f"models:/{name}@challenger")
    assert small.booster.num_boosted_rounds() == out["trees"]
    cutoffs = holdout_cutoffs(LABELS_AS_OF, config, parse_tag_time(parent.tags["window_end"], "window_end"))
    frame = holdout_frame(config, full.feature_set, cutoffs)
    p_small = small.predict_proba(frame)
    np.testing.assert_allclose(
        p_small, predict_proba(full.booster, full.feature_set, frame, iteration_range=(0, out["trees"])),
        atol=1e-7)
    assert abs(roc_auc_score(frame["label"], p_small) - out["auc"]) < 1e-9
    # the smallest on the search: one tree fewer than found is outside the budget (when k > 1
    # and k-1 was evaluated); the curve records every evaluated size
    curve = dict(out["curve"])
    if out["trees"] - 1 in curve:
        assert curve[out["trees"] - 1] < out["parent_auc"] - 0.01
    tags = MlflowClient(config.mlflow_tracking_uri).get_model_version(name, out["version"]).tags
    assert tags["parent_version"] == str(parent.version) and tags["trees"] == str(out["trees"])
    assert tags["feature_set_hash"] == parent.tags["feature_set_hash"]  # servable like its parent
    for key in ("latency_p50_ms", "latency_p99_ms", "size_bytes", "auc", "parent_auc"):
        assert float(tags[key]) > 0
    # a zero budget keeps every tree that matters: AUC at least the full model's
    exact = compress(config, parent.version, LABELS_AS_OF, budget=0.0)
    assert exact.auc >= exact.parent_auc and exact.trees <= n


@pytest.mark.slow  # among the slowest of make test-fast (churn processes)
def test_compress_bad_version_is_one_line(config) -> None:
    res = run_cli(config, ["compress", "--version", "99", "--as-of", LABELS_AS_OF.isoformat()])
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert res.returncode == 2 and len(errors) == 1 and "'99'" in errors[0] and "Traceback" not in res.stderr
