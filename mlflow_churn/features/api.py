"""HTTP feature API (FastAPI): ``GET /features``, ``GET /health``, ``GET /metrics``.

- ``GET /features?ids=1,2,3[&features=a,b | &feature_set=name]``: per id the values, each
  feature's version, the event time the values were computed from and a status:
  ``found``; ``missing`` (not in the serving batch: unknown or churned customer);
  ``stale`` (the row's own event time, i.e. the newest event its values used, is older than
  ``features.freshness_sla_hours`` at request time: a customer without recent activity is
  stale even in a fresh batch). Repeated ``ids=`` or ``features=`` are merged; an empty
  ``features=`` or ``feature_set=`` is a 400. A 409 names the answered features whose
  values the batch computed under another definition than this server's registry holds.
- ``GET /health``: 200 while the serving batch's watermark is younger than the SLA, else 503;
  the body gives the age and the SLA in seconds.
- ``GET /metrics``: Prometheus text: ``feature_freshness_seconds`` (and the SLA it is held to,
  ``feature_freshness_sla_seconds``, for the alert rule in ``deploy/prometheus/``), request latency
  histogram ``feature_request_duration_seconds``, request, id-status and cache counters.

Rows are cached in process for ``features.cache_ttl_seconds``; every request reads the
serving batch id first and a new batch empties the cache, so a fresh batch is served from
the first request after its flip. The clock is read here, at the HTTP edge, only.
Bad input is a 4xx with a JSON ``detail`` (:mod:`mlflow_churn.web.errors`); an unusable
store is a 404 (none yet) or 503 (unreachable, or a batch whose rows were retired under a
request), never with an exception's text.

Hardening: with ``features.api_token`` set, ``/features`` and ``/metrics`` need
``Authorization: Bearer <token>`` (``/health`` stays open). Request bodies over
``features.max_body_bytes`` get 413. Store reads run in the thread pool (plain ``def``
handlers), each bounded by ``features.redis_timeout_ms`` / ``features.sqlite_timeout_ms``;
after ``features.breaker_failures`` failures in a row a circuit breaker answers 503 at
once and probes the store in the background. ``/metrics`` never reads the store while the
circuit is open (it shows the last batch seen).
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPBearer
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4
from pydantic import BaseModel, ConfigDict

from mlflow_churn.errors import ChurnError
from mlflow_churn.features.online import BatchInfo, OnlineStore, StoreUnavailable, open_store
from mlflow_churn.features.registry import FeatureRegistry, UnknownFeatureError, registry_for
from mlflow_churn.web import errors as web_errors
from mlflow_churn.web.auth import check_bearer
from mlflow_churn.web.breaker import CircuitBreaker, Unavailable, is_outage
from mlflow_churn.web.limits import HttpLimits
from mlflow_churn.web.limits import serve as serve_app
from mlflow_churn.web.metrics import Metrics

INT64_MAX = 2**63 - 1
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_VERSIONED = re.compile(r"^(?P<base>.+)_v(?P<n>\d+)$")
_dumps = json.JSONEncoder(separators=(",", ":")).encode


#: a 4xx/5xx answer: status, detail and optional extra JSON fields (the apps' shared type)
ApiError = web_errors.HttpError


RawRow = tuple[int | None, str]  # (event_time_ms, values JSON object text)


class Health(BaseModel):
    """``GET /health`` (OpenAPI only), 200 and 503: ``status`` ok | stale | no_batch |
    store_unavailable, the SLA, the batch's age when there is one, else a ``detail``."""

    model_config = ConfigDict(extra="allow")
    status: str
    sla_seconds: float
    detail: str | None = None
    batch_id: str | None = None
    as_of: str | None = None
    watermark: str | None = None
    age_seconds: float | None = None
    rows: int | None = None


class RowCache:
    """Rows of the serving batch by customer id, each kept ``ttl`` seconds (monotonic).

    ``lookup`` empties the cache when the batch id changes. ``ttl <= 0`` disables it.
    Holds at most ``max_entries`` ids (emptied when full).
    """

    def __init__(self, ttl: float, max_entries: int = 200_000) -> None:
        self.ttl, self.max_entries = ttl, max_entries
        self.batch_id: str | None = None
        self._rows: dict[int, tuple[float, RawRow | None]] = {}
        self._lock = threading.Lock()
        self.hits = self.misses = self.invalidations = 0

    def lookup(self, batch_id: str, ids: Sequence[int],
               fetch: Callable[[list[int]], dict[int, RawRow]]) -> dict[int, RawRow | None]:
        now = time.monotonic()
        out: dict[int, RawRow | None] = {}
        todo: list[int] = []
        with self._lock:
            if batch_id != self.batch_id:
                if self.batch_id is not None:
                    self.invalidations += 1
                self._rows.clear()
                self.batch_id = batch_id
            for i in ids:
                hit = self._rows.get(i) if self.ttl > 0 else None
                if hit is not None and hit[0] > now:
                    out[i] = hit[1]
                else:
                    todo.append(i)
            self.hits += len(ids) - len(todo)
            self.misses += len(todo)
        if todo:
            fetched = fetch(todo)
            with self._lock:
                if self.ttl > 0 and self.batch_id == batch_id:
                    if len(self._rows) + len(todo) > self.max_entries:
                        self._rows.clear()
                    expires = now + self.ttl
                    for i in todo:
                        self._rows[i] = (expires, fetched.get(i))
            for i in todo:
                out[i] = fetched.get(i)
        return out


#: name -> (type, help) of every series of the feature API's /metrics (the dashboards' names)
_SERIES = {
    "feature_requests_total": ("counter", "Requests by endpoint and HTTP status."),
    "feature_request_duration_seconds": ("histogram", "Request latency inside the app (seconds)."),
    "feature_ids_total": ("counter", "Customer ids answered, by status."),
    "feature_freshness_seconds": ("gauge", "Age of the serving batch: now - its watermark (seconds)."),
    "feature_freshness_sla_seconds": ("gauge", "features.freshness_sla_hours in seconds: an older batch is "
                                      "stale (the alert rule compares the two)."),
    "feature_batch_rows": ("gauge", "Customers in the serving batch."),
    "feature_store_circuit_open": ("gauge", "1 while the online store's circuit breaker is open."),
    "feature_cache_hits": ("counter", "Ids answered from the in-process cache."),
    "feature_cache_misses": ("counter", "Ids read from the online store."),
    "feature_cache_invalidations": ("counter", "Cache emptied because a new batch landed."),
}


class FeatureMetrics(Metrics):
    """Request counters, the latency histogram and id counts of the feature API (on
    :class:`~mlflow_churn.web.metrics.Metrics`, one registry per app); freshness, batch rows,
    cache and circuit state are read at scrape time."""

    def __init__(self) -> None:
        super().__init__(buckets=LATENCY_BUCKETS)
        for name, (kind, text) in _SERIES.items():
            self.describe(name, kind, text)
        for status in ("found", "missing", "stale"):  # every status shows, at 0 until counted
            self.inc("feature_ids_total", {"status": status}, 0)

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        self.inc("feature_requests_total", {"endpoint": endpoint, "code": str(status)})
        self.observe("feature_request_duration_seconds", {"endpoint": endpoint}, seconds)

    def count_ids(self, counts: dict[str, int]) -> None:
        for k, v in counts.items():
            if v:
                self.inc("feature_ids_total", {"status": k}, v)

    def render_state(self, freshness: float | None, batch: BatchInfo | None, cache: RowCache,
                     breaker: CircuitBreaker | None = None, sla_seconds: float | None = None) -> str:
        values = [("feature_freshness_seconds", {}, freshness if freshness is not None else math.nan),
                  ("feature_batch_rows", {}, batch.rows if batch else 0),
                  ("feature_store_circuit_open", {}, int(breaker.is_open) if breaker else 0)]
        if sla_seconds is not None:
            values.append(("feature_freshness_sla_seconds", {}, sla_seconds))
        if cache is not None:
            values += [("feature_cache_hits", {}, cache.hits), ("feature_cache_misses", {}, cache.misses),
                       ("feature_cache_invalidations", {}, cache.invalidations)]
        return self.render(values)


def parse_ids(raw: str | None, max_ids: int) -> list[int]:
    """Comma-separated integer ids (duplicates dropped, order kept) or ApiError 400."""
    if raw is None or not raw.strip():
        raise ApiError(400, "ids is required: comma-separated customer ids, e.g. ?ids=1,2,3")
    parts = [p.strip() for p in raw.split(",")]
    out: dict[int, None] = {}
    for p in parts:
        if not re.fullmatch(r"[0-9]{1,19}", p or "", flags=re.ASCII):  # \d would take Arabic-Indic digits
            if re.fullmatch(r"[0-9]+", p or "", flags=re.ASCII):
                raise ApiError(400, f"ids: customer id '{p[:40]}' is larger than {INT64_MAX}")
            raise ApiError(400, f"ids: customer id {web_errors.quote(p)} is not a non-negative integer "
                                "in ASCII digits; use comma-separated integers, e.g. ?ids=1,2,3")
        value = int(p)
        if value > INT64_MAX:
            raise ApiError(400, f"ids: customer id '{p}' is larger than {INT64_MAX}")
        out[value] = None
    if len(out) > max_ids:
        raise ApiError(400, f"{len(out)} ids asked, at most {max_ids} per request "
                            "(features.max_ids); split the request")
    return list(out)


def _unknown_feature(registry: FeatureRegistry, name: str, err: UnknownFeatureError) -> ApiError:
    m = _VERSIONED.match(name)
    base = m.group("base") if m else name
    versions = [d for d in registry.definitions() if d.name == base]
    if versions:
        avail = [d.full_name for d in versions]
        return ApiError(404, f"unknown version '{name}' of feature '{base}'; available versions: "
                             + ", ".join(f"{d.full_name} (v{d.version})" for d in versions),
                        available=avail)
    return ApiError(404, str(err), available=err.available)


class FeatureService:
    """What the endpoints share: config, registry, the store (opened lazily), cache, metrics."""

    def __init__(self, cfg: Any, store: OnlineStore | None = None,
                 clock: Callable[[], datetime] | None = None) -> None:
        self.cfg = cfg
        self.registry = registry_for(cfg)
        self._store = store
        self._lock = threading.Lock()
        self.clock = clock or (lambda: datetime.now(UTC))
        self.cache = RowCache(cfg.features.cache_ttl_seconds)
        self.metrics = FeatureMetrics()
        self.sla_seconds = cfg.features.freshness_sla_hours * 3600.0
        self._versions: dict[str, int] = {}
        self._conflicts: dict[tuple[str, tuple[str, ...]], list[str]] = {}
        fc = cfg.features
        self.breaker = CircuitBreaker(f"the online store ({fc.online_backend})", self._probe,
                                      fc.breaker_failures, fc.breaker_probe_seconds, is_outage)
        self.last_batch: BatchInfo | None = None  # the newest batch seen (for /metrics)

    def _probe(self) -> None:
        self.store().current_batch()

    def guarded(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` (a store read) through the circuit breaker."""
        return self.breaker.call(fn)

    def store(self) -> OnlineStore:
        if self._store is None:
            with self._lock:
                if self._store is None:
                    try:
                        self._store = open_store(self.cfg, must_exist=True, fail_fast=True)
                    except StoreUnavailable:
                        raise
                    except ChurnError as exc:
                        raise ApiError(404, str(exc)) from None
        return self._store

    def batch(self) -> BatchInfo:
        store = self.guarded(self.store)
        batch = self.guarded(store.current_batch)
        if batch is None:
            raise ApiError(404, f"the online store {store.location} has no batch yet; "
                                "run `churn features materialize`")
        self.last_batch = batch
        return batch

    def status_batch(self) -> BatchInfo | None:
        """The serving batch for /metrics: read (bounded) while the circuit is closed, else
        the last one seen; never waits on a store known to be down."""
        if not self.breaker.is_open:
            try:
                return self.batch()
            except Exception:  # noqa: BLE001 - /metrics answers with what it knows
                pass
        return self.last_batch

    def version(self, name: str) -> int:
        v = self._versions.get(name)
        if v is None:
            try:
                v = self.registry.get(name).version
            except UnknownFeatureError:
                m = _VERSIONED.match(name)
                v = int(m.group("n")) if m else 1
            self._versions[name] = v
        return v

    def select(self, batch: BatchInfo, features: str | None,
               feature_set: str | None) -> tuple[list[str], dict[str, Any]]:
        if features is not None and feature_set is not None:
            raise ApiError(400, "give features= or feature_set=, not both")
        meta: dict[str, Any] = {"feature_set": None, "feature_set_hash": None}
        if feature_set is not None:
            if not feature_set.strip():
                raise ApiError(400, "feature_set= is empty; name a feature set, e.g. "
                                    "feature_set=churn_default, or leave it out for every feature")
            try:
                fs = self.registry.feature_set(feature_set.strip())
            except UnknownFeatureError as err:
                raise ApiError(404, str(err), available=err.available) from None
            names = fs.columns
            meta = {"feature_set": fs.name, "feature_set_hash": fs.hash}
        elif features is not None:
            if not features.strip():
                raise ApiError(400, "features= is empty; give comma-separated feature names, "
                                    "e.g. features=monthly_usage,plan, or leave it out for every feature")
            names = list(dict.fromkeys(n.strip() for n in features.split(",")))
            if "" in names:
                raise ApiError(400, f"empty feature name in features='{features}'")
            for n in names:
                try:
                    self.registry.get(n)
                except UnknownFeatureError as err:
                    raise _unknown_feature(self.registry, n, err) from None
        else:
            names = list(batch.features)
        absent = [n for n in names if n not in batch.features]
        if absent:
            raise ApiError(404, f"feature(s) {', '.join(absent)} are not in the serving batch "
                                f"{batch.batch_id}; run `churn features materialize` to add them",
                           available=list(batch.features))
        self.check_definitions(batch, names)
        return names, meta

    def check_definitions(self, batch: BatchInfo, names: list[str]) -> None:
        """ApiError 409 naming the features of ``names`` that ``batch`` computed under another
        definition than this server's registry holds (cached per batch and selection)."""
        key = (batch.batch_id, tuple(names))
        conflicts = self._conflicts.get(key)
        if conflicts is None:
            expected = {}
            for n in names:
                try:
                    expected[n] = self.registry.get(n).hash
                except UnknownFeatureError:
                    expected[n] = None
            conflicts = batch.definition_conflicts(expected)
            if len(self._conflicts) > 1000:
                self._conflicts.clear()
            self._conflicts[key] = conflicts
        if conflicts:
            raise ApiError(409, batch.conflict_detail(conflicts, "this server's feature registry"),
                           features=conflicts)

    def features(self, ids_raw: str | None, features: str | None, feature_set: str | None) -> str:
        """The JSON answer of ``GET /features``, built as text.

        Rows come from the store as ``(event_time_ms, values JSON object)``; when every
        feature of the batch is asked for, that text is spliced in as is, otherwise only the
        asked features are re-encoded. The per-id ``versions`` map is encoded once.
        """
        ids = parse_ids(ids_raw, self.cfg.features.max_ids)
        batch = self.batch()
        names, meta = self.select(batch, features, feature_set)
        store = self.store()
        rows = self.cache.lookup(batch.batch_id, ids,
                                 lambda todo: self.guarded(lambda: store.get_raw(todo, batch.batch_id)))
        now = self.clock()
        sla = self.sla_seconds
        whole = names == list(batch.features)
        versions = _dumps({n: self.version(n) for n in names})
        counts = {"found": 0, "missing": 0, "stale": 0}
        times: dict[int | None, tuple[str, str]] = {}
        parts = []
        for cid in ids:
            row = rows.get(cid)
            if row is None:
                counts["missing"] += 1
                parts.append(f'{{"customer_id":{cid},"status":"missing","event_time":null,'
                             f'"values":null,"versions":{versions}}}')
                continue
            ms, text = row
            hit = times.get(ms)
            if hit is None:
                if ms is None:
                    hit = ("null", "stale")
                else:
                    et = datetime.fromtimestamp(ms / 1000.0, tz=UTC)
                    hit = (f'"{et.isoformat()}"', "stale" if (now - et).total_seconds() > sla else "found")
                times[ms] = hit
            when, status = hit
            counts[status] += 1
            if not whole:
                obj = json.loads(text)
                text = _dumps({n: obj[n] for n in names})
            parts.append(f'{{"customer_id":{cid},"status":"{status}","event_time":{when},'
                         f'"values":{text},"versions":{versions}}}')
        self.metrics.count_ids(counts)
        head = _dumps({"batch_id": batch.batch_id, "as_of": batch.as_of.isoformat(),
                       "watermark": batch.watermark.isoformat() if batch.watermark else None,
                       **meta, "features": names})
        return head[:-1] + ',"results":[' + ",".join(parts) + "]}"

    def health(self) -> tuple[int, dict]:
        try:
            batch = self.batch()
        except ApiError as err:
            return 503, {"status": "no_batch", "detail": err.detail, "sla_seconds": self.sla_seconds}
        except Exception as err:  # noqa: BLE001 - unreachable store (or circuit open): at once
            return 503, {"status": "store_unavailable", "detail": _unavailable(err),
                         "sla_seconds": self.sla_seconds}
        age = self.age(batch)
        fresh = age is not None and age <= self.sla_seconds
        body = {
            "status": "ok" if fresh else "stale", "batch_id": batch.batch_id,
            "as_of": batch.as_of.isoformat(),
            "watermark": batch.watermark.isoformat() if batch.watermark else None,
            "age_seconds": age, "sla_seconds": self.sla_seconds, "rows": batch.rows,
        }
        if not fresh:  # a 503 carries a detail like every other error answer
            body["detail"] = (f"the serving batch {batch.batch_id} is stale: "
                              + (f"{age:.0f} s old, more than features.freshness_sla_hours "
                                 f"({self.sla_seconds:.0f} s)" if age is not None else "it has no watermark")
                              + "; run `churn features materialize`")
        return (200 if fresh else 503), body

    def age(self, batch: BatchInfo) -> float | None:
        return (self.clock() - batch.watermark).total_seconds() if batch.watermark else None


def _unavailable(err: BaseException) -> str:
    """The 503 detail of a store failure: ours, never the exception's text."""
    if isinstance(err, Unavailable | ChurnError):
        return f"online store unavailable: {err}"
    return (f"online store unavailable: {type(err).__name__} (reads wait at most "
            "features.redis_timeout_ms / features.sqlite_timeout_ms); try again")


def create_app(cfg: Any, store: OnlineStore | None = None,
               clock: Callable[[], datetime] | None = None) -> FastAPI:
    """The feature API over ``store`` (default: ``open_store(cfg)`` at the first request).

    ``clock`` returns the current UTC time (default: the system clock); tests pin it.
    """
    svc = FeatureService(cfg, store, clock)
    app = FastAPI(title="churn feature store", version="1")
    app.state.service = svc
    web_errors.install(app, cfg.features.max_body_bytes, "features.max_body_bytes")
    bearer_scheme = HTTPBearer(auto_error=False, description="features.api_token (when set)")

    def need_token(request: Request, _scheme: Any = Depends(bearer_scheme)) -> None:
        if cfg.features.api_token:
            check_bearer(request, {"features.api_token": cfg.features.api_token}, "/features and /metrics")

    def timed(endpoint: str, work: Callable[[], Response]) -> Response:
        start = time.perf_counter()
        try:
            resp = work()
        except ApiError as err:
            resp = err.response()
        except Exception as err:  # noqa: BLE001 - a broken backend is a 503, never a 500
            resp = web_errors.error_response(503, _unavailable(err))
        svc.metrics.observe_request(endpoint, resp.status_code, time.perf_counter() - start)
        return resp

    # plain defs: FastAPI runs them in its thread pool, so a slow store read (bounded by
    # features.redis_timeout_ms) never stalls the event loop, /health or /metrics
    @app.get("/features", dependencies=[Depends(need_token)],
             responses=web_errors.error_responses(401, 403, 404, 409, 422))
    def get_features(request: Request, ids: str | None = None, features: str | None = None,
                     feature_set: str | None = None) -> Response:
        """Values, versions, event time and status per customer id (``ids`` and ``features``
        may repeat: the lists are merged)."""
        def work() -> Response:
            query = request.query_params
            if len(query.getlist("feature_set")) > 1:
                raise ApiError(400, "feature_set= given more than once; name one feature set")
            merged = {k: ",".join(query.getlist(k)) if len(query.getlist(k)) > 1 else v
                      for k, v in (("ids", ids), ("features", features))}
            return Response(svc.features(merged["ids"], merged["features"], feature_set),
                            media_type="application/json")
        return timed("/features", work)

    @app.get("/health", response_model=Health, responses={
        **web_errors.error_responses(), 503: {"model": Health, "description": "stale, no batch or no store"}})
    def health() -> Response:
        """200 while the serving batch is fresher than the SLA, else 503 (age and SLA given)."""
        def work() -> Response:
            code, body = svc.health()
            return JSONResponse(body, status_code=code)
        return timed("/health", work)

    @app.get("/metrics", dependencies=[Depends(need_token)], response_class=PlainTextResponse,
             responses=web_errors.error_responses(401, 403, plain_route=True))
    def metrics() -> Response:
        """Prometheus text format."""
        def work() -> Response:
            batch = svc.status_batch()
            age = svc.age(batch) if batch is not None else None
            text = svc.metrics.render_state(age, batch, svc.cache, svc.breaker, svc.sla_seconds)
            return PlainTextResponse(text, media_type=CONTENT_TYPE_PLAIN_0_0_4)
        return timed("/metrics", work)

    return app


def serve(cfg: Any, host: str | None = None, port: int | None = None) -> None:
    """Run the API with uvicorn on ``host:port`` (default: features.host / features.port)."""
    serve_app(create_app(cfg), host or cfg.features.host, port or cfg.features.port,
              HttpLimits.of(cfg.features, "features"))


__all__ = ["ApiError", "FeatureService", "Metrics", "RowCache", "create_app", "parse_ids", "serve"]
