"""Sticky canary routing: a customer always lands on the same route for a given salt.

A customer id hashes (BLAKE2b, keyed by ``salt``) to a point u in [0, 1); the customer
goes to the canary when u < ``fraction``. Raising the fraction only moves customers from
champion to canary, never back, so a ramp keeps every customer's experience consistent.
Change the salt (e.g. the canary version) to draw a fresh sample of customers.
"""

from __future__ import annotations

import hashlib
from enum import StrEnum

import numpy as np

from mlflow_churn.tags import ROLLOUT_WEIGHT_TAG as WEIGHT_TAG


class Route(StrEnum):
    """The prediction log's ``route`` values: who answered the customer (``champion`` |
    ``canary``), or (``shadow``) the canary's score of a customer the champion answered
    (``canary.mode: shadow``, never returned). A StrEnum: it equals (and is logged as) its
    string, so the log's rows and the ``route`` metric labels keep their values."""

    CHAMPION = "champion"
    CANARY = "canary"
    SHADOW = "shadow"


CHAMPION_ROUTE, CANARY_ROUTE, SHADOW_ROUTE = Route.CHAMPION, Route.CANARY, Route.SHADOW
#: the values the ``X-Churn-Route`` header of a test request may force
FORCEABLE = (CHAMPION_ROUTE, CANARY_ROUTE)
_SCALE = float(2**64)


def canary_arm_route(mode: str) -> Route:
    """The log route whose rows are the canary's arm in ``canary.mode`` ``mode``: ``canary``
    (split: the customers it answered) or ``shadow`` (the customers it scored beside the
    champion)."""
    return SHADOW_ROUTE if mode == "shadow" else CANARY_ROUTE


def weight_fraction(tags: dict[str, str] | None) -> float | None:
    """The canary fraction (0..1) a version's :data:`WEIGHT_TAG` sets, None without a valid one."""
    text = (tags or {}).get(WEIGHT_TAG)
    try:
        value = float(text) if text is not None else float("nan")
    except ValueError:
        return None
    return value / 100.0 if 0.0 <= value <= 100.0 else None


def bucket(customer_id: int | str, salt: str = "") -> float:
    """The customer's fixed point in [0, 1) for ``salt``."""
    digest = hashlib.blake2b(str(customer_id).encode(), digest_size=8, key=salt.encode()[:64]).digest()
    return int.from_bytes(digest, "big") / _SCALE


def route(customer_id: int | str, fraction: float, salt: str = "") -> Route:
    """``canary`` for a sticky ``fraction`` (0..1) of customers, else ``champion``."""
    if fraction <= 0.0:
        return Route.CHAMPION
    return Route.CANARY if bucket(customer_id, salt) < fraction else Route.CHAMPION


def routes(customer_ids: list[int] | np.ndarray, fraction: float, salt: str = "") -> np.ndarray:
    """Vectorised :func:`route`: a boolean array, True where the customer goes to the canary."""
    if fraction <= 0.0:
        return np.zeros(len(customer_ids), dtype=bool)
    return np.fromiter((bucket(c, salt) < fraction for c in customer_ids), dtype=bool,
                       count=len(customer_ids))
