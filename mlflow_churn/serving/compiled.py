"""The predictor of a loaded booster: XGBoost's ``inplace_predict`` (``serving.predictor:
xgboost``), or the same trees compiled to C by Treelite + TL2cgen (``compiled``).

A compiled model is built once per model digest (the SHA-256 of the booster's UBJSON bytes and
of the compiler's versions and settings) into ``<cache>/<digest>/`` with a manifest naming the
digest and the SHA-256 of the shared library. A cached library is loaded only when its manifest
names this digest and the library's bytes hash to the manifest's value (a half-written,
corrupted or swapped library is compiled again); the cache directory must be the user's own and
not writable by others. Nothing compiled is ever read from the registry's artifacts: the
library is built here from the booster that was loaded (and, with signed models, verified).

Before a compiled model scores anything it is compared with the booster on a few hundred
generated rows (NaNs, category codes, numbers over many magnitudes): more than
:data:`PARITY_TOLERANCE` apart and it is refused (``ChurnError``). bench/bench_predictor.py
measures both; bench/RESULTS.md has the figures.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import xgboost as xgb

from mlflow_churn.errors import ChurnError, first_line

log = logging.getLogger("mlflow_churn.serving")

#: a function from the encoded input matrix (rows x features, float) to P(churn) per row (float64)
PredictFn = Callable[[np.ndarray], np.ndarray]
PREDICTORS = ("xgboost", "compiled")
#: compiled vs xgboost probabilities, at most
PARITY_TOLERANCE = 1e-6
#: TL2cgen code generation: quantized thresholds (integer compares; same results, faster)
COMPILE_PARAMS = {"quantize": 1}
LIBRARY, MANIFEST = "model.so", "manifest.json"
_CHECK_ROWS = 512
_EXTRA = "pip install 'mlflow-churn[compiled]' (treelite, tl2cgen) or set serving.predictor: xgboost"


def xgboost_predict(booster: xgb.Booster) -> PredictFn:
    """The booster's own ``inplace_predict`` as a :data:`PredictFn`."""

    def predict(x: np.ndarray) -> np.ndarray:
        return np.asarray(booster.inplace_predict(x, predict_type="value", validate_features=False),
                          dtype="float64").reshape(-1)

    return predict


class CompiledPredictor:
    """A compiled model loaded from its shared library; callable as a :data:`PredictFn`."""

    def __init__(self, library: Path, digest: str, nthread: int = 1) -> None:
        import tl2cgen

        self.digest = digest
        self.library = library
        self._dmatrix = tl2cgen.DMatrix
        self._predictor = tl2cgen.Predictor(str(library), nthread=nthread)
        self._lock = threading.Lock()  # one call at a time into the library's thread pool

    def __call__(self, x: np.ndarray) -> np.ndarray:
        # float32, as XGBoost compares a value with its (float32) split conditions
        dmat = self._dmatrix(np.ascontiguousarray(x, dtype=np.float32))
        with self._lock:
            out = self._predictor.predict(dmat)
        return np.asarray(out, dtype="float64").reshape(-1)


@dataclass(frozen=True)
class Compiled:
    """The result of :func:`compile_booster`."""

    digest: str
    library: Path
    #: seconds spent compiling; None when the cached library was used
    compile_seconds: float | None


def _versions() -> dict[str, str]:
    try:
        return {name: metadata.version(name) for name in ("treelite", "tl2cgen")}
    except metadata.PackageNotFoundError as exc:
        raise ChurnError(f"serving.predictor=compiled: {exc.name} is not installed; {_EXTRA}") from None


def model_digest(booster: xgb.Booster) -> str:
    """The cache key of ``booster``'s compiled model: its UBJSON bytes, the compiler's versions
    and :data:`COMPILE_PARAMS` (a new compiler or setting compiles again)."""
    h = hashlib.sha256(bytes(booster.save_raw("ubj")))
    h.update(json.dumps({"versions": _versions(), "params": COMPILE_PARAMS}, sort_keys=True).encode())
    return h.hexdigest()


def _file_sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _private_dir(path: Path) -> Path:
    """``path`` created (mode 0700) or checked: ours and not writable by group or others."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise ChurnError(f"compiled model cache {path} must be owned by this user and not writable by "
                         f"group or others (mode {st.st_mode & 0o777:o}); fix it or set "
                         "serving.compiled_cache_dir to a private directory")
    return path


def _cached(entry: Path, digest: str) -> Path | None:
    """The library of cache ``entry`` when its manifest names ``digest`` and its bytes hash to
    the manifest's value; None otherwise (absent, partial, corrupted or not this model's)."""
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
        library = entry / LIBRARY
        if manifest.get("model_digest") == digest and manifest.get("library_sha256") == _file_sha256(library):
            return library
    except (OSError, ValueError, AttributeError):
        return None
    log.warning("compiled model cache %s does not match its manifest or model; compiling again", entry)
    return None


def _without_category_names(booster: xgb.Booster) -> str:
    """``booster``'s JSON without the category names XGBoost (3.1+) keeps to re-code pandas
    input: Treelite refuses them, and the compiled model, like ``inplace_predict`` on the
    service's matrix, reads category codes in the feature set's order (which training's pandas
    categories had; the parity check compares with the booster)."""
    doc = json.loads(bytes(booster.save_raw("json")))
    doc["learner"]["gradient_booster"].get("model", {}).pop("cats", None)
    return json.dumps(doc)


def compile_booster(booster: xgb.Booster, cache_dir: Path, nthread: int | None = None) -> Compiled:
    """``booster`` compiled to a shared library under ``cache_dir`` (or the verified cached one).

    ChurnError when treelite / tl2cgen are missing or compilation fails (gcc absent, ...)."""
    try:
        import tl2cgen
        import treelite
    except ImportError as exc:
        raise ChurnError(f"serving.predictor=compiled: {first_line(exc)}; {_EXTRA}") from None
    digest = model_digest(booster)
    root = _private_dir(Path(cache_dir))
    entry = root / digest
    library = _cached(entry, digest)
    if library is not None:
        return Compiled(digest, library, None)
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix=f".{digest[:12]}-", dir=root))
    try:
        model = treelite.frontend.from_xgboost_json(_without_category_names(booster))
        tl2cgen.export_lib(model, toolchain="gcc", libpath=str(work / LIBRARY),
                           params={**COMPILE_PARAMS, "parallel_comp": max(1, os.cpu_count() or 1)},
                           nthread=nthread or os.cpu_count() or 1)
        manifest = {"model_digest": digest, "library_sha256": _file_sha256(work / LIBRARY),
                    "compiler": _versions(), "params": COMPILE_PARAMS}
        (work / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if entry.exists():  # a bad entry (checked above), or another process's, just written
            if _cached(entry, digest) is not None:
                return Compiled(digest, entry / LIBRARY, None)
            shutil.rmtree(entry, ignore_errors=True)
        try:
            os.replace(work, entry)
        except OSError:  # another process put its (same) entry there first: use it if it verifies
            if _cached(entry, digest) is None:
                raise
            return Compiled(digest, entry / LIBRARY, None)
    except ChurnError:
        raise
    except Exception as exc:
        raise ChurnError(f"compiling the model (digest {digest[:12]}..) failed: {first_line(exc)[:300]}; "
                         "serving.predictor=compiled needs gcc, or set serving.predictor: xgboost") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    seconds = time.perf_counter() - t0
    log.info("compiled model %s.. in %.1f s", digest[:12], seconds)
    return Compiled(digest, entry / LIBRARY, seconds)


def check_rows(booster: xgb.Booster, n: int = _CHECK_ROWS, seed: int = 0) -> np.ndarray:
    """``n`` generated input rows for ``booster``: category codes 0..19 for its categorical
    features, numbers over many magnitudes and signs (and a few exact integers) otherwise, 10 %
    NaN."""
    rng = np.random.default_rng(seed)
    types = booster.feature_types or ["q"] * booster.num_features()
    x = np.empty((n, len(types)))
    for j, kind in enumerate(types):
        if kind == "c":
            x[:, j] = rng.integers(0, 20, n)
        else:
            x[:, j] = rng.choice([-1.0, 1.0], n) * 10.0 ** rng.uniform(-3, 5, n)
            x[: n // 4, j] = np.round(x[: n // 4, j])
    x[rng.random(x.shape) < 0.1] = np.nan
    return x


def compiled_predict(booster: xgb.Booster, cache_dir: Path, nthread: int = 1,
                     check: np.ndarray | None = None) -> CompiledPredictor:
    """A :class:`CompiledPredictor` of ``booster``, refused (ChurnError) when it differs from
    the booster by more than :data:`PARITY_TOLERANCE` on ``check`` (default :func:`check_rows`)."""
    compiled = compile_booster(booster, cache_dir)
    predictor = CompiledPredictor(compiled.library, compiled.digest, nthread)
    x = check_rows(booster) if check is None else check
    worst = float(np.max(np.abs(predictor(x) - xgboost_predict(booster)(x)), initial=0.0))
    if not worst <= PARITY_TOLERANCE:
        raise ChurnError(f"the compiled model (digest {compiled.digest[:12]}..) differs from xgboost by "
                         f"{worst:.3g} > {PARITY_TOLERANCE:g} on {len(x)} check rows; set "
                         "serving.predictor: xgboost")
    return predictor


def predictor_for(kind: str, booster: xgb.Booster, cache_dir: Path, nthread: int = 1) -> PredictFn:
    """The :data:`PredictFn` ``serving.predictor`` names for ``booster``."""
    if kind == "xgboost":
        return xgboost_predict(booster)
    if kind == "compiled":
        return compiled_predict(booster, cache_dir, nthread)
    raise ChurnError(f"serving.predictor must be one of {', '.join(PREDICTORS)}, got {kind!r}")
