"""The logged model (training.model): pyfunc returns P(churn); the scorer agrees; clear errors."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import xgboost as xgb

from mlflow_churn.config import ChurnConfig
from mlflow_churn.errors import ChurnError
from mlflow_churn.features.registry import table_feature_set
from mlflow_churn.tracking import setup_mlflow
from mlflow_churn.training.model import (
    load_scorer,
    log_churn_model,
    predict_proba,
    signature_for,
    to_model_input,
)


def _data(n: int = 400, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({
        "plan": rng.choice(["basic", "plus", "pro"], n).astype(object),
        "minutes": rng.gamma(2.0, 100.0, n),
        "calls": rng.poisson(1.0, n).astype("float64"),
    })
    logit = -1.0 + 1.5 * (frame["plan"] == "basic") - frame["minutes"] / 200 + 0.6 * frame["calls"]
    y = (rng.uniform(size=n) < 1 / (1 + np.exp(-logit))).astype(int)
    return frame, y


def _booster(frame: pd.DataFrame, y: np.ndarray):
    fs = table_feature_set("toy", frame)
    dm = xgb.DMatrix(fs.coerce(frame), label=y, enable_categorical=True)
    booster = xgb.train({"objective": "binary:logistic", "tree_method": "hist", "max_depth": 3,
                         "seed": 0, "nthread": 1}, dm, 20)
    return booster, fs


def test_pyfunc_returns_probabilities_and_scorer_agrees(config: ChurnConfig) -> None:
    frame, y = _data()
    booster, fs = _booster(frame, y)
    setup_mlflow(config)
    with mlflow.start_run():
        info = log_churn_model(booster, fs, frame)
    assert info.signature == signature_for(fs)
    model = mlflow.pyfunc.load_model(info.model_uri)
    probs = model.predict(to_model_input(fs, frame))
    assert probs.shape == (len(frame),) and probs.dtype == np.float64
    assert ((probs > 0) & (probs < 1)).all()
    np.testing.assert_allclose(probs, predict_proba(booster, fs, frame), rtol=1e-6)
    scorer = load_scorer(info.model_uri, version="7")
    assert scorer.version == "7" and scorer.feature_set.hash == fs.hash
    np.testing.assert_allclose(scorer.predict_proba(frame), probs, rtol=1e-6)
    # an unseen category and a missing value are scored as missing, not refused
    odd = frame.head(2).copy()
    odd.loc[odd.index[0], "plan"] = "platinum"
    odd.loc[odd.index[1], "minutes"] = np.nan
    assert np.isfinite(model.predict(to_model_input(fs, odd))).all()
    assert predict_proba(booster, fs, frame.head(0)).shape == (0,)


def test_bad_inputs_name_the_problem(config: ChurnConfig, tmp_path: Path) -> None:
    frame, y = _data(200)
    booster, fs = _booster(frame, y)
    with pytest.raises(ChurnError, match="lacks feature column"):
        predict_proba(booster, fs, frame.drop(columns=["calls"]))
    with pytest.raises(ChurnError, match="must be numeric"):
        predict_proba(booster, fs, frame.head(3).assign(minutes=["1", "x", "2"]))
    setup_mlflow(config)
    with pytest.raises(ChurnError, match="cannot load model"):
        load_scorer(f"runs:/{'0' * 32}/model")
    with mlflow.start_run():

        class Plain(mlflow.pyfunc.PythonModel):
            def predict(self, context, model_input, params=None):
                return np.zeros(len(model_input))

        info = mlflow.pyfunc.log_model(name="plain", python_model=Plain())
    with pytest.raises(ChurnError, match="not logged by mlflow-churn"):
        load_scorer(info.model_uri)


_FOREIGN = """
import sys, importlib.util
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
sys.path[:] = [p for p in sys.path if p not in ("", {root!r})]
for name in [m for m in sys.modules if m.startswith("mlflow_churn")]:
    del sys.modules[name]
assert importlib.util.find_spec("mlflow_churn") is None, "mlflow_churn is still importable"
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model({uri!r})
print(float(model.predict(pd.read_json({rows!r}, orient="split"))[0]))
"""


def test_logged_model_carries_its_code_and_real_requirements(config: ChurnConfig, tmp_path: Path) -> None:
    """A process without mlflow-churn installed (as `mlflow models serve` builds one) loads it."""
    import subprocess
    import sys

    frame, y = _data()
    booster, fs = _booster(frame, y)
    setup_mlflow(config)
    with mlflow.start_run():
        info = log_churn_model(booster, fs, frame)
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path / "m")))
    reqs = (local / "requirements.txt").read_text().split()
    assert not [r for r in reqs if r.startswith("mlflow-churn")]
    assert {r.split("==")[0] for r in reqs} >= {"mlflow", "xgboost", "pandas", "duckdb"}
    assert (local / "code" / "mlflow_churn" / "training" / "model.py").exists()
    assert not list((local / "code").rglob("__pycache__"))
    rows = to_model_input(fs, frame.head(1)).to_json(orient="split", index=False)
    root = str(Path(__file__).resolve().parents[1])
    res = subprocess.run([sys.executable, "-c", _FOREIGN.format(root=root, uri=str(local), rows=rows)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert float(res.stdout.strip().splitlines()[-1]) == pytest.approx(
        predict_proba(booster, fs, frame.head(1))[0], rel=1e-6)
