"""Post an alert to an Alertmanager-style webhook (``POST <url>`` with a JSON list of alerts).

The body is what Alertmanager's ``/api/v2/alerts`` takes (a list of ``{"labels",
"annotations", "startsAt"}``); a plain webhook receiver (Slack relay, a ticket bridge)
gets the same JSON. One attempt, a short timeout: an alert never blocks the work that
raised it; failures are logged and returned, not raised.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from datetime import datetime

_log = logging.getLogger(__name__)


def post_alert(url: str, labels: dict[str, str], annotations: dict[str, str], starts_at: datetime,
               timeout: float = 5.0) -> str | None:
    """POST one alert to ``url``; None when it was accepted (2xx), else why it was not."""
    body = json.dumps([{"labels": {k: str(v) for k, v in labels.items()},
                        "annotations": {k: str(v) for k, v in annotations.items()},
                        "startsAt": starts_at.isoformat()}]).encode()
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout):  # noqa: S310 (the configured alert URL)
            return None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        why = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
        _log.warning("alert to %s not delivered: %s", url, why)
        return why
