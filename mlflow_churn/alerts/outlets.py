"""The two outlets an alert goes to, and the one HTTP POST both use.

- **alertmanager**: ``POST <alerts.alertmanager_url>/api/v2/alerts`` with a JSON list of
  ``{"labels", "annotations", "startsAt", "endsAt", "generatorURL"}`` (Alertmanager's API v2).
  Alertmanager groups, deduplicates (by the label set), routes, silences and resolves; a firing
  alert is posted again every ``alerts.repeat_seconds`` by a running sender, with ``endsAt`` =
  now + ``alerts.hold_hours`` (past that with no re-post, Alertmanager resolves it by itself);
  a cleared one is posted with ``endsAt`` = when it cleared.
- **webhook**: ``POST <alerts.webhook_url>`` with Alertmanager's *webhook payload*
  (``{"version": "4", "groupKey", "status", "receiver", "groupLabels", "commonLabels",
  "commonAnnotations", "externalURL", "truncatedAlerts", "alerts": [...]}``, one alert per
  message), the shape Slack / PagerDuty / ticket bridges already read from Alertmanager: one
  ``firing`` message when a condition fires and one ``resolved`` message when it clears.

Each POST carries an ``Idempotency-Key`` header (``<key>/<episode>/<status>``): a receiver that
answered but whose answer was lost gets the same message again (at-least-once) and can drop it.

An attempt is a success on any 2xx answer; anything else (a refused connection, a timeout, a
3xx/4xx/5xx) is a failure the sender retries with back-off.
"""

from __future__ import annotations

import json
import logging
import urllib.parse
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx

from mlflow_churn.errors import ChurnError, first_line

_log = logging.getLogger(__name__)

ALERTMANAGER, WEBHOOK = "alertmanager", "webhook"
OUTLETS = (ALERTMANAGER, WEBHOOK)
#: where Alertmanager takes alerts, under its base URL
API_PATH = "/api/v2/alerts"
#: Alertmanager's "no end time" (Go's zero time), as its webhook payload writes it
ZERO_TIME = "0001-01-01T00:00:00Z"
#: ``receiver`` of the webhook payload (Alertmanager puts its receiver's name there)
RECEIVER = "churn"


def rfc3339(ts: float | datetime) -> str:
    """``ts`` (Unix seconds or a datetime) as RFC 3339 UTC with a ``Z``, as Alertmanager writes it."""
    when = ts if isinstance(ts, datetime) else datetime.fromtimestamp(ts, UTC)
    return when.astimezone(UTC).isoformat().replace("+00:00", "Z")


def alertmanager_api(url: str) -> str:
    """The ``/api/v2/alerts`` endpoint of an Alertmanager given by its base URL
    (``http://alertmanager:9093``, a path prefix kept) or by that endpoint itself."""
    parts = urllib.parse.urlsplit(url)
    path = parts.path.rstrip("/")
    if not path.endswith(API_PATH):
        path += API_PATH
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


@dataclass(frozen=True)
class Message:
    """What one attempt sends: the alert of one condition's episode at one step.

    ``status`` is ``firing`` or ``resolved``; ``ends_at`` (Unix seconds) is when it cleared
    (resolved) or when Alertmanager may consider it over without news (firing; None = the
    webhook's zero time)."""

    key: str
    episode: int
    status: str
    labels: dict[str, str]
    annotations: dict[str, str]
    starts_at: float
    ends_at: float | None

    @property
    def idempotency_key(self) -> str:
        return f"{self.key}/{self.episode}/{self.status}"

    def alertmanager_body(self) -> list[dict]:
        """Alertmanager API v2: a list of postable alerts (here one)."""
        alert = {"labels": self.labels, "annotations": self.annotations, "startsAt": rfc3339(self.starts_at),
                 "generatorURL": ""}
        if self.ends_at is not None:
            alert["endsAt"] = rfc3339(self.ends_at)
        return [alert]

    def webhook_body(self) -> dict:
        """Alertmanager's webhook payload (version 4) with this one alert."""
        ends = rfc3339(self.ends_at) if self.status == "resolved" and self.ends_at is not None else ZERO_TIME
        return {
            "version": "4",
            "groupKey": f"{RECEIVER}:{self.key}",
            "truncatedAlerts": 0,
            "status": self.status,
            "receiver": RECEIVER,
            "groupLabels": {"alertname": self.labels.get("alertname", "")},
            "commonLabels": self.labels,
            "commonAnnotations": self.annotations,
            "externalURL": "",
            "alerts": [{"status": self.status, "labels": self.labels, "annotations": self.annotations,
                        "startsAt": rfc3339(self.starts_at), "endsAt": ends, "generatorURL": "",
                        "fingerprint": self.key}],
        }

    def body(self, outlet: str) -> object:
        if outlet == ALERTMANAGER:
            return self.alertmanager_body()
        if outlet == WEBHOOK:
            return self.webhook_body()
        raise ChurnError(f"unknown alert outlet '{outlet}'; one of {', '.join(OUTLETS)}")


@dataclass(frozen=True)
class Answer:
    """The outcome of one POST: ``ok`` on 2xx; ``status`` the HTTP status when one came back;
    ``error`` why it failed (None when ok)."""

    ok: bool
    status: int | None
    error: str | None


def post_json(url: str, body: object, timeout: float, headers: dict[str, str] | None = None) -> Answer:
    """POST ``body`` as JSON to ``url`` (httpx, no redirects followed); never raises for a
    network or HTTP failure."""
    try:
        resp = httpx.post(url, content=json.dumps(body).encode(), timeout=timeout,
                          headers={"Content-Type": "application/json", **(headers or {})})
    except (httpx.HTTPError, httpx.InvalidURL, ValueError) as exc:
        reason = " ".join(str(exc).split())[:200]
        return Answer(False, None, f"{type(exc).__name__}: {reason}")
    if resp.is_success:
        return Answer(True, resp.status_code, None)
    detail = first_line(resp.text[:300], 200, empty="") if resp.content else ""  # type: ignore[arg-type]
    return Answer(False, resp.status_code, f"HTTP {resp.status_code}" + (f": {detail}" if detail else ""))


def send(outlet: str, url: str, message: Message, timeout: float) -> Answer:
    """One attempt of ``message`` to ``outlet`` at ``url``."""
    return post_json(url, message.body(outlet), timeout, {"Idempotency-Key": message.idempotency_key})


__all__ = ["ALERTMANAGER", "API_PATH", "OUTLETS", "WEBHOOK", "ZERO_TIME", "Answer", "Message",
           "alertmanager_api", "post_json", "rfc3339", "send"]
