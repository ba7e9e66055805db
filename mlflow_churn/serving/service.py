"""The scoring service: routes ids to champion / canary, fetches features, scores, logs
predictions; raises :class:`ServiceError` (status + detail) for the HTTP shell to answer.

``canary.mode: shadow``: the champion answers every customer; the canary scores the found
rows of a sticky ``canary.shadow_fraction`` of customers on a :class:`ShadowExecutor` after
the response is built, logged as route ``shadow`` rows (never returned). A test request may
force its route (``predict(req, force="champion"|"canary")``, the app's ``X-Churn-Route``
header): its rows are logged ``forced`` and get no shadow scoring.

Stages timed per request and route: ``feature`` (the online store read), ``model`` (the
route's scoring), ``log`` (the prediction log submit), in ``churn_stage_latency_seconds``;
the first two also in every logged row (``feature_ms``, ``model_ms``)."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import defaultdict
from datetime import UTC, datetime
from functools import partial
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from mlflow_churn.config import ChurnConfig
from mlflow_churn.errors import ChurnError, first_line
from mlflow_churn.features.online import open_store
from mlflow_churn.serving.input_checks import CheckResult, InputIssue, encode_warnings
from mlflow_churn.serving.log_writer import LogWriter, PredictionLogUnavailable
from mlflow_churn.serving.models import LoadedModel, ModelManager, ModelPair
from mlflow_churn.serving.prediction_log import FeatureSampler, PredictionRecord
from mlflow_churn.serving.routing import CANARY_ROUTE, CHAMPION_ROUTE, FORCEABLE, SHADOW_ROUTE, routes
from mlflow_churn.serving.shadow import ShadowExecutor
from mlflow_churn.times import utc
from mlflow_churn.web import errors as web_errors
from mlflow_churn.web.breaker import CircuitBreaker, Unavailable, is_outage
from mlflow_churn.web.metrics import Metrics

log = logging.getLogger("mlflow_churn.serving")

STAGE_METRIC = "churn_stage_latency_seconds"
INVALID_METRIC = "churn_input_invalid_total"
#: invalid values named in a 422 detail / listed in its ``invalid`` at most
_SHOW_INVALID, _LIST_INVALID = 5, 100
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
            ("churn_rollout_weight_refused_total", "counter", "alias polls that ignored the canary's "
             "rollout weight tag: its signed rollout decision is missing or does not verify"),
            ("churn_model_loaded", "gauge", "1 for each alias and the version it serves"),
            (STAGE_METRIC, "histogram", "seconds of one stage of POST /predict by route: feature (the "
             "online store read, shared by a request's routes), model (the route's scoring), log (the "
             "prediction log submit)"),
            (INVALID_METRIC, "counter", "feature values the scoring version's training profile calls "
             "invalid, by feature, kind (unknown_category | out_of_range | null) and route (flagged or "
             "rejected, serving.on_invalid)"),
        ):
            self.metrics.describe(name, kind, text)
        self.models = ModelManager(cfg, self.metrics)
        sv = cfg.serving
        self.writer = LogWriter(cfg.prediction_log_url, self.metrics, sv.prediction_log_mode,
                                sv.prediction_log_max_pending,
                                FeatureSampler(sv.log_features_sample_rate, sv.log_features_max_bytes))
        #: the canary's shadow scoring (canary.mode: shadow), off the response path
        self.shadow = (ShadowExecutor(self.metrics, cfg.canary.shadow_queue)
                       if cfg.canary.mode == "shadow" else None)
        self._store: Any = None
        self._store_lock = threading.Lock()
        self._stop = threading.Event()
        self._reloader: threading.Thread | None = None
        fc = cfg.features
        self.breaker = CircuitBreaker(f"the online store ({fc.online_backend})",
                                      lambda: self.store().current_batch(), fc.breaker_failures,
                                      fc.breaker_probe_seconds, is_outage)
        self.metrics.describe("churn_online_store_circuit_open", "gauge",
                              "1 while the online store's circuit breaker is open (503 at once)")

    # lifecycle
    def start(self) -> None:
        self.writer.start()
        if self.shadow is not None:
            self.shadow.start()
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
        if self.shadow is not None:  # its queued scores go to the log before the log closes
            self.shadow.stop()
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
                self._store = open_store(self.cfg, fail_fast=True)  # ChurnError: the caller's 503
            return self._store

    # scoring
    def predict(self, req: PredictRequest, force: str | None = None) -> dict[str, Any]:
        """Score ``req``. ``force`` (``champion`` | ``canary``, the app checked who may) sends
        every row to that route: a test request, logged ``forced``, never shadowed."""
        t0 = time.perf_counter()
        pair = self.models.pair  # one snapshot for the whole request
        if pair.champion is None:
            why = pair.refused.get(CHAMPION_ROUTE) or pair.error or (
                f"no version of '{self.models.name}' has alias champion yet")
            raise ServiceError(503, f"no champion model is being served: {why}")
        if force is not None and force not in FORCEABLE:
            raise ServiceError(422, f"X-Churn-Route must be one of {', '.join(FORCEABLE)}, got "
                                    f"{web_errors.quote(force)}")
        if force == CANARY_ROUTE and pair.canary is None:
            why = pair.refused.get(CANARY_ROUTE) or f"no version of '{self.models.name}' has alias canary"
            raise ServiceError(409, f"X-Churn-Route: canary, but no canary model is being served ({why}); "
                                    "send X-Churn-Route: champion or leave the header out")
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
        as_of = None if req.as_of is None else utc(req.as_of)
        feature_s = 0.0  # the feature stage: the online store read (records: none)
        if req.customer_ids is not None:
            ids = [int(i) for i in req.customer_ids]
            t_feature = time.perf_counter()
            values, found, batch_as_of = self._fetch(ids, pair)
            feature_s = time.perf_counter() - t_feature
            as_of = as_of or batch_as_of or served_at
            values_as_of = batch_as_of  # when the logged feature values were computed
        else:
            records = req.records or []
            ids = [_record_id(r, i) for i, r in enumerate(records)]
            values = records
            found = np.ones(len(ids), dtype=bool)
            as_of = as_of or served_at
            values_as_of = None  # the client's values: no computation time
        known = np.array([i != ANONYMOUS_ID for i in ids], dtype=bool)
        to_canary = np.zeros(len(ids), dtype=bool)
        fraction = self.canary_fraction(pair)  # 0 in shadow mode: the champion answers everyone
        if force is not None:
            to_canary[:] = force == CANARY_ROUTE
        elif pair.canary is not None and fraction > 0:
            to_canary = self._sticky(ids, known, fraction)
        route = np.where(to_canary, CANARY_ROUTE, CHAMPION_ROUTE).astype(object)
        version = np.where(to_canary, pair.canary.version if pair.canary else "",
                           pair.champion.version).astype(object)
        if self.cfg.serving.on_invalid == "reject":  # before any scoring: against the routed version
            self._reject_invalid(self._check_inputs(pair, values, route, found), req, ids)
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
        feature_ms, model_ms = feature_s * 1000.0, {r: spent[r] * 1000.0 for r in spent}
        forced = force is not None
        flagged: dict[int, list[InputIssue]] = {}
        if self.cfg.serving.on_invalid == "flag":  # against the version that scored each row
            flagged = self._check_inputs(pair, values, route, found).by_row()
        request_id = uuid.uuid4().hex
        out, records_out = [], []
        for i, cid in enumerate(ids):
            ok = bool(found[i])
            status = "ok" if ok else "not_found"
            p = float(scores[i]) if ok else None
            warnings = flagged.get(i, [])
            out.append({"customer_id": None if cid == ANONYMOUS_ID else cid, "churn_probability": p,
                        "model_version": version[i], "route": route[i], "status": status,
                        "warnings": [w.to_dict() for w in warnings]})
            records_out.append(PredictionRecord(request_id, cid, version[i], route[i], p,
                                                latency_ms[route[i]], status, served_at, as_of,
                                                values[i] if ok else None, values_as_of,
                                                input_warnings=encode_warnings(warnings),
                                                feature_ms=feature_ms, model_ms=model_ms[route[i]],
                                                forced=forced))
        for row, r, v in errors:
            self.metrics.inc("churn_prediction_errors_total", {"route": r, "version": v})
            records_out.append(PredictionRecord(request_id, ids[row], v, r, None, latency_ms[r], "error",
                                                served_at, as_of, feature_ms=feature_ms,
                                                model_ms=model_ms[r], forced=forced))
        t_log = time.perf_counter()
        self._submit(records_out)  # sync mode: committed before the response is sent
        log_s = time.perf_counter() - t_log
        for (r, v, s), count in _tally(route, version, found).items():
            self.metrics.inc("churn_predictions_total", {"route": r, "version": v, "status": s}, count)
        for r, v in {(r, v) for r, v in zip(route, version, strict=True)}:
            self.metrics.observe("churn_predict_latency_seconds", {"route": r, "version": v},
                                 latency_ms[r] / 1000.0)
        for r in {str(r) for r in route} | {r for _, r, _ in errors}:
            self._observe_stages(r, feature_s, spent[r], log_s)
        if self.shadow is not None and pair.canary is not None and not forced:
            shadowed = self._shadowed(ids, known, found)
            if len(shadowed):  # after the response is built: a queue put, never a wait
                self.shadow.submit(partial(self._shadow_score, pair.canary, values, shadowed, ids, request_id,
                                           served_at, as_of, prepared, feature_s, from_client))
        return {"request_id": request_id, "as_of": as_of.isoformat(), "predictions": out}

    def _observe_stages(self, route: str, feature_s: float, model_s: float, log_s: float) -> None:
        for stage, seconds in (("feature", feature_s), ("model", model_s), ("log", log_s)):
            self.metrics.observe(STAGE_METRIC, {"stage": stage, "route": route}, seconds)

    def _shadowed(self, ids: list[int], known: np.ndarray, found: np.ndarray) -> np.ndarray:
        """The rows the canary shadows: found, of a sticky ``canary.shadow_fraction`` of the
        customers (anonymous records only at fraction 1)."""
        fraction = self.cfg.canary.shadow_fraction
        if fraction >= 1.0:
            return np.flatnonzero(found)
        return np.flatnonzero(self._sticky(ids, known, fraction) & found)

    def _sticky(self, ids: list[int], known: np.ndarray, fraction: float) -> np.ndarray:
        """True for the known customers whose sticky hash (``serving.routing_salt``) falls
        below ``fraction``: the canary's split, and its shadow share."""
        chosen = np.zeros(len(ids), dtype=bool)
        if fraction > 0:
            chosen[known] = routes([i for i, k in zip(ids, known, strict=True) if k], fraction,
                                   self.cfg.serving.routing_salt)
        return chosen

    def _shadow_score(self, model: LoadedModel, values: list[dict[str, Any]], rows: np.ndarray,
                      ids: list[int], request_id: str, served_at: datetime, as_of: datetime,
                      prepared: float, feature_s: float, from_client: bool) -> None:
        """The canary's scores of ``rows`` as route ``shadow`` rows of the request's log (a
        failing canary: ``error`` rows and route=shadow errors); runs on the shadow executor."""
        t1 = time.perf_counter()
        try:
            scores: np.ndarray | None = self._score(model, values, rows, from_client)
        except Exception as exc:  # the response has long gone: the log and the counters say it
            scores = None
            why = exc.detail if isinstance(exc, ServiceError) else f"{type(exc).__name__}: {first_line(exc)}"
            log.warning("shadow: canary version %s failed to score: %s", model.version, why)
        model_s = time.perf_counter() - t1
        latency, labels = (prepared + model_s) * 1000.0, {"route": SHADOW_ROUTE, "version": model.version}
        common = {"feature_ms": feature_s * 1000.0, "model_ms": model_s * 1000.0}
        if scores is None:
            self.metrics.inc("churn_prediction_errors_total", labels, len(rows))
            records = [PredictionRecord(request_id, ids[r], model.version, SHADOW_ROUTE, None, latency,
                                        "error", served_at, as_of, **common) for r in rows]
        else:
            self.metrics.inc("churn_predictions_total", {**labels, "status": "ok"}, len(rows))
            records = [PredictionRecord(request_id, ids[r], model.version, SHADOW_ROUTE, float(sc), latency,
                                        "ok", served_at, as_of, **common)
                       for r, sc in zip(rows, scores, strict=True)]
        t_log = time.perf_counter()
        try:
            self.writer.submit(records)
        except PredictionLogUnavailable as exc:  # counted by the writer; nobody waits for an answer
            log.warning("shadow: %d rows not logged: %s", len(records), exc)
        self.metrics.observe("churn_predict_latency_seconds", labels, latency / 1000.0)
        self._observe_stages(SHADOW_ROUTE, feature_s, model_s, time.perf_counter() - t_log)

    def _check_inputs(self, pair: ModelPair, values: list[dict[str, Any]], route: np.ndarray,
                      found: np.ndarray) -> CheckResult:
        """The input issues of the found rows, each against the training profile of the version
        its ``route`` names (a version without a profile checks nothing); counted in
        ``churn_input_invalid_total``."""
        result = CheckResult()
        for model in (pair.champion, pair.canary):
            if model is None or model.checker is None:
                continue
            rows = np.flatnonzero((route == model.alias) & found)
            if len(rows):
                checked = model.checker.check(values, rows)
                result.issues += checked.issues
                for (feature, kind), n in checked.counts().items():
                    labels = {"feature": feature, "kind": kind, "route": model.alias}
                    self.metrics.inc(INVALID_METRIC, labels, n)
        return result

    def _reject_invalid(self, result: CheckResult, req: PredictRequest, ids: list[int]) -> None:
        """``serving.on_invalid=reject``: 422 naming each invalid field and what it allows."""
        if not result:
            return
        issues = sorted(result.issues, key=lambda i: (i.row, i.feature))[:_LIST_INVALID]
        named = [(_field(req, ids, i), i) for i in issues]
        shown = "; ".join(f"{f}: {i.message}" for f, i in named[:_SHOW_INVALID])
        more = len(result.issues) - len(named[:_SHOW_INVALID])
        raise ServiceError(422, f"invalid input (serving.on_invalid=reject): {shown}"
                                + (f"; and {more} more (see 'invalid')" if more > 0 else ""),
                           invalid=[{"field": f, **i.to_dict()} for f, i in named],
                           invalid_total=len(result.issues))

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
        except Exception as exc:  # the store failed (the breaker counted it if an outage) or a bug: 503
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
        return model.predict(x)

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

    def canary_fraction(self, pair: ModelPair | None = None) -> float:
        """The share of customers routed to the canary now: its rollout weight (the canary
        version's tag, picked up on every alias reload), else ``serving.canary_fraction``."""
        if self.cfg.canary.mode == "shadow":  # the canary answers nobody; it scores beside
            return 0.0
        pair = pair or self.models.pair
        return pair.canary_weight if pair.canary_weight is not None else self.cfg.serving.canary_fraction

    def status(self) -> dict[str, Any]:
        pair = self.models.pair
        return {
            "model_name": self.models.name,
            "champion": pair.champion.version if pair.champion else None,
            "canary": pair.canary.version if pair.canary else None,
            "canary_fraction": self.canary_fraction(pair),
            "canary_fraction_source": "config" if pair.canary_weight is None else "rollout",
            "canary_mode": self.cfg.canary.mode,
            "shadow_fraction": self.cfg.canary.shadow_fraction if self.shadow is not None else 0.0,
            "shadow_dropped": self.shadow.dropped() if self.shadow is not None else 0,
            "refused": pair.refused,
            "input_checks": {m.alias: _checks_state(m) for m in (pair.champion, pair.canary)
                             if m is not None},
            "on_invalid": self.cfg.serving.on_invalid,
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


def _checks_state(model: LoadedModel) -> str:
    """``on`` (naming the features its profile cannot check, if any) or ``off: <why>``."""
    if model.checker is None:
        return f"off: {model.checks_off}"
    partial = "; ".join(f"{f} ({why})" for f, why in model.checker.unchecked.items())
    return f"on; not checked: {partial}" if partial else "on"


def _field(req: PredictRequest, ids: list[int], issue: InputIssue) -> str:
    """Where an invalid value came from: ``records.<i>.<feature>`` of the request, or the
    online store's feature of ``customer_ids.<i>``."""
    if req.records is not None:
        return f"records.{issue.row}.{issue.feature}"
    return f"customer_ids.{issue.row} (customer {ids[issue.row]}, online store) feature {issue.feature}"


def _values(values: Any, columns: list[str]) -> dict[str, Any]:
    if isinstance(values, dict):
        return values
    return dict(zip(columns, values, strict=False))


def _tally(route: np.ndarray, version: np.ndarray, found: np.ndarray) -> dict[tuple[str, str, str], int]:
    out: dict[tuple[str, str, str], int] = defaultdict(int)
    for r, v, f in zip(route, version, found, strict=True):
        out[(str(r), str(v), "ok" if f else "not_found")] += 1
    return out
