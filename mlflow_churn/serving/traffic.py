"""Realistic ``POST /predict`` traffic to a running scoring service (``churn traffic``).

The newcomer's missing step between ``churn serve`` and ``churn canary evaluate``: the canary
analysis needs ``serving.min_canary_samples`` logged canary predictions, which only traffic
gives. :func:`send_traffic` posts customer ids drawn from the workspace's customer table
(:func:`draw_customers`) in small requests over one keep-alive ``httpx.Client``, optionally paced
to a rate, and stops after ``max_seconds`` whatever happens. It only talks to a loopback
address (:func:`loopback_url`): this is a test-traffic generator, not a load tool to point
at someone else's service. :func:`live_canary_fraction` asks a running service (``GET
/health``) for the canary fraction it routes with (``churn canary status``).
"""

from __future__ import annotations

import ipaddress
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np

from mlflow_churn.errors import ChurnError

#: stop after this many failed requests in a row (the service is down or refusing)
MAX_CONSECUTIVE_FAILURES = 20


@dataclass
class TrafficResult:
    """What was sent and what the service answered."""

    url: str
    customers: int = 0
    requests: int = 0
    failed_requests: int = 0
    routes: dict[str, int] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)
    statuses: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    stopped: str | None = None  # why it stopped before sending every customer

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def loopback_url(url: str) -> tuple[str, int, str]:
    """``(host, port, base path)`` of an ``http://`` URL on this machine's loopback, else ChurnError."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ChurnError(f"--url must look like http://127.0.0.1:8080, got '{url}'")
    host = parts.hostname
    try:
        local = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        local = False
    if not local:
        raise ChurnError(f"--url {url} is not a loopback address: `churn traffic` only sends to a service "
                         "on this machine (127.0.0.1, ::1 or localhost)")
    try:
        port = parts.port or 80
    except ValueError:
        raise ChurnError(f"--url has a bad port: '{url}'") from None
    return host, port, parts.path.rstrip("/")


def draw_customers(data_dir: Path, n: int, seed: int = 0) -> np.ndarray:
    """``n`` distinct ids drawn at random from the live customers of ``<data_dir>``: those of
    ``customers.parquet`` without a churn event in ``churn_events.parquet`` (the ones the
    online store serves at the end of the data, so the service answers ``ok`` for them)."""
    import pyarrow.parquet as pq

    path = Path(data_dir) / "customers.parquet"
    if not path.is_file():
        raise ChurnError(f"no customer table at {path}; run `churn simulate` first (or pass --workspace)")
    ids = pq.read_table(path, columns=["customer_id"]).column("customer_id").to_numpy()
    events = Path(data_dir) / "churn_events.parquet"
    if events.is_file():
        churned = pq.read_table(events, columns=["customer_id"]).column("customer_id").to_numpy()
        ids = np.setdiff1d(ids, churned)
    if n > len(ids):
        raise ChurnError(f"--customers {n:,} is more than the workspace's {len(ids):,} live customers; "
                         f"pass at most {len(ids):,}")
    return np.random.default_rng(seed).choice(ids, size=n, replace=False)


def _detail(body: bytes) -> str:
    try:
        return str(json.loads(body).get("detail", body[:200].decode(errors="replace")))
    except (ValueError, AttributeError):
        return body[:200].decode(errors="replace")


class _Client:
    """One ``httpx.Client`` (keep-alive HTTP/1.1 connections) that tries a request a second
    time after a dropped connection; a transport failure is a ``ConnectionError`` (an
    OSError) naming httpx's error class."""

    def __init__(self, host: str, port: int, base: str, token: str | None, timeout: float) -> None:
        headers = {"content-type": "application/json"}
        if token:
            headers["authorization"] = f"Bearer {token}"
        self.http = httpx.Client(base_url=f"http://{host}:{port}{base}", headers=headers, timeout=timeout)

    def request(self, method: str, path: str, payload: Any = None) -> tuple[int, bytes]:
        body = None if payload is None else json.dumps(payload).encode()
        for attempt in (0, 1):
            try:
                res = self.http.request(method, path, content=body)
                return res.status_code, res.content
            except httpx.TransportError as exc:
                if attempt:
                    raise ConnectionError(f"{type(exc).__name__}: {exc}") from exc
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.http.close()


def wait_ready(client: _Client, url: str, wait_seconds: float, clock: Callable[[], float],
               sleep: Callable[[float], None]) -> None:
    """Poll ``GET /ready`` until 200 or ``wait_seconds``; ChurnError naming why it is not ready."""
    deadline = clock() + wait_seconds
    last = "nothing answered"
    while True:
        try:
            status, body = client.request("GET", "/ready")
            if status == 200:
                return
            last = f"/ready answered {status}: {_detail(body)}"
        except OSError as exc:
            last = f"no service at {url} ({exc.__class__.__name__}); start it with `churn serve`"
        if clock() >= deadline:
            raise ChurnError(f"the scoring service is not ready after {wait_seconds:g} s: {last}")
        sleep(0.2)


@dataclass
class LiveFraction:
    """The canary fraction to report: the running service's, else the config's (``source``
    ``service`` / ``config``; ``note`` says why the config's)."""

    canary_fraction: float
    source: str
    service_url: str
    note: str = ""


def live_canary_fraction(url: str, model_name: str, configured: float, timeout: float = 2.0) -> LiveFraction:
    """Ask the scoring service at ``url`` (``GET /health``, one attempt of ``timeout`` s) for
    the canary fraction it routes with; ``configured`` (``serving.canary_fraction``) with a
    note when nothing answers there, the answer is not a scoring service's, or it serves
    another model than ``model_name``."""
    def fallback(why: str) -> LiveFraction:
        return LiveFraction(configured, "config", url, f"{why}; showing the config's serving.canary_fraction")

    parts = urlsplit(url)
    try:
        port = parts.port or 80
    except ValueError:
        port = 0
    if parts.scheme != "http" or not parts.hostname or not port:
        return fallback(f"the service URL must look like http://127.0.0.1:8080, got '{url}'")
    client = _Client(parts.hostname, port, parts.path.rstrip("/"), None, timeout)
    try:
        status, body = client.request("GET", "/health")
    except OSError as exc:
        return fallback(f"no scoring service answered at {url} ({exc.__class__.__name__})")
    finally:
        client.close()
    try:
        data = json.loads(body) if status == 200 else None
    except ValueError:
        data = None
    fraction = data.get("canary_fraction") if isinstance(data, dict) else None
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 <= fraction <= 1:
        return fallback(f"{url}/health answered {status} without a canary fraction (not `churn serve`?)")
    served = data.get("model")
    if served != model_name:
        return fallback(f"the service at {url} serves model '{served}', not '{model_name}'")
    return LiveFraction(float(fraction), "service", url)


def send_traffic(
    url: str,
    customer_ids: Sequence[int] | np.ndarray,
    *,
    batch: int = 10,
    rate: float | None = None,
    max_seconds: float = 600.0,
    wait_seconds: float = 30.0,
    token: str | None = None,
    timeout: float = 30.0,
    on_request: Callable[[int], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> TrafficResult:
    """POST ``customer_ids`` to ``<url>/predict``, ``batch`` per request, at most ``rate`` requests
    a second, for at most ``max_seconds``; count the answers by route, version and status.

    ``on_request(n)`` is called after each request with the customers it carried (progress).
    A 401 (a token is needed or wrong) or another 4xx (the request itself is wrong) is a
    ChurnError at once; other failures are counted and, after
    :data:`MAX_CONSECUTIVE_FAILURES` in a row, stop the run with a ChurnError.
    """
    if batch < 1:
        raise ChurnError(f"--batch must be >= 1, got {batch}")
    if rate is not None and not rate > 0:
        raise ChurnError(f"--rate must be > 0 requests per second, got {rate}")
    if not max_seconds > 0:
        raise ChurnError(f"--max-seconds must be > 0, got {max_seconds}")
    host, port, base = loopback_url(url)
    client = _Client(host, port, base, token, timeout)
    result = TrafficResult(url=url)
    try:
        wait_ready(client, url, wait_seconds, clock, sleep)
        start = clock()
        failures = 0
        ids = [int(i) for i in customer_ids]
        for n, i in enumerate(range(0, len(ids), batch)):
            due = start + n / rate if rate is not None else clock()
            if max(clock(), due) - start >= max_seconds:
                result.stopped = f"--max-seconds {max_seconds:g} reached"
                break
            wait = due - clock()
            if wait > 0:
                sleep(wait)
            chunk = ids[i:i + batch]
            result.requests += 1
            try:
                status, body = client.request("POST", "/predict", {"customer_ids": chunk})
            except OSError as exc:
                status, body = 0, str(exc).encode()
            if status == 401:
                raise ChurnError(f"{url}/predict answered 401: {_detail(body)}; pass --token or set "
                                 "CHURN_SERVING__API_TOKEN")
            if 400 <= status < 500:
                raise ChurnError(f"{url}/predict answered {status}: {_detail(body)}")
            if status != 200:
                result.failed_requests += 1
                failures += 1
                if failures >= MAX_CONSECUTIVE_FAILURES:
                    raise ChurnError(f"{failures} requests in a row failed, the last with "
                                     f"{status or 'no answer'}: {_detail(body)}")
            else:
                failures = 0
                for row in json.loads(body)["predictions"]:
                    result.customers += 1
                    for counts, key in ((result.routes, row.get("route")),
                                        (result.versions, row.get("model_version")),
                                        (result.statuses, row.get("status"))):
                        key = str(key)
                        counts[key] = counts.get(key, 0) + 1
            if on_request is not None:
                on_request(len(chunk))
        result.seconds = clock() - start
    finally:
        client.close()
    return result
