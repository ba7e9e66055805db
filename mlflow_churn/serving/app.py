"""Online scoring service: champion + canary behind one ``POST /predict``, sticky split.

``create_app(cfg)`` builds the FastAPI app that ``churn serve`` runs under uvicorn.

- ``POST /predict`` takes ``{"customer_ids": [...]}`` (features read in process from the
  online store, only the columns of each model's feature set) or ``{"records": [{...}]}``
  (raw feature values; a record may carry ``customer_id`` for routing and the log).
  Each id gets ``churn_probability`` (0..1), ``model_version``, ``route``
  (champion|canary) and ``status`` (ok|not_found). Optional ``as_of`` (ISO time, UTC) is
  the business time logged with the prediction; by default the online batch's ``as_of``
  (customer ids) or the serving time (records).
- The versions behind aliases ``champion`` and ``canary`` are loaded by a background
  reloader that polls the registry every ``serving.reload_seconds`` (and on
  ``POST /admin/reload``) and swaps both models in one reference assignment, so a request
  sees either the old pair or the new one and none is dropped. A version whose
  ``feature_set_hash`` tag or ``feature_set.json`` differs from the feature registry's
  definition of that set is refused (visible in ``/ready`` and ``/admin/status``).
- ``serving.canary_fraction`` of customers (sticky hash of the id with
  ``serving.routing_salt``, :mod:`mlflow_churn.serving.routing`) go to the canary.
  When the canary fails to score them, whatever the reason (its model raised, records or
  the online batch lack a column only the canary uses), they get the champion's score and
  the canary error is logged (it counts against the canary in ``churn canary evaluate``).
- Every scored id goes to the durable prediction log (:mod:`mlflow_churn.serving.log_writer`:
  ``serving.prediction_log_mode`` sync commits a request's rows before its response is
  sent; async batches them off the request path, bounded, flushed on shutdown). A row's
  ``latency_ms`` is the request's parsing and feature fetch plus the scoring time of its
  own route's model.
- ``GET /health`` (process alive), ``/ready`` (503 until a champion is loaded),
  ``/metrics`` (Prometheus text: requests and errors by route and version, latency
  histograms, prediction-log counters), admin ``POST /admin/reload|promote|rollback`` and
  ``GET /admin/status`` behind the bearer token ``serving.admin_token``: closed by default
  (without a configured token every admin route answers 403; ``churn serve`` creates one
  in ``<workspace>/secrets/admin_token``). Promote / rollback attach the canary evidence to
  their MLflow run.
- ``serving.api_token`` (optional) guards ``/predict``, ``/ready`` and ``/metrics`` (the
  admin token works there too); ``/health`` stays open. A client ``as_of`` on ``/predict``
  needs the admin token (it files predictions into a canary window).
- Request bodies over ``serving.max_body_bytes`` get 413 before any JSON work; online
  store reads run in the thread pool, bounded by ``features.redis_timeout_ms`` /
  ``features.sqlite_timeout_ms``, behind a circuit breaker (503 at once while the store
  is down, probed in the background).

Errors are JSON ``{"detail": ...}`` naming the field (:mod:`mlflow_churn.web.errors`): 422
for malformed JSON, wrong types, ids outside 0..2**63-1 or missing feature columns; 401 no
token, 403 a wrong one; 404 an admin transition naming a version that does not exist;
409 a registry conflict of an admin transition (no canary, another version is the canary)
or an online batch computed under other feature definitions than the model's; 413 a body
too large; 503 when no champion is served (none has the alias, or it was refused), the
online store has no batch or is unreachable, the prediction log cannot be written (sync
mode) or anything unexpected fails (never with the exception's text). Never a 500.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from mlflow_churn.config import ChurnConfig
from mlflow_churn.errors import ChurnError, first_line
from mlflow_churn.features.registry import FeatureSet
from mlflow_churn.serving.log_writer import LogWriter, PredictionLogUnavailable
from mlflow_churn.serving.metrics import Metrics
from mlflow_churn.serving.prediction_log import PredictionRecord
from mlflow_churn.serving.routing import routes
from mlflow_churn.training.model import Scorer
from mlflow_churn.web import errors as web_errors
from mlflow_churn.web.auth import bearer, check_bearer, same_token
from mlflow_churn.web.breaker import CircuitBreaker, Unavailable

log = logging.getLogger("mlflow_churn.serving")

CHAMPION_ROUTE, CANARY_ROUTE = "champion", "canary"
ANONYMOUS_ID = -1  # logged customer_id of a raw record without one
INT64_MAX = 2**63 - 1  # customer ids are int64 >= 0 (the online store's and the log's type)

#: an HTTP error with a status code and a detail for the client (the apps' shared type)
ServiceError = web_errors.HttpError


# --------------------------------------------------------------------------- request models
Value = StrictStr | StrictInt | StrictFloat | StrictBool | None


class PredictRequest(BaseModel):
    """Exactly one of ``customer_ids`` or ``records``."""

    model_config = ConfigDict(extra="forbid")
    customer_ids: list[Annotated[StrictInt, Field(ge=0, le=INT64_MAX)]] | None = Field(
        None, description="customers to score (online store): integers 0 .. 2**63-1")
    records: list[dict[str, Value]] | None = Field(None, description="raw feature records")
    as_of: datetime | None = Field(None, description="business time logged with the predictions "
                                   "(admin token only)")


class AdminRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field("requested through the serving API", max_length=500)
    version: str | None = Field(None, pattern=r"^[1-9][0-9]{0,18}$",
                                description="expected canary version, e.g. '3' (no-op if already done)")
    as_of: datetime | None = Field(None, description="evidence up to this time (default: newest data)")
    since: datetime | None = Field(None, description="evidence from this time (default: all logged)")
    force: bool = Field(False, description="promote: override a canary verdict other than promote "
                        "(the reason is recorded as the version's promotion_override tag)")


# --------------------------------------------------------------------------- models
class InputEncoder:
    """Raw feature values (dicts, as the online store and clients hold them) -> the float
    matrix XGBoost scores: numerics as float64, categoricals as their category code in the
    feature set's category order, missing / unknown categories as NaN.

    The same values as :meth:`FeatureSet.coerce` followed by XGBoost's own categorical
    encoding (the tests compare with :meth:`Scorer.predict_proba`), without building pandas
    objects per request: one-customer scoring drops from milliseconds to tens of microseconds.
    """

    def __init__(self, feature_set: FeatureSet) -> None:
        self.columns = feature_set.columns
        cats = feature_set.categorical
        self._codes = [{v: float(i) for i, v in enumerate(cats[c])} if c in cats else None
                       for c in self.columns]

    def encode(self, rows: list[dict[str, Any]]) -> np.ndarray:
        """Matrix (len(rows) x features); ChurnError naming a non-numeric numeric feature."""
        out = np.full((len(rows), len(self.columns)), np.nan)
        for j, (col, codes) in enumerate(zip(self.columns, self._codes, strict=True)):
            for i, row in enumerate(rows):
                v = row.get(col)
                if v is None:
                    continue
                if codes is not None:
                    out[i, j] = codes.get(str(v), np.nan)
                    continue
                try:
                    out[i, j] = x = float(v)
                except (TypeError, ValueError, OverflowError):
                    x = math.nan
                if not math.isfinite(x):
                    raise ChurnError(f"feature '{col}' must be a finite number, got "
                                     f"{web_errors.quote(v)}") from None
        return out


@dataclass(frozen=True)
class LoadedModel:
    """One registered version loaded for in-process scoring."""

    alias: str
    version: str
    scorer: Scorer
    encoder: InputEncoder

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


def check_feature_set(cfg: ChurnConfig, tags: dict[str, str], scorer: Scorer) -> str | None:
    """Why ``scorer`` must not be served, or None when its feature set is the registry's.

    Compares the version tag ``feature_set_hash`` (when present) and the model's own
    ``feature_set.json`` with the feature registry's definition of that set.
    """
    from mlflow_churn.features.registry import UnknownFeatureError, registry_for

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

    def _connect(self) -> Any:
        if self._client is None:
            from mlflow.tracking import MlflowClient

            from mlflow_churn.tracking import setup_mlflow

            setup_mlflow(self.cfg)
            uri = self.cfg.mlflow_tracking_uri
            self._client = MlflowClient(uri, uri)
        return self._client

    def _load(self, alias: str, mv: Any) -> tuple[LoadedModel | None, str | None]:
        from mlflow_churn.training.model import load_scorer

        version = str(mv.version)
        if version not in self._cache:
            try:
                scorer = load_scorer(f"models:/{self.name}/{version}", version)
                # one thread per prediction: a request scores a few rows, and a thread pool per
                # call costs more than it saves (x5-10 on a busy 2-core machine)
                scorer.booster.set_param({"nthread": 1})
            except ChurnError as exc:
                self._cache[version] = (None, str(exc))
            else:
                refusal = check_feature_set(self.cfg, dict(mv.tags or {}), scorer)
                model = (None if refusal
                         else LoadedModel(alias, version, scorer, InputEncoder(scorer.feature_set)))
                self._cache[version] = (model, refusal)
        model, refusal = self._cache[version]
        if model is not None and model.alias != alias:
            model = LoadedModel(alias, model.version, model.scorer, model.encoder)
        return model, refusal

    def reload(self) -> ModelPair:
        """Re-read both aliases; load what changed; swap. Keeps the old pair on registry errors."""
        from mlflow_churn.registry.aliases import CANARY, CHAMPION, alias_version

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
                keep = {m.version for m in loaded.values() if m is not None}
                self._cache = {v: c for v, c in self._cache.items() if v in keep or c[0] is None}
                new = ModelPair(loaded[CHAMPION], loaded[CANARY], refused, None, datetime.now(UTC))
                self.metrics.inc("churn_model_reloads_total", {"result": "ok"})
            except Exception as exc:  # registry unreachable, bad store: keep serving the old pair
                first = first_line(exc)
                old = self.pair
                new = ModelPair(old.champion, old.canary, old.refused, first, old.loaded_at)
                self.metrics.inc("churn_model_reloads_total", {"result": "error"})
                log.warning("model reload failed: %s", first)
            old = self.pair
            self.pair = new  # the atomic swap
            if _versions(old) != _versions(new):
                log.info("serving champion=%s canary=%s", *_versions(new))
            return new


def _versions(pair: ModelPair) -> tuple[str | None, str | None]:
    return (pair.champion.version if pair.champion else None, pair.canary.version if pair.canary else None)


# --------------------------------------------------------------------------- the service
class ScoringService:
    """Everything one app instance holds: models, store, log writer, metrics."""

    def __init__(self, cfg: ChurnConfig) -> None:
        self.cfg = cfg
        self.metrics = Metrics()
        for name, kind, text in (
            ("churn_http_requests_total", "counter", "HTTP requests by path and status code"),
            ("churn_predictions_total", "counter", "scored ids by route, model version and status"),
            ("churn_prediction_errors_total", "counter", "failed scorings by route and model version"),
            ("churn_predict_latency_seconds", "histogram", "POST /predict latency by route and version"),
            ("churn_model_reloads_total", "counter", "alias polls by result"),
            ("churn_model_loaded", "gauge", "1 for each alias and the version it serves"),
        ):
            self.metrics.describe(name, kind, text)
        self.models = ModelManager(cfg, self.metrics)
        sv = cfg.serving
        self.writer = LogWriter(cfg.prediction_log_url, self.metrics, sv.prediction_log_mode,
                                sv.prediction_log_max_pending)
        self._store: Any = None
        self._store_lock = threading.Lock()
        self._stop = threading.Event()
        self._reloader: threading.Thread | None = None
        fc = cfg.features
        self.breaker = CircuitBreaker(f"the online store ({fc.online_backend})",
                                      lambda: self.store().current_batch(), fc.breaker_failures,
                                      fc.breaker_probe_seconds, _store_failure)
        self.metrics.describe("churn_online_store_circuit_open", "gauge",
                              "1 while the online store's circuit breaker is open (503 at once)")

    # lifecycle
    def start(self) -> None:
        self.writer.start()
        self._reloader = threading.Thread(target=self._poll, name="alias-reloader", daemon=True)
        self._reloader.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.models.reload()
            self._stop.wait(self.cfg.serving.reload_seconds)

    def stop(self) -> None:
        self._stop.set()
        self.breaker.stop()
        if self._reloader is not None:
            self._reloader.join(timeout=30)
        self.writer.close()
        with self._store_lock:
            if self._store is not None:
                try:
                    self._store.close()
                finally:
                    self._store = None

    # online store
    def store(self) -> Any:
        with self._store_lock:
            if self._store is None:
                try:
                    from mlflow_churn.features.online import open_store
                except ImportError:
                    raise ServiceError(503, "the online feature store is not available in this "
                                       "installation; send raw feature records instead") from None
                self._store = open_store(self.cfg, fail_fast=True)  # ChurnError: the caller's 503
            return self._store

    # scoring
    def predict(self, req: PredictRequest) -> dict[str, Any]:
        t0 = time.perf_counter()
        pair = self.models.pair  # one snapshot for the whole request
        if pair.champion is None:
            why = pair.refused.get(CHAMPION_ROUTE) or pair.error or (
                f"no version of '{self.models.name}' has alias champion yet")
            raise ServiceError(503, f"no champion model is being served: {why}")
        if (req.customer_ids is None) == (req.records is None):
            raise ServiceError(422, "send exactly one of 'customer_ids' (list of integers) or "
                                    "'records' (list of feature objects)")
        n = len(req.customer_ids if req.customer_ids is not None else req.records)
        if n == 0:
            raise ServiceError(422, "'customer_ids' / 'records' is empty; send at least one")
        if n > self.cfg.features.max_ids:
            raise ServiceError(422, f"{n} items in one request; at most {self.cfg.features.max_ids} "
                                    "(features.max_ids)")
        served_at = datetime.now(UTC)
        as_of = None
        if req.as_of is not None:
            as_of = req.as_of.replace(tzinfo=UTC) if req.as_of.tzinfo is None else req.as_of.astimezone(UTC)
        if req.customer_ids is not None:
            ids = [int(i) for i in req.customer_ids]
            values, found, batch_as_of = self._fetch(ids, pair)
            as_of = as_of or batch_as_of or served_at
        else:
            records = req.records or []
            ids = [_record_id(r, i) for i, r in enumerate(records)]
            values = records
            found = np.ones(len(ids), dtype=bool)
            as_of = as_of or served_at
        known = np.array([i != ANONYMOUS_ID for i in ids], dtype=bool)
        to_canary = np.zeros(len(ids), dtype=bool)
        if pair.canary is not None and self.cfg.serving.canary_fraction > 0:
            to_canary[known] = routes([i for i, k in zip(ids, known, strict=True) if k],
                                      self.cfg.serving.canary_fraction, self.cfg.serving.routing_salt)
        route = np.where(to_canary, CANARY_ROUTE, CHAMPION_ROUTE).astype(object)
        version = np.where(to_canary, pair.canary.version if pair.canary else "",
                           pair.champion.version).astype(object)
        scores = np.full(len(ids), np.nan)
        prepared = time.perf_counter() - t0  # parsing + feature fetch, shared by both routes
        spent = {CHAMPION_ROUTE: 0.0, CANARY_ROUTE: 0.0}  # seconds each route's model took
        errors: list[tuple[int, str, str]] = []  # (row, route, version) of failed canary scorings
        from_client = req.records is not None
        if to_canary.any():
            rows = np.flatnonzero(to_canary & found)
            failure = self._score_into(scores, pair.canary, values, rows, from_client, spent)
            if failure is not None:  # a broken canary must not hurt customers: the champion serves
                log.warning("canary version %s failed, champion serves: %s", pair.canary.version, failure)
                errors += [(int(r), CANARY_ROUTE, pair.canary.version) for r in rows]
                route[rows], version[rows] = CHAMPION_ROUTE, pair.champion.version
        champ_rows = np.flatnonzero((route == CHAMPION_ROUTE) & found)
        failure = self._score_into(scores, pair.champion, values, champ_rows, from_client, spent)
        if failure is not None:
            if isinstance(failure, ServiceError):  # the request's fault (422) or the batch's (503)
                raise failure
            self.metrics.inc("churn_prediction_errors_total",
                             {"route": CHAMPION_ROUTE, "version": pair.champion.version}, len(champ_rows))
            self._log_errors(ids, [(int(r), CHAMPION_ROUTE, pair.champion.version) for r in champ_rows],
                             served_at, as_of, t0)
            log.warning("champion version %s failed to score: %s: %s", pair.champion.version,
                        type(failure).__name__, failure)
            raise ServiceError(503, f"champion version {pair.champion.version} failed to score "
                                    f"({type(failure).__name__}; the service log has the details)")
        # a row's latency: the shared preparation plus its own route's scoring (ms), so a slow
        # canary shows in the canary's numbers only
        latency_ms = {r: (prepared + spent[r]) * 1000.0 for r in spent}
        request_id = uuid.uuid4().hex
        out, records_out = [], []
        for i, cid in enumerate(ids):
            ok = bool(found[i])
            status = "ok" if ok else "not_found"
            p = float(scores[i]) if ok else None
            out.append({"customer_id": None if cid == ANONYMOUS_ID else cid, "churn_probability": p,
                        "model_version": version[i], "route": route[i], "status": status})
            records_out.append(PredictionRecord(request_id, cid, version[i], route[i], p,
                                                latency_ms[route[i]], status, served_at, as_of))
        for row, r, v in errors:
            self.metrics.inc("churn_prediction_errors_total", {"route": r, "version": v})
            records_out.append(PredictionRecord(request_id, ids[row], v, r, None, latency_ms[r], "error",
                                                served_at, as_of))
        self._submit(records_out)  # sync mode: committed before the response is sent
        for (r, v, s), count in _tally(route, version, found).items():
            self.metrics.inc("churn_predictions_total", {"route": r, "version": v, "status": s}, count)
        for r, v in {(r, v) for r, v in zip(route, version, strict=True)}:
            self.metrics.observe("churn_predict_latency_seconds", {"route": r, "version": v},
                                 latency_ms[r] / 1000.0)
        return {"request_id": request_id, "as_of": as_of.isoformat(), "predictions": out}

    def _fetch(self, ids: list[int],
               pair: ModelPair) -> tuple[list[dict[str, Any]], np.ndarray, datetime | None]:
        columns: list[str] = []
        for m in (pair.champion, pair.canary):
            if m is not None:
                columns += [c for c in m.columns if c not in columns]
        guard = self.breaker.call
        try:
            store = guard(self.store)
            batch = guard(store.current_batch)  # then read that batch: ids and as_of stay consistent
            if batch is None:
                raise ServiceError(503, "the online store has no batch yet; run `churn features materialize`")
            rows = guard(lambda: store.get(ids, columns, batch_id=batch.batch_id))
        except ServiceError:
            raise
        except (ChurnError, Unavailable) as exc:
            raise ServiceError(503, f"online feature store: {exc}") from None
        except Exception as exc:  # Redis / SQLite failed or timed out: the breaker counted it
            raise ServiceError(503, f"online feature store unavailable: {type(exc).__name__} (a read "
                                    "waits at most features.redis_timeout_ms / features.sqlite_timeout_ms)"
                               ) from None
        for m in (pair.champion, pair.canary):  # only values computed under the model's definitions
            defs = m.scorer.feature_set.features if m else ()
            clash = batch.definition_conflicts({f.full_name: f.hash for f in defs})
            if clash:
                raise ServiceError(409, batch.conflict_detail(clash, f"model version {m.version}"))
        found = np.array([i in rows for i in ids], dtype=bool)
        values = [_values(rows[i].values, columns) if i in rows else {} for i in ids]
        return values, found, batch.as_of

    def _score_into(self, scores: np.ndarray, model: LoadedModel, values: list[dict[str, Any]],
                    rows: np.ndarray, from_client: bool, spent: dict[str, float]) -> Exception | None:
        """Score ``rows`` with ``model`` into ``scores`` and add the seconds it took to
        ``spent[model.alias]``; the exception instead when it fails (nothing written)."""
        t1 = time.perf_counter()
        try:
            scores[rows] = self._score(model, values, rows, from_client)
        except Exception as exc:  # the caller decides: canary -> fall back, champion -> 4xx/503
            return exc
        finally:
            spent[model.alias] += time.perf_counter() - t1
        return None

    def _score(self, model: LoadedModel, values: list[dict[str, Any]], rows: np.ndarray,
               from_client: bool) -> np.ndarray:
        if len(rows) == 0:
            return np.zeros(0)
        chosen = [values[r] for r in rows]
        missing = [c for c in model.columns if any(c not in v for v in chosen)]
        if missing:
            what = f"of feature set '{model.scorer.feature_set.name}' (model version {model.version})"
            if from_client:
                raise ServiceError(422, f"records lack feature column(s) {', '.join(missing)} {what}")
            raise ServiceError(503, f"the online batch lacks feature(s) {', '.join(missing)} {what}; "
                                    "re-run `churn features materialize`")
        try:
            x = model.encoder.encode(chosen)
        except ChurnError as exc:
            raise ServiceError(422, f"{exc} (model version {model.version})") from None
        return np.asarray(model.scorer.booster.inplace_predict(
            x, predict_type="value", validate_features=False), dtype="float64").reshape(-1)

    def _log_errors(self, ids: list[int], errors: list[tuple[int, str, str]], served_at: datetime,
                    as_of: datetime, t0: float) -> None:
        latency = (time.perf_counter() - t0) * 1000.0
        rid = uuid.uuid4().hex
        try:
            self._submit([PredictionRecord(rid, ids[row], v, r, None, latency, "error", served_at, as_of)
                          for row, r, v in errors])
        except ServiceError as exc:  # the scoring failure is what the client must hear about
            log.warning("prediction log: error rows not logged: %s", exc.detail)

    def _submit(self, records: list[PredictionRecord]) -> None:
        try:
            self.writer.submit(records)
        except PredictionLogUnavailable as exc:
            raise ServiceError(503, f"{exc}; with serving.prediction_log_mode=sync no prediction is "
                                    "answered before it is logged") from None

    def gauges(self) -> list[tuple[str, dict[str, str], float]]:
        pair = self.models.pair
        out = [("churn_model_loaded", {"alias": m.alias, "version": m.version}, 1.0)
               for m in (pair.champion, pair.canary) if m is not None]
        out.append(("churn_prediction_log_pending", {}, float(self.writer.pending())))
        out.append(("churn_online_store_circuit_open", {}, float(self.breaker.is_open)))
        return out

    def status(self) -> dict[str, Any]:
        pair = self.models.pair
        return {
            "model_name": self.models.name,
            "champion": pair.champion.version if pair.champion else None,
            "canary": pair.canary.version if pair.canary else None,
            "canary_fraction": self.cfg.serving.canary_fraction,
            "refused": pair.refused,
            "error": pair.error,
            "loaded_at": pair.loaded_at.isoformat() if pair.loaded_at else None,
        }


def _record_id(record: dict[str, Any], index: int) -> int:
    cid = record.get("customer_id")
    if cid is None:  # absent or null: an anonymous record
        return ANONYMOUS_ID
    if isinstance(cid, bool) or not isinstance(cid, int) or not 0 <= cid <= INT64_MAX:
        raise ServiceError(422, f"records.{index}.customer_id must be an integer 0 .. {INT64_MAX}, got "
                                f"{web_errors.quote(cid)}")
    return int(cid)


def _store_failure(exc: BaseException) -> bool:
    """A failure of the online store itself (counts for the breaker), not an answer."""
    from mlflow_churn.features.online import StoreUnavailable

    if isinstance(exc, ServiceError | Unavailable):
        return False
    return isinstance(exc, StoreUnavailable) or not isinstance(exc, ChurnError)


def _values(values: Any, columns: list[str]) -> dict[str, Any]:
    if isinstance(values, dict):
        return values
    return dict(zip(columns, values, strict=False))


def _tally(route: np.ndarray, version: np.ndarray, found: np.ndarray) -> dict[tuple[str, str, str], int]:
    out: dict[tuple[str, str, str], int] = defaultdict(int)
    for r, v, f in zip(route, version, found, strict=True):
        out[(str(r), str(v), "ok" if f else "not_found")] += 1
    return out


def _registry_error(exc: Exception, what: str) -> ServiceError:
    """An MlflowException of an admin route as a client answer (never its text)."""
    code = str(getattr(exc, "error_code", "") or "")
    if code == "RESOURCE_DOES_NOT_EXIST":
        return ServiceError(404, f"{what} does not exist in the model registry")
    if code == "INVALID_PARAMETER_VALUE":
        return ServiceError(422, f"the model registry refused {what} as invalid")
    log.warning("model registry error on %s: %s", what, exc)
    return ServiceError(503, f"the model registry could not answer for {what} ({code or 'no error code'}); "
                             "try again")


def create_app(cfg: ChurnConfig, start_background: bool = True) -> FastAPI:
    """The scoring app for ``cfg`` (models, store and log are opened on startup)."""
    from mlflow.exceptions import MlflowException

    service = ScoringService(cfg)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if start_background:
            service.start()
        try:
            yield
        finally:
            service.stop()

    app = FastAPI(title="mlflow-churn scoring", version="1", lifespan=lifespan)
    app.state.service = service
    sv = cfg.serving

    def _json(status: int, detail: Any) -> JSONResponse:
        return web_errors.error_response(status, detail)

    @app.exception_handler(ChurnError)
    async def _churn_error(_req: Request, exc: ChurnError) -> JSONResponse:
        return _json(409, str(exc))

    @app.exception_handler(MlflowException)
    async def _mlflow_error(_req: Request, exc: MlflowException) -> JSONResponse:
        return _registry_error(exc, "the request").response()

    def _count(path: str, status: int) -> None:
        service.metrics.inc("churn_http_requests_total", {"path": path if path in _PATHS else "other",
                                                          "code": str(status)})

    web_errors.install(app, sv.max_body_bytes, "serving.max_body_bytes", on_response=_count)

    admin_scheme = HTTPBearer(scheme_name="admin", auto_error=False, description="serving.admin_token")
    api_scheme = HTTPBearer(scheme_name="api", auto_error=False,
                            description="serving.api_token (when set) or serving.admin_token")

    async def need_admin(request: Request, _scheme: Any = Depends(admin_scheme)) -> None:
        if not sv.admin_token:
            raise ServiceError(403, "admin routes are closed: serving.admin_token is not set (`churn serve` "
                                    "creates one in <workspace>/secrets/admin_token)")
        check_bearer(request, {"serving.admin_token": sv.admin_token}, "admin routes")

    async def need_api(request: Request, _scheme: Any = Depends(api_scheme)) -> None:
        if sv.api_token:
            check_bearer(request, {"serving.api_token": sv.api_token, "serving.admin_token": sv.admin_token},
                         "/predict, /ready and /metrics")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", dependencies=[Depends(need_api)])
    async def ready() -> JSONResponse:
        st = service.status()
        if st["champion"] is None:
            why = st["refused"].get(CHAMPION_ROUTE) or st["error"] or "no champion loaded yet"
            return _json(503, f"not ready: {why}")
        return JSONResponse({"status": "ready", **st})

    @app.get("/metrics", dependencies=[Depends(need_api)])
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(service.metrics.render(service.gauges()),
                                 media_type="text/plain; version=0.0.4")

    # a plain def: FastAPI runs it in its thread pool, so the blocking work (store reads,
    # bounded by the store timeouts, the sync prediction-log commit, XGBoost) never stalls
    # the event loop and other requests
    @app.post("/predict", dependencies=[Depends(need_api)])
    def predict(req: PredictRequest, request: Request) -> JSONResponse:
        if req.as_of is not None and not same_token(bearer(request), sv.admin_token):
            raise ServiceError(403, "as_of: a client business time needs the admin token "
                                    "(serving.admin_token); leave as_of out to log the batch's as_of")
        return JSONResponse(service.predict(req))

    @app.get("/admin/status", dependencies=[Depends(need_admin)])
    def admin_status() -> dict[str, Any]:
        return service.status()

    @app.post("/admin/reload", dependencies=[Depends(need_admin)])
    def admin_reload() -> dict[str, Any]:
        service.models.reload()
        return service.status()

    def _transition(body: AdminRequest | None, kind: str) -> dict[str, Any]:
        from mlflow_churn.serving import canary

        body = body or AdminRequest()
        name = service.models.name
        if body.version is not None:  # 404 for a version the registry does not have
            try:
                service.models._connect().get_model_version(name, body.version)
            except MlflowException as exc:
                raise _registry_error(exc, f"version: version {body.version} of '{name}'") from None
        # the transition attaches the canary evidence of [since, as_of] (default: the same
        # window `churn canary evaluate` looks at) to its MLflow run
        extra = {"force": body.force} if kind == "promote" else {}
        try:
            result = getattr(canary, kind)(cfg, body.reason, version=body.version, as_of=body.as_of,
                                           since=body.since, **extra)
        except MlflowException as exc:
            raise _registry_error(exc, f"the {kind} of '{name}'") from None
        service.models.reload()
        return {"transition": result.to_dict(), "serving": service.status()}

    @app.post("/admin/promote", dependencies=[Depends(need_admin)])
    def admin_promote(body: AdminRequest | None = None) -> dict[str, Any]:
        return _transition(body, "promote")

    @app.post("/admin/rollback", dependencies=[Depends(need_admin)])
    def admin_rollback(body: AdminRequest | None = None) -> dict[str, Any]:
        return _transition(body, "rollback")

    return app


_PATHS = {"/predict", "/health", "/ready", "/metrics", "/admin/status", "/admin/reload",
          "/admin/promote", "/admin/rollback"}


def serve(cfg: ChurnConfig, host: str | None = None, port: int | None = None) -> None:
    """Run the app under uvicorn until interrupted (flushes the prediction log on exit)."""
    import uvicorn

    uvicorn.run(create_app(cfg), host=host or cfg.serving.host, port=port or cfg.serving.port,
                log_level="warning", access_log=False, timeout_graceful_shutdown=10)
