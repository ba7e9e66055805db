"""The model pair the scoring service serves: champion and canary loaded from the registry,
checked against the feature registry, swapped in one reference assignment."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from mlflow_churn.config import ChurnConfig
from mlflow_churn.errors import ChurnError, first_line
from mlflow_churn.features.registry import UnknownFeatureError, registry_for
from mlflow_churn.registry.aliases import CANARY, CHAMPION, alias_version
from mlflow_churn.registry.promotion import read_evidence, verified_decision
from mlflow_churn.registry.signing import (
    download_version,
    files_digest,
    metrics_digest,
    sig_tag,
    verifier_for,
    version_ref,
)
from mlflow_churn.registry.vocab import GateVerdict, SignedKind
from mlflow_churn.serving.compiled import PredictFn, predictor_for
from mlflow_churn.serving.encoding import InputEncoder
from mlflow_churn.serving.input_checks import InputChecker
from mlflow_churn.serving.routing import WEIGHT_TAG, weight_fraction
from mlflow_churn.tracking import setup_mlflow
from mlflow_churn.training.model import Scorer, load_scorer
from mlflow_churn.training.profile import NoProfile, profile_for_version
from mlflow_churn.web.metrics import Metrics

log = logging.getLogger("mlflow_churn.serving")

@dataclass(frozen=True)
class LoadedModel:
    """One registered version loaded for in-process scoring."""

    alias: str
    version: str
    scorer: Scorer
    encoder: InputEncoder
    #: the encoded matrix -> P(churn) per row (``serving.predictor``: the booster, or it compiled)
    predict: PredictFn
    #: the version's input checks (its training profile); None = off, ``checks_off`` says why
    checker: InputChecker | None = None
    checks_off: str | None = None

    @property
    def columns(self) -> list[str]:
        return self.encoder.columns


@dataclass(frozen=True)
class ModelPair:
    """The immutable snapshot a request scores with (swapped whole on reload)."""

    champion: LoadedModel | None = None
    canary: LoadedModel | None = None
    refused: dict[str, str] = field(default_factory=dict)  # alias -> why it is not served
    error: str | None = None  # last registry / load error
    loaded_at: datetime | None = None
    #: the canary's rollout weight (0..1, tag churn.rollout.weight of the canary version); None =
    #: serving.canary_fraction
    canary_weight: float | None = None


def _check_feature_set(cfg: ChurnConfig, tags: dict[str, str], scorer: Scorer) -> str | None:
    """Why ``scorer`` must not be served, or None when its feature set is the registry's.

    Compares the version tag ``feature_set_hash`` (when present) and the model's own
    ``feature_set.json`` with the feature registry's definition of that set.
    """

    fs = scorer.feature_set
    tagged = tags.get("feature_set_hash")
    if tagged and tagged != fs.hash:
        return (f"version tag feature_set_hash={tagged[:12]}.. differs from the model's feature set "
                f"'{fs.name}' hash {fs.hash[:12]}..; re-register the model")
    if fs.from_table:
        return None
    try:
        defined = registry_for(cfg).feature_set(fs.name)
    except UnknownFeatureError as exc:
        return f"feature set '{fs.name}' of the model is not in the feature registry ({exc})"
    if defined.hash != fs.hash:
        return (f"feature set '{fs.name}' of the model (hash {fs.hash[:12]}..) differs from the "
                f"registry's definition (hash {defined.hash[:12]}..); retrain on the current "
                "definitions or restore the old ones")
    return None


class ModelManager:
    """Loads the versions behind ``champion`` and ``canary`` and swaps them atomically."""

    def __init__(self, cfg: ChurnConfig, metrics: Metrics) -> None:
        self.cfg = cfg
        self.name = cfg.training.model_name
        self.metrics = metrics
        self.pair = ModelPair()
        self._lock = threading.Lock()  # one reload at a time
        self._cache: dict[str, tuple[LoadedModel | None, str | None]] = {}  # version -> (model, refusal)
        self._client: Any = None
        self._weight_refused: tuple[str, str | None] | None = None  # (version ref, weight) last warned

    def _connect(self) -> Any:
        if self._client is None:
            from mlflow.tracking import MlflowClient

            setup_mlflow(self.cfg)
            uri = self.cfg.mlflow_tracking_uri
            self._client = MlflowClient(uri, uri)
        return self._client

    def _load(self, alias: str, mv: Any) -> tuple[LoadedModel | None, str | None]:

        version = str(mv.version)
        key = _cache_key(mv)
        if key not in self._cache:
            try:
                scorer = self._load_verified(version)
                # one thread per prediction: a request scores a few rows, and a thread pool per
                # call costs more than it saves (x5-10 on a busy 2-core machine)
                scorer.booster.set_param({"nthread": 1})
                predict = predictor_for(self.cfg.serving.predictor, scorer.booster,
                                        self.cfg.compiled_cache_dir)
            except ChurnError as exc:
                self._cache[key] = (None, str(exc))
            else:
                refusal = _check_feature_set(self.cfg, dict(mv.tags or {}), scorer)
                model = None
                if not refusal:  # an outage reading the profile raises: not cached, tried again
                    checker, off = self._checker(version, scorer)
                    encoder = InputEncoder(scorer.feature_set)
                    model = LoadedModel(alias, version, scorer, encoder, predict, checker, off)
                self._cache[key] = (model, refusal)
        model, refusal = self._cache[key]
        if model is not None and model.alias != alias:
            model = replace(model, alias=alias)
        return model, refusal

    def _checker(self, version: str, scorer: Scorer) -> tuple[InputChecker | None, str | None]:
        """The input checks of ``version`` from its training profile, or (None, why not) when
        it has none; ChurnError when the registry or artifact store cannot be read."""
        try:
            profile = profile_for_version(self._connect(), self.name, version)
        except NoProfile as exc:
            log.warning("version %s is served without input checks: %s", version, exc)
            return None, f"no training profile: {exc}"
        return InputChecker(profile, scorer.feature_set.columns, self.cfg.serving.range_margin, version), None

    def _load_verified(self, version: str) -> Scorer:
        """Load ``version``; with ``registry.require_signed_models`` only from files whose digest
        is the one its signed gate decision names (ChurnError naming what does not match)."""
        if not self.cfg.registry.require_signed_models:
            return load_scorer(f"models:/{self.name}/{version}", version)
        import tempfile

        client = self._connect()
        ev = read_evidence(client, self.name, version, verifier_for(self.cfg))
        gate = ev.decisions.get(SignedKind.GATE) if ev else None
        if gate is None or gate.decision != GateVerdict.PASSED:
            why = (ev.problems.get(SignedKind.GATE) if ev else None) or "no signed gate decision 'passed'"
            raise ChurnError(f"not loaded: {why} (registry.require_signed_models is on)")
        with tempfile.TemporaryDirectory(prefix="churn-serve-") as tmp:
            local = download_version(client, self.name, version, tmp)
            digest = files_digest(local)
            if digest != gate.files_sha256:
                raise ChurnError(f"not loaded: its files (sha256 {digest[:16]}...) are not the files its "
                                 f"signed gate decision names ({gate.files_sha256[:16]}...); they were "
                                 "changed after the gate")
            return load_scorer(str(local), version)

    def _weight(self, mv: Any) -> float | None:
        """The canary fraction its rollout weight tag sets (None: ``serving.canary_fraction``).
        With ``registry.require_signed_models`` only a weight whose signed ``rollout``
        decision verifies for this version and this value: a tag set by hand (a user with write
        access to the registry, no key) routes nobody; it is logged and counted."""
        weight = weight_fraction(mv.tags)
        if weight is None or not self.cfg.registry.require_signed_models:
            return weight
        signed, why = verified_decision(mv, self.name, SignedKind.ROLLOUT, verifier_for(self.cfg))
        text = (mv.tags or {}).get(WEIGHT_TAG)
        if signed is None or signed.metrics_sha256 != metrics_digest({"weight": text}):
            why = why or ("no signed rollout decision" if signed is None else
                          f"the signed rollout weight is not {text}")
            if self._weight_refused != (version_ref(mv), text):
                log.warning("canary version %s: rollout weight %s %% ignored (serving.canary_fraction "
                            "routes): %s", mv.version, text, why)
                self._weight_refused = (version_ref(mv), text)
            self.metrics.inc("churn_rollout_weight_refused_total", {"version": str(mv.version)})
            return None
        return weight

    def reload(self) -> ModelPair:
        """Re-read both aliases; load what changed; swap. Keeps the old pair on registry errors."""

        with self._lock:
            try:
                client = self._connect()
                found = {a: alias_version(client, self.name, a) for a in (CHAMPION, CANARY)}
                loaded, refused = {}, {}
                for alias, mv in found.items():
                    if mv is None:
                        loaded[alias] = None
                        continue
                    loaded[alias], why = self._load(alias, mv)
                    if why:
                        refused[alias] = f"version {mv.version}: {why}"
                keep = {_cache_key(mv) for mv in found.values() if mv is not None}
                self._cache = {k: c for k, c in self._cache.items() if k in keep}
                weight = self._weight(found[CANARY]) if found[CANARY] is not None else None
                new = ModelPair(loaded[CHAMPION], loaded[CANARY], refused, None, datetime.now(UTC), weight)
                self.metrics.inc("churn_model_reloads_total", {"result": "ok"})
            except Exception as exc:  # registry unreachable, bad store: keep serving the old pair
                first = first_line(exc)
                old = self.pair
                new = replace(old, error=first)
                self.metrics.inc("churn_model_reloads_total", {"result": "error"})
                log.warning("model reload failed: %s", first)
            old = self.pair
            self.pair = new  # the atomic swap
            if _versions(old) != _versions(new) or old.canary_weight != new.canary_weight:
                log.info("serving champion=%s canary=%s (canary weight %s)", *_versions(new),
                         "config" if new.canary_weight is None else f"{new.canary_weight:.2%}")
            return new


def _cache_key(mv: Any) -> tuple[str, str]:
    """What a loaded model (or a refusal) is kept under: the version's identity, not its
    number (a model deleted and re-created re-uses numbers), and its signed gate decision
    (a version refused before its gate signed it is looked at again once it has)."""
    return version_ref(mv), str((mv.tags or {}).get(sig_tag(SignedKind.GATE), ""))


def _versions(pair: ModelPair) -> tuple[str | None, str | None]:
    return (pair.champion.version if pair.champion else None, pair.canary.version if pair.canary else None)


# --------------------------------------------------------------------------- the service
