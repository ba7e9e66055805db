"""The connection edges of the HTTP apps: request head limits, slow clients, binding, access log.

Every app (``churn serve``, ``churn features serve``, ``churn hooks serve``) runs under
:func:`serve`, which gives uvicorn the :class:`LimitedH11Protocol` (h11, a dependency of uvicorn
itself, never httptools: httptools reads a request head of any size):

- **head size**: a request line plus headers longer than ``max_header_bytes`` is answered 431
  (h11's ``max_incomplete_event_size``: nothing past the limit is buffered, whatever the
  header; a 100 MB header costs the app at most the limit plus one socket read);
- **header count**: more than ``max_headers`` header lines -> 431;
- **read timeout**: a client has ``read_timeout_seconds`` from connecting (or from the first
  byte of a later request on a kept-alive connection) to send its whole request, head and
  body; past it the connection is closed (408 when the head was not complete), so slow
  clients (one byte every few seconds) are not held. An idle kept-alive connection is closed
  after ``keep_alive_seconds``;
- **binding**: the listening socket is bound here first, so a port in use is one
  :class:`~mlflow_churn.errors.ChurnError` naming the address (the CLI: one line, exit 2),
  not uvicorn's own message and exit 3;
- **access log**: :class:`NoQueryFilter` drops the query string from uvicorn's access lines
  (a query may carry ids or a token).

The refusals are ``{"detail": ...}`` JSON naming the config key, as every other refusal.
A leaf: it imports nothing of the project but :mod:`mlflow_churn.errors`.
"""

from __future__ import annotations

import json
import logging
import socket
from dataclasses import dataclass
from typing import Any

import h11

from mlflow_churn.errors import ChurnError

log = logging.getLogger("mlflow_churn.web")

#: default longest request head (request line + headers), bytes
MAX_HEADER_BYTES = 16_384
#: default most header lines of one request
MAX_HEADERS = 100
#: default time a client has to send one whole request (s)
READ_TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True)
class HttpLimits:
    """The connection limits of one app; ``section`` names its config section in refusals."""

    section: str
    max_header_bytes: int = MAX_HEADER_BYTES
    max_headers: int = MAX_HEADERS
    read_timeout_seconds: float = READ_TIMEOUT_SECONDS
    keep_alive_seconds: float = 5.0

    @classmethod
    def of(cls, section_cfg: Any, section: str) -> HttpLimits:
        """The limits of a config section that has (some of) the keys of this class."""
        values = {key: getattr(section_cfg, key) for key in
                  ("max_header_bytes", "max_headers", "read_timeout_seconds", "keep_alive_seconds")
                  if getattr(section_cfg, key, None) is not None}
        return cls(section=section, **values)


class _TooManyHeaders(h11.RemoteProtocolError):
    """Our refusal of a head with more than ``max_headers`` lines (its message is the answer)."""


class _Connection(h11.Connection):
    """h11's server connection that also refuses a request with too many header lines and
    remembers the protocol error it raised (its status hint picks the answer)."""

    def __init__(self, limits: HttpLimits) -> None:
        super().__init__(h11.SERVER, max_incomplete_event_size=limits.max_header_bytes)
        self.limits = limits
        self.refusal: h11.RemoteProtocolError | None = None

    def next_event(self):  # noqa: ANN201 - h11's own union of event types
        try:
            event = super().next_event()
        except h11.RemoteProtocolError as exc:
            self.refusal = exc
            raise
        if isinstance(event, h11.Request):
            # h11 bounds a head that arrives in pieces; one read can hold a whole longer head
            size = len(event.method) + len(event.target) + sum(len(k) + len(v) + 4 for k, v in event.headers)
            if size > self.limits.max_header_bytes:
                self.refusal = h11.RemoteProtocolError("head too long", error_status_hint=431)
                raise self.refusal
            if len(event.headers) > self.limits.max_headers:
                self.refusal = _TooManyHeaders(
                    f"more than {self.limits.section}.max_headers ({self.limits.max_headers}) header lines "
                    f"({len(event.headers)})", error_status_hint=431)
                raise self.refusal
        return event


def _json_answer(status: int, detail: str) -> bytes:
    body = json.dumps({"detail": detail}).encode()
    reason = {400: b"Bad Request", 408: b"Request Timeout",
              431: b"Request Header Fields Too Large"}.get(status, b"Error")
    return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n" % (status, reason, len(body))) + body


def protocol_class(limits: HttpLimits) -> type:
    """uvicorn's h11 protocol with ``limits`` (see the module doc)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class LimitedH11Protocol(H11Protocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.conn = _Connection(limits)
            self._read_timer = None

        def connection_made(self, transport) -> None:  # noqa: ANN001
            super().connection_made(transport)
            self._arm_read_timer()

        def data_received(self, data: bytes) -> None:
            if self.conn.their_state is h11.IDLE:  # the first bytes of a request: its clock starts
                self._arm_read_timer()
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE and self.conn.their_state is not h11.SEND_BODY:
                self._cancel_read_timer()  # the whole request is in (or the connection is done)

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_read_timer()
            super().connection_lost(exc)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            # a pipelined request already buffered starts its own clock in data_received
            self._cancel_read_timer()

        def _arm_read_timer(self) -> None:
            if self._read_timer is None:
                self._read_timer = self.loop.call_later(limits.read_timeout_seconds, self._read_timed_out)

        def _cancel_read_timer(self) -> None:
            if self._read_timer is not None:
                self._read_timer.cancel()
                self._read_timer = None

        def _read_timed_out(self) -> None:
            self._read_timer = None
            if self.transport.is_closing():
                return
            if self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]:
                # a head begun and not finished in time (nothing sent at all: just closed)
                self.transport.write(_json_answer(408, (
                    f"request not received within {limits.section}.read_timeout_seconds "
                    f"({limits.read_timeout_seconds:g} s)")))
            self.transport.close()

        def send_400_response(self, msg: str) -> None:
            exc = self.conn.refusal
            if exc is not None and exc.error_status_hint == 431:
                detail = str(exc) if isinstance(exc, _TooManyHeaders) else (
                    f"request head over {limits.section}.max_header_bytes ({limits.max_header_bytes} bytes)")
                status = 431
            else:
                status, detail = 400, "invalid HTTP request"
            self.transport.write(_json_answer(status, detail))
            self.transport.close()

    return LimitedH11Protocol


class NoQueryFilter(logging.Filter):
    """Drops the query string from uvicorn's access log lines (their third argument)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str) and "?" in args[2]:
            record.args = (*args[:2], args[2].split("?", 1)[0], *args[3:])
        return True


def bind(host: str, port: int, option: str = "--port") -> socket.socket:
    """A listening TCP socket on ``host:port``; a ChurnError naming the address when it cannot be
    bound (in use, not an address of this machine, no permission)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise ChurnError(f"cannot listen on {host}:{port}: {exc}; check the host") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        hint = (f"another process listens there; stop it or pick another {option}"
                if exc.errno == 98 else "check the host and port")
        raise ChurnError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; {hint}") from None
    sock.set_inheritable(True)
    return sock


def serve(app: Any, host: str, port: int, limits: HttpLimits, *, log_level: str = "warning",
          access_log: bool = False, **uvicorn_options: Any) -> None:
    """Run ``app`` under uvicorn on ``host:port`` with ``limits`` until interrupted."""
    import uvicorn

    sock = bind(host, port)
    config = uvicorn.Config(app, log_level=log_level, access_log=access_log,
                            http=protocol_class(limits),
                            h11_max_incomplete_event_size=limits.max_header_bytes,
                            timeout_keep_alive=limits.keep_alive_seconds, **uvicorn_options)
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, NoQueryFilter) for f in access.filters):
        access.addFilter(NoQueryFilter())
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if not server.started:
        raise ChurnError(f"the server on {host}:{port} did not start; see the log above")


__all__ = ["HttpLimits", "NoQueryFilter", "bind", "protocol_class", "serve"]
