"""The one error-to-JSON path of the HTTP apps, and the guard every request passes first.

Every answer that is not a success is ``{"detail": "..."}`` (plus optional extra fields):

- :class:`HttpError` raised anywhere -> its status and detail;
- a :class:`~mlflow_churn.errors.ChurnError` -> the status of its kind
  (:data:`mlflow_churn.errors.ANSWERS`: 422 bad input, 404 not found, 409 conflict, 503 an
  unavailable dependency, named in the detail);
- a request that does not validate -> 422 naming each bad field (and its value);
- an unknown route or method -> 404 / 405 naming them;
- a body over the app's limit -> 413, decided from ``Content-Length`` before the app runs
  and, for a body without one, while it streams in (nothing past the limit is read);
- anything unexpected -> 503 with an error id; the exception goes to the log only,
  never to the client.

:func:`install` puts the handlers and the :class:`Guard` middleware on an app;
:func:`error_responses` documents those answers in a route's OpenAPI ``responses``
(:class:`ErrorDetail`, the string-detail shape, also in place of FastAPI's default 422
schema, whose ``detail`` is a list the apps never send).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from mlflow_churn.errors import ChurnError, Unavailable, http_status

log = logging.getLogger("mlflow_churn.web")

#: longest client value quoted back in a detail
_QUOTE = 60


class ErrorDetail(BaseModel):
    """The body of every error answer (OpenAPI only): a string ``detail`` naming the field
    or the cause; some answers add fields (e.g. ``available``, ``invalid``)."""

    model_config = ConfigDict(extra="allow")
    detail: str


#: what each error status means, for the OpenAPI descriptions
_STATUS_TEXT = {
    400: "Bad request (a malformed parameter or header, e.g. Content-Length)",
    401: "Missing credentials (token or signature)",
    403: "Wrong credentials, or a closed route",
    404: "Not found",
    409: "Conflict",
    413: "Request body larger than the app's max_body_bytes",
    422: "Invalid request: each bad field named, with its value",
    431: "Request head larger than max_header_bytes, or too many header lines",
    503: "Unavailable (a dependency is down, not ready, or an unexpected error, logged)",
}
#: what any route can answer: the guard (bad Content-Length, body limit, unexpected error)
#: and the connection's head limits
EDGE_STATUSES = (400, 413, 431, 503)


def error_responses(*statuses: int, plain_route: bool = False) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` of a route: ``statuses`` plus :data:`EDGE_STATUSES`, each an
    :class:`ErrorDetail` (a declared 422 replaces FastAPI's list-detail default).

    ``plain_route``: the route answers ``text/plain`` (``response_class=PlainTextResponse``);
    the schema is then given inline under ``application/json``, since FastAPI files a
    ``model`` under the route's own media type."""
    if plain_route:
        content = {"application/json": {"schema": ErrorDetail.model_json_schema()}}
        return {code: {"content": content, "description": _STATUS_TEXT[code]}
                for code in sorted({*statuses, *EDGE_STATUSES})}
    return {code: {"model": ErrorDetail, "description": _STATUS_TEXT[code]}
            for code in sorted({*statuses, *EDGE_STATUSES})}


class HttpError(Exception):
    """An answer for the client: status, a detail that names the field, extra JSON fields."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None,
                 **extra: Any) -> None:
        super().__init__(detail)
        self.status, self.detail, self.headers, self.extra = status, detail, headers, extra

    def response(self) -> JSONResponse:
        return error_response(self.status, self.detail, self.headers, **self.extra)


class PayloadTooLarge(HTTPException):
    """Raised from ``receive`` when a streamed body passes the limit (an HTTPException, so
    FastAPI's body parsing lets it through instead of turning it into a 400)."""

    def __init__(self, detail: str) -> None:
        super().__init__(413, detail)


def error_response(status: int, detail: Any, headers: dict[str, str] | None = None,
                   **extra: Any) -> JSONResponse:
    """``{"detail": detail, **extra}`` with ``status``: the only error body the apps send."""
    return JSONResponse({"detail": detail, **extra}, status_code=status, headers=headers)


def quote(value: Any) -> str:
    """A client value for a detail: repr, cut to a few dozen characters."""
    text = repr(value)
    return text if len(text) <= _QUOTE else text[:_QUOTE] + "..."


def validation_detail(exc: RequestValidationError) -> str:
    """One line naming each invalid field (dotted path), what is wrong and the value sent."""
    parts = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path", "header")]
        if err.get("type") == "json_invalid":
            ctx = err.get("ctx") or {}
            parts.append(f"malformed JSON: {ctx.get('error', err.get('msg'))} (at character "
                         f"{loc[0] if loc else '?'})")
            continue
        where = ".".join(loc) or "body"
        text = f"{where}: {err.get('msg')}"
        value = err.get("input")
        if value is not None and not isinstance(value, dict | list) and "input" in err:
            text += f" (got {quote(value)})"
        parts.append(text)
    return "; ".join(parts) or "invalid request"


async def _http_error(_req: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HttpError)
    return exc.response()


def churn_error_response(exc: ChurnError) -> JSONResponse:
    """The answer to a ChurnError: the status of its kind, its message as the detail (an
    outage's names the dependency that is down)."""
    detail = str(exc) or type(exc).__name__
    if isinstance(exc, Unavailable) and exc.dependency.lower() not in detail.lower():
        detail = f"{exc.dependency} unavailable: {detail}"
    return error_response(http_status(exc), detail)


async def _churn_error(_req: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ChurnError)
    return churn_error_response(exc)


async def _validation(_req: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return error_response(422, validation_detail(exc))


async def _starlette(req: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail
    if exc.status_code == 404 and detail == "Not Found":
        detail = f"no route {req.method} {req.url.path}; see /docs for the routes"
    elif exc.status_code == 405:
        detail = f"method {req.method} is not allowed on {req.url.path}"
    return error_response(exc.status_code, detail, dict(exc.headers) if exc.headers else None)


def _content_length(scope: dict) -> int | None | str:
    for key, value in scope.get("headers", ()):
        if key == b"content-length":
            text = value.decode("latin-1").strip()
            return int(text) if text.isascii() and text.isdigit() else text
    return None


class Guard:
    """ASGI middleware: body limit (413), then the app; an unexpected exception -> 503 JSON.

    ``on_response(path, status)`` is called once per request (e.g. to count it). The limit
    is enforced from ``Content-Length`` before the app sees the request, and on the bytes
    actually received (chunked bodies, lying clients): the app's ``receive`` raises
    :class:`PayloadTooLarge` at the first chunk past the limit, so at most ``max_body_bytes``
    plus one chunk is ever held.
    """

    def __init__(self, app: Any, max_body_bytes: int, limit_key: str,
                 on_response: Callable[[str, int], None] | None = None) -> None:
        self.app, self.limit, self.key, self.on_response = app, int(max_body_bytes), limit_key, on_response

    def _too_large(self, size: str) -> str:
        return f"request body {size} is larger than the limit of {self.limit} bytes ({self.key})"

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = {"status": 0, "received": 0}

        async def _send(message: dict) -> None:
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
            await send(message)

        async def _receive() -> dict:
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > self.limit:
                    raise PayloadTooLarge(self._too_large(f"of more than {self.limit} bytes"))
            return message

        try:
            length = _content_length(scope)
            if isinstance(length, str):
                response = error_response(400, f"header Content-Length must be a byte count, got "
                                               f"{quote(length)}")
            elif length is not None and length > self.limit:
                response = error_response(413, self._too_large(f"of {length} bytes"))
            else:
                await self.app(scope, _receive, _send)
                return
            await response(scope, receive, _send)
        except Exception as exc:
            if state["status"]:  # the response has started: nothing else can be sent
                raise
            if isinstance(exc, PayloadTooLarge):
                response = error_response(413, exc.detail)
            else:
                ref = uuid.uuid4().hex[:12]
                log.exception("unexpected error %s answering %s %s", ref, scope.get("method"),
                              scope.get("path"))
                response = error_response(503, f"the service could not answer this request (internal "
                                               f"error {ref}, logged by the service); try again")
            await response(scope, receive, _send)
        finally:
            if self.on_response is not None:
                self.on_response(scope.get("path", ""), state["status"] or 503)


def install(app: FastAPI, max_body_bytes: int, limit_key: str,
            on_response: Callable[[str, int], None] | None = None) -> None:
    """The shared error handlers and the :class:`Guard` (outermost of the app's middleware
    added so far; add counting middleware after it to count its answers too)."""
    app.add_exception_handler(HttpError, _http_error)
    app.add_exception_handler(ChurnError, _churn_error)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _starlette)
    app.add_middleware(Guard, max_body_bytes=max_body_bytes, limit_key=limit_key, on_response=on_response)


__all__ = ["EDGE_STATUSES", "ErrorDetail", "Guard", "HttpError", "PayloadTooLarge", "churn_error_response",
           "error_response",
           "error_responses", "install", "quote", "validation_detail"]
