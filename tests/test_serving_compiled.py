"""serving.predictor: compiled: parity with xgboost on a trained model's holdout, the compiled
model's cache (digest-checked), config validation, and the app answering with it."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import numpy as np
import pytest
from serving_support import ServerThread, serving_config, two_versions, wait_ready

from mlflow_churn.config import ConfigError, load_config
from mlflow_churn.data.groups import holdout_mask
from mlflow_churn.errors import ChurnError
from mlflow_churn.features.offline import build_training_frame, daily_cutoffs
from mlflow_churn.features.online import open_store
from mlflow_churn.serving.app import create_app
from mlflow_churn.serving.compiled import (
    MANIFEST,
    PARITY_TOLERANCE,
    compile_booster,
    compiled_predict,
    xgboost_predict,
)
from mlflow_churn.serving.encoding import InputEncoder
from mlflow_churn.training.model import load_scorer

pytest.importorskip("tl2cgen")


def test_compiled_equals_xgboost_on_the_holdout_and_its_cache_is_checked(config, register_version,
                                                                          tmp_path: Path) -> None:
    mv = register_version(config, quality="good", alias=None)
    scorer = load_scorer(f"models:/{config.training.model_name}/{mv.version}")
    fs = scorer.feature_set
    last = datetime.fromisoformat(mv.tags["window_end"])  # the newest training cutoff
    frame = build_training_frame(config.data_dir, fs, daily_cutoffs(last - timedelta(days=14), last, 2),
                                 config.features.label_horizon_days)
    holdout = frame[holdout_mask(frame["customer_id"], config)].reset_index(drop=True)
    assert len(holdout) >= 2000
    records = holdout[fs.columns].astype(object).where(holdout[fs.columns].notna(), None).to_dict("records")
    x = InputEncoder(fs).encode(records)  # the serving path's encoding
    cache = tmp_path / "compiled"
    predict = compiled_predict(scorer.booster, cache)
    got = predict(x)
    assert got.shape == (len(holdout),)
    reference = scorer.predict_proba(holdout)  # xgboost on the pandas path training uses
    assert np.max(np.abs(got - reference)) <= PARITY_TOLERANCE
    assert np.max(np.abs(got - xgboost_predict(scorer.booster)(x))) <= PARITY_TOLERANCE
    assert 0.05 < np.std(got)  # a real model, not a constant

    again = compile_booster(scorer.booster, cache)
    assert again.compile_seconds is None and again.digest == predict.digest  # from the cache
    # a tampered library is never loaded: its bytes no longer hash to the manifest's value
    # (written beside it and renamed over it: the loaded library's own pages stay as they are)
    tampered = again.library.with_suffix(".tmp")
    tampered.write_bytes(again.library.read_bytes()[:-16] + b"\0" * 16)
    tampered.replace(again.library)
    rebuilt = compile_booster(scorer.booster, cache)
    assert rebuilt.compile_seconds is not None
    manifest = json.loads((rebuilt.library.parent / MANIFEST).read_text())
    assert manifest["model_digest"] == rebuilt.digest
    # a cache others may write to is refused, naming the directory and the fix
    cache.chmod(0o777)
    with pytest.raises(ChurnError, match="compiled_cache_dir") as err:
        compile_booster(scorer.booster, cache)
    assert str(cache) in str(err.value)
    cache.chmod(0o700)


def test_an_unknown_predictor_is_refused_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(workspace=tmp_path, environ={"CHURN_SERVING__PREDICTOR": "onnx"})
    message = str(err.value)
    assert "serving.predictor" in message and "onnx" in message and "\n" not in message
    assert load_config(workspace=tmp_path, environ={}).serving.predictor == "xgboost"


def test_the_app_answers_with_the_compiled_predictor(config, register_version) -> None:
    champ, _ = two_versions(config, register_version)
    cfg = serving_config(config, canary_fraction=0.0, predictor="compiled")
    store = open_store(cfg)
    ids = store.customer_ids()[:50]
    rows = store.get(ids)
    store.close()
    scorer = load_scorer(f"models:/{cfg.training.model_name}/{champ}")
    with ServerThread(create_app(cfg)) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        wait_ready(client, timeout=120)
        res = client.post("/predict", json={"customer_ids": ids})
        assert res.status_code == 200, res.text
        got = {p["customer_id"]: p["churn_probability"] for p in res.json()["predictions"]}
    assert sorted(cfg.compiled_cache_dir.iterdir())  # compiled into the workspace's cache
    values = [{c: rows[i].values[c] for c in scorer.feature_set.columns} for i in ids]
    expected = xgboost_predict(scorer.booster)(InputEncoder(scorer.feature_set).encode(values))
    assert np.max(np.abs(np.array([got[i] for i in ids]) - expected)) <= PARITY_TOLERANCE
