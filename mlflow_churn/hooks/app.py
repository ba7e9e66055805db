"""Receiver of MLflow model-registry webhooks: runs the gate when a challenger appears.

``mlflow server`` (SQL backend, MLflow >= 3.3) POSTs JSON deliveries
``{"entity", "action", "timestamp", "data"}`` with headers ``X-MLflow-Delivery-Id``,
``X-MLflow-Timestamp`` (Unix seconds) and ``X-MLflow-Signature`` = ``v1,`` + base64
HMAC-SHA256 of ``{delivery_id}.{timestamp}.{body}`` keyed with the webhook's secret.

``POST /webhook``, in this order:

0. an ``X-MLflow-Signature`` over 1024 characters or a delivery id over 200 -> 400 before
   any HMAC work (the whole request head is bounded by ``hooks.max_header_bytes``);
1. missing or wrong signature -> 401 (``hooks.secret`` is the key; the app refuses to
   start without one);
2. timestamp not Unix seconds (at most 12 digits) or more than ``hooks.max_age_seconds``
   away from the receiver's clock -> 401 (replay protection);
3. a delivery id already recorded -> 200 ``{"status": "duplicate"}``, nothing runs again
   (ids persist in SQLite ``<workspace>/hooks.db``, so restarts keep them);
4. body not a JSON delivery -> 400;
5. ``model_version_alias.created`` with alias ``challenger`` on ``training.model_name`` ->
   202 ``{"status": "queued"}``: the gate (:func:`mlflow_churn.evaluation.evaluate.evaluate`
   on that version vs the champion) runs on one background worker thread, so the answer
   is fast and gates never overlap;
6. every ``model_version_alias.created`` / ``.deleted`` on ``training.model_name`` also goes
   to the alias watcher (:mod:`mlflow_churn.registry.alias_events`, its own thread): alias
   history, unguarded protected-alias moves (audit run, ``/metrics``, alert, optional
   revert) and promotions made by hand in the UI -> 202 ``{"status": "queued"}``;
   anything else -> 200 ``{"status": "ignored"}``. At every start the watcher reconciles the
   history with the current aliases (moves made while the receiver was down).

A delivery answered 202 whose gate had not finished when the receiver stopped is queued
again at the next start (its version is kept in ``hooks.db``); the gate is idempotent, so
a gate that had in fact finished just returns its earlier decision.

Reconciliation (:mod:`mlflow_churn.hooks.reconcile`): at start and every
``hooks.reconcile_seconds`` a pass on its own thread finds the versions a delivery missed
(at ``challenger``, or newer than the champion, without a gate decision signed for their
identity) and those whose last gate failed for an outage, and queues their gates on the same
worker (rows with ``source: reconcile``), with back-off and an alert after
``hooks.max_gate_attempts``.

``GET /deliveries/{id}`` tells what became of a delivery (queued, running, done with the
decision run id, failed with the error and its ``failure_kind``: ``outage`` | ``error``);
``GET /deliveries?model=&version=&source=`` lists the gates (webhook deliveries and
reconcile gates, newest first, with ``source`` and ``attempts``), to find the one of a
version; ``GET /health``; ``GET /metrics`` (Prometheus text:
``churn_hooks_unguarded_promotions_total{alias}``, ``churn_hooks_alias_moves_recorded_total``,
``churn_hooks_reconcile_gates_total``, ``churn_hooks_gate_gave_up_total``). Errors are
``{"detail": ...}``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any, Literal

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4
from pydantic import BaseModel, ConfigDict

from mlflow_churn.alerts import start_sender, stop_sender
from mlflow_churn.config import ChurnConfig
from mlflow_churn.errors import ChurnError
from mlflow_churn.hooks.deliveries import (  # noqa: F401 (DeliveryLog, run_gate: this module's API too)
    WEBHOOK,
    DeliveryLog,
    GateJob,
    GateWorker,
    default_as_of,
    run_gate,
)
from mlflow_churn.hooks.reconcile import (
    METRICS,
    QUEUED_METRIC,
    FollowUp,
    ReconcileLoop,
    reconcile_gates,
    tracking_client,
)
from mlflow_churn.registry.alias_events import AliasEvent, AliasWatcher, PromoteByHand
from mlflow_churn.registry.aliases import CHALLENGER
from mlflow_churn.times import utc
from mlflow_churn.tracking import export_http_limits
from mlflow_churn.web.errors import error_response, error_responses
from mlflow_churn.web.errors import install as install_web_errors
from mlflow_churn.web.metrics import Metrics

SIGNATURE_HEADER = "X-MLflow-Signature"
TIMESTAMP_HEADER = "X-MLflow-Timestamp"
DELIVERY_HEADER = "X-MLflow-Delivery-Id"
SIGNATURE_VERSION = "v1"
#: longest X-MLflow-Signature read (a few space-separated v1 signatures of 47 characters)
MAX_SIGNATURE_CHARS = 1024
#: longest X-MLflow-Delivery-Id read (MLflow sends a UUID)
MAX_DELIVERY_ID_CHARS = 200
EVENT = "model_version_alias.created"
ALIAS_EVENTS = ("model_version_alias.created", "model_version_alias.deleted")
_log = logging.getLogger(__name__)


class Health(BaseModel):
    """``GET /health``: the receiver answers, for the model it watches."""

    status: str
    model: str


class WebhookAnswer(BaseModel):
    """``POST /webhook`` (OpenAPI only): ``status`` duplicate | ignored (200) or queued (202)."""

    model_config = ConfigDict(extra="allow")
    status: str
    delivery_id: str


def sign(secret: str, delivery_id: str, timestamp: str, body: bytes | str) -> str:
    """The ``X-MLflow-Signature`` value MLflow sends for this delivery."""
    payload = body.decode("utf-8") if isinstance(body, bytes) else body
    signed = f"{delivery_id}.{timestamp}.{payload}".encode()
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).digest()
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode()}"


def verify_signature(secret: str, delivery_id: str, timestamp: str, body: bytes, header: str | None) -> bool:
    """True when ``header`` holds a valid v1 signature (constant-time compare)."""
    if not header or not delivery_id or not timestamp:
        return False
    try:
        expected = sign(secret, delivery_id, timestamp, body)
    except UnicodeDecodeError:
        return False
    # tolerate several space-separated signatures (secret rotation)
    return any(hmac.compare_digest(expected, part.strip()) for part in header.split(" ") if part.strip())


def _event_time(payload: dict[str, Any], stamp: int) -> datetime:
    """When MLflow sent the delivery: the payload's ``timestamp``, else the header's seconds."""
    try:
        at = datetime.fromisoformat(str(payload.get("timestamp")))
        return utc(at)
    except ValueError:
        return datetime.fromtimestamp(stamp, UTC)


def create_app(cfg: ChurnConfig, clock: Callable[[], float] = time.time,
               gate: Callable[[GateJob], str] | None = None,
               promote_by_hand: PromoteByHand | None = None) -> FastAPI:
    """The receiver app. ``clock`` (Unix seconds) judges staleness; ``gate`` runs one job
    (default :func:`run_gate` with ``cfg``); ``promote_by_hand`` completes a promotion a
    person made in the UI (``churn hooks serve`` wires
    :func:`mlflow_churn.serving.transitions.adopt_promotion`; None = only recorded). Raises
    ChurnError without ``hooks.secret``."""
    secret = cfg.hooks.secret
    if not secret:
        raise ChurnError("hooks.secret is not set: pass --secret or set CHURN_HOOKS__SECRET to the "
                         "secret given to `churn hooks register`")
    log = DeliveryLog(cfg.workspace / "hooks.db", clock)
    run = gate or (lambda job: run_gate(cfg, job))
    state: dict[str, Any] = {}
    gate_metrics = Metrics()  # the gates' counters (the alias watcher keeps its own)
    for name, text in METRICS.items():
        gate_metrics.describe(name, "counter", text)
        gate_metrics.inc(name, {}, 0.0)  # exposed at 0 from the start, so alert rules see them

    def reconcile_pass() -> None:
        report = reconcile_gates(cfg, tracking_client(cfg), log, state["worker"].submit, now=clock())
        gate_metrics.inc(QUEUED_METRIC, {}, float(len(report.queued)))
        if report.error:
            _log.warning("reconciliation: %s", report.summary())
        elif report.items:
            _log.info("reconciliation: %s", report.summary())

    def alias_done(event: AliasEvent, status: str, detail: str, run_id: str | None) -> None:
        if event.delivery_id and event.alias != CHALLENGER:  # a challenger's row tells its gate
            log.update(event.delivery_id, status, detail, run_id)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        export_http_limits(cfg)  # once, before the gate worker's and the alias watcher's threads
        state["worker"] = GateWorker(run, log, FollowUp(cfg, log, clock, gate_metrics))
        state["worker"].resume()
        app.state.worker = state["worker"]
        state["aliases"] = AliasWatcher(cfg, promote_by_hand, alias_done)
        state["aliases"].submit(AliasEvent(cfg.training.model_name, "reconcile"))
        app.state.aliases = state["aliases"]
        # gates the deliveries missed or an outage stopped: at start, then every reconcile_seconds
        state["reconcile"] = ReconcileLoop(cfg.hooks.reconcile_seconds, reconcile_pass)
        app.state.reconcile = state["reconcile"]
        start_sender(cfg)  # alerts earlier processes left undelivered go out; Alertmanager re-posts
        try:
            yield
        finally:
            state["reconcile"].stop()
            state["aliases"].stop()
            state["worker"].stop()
            stop_sender(cfg)

    app = FastAPI(title="churn registry hooks", lifespan=lifespan)
    app.state.deliveries = log
    # bodies over hooks.max_body_bytes: 413 from Content-Length, or while streaming, before
    # the signature check or any JSON work reads them
    install_web_errors(app, cfg.hooks.max_body_bytes, "hooks.max_body_bytes")

    @app.get("/health", response_model=Health, responses=error_responses())
    def health() -> dict[str, str]:
        return {"status": "ok", "model": cfg.training.model_name}

    @app.get("/deliveries", responses=error_responses(422))
    def deliveries(model: str | None = None, version: str | None = None,
                   source: Literal["webhook", "reconcile"] | None = None,
                   limit: int = Query(100, ge=1, le=1000)) -> dict[str, Any]:
        return {"deliveries": log.find(model, version, limit, source)}

    @app.get("/metrics", response_class=PlainTextResponse,
             responses=error_responses(plain_route=True))
    def metrics() -> PlainTextResponse:
        watcher = state.get("aliases")
        text = (watcher.metrics.render([]) if watcher else "") + gate_metrics.render([])
        return PlainTextResponse(text, media_type=CONTENT_TYPE_PLAIN_0_0_4)

    @app.get("/deliveries/{delivery_id}", response_model=None, responses={
        200: {"description": "the delivery: status, detail, run id, failure kind"},
        **error_responses(404, 422)})
    def delivery(delivery_id: str):
        row = log.get(delivery_id)
        return row if row is not None else error_response(404, f"no delivery {delivery_id} was received")

    @app.post("/webhook", response_model=None, responses={
        200: {"model": WebhookAnswer, "description": "duplicate or ignored"},
        202: {"model": WebhookAnswer, "description": "queued: the gate or the alias watcher runs it"},
        **error_responses(401)})
    async def webhook(request: Request):
        body = await request.body()
        delivery_id = request.headers.get(DELIVERY_HEADER, "")
        stamp = request.headers.get(TIMESTAMP_HEADER, "")
        signature = request.headers.get(SIGNATURE_HEADER)
        # bounded before any parsing or HMAC work (the request head itself is bounded by
        # hooks.max_header_bytes at the connection)
        for name, value, most in ((SIGNATURE_HEADER, signature or "", MAX_SIGNATURE_CHARS),
                                  (DELIVERY_HEADER, delivery_id, MAX_DELIVERY_ID_CHARS)):
            if len(value) > most:
                return error_response(400, f"{name} is {len(value)} characters, more than {most}")
        if not verify_signature(secret, delivery_id, stamp, body, signature):
            return error_response(401, f"missing or invalid {SIGNATURE_HEADER} (check hooks.secret "
                                       "against the webhook's secret)")
        if not (stamp.isascii() and stamp.isdigit() and len(stamp) <= 12):
            return error_response(401, f"{TIMESTAMP_HEADER} must be Unix seconds, got '{stamp[:40]}'")
        sent = int(stamp)
        now = clock()
        if abs(now - sent) > cfg.hooks.max_age_seconds:
            return error_response(401, f"stale delivery: sent at {sent}, {abs(now - sent):.0f} s from now, "
                                       f"more than hooks.max_age_seconds={cfg.hooks.max_age_seconds}")
        try:
            payload = json.loads(body)
            event = f"{payload['entity']}.{payload['action']}"
            data = payload.get("data") or {}
            if not isinstance(data, dict):
                raise TypeError("data")
        except (ValueError, KeyError, TypeError):
            return error_response(400, "body must be an MLflow webhook delivery: JSON with entity, action, "
                                       "data")
        if not log.claim(delivery_id, event, now, source=WEBHOOK):
            return JSONResponse({"status": "duplicate", "delivery_id": delivery_id}, status_code=200)
        ours = data.get("name") == cfg.training.model_name and isinstance(data.get("alias"), str)
        version = str(data.get("version", ""))
        gated = ours and event == EVENT and data.get("alias") == CHALLENGER and version.isdigit()
        watched = ours and event in ALIAS_EVENTS and (version.isdigit() or event != EVENT)
        if not (gated or watched):
            log.update(delivery_id, "ignored", f"{event} {data.get('name')}@{data.get('alias')}")
            return JSONResponse({"status": "ignored", "delivery_id": delivery_id}, status_code=200)
        if watched:  # history, unguarded moves, promotions by hand
            log.update(delivery_id, "queued", f"{event} {data['name']}@{data['alias']}")
            state["aliases"].submit(AliasEvent(str(data["name"]), payload["action"], data["alias"],
                                               version or None, _event_time(payload, sent), delivery_id))
        if gated:
            state["worker"].submit(GateJob(delivery_id, str(data["name"]), version))
        return JSONResponse({"status": "queued", "delivery_id": delivery_id, "version": version or None},
                            status_code=202)

    return app
