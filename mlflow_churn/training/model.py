"""The logged model: an XGBoost booster behind an MLflow pyfunc that returns P(churn).

``mlflow.pyfunc.load_model(uri).predict(df)`` returns a 1-D float array of churn
probabilities in [0, 1] (not labels, as the xgboost flavor's pyfunc would for a
classifier), so ``mlflow models serve`` answers with probabilities too. The model carries
its :class:`~mlflow_churn.features.registry.FeatureSet` (``feature_set.json``): the input
is coerced by the same code the feature store uses, and serving compares its hash with
the registry's before feeding the model.

:func:`load_scorer` gives the in-process fast path (the booster and the feature set)
used by the online service and batch scoring.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import xgboost as xgb
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

from mlflow_churn.errors import ChurnError, first_line
from mlflow_churn.features.registry import FeatureSet

BOOSTER_FILE = "booster.ubj"
FEATURE_SET_FILE = "feature_set.json"


def predict_proba(booster: xgb.Booster, feature_set: FeatureSet, frame: pd.DataFrame,
                  iteration_range: tuple[int, int] | None = None) -> np.ndarray:
    """P(churn) per row of ``frame`` (raw or coerced feature values), float64 in [0, 1]."""
    if len(frame) == 0:
        return np.zeros(0, dtype="float64")
    x = feature_set.coerce(frame)
    kwargs: dict[str, Any] = {"predict_type": "value", "validate_features": False}
    if iteration_range is not None:
        kwargs["iteration_range"] = iteration_range
    return np.asarray(booster.inplace_predict(x, **kwargs), dtype="float64").reshape(-1)


class ChurnModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: ``predict(df)`` -> P(churn) per row."""

    def load_context(self, context: Any) -> None:
        self.booster = xgb.Booster()
        self.booster.load_model(context.artifacts["booster"])
        self.feature_set = FeatureSet.from_dict(
            json.loads(Path(context.artifacts["feature_set"]).read_text())
        )

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict | None = None) -> np.ndarray:
        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame(model_input)
        return predict_proba(self.booster, self.feature_set, model_input)


def signature_for(feature_set: FeatureSet) -> ModelSignature:
    """Input: the set's columns (string for categoricals, double otherwise, all optional);
    output: one double column, P(churn)."""
    cols = [
        ColSpec("string" if f.dtype == "category" else "double", f.full_name, required=False)
        for f in feature_set.features
    ]
    return ModelSignature(inputs=Schema(cols), outputs=Schema([ColSpec("double", "churn_probability")]))


def to_model_input(feature_set: FeatureSet, frame: pd.DataFrame) -> pd.DataFrame:
    """``frame``'s feature columns in the pyfunc's input schema: strings for categoricals,
    float64 otherwise (MLflow refuses to cast int64 to double on its own)."""
    out = {}
    for f in feature_set.features:
        col = frame[f.full_name]
        out[f.full_name] = (
            col.astype("object").where(col.notna(), None)
            if f.dtype == "category"
            else pd.to_numeric(col, errors="coerce").astype("float64")
        )
    return pd.DataFrame(out).reset_index(drop=True)


def input_example(feature_set: FeatureSet, frame: pd.DataFrame, rows: int = 5) -> pd.DataFrame:
    """A few rows of ``frame`` as a serving client would send them."""
    return to_model_input(feature_set, frame.head(rows))


PACKAGE_DIR = Path(__file__).resolve().parents[1]
#: distributions the pyfunc imports at load time (mlflow_churn.training.model and its imports)
MODEL_DISTRIBUTIONS = ("mlflow", "xgboost", "pandas", "numpy", "pyarrow", "duckdb", "pydantic", "pyyaml")


def _model_requirements() -> list[str]:
    """``name==version`` of :data:`MODEL_DISTRIBUTIONS` as installed here."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in MODEL_DISTRIBUTIONS]


def _package_copy(tmp: Path) -> Path:
    """The package's sources (no caches) under ``tmp``, for ``code_paths``."""
    import shutil

    return Path(shutil.copytree(PACKAGE_DIR, tmp / "code" / PACKAGE_DIR.name,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc")))


class _DropCloudPickleNotice(logging.Filter):
    """MLflow logs, on every ``log_model`` with a Python object as ``python_model``, that the
    object is saved with CloudPickle. Ours is a stateless class from the package, which travels
    with the model (``code_paths``); loading it is exactly as safe as importing the package, so
    the notice says nothing to act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Passing a Python object as `python_model`" not in record.getMessage()


@contextlib.contextmanager
def _quiet_cloudpickle_notice() -> Iterator[None]:
    """Drop that one notice, only around our own ``log_model`` call."""
    logger, drop = logging.getLogger("mlflow.pyfunc"), _DropCloudPickleNotice()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def log_churn_model(
    booster: xgb.Booster, feature_set: FeatureSet, example: pd.DataFrame, name: str = "model"
) -> mlflow.models.model.ModelInfo:
    """Log ``booster`` as a pyfunc returning P(churn) in the active run; return its info."""
    with tempfile.TemporaryDirectory() as tmp:
        booster_path = Path(tmp) / BOOSTER_FILE
        booster.save_model(str(booster_path))
        fs_path = Path(tmp) / FEATURE_SET_FILE
        fs_path.write_text(json.dumps(feature_set.to_dict(), indent=2))
        with _quiet_cloudpickle_notice():
            return _log_pyfunc(name, booster_path, fs_path, feature_set, example, Path(tmp))


def _log_pyfunc(name: str, booster_path: Path, fs_path: Path, feature_set: FeatureSet,
                example: pd.DataFrame, tmp: Path) -> mlflow.models.model.ModelInfo:
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=ChurnModel(),
        artifacts={"booster": str(booster_path), "feature_set": str(fs_path)},
        signature=signature_for(feature_set),
        input_example=input_example(feature_set, example),
        # the package travels with the model, so any MLflow environment manager (virtualenv,
        # conda, docker) can load it without mlflow-churn on an index
        code_paths=[str(_package_copy(tmp))],
        pip_requirements=_model_requirements(),
    )


@dataclass
class Scorer:
    """A loaded churn model for in-process scoring."""

    booster: xgb.Booster
    feature_set: FeatureSet
    model_uri: str
    version: str | None = None

    def predict_proba(self, frame: pd.DataFrame) -> np.ndarray:
        """P(churn) per row (raw or coerced feature values)."""
        return predict_proba(self.booster, self.feature_set, frame)


def _load_lean(model_uri: str, tmp: Path) -> tuple[xgb.Booster, FeatureSet] | None:
    """The booster and feature set of a model logged by :func:`log_churn_model`, downloading
    only its ``MLmodel`` file and those two artifacts (3 files, where the whole model is ~140
    with the package's code copy: against a tracking server, one request each). None when the
    model is not laid out that way (:func:`load_scorer` then loads it whole and says why)."""
    import yaml
    from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository

    root = (ModelsArtifactRepository.get_underlying_uri(model_uri) if model_uri.startswith("models:/")
            else model_uri).rstrip("/")
    meta = yaml.safe_load(Path(mlflow.artifacts.download_artifacts(
        artifact_uri=f"{root}/MLmodel", dst_path=str(tmp / "meta"))).read_text()) or {}
    arts = ((meta.get("flavors") or {}).get("python_function") or {}).get("artifacts") or {}
    paths = {key: (arts.get(key) or {}).get("path") for key in ("booster", "feature_set")}
    if not all(isinstance(v, str) and v.startswith("artifacts/") for v in paths.values()):
        return None
    local = {key: mlflow.artifacts.download_artifacts(artifact_uri=f"{root}/{path}", dst_path=str(tmp / key))
             for key, path in paths.items()}
    booster = xgb.Booster()
    booster.load_model(local["booster"])
    return booster, FeatureSet.from_dict(json.loads(Path(local["feature_set"]).read_text()))


def load_scorer(model_uri: str, version: str | None = None) -> Scorer:
    """Load a model logged by :func:`log_churn_model` (any MLflow model URI).

    Loaded from a private copy (a temporary directory, removed once the booster is in memory):
    on a local artifact store MLflow would otherwise load ``models:/`` in place and write its
    ``registered_model_meta`` file into the registered version's files, changing the digest
    the version's signed gate decision names (:mod:`mlflow_churn.registry.signing`)."""
    import tempfile

    try:
        with tempfile.TemporaryDirectory(prefix="churn-load-") as tmp:
            lean = _load_lean(model_uri, Path(tmp))
            if lean is not None:
                return Scorer(lean[0], lean[1], model_uri, version)
            model = mlflow.pyfunc.load_model(model_uri, dst_path=tmp)
    except Exception as exc:  # MLflow raises several types for a missing model
        first = first_line(exc)
        raise ChurnError(f"cannot load model {model_uri}: {first[:200]}") from None
    inner = model.unwrap_python_model()
    if not isinstance(inner, ChurnModel):
        raise ChurnError(f"model {model_uri} was not logged by mlflow-churn (no ChurnModel inside)")
    return Scorer(inner.booster, inner.feature_set, model_uri, version)
