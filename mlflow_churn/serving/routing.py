"""Sticky canary routing: a customer always lands on the same route for a given salt.

A customer id hashes (BLAKE2b, keyed by ``salt``) to a point u in [0, 1); the customer
goes to the canary when u < ``fraction``. Raising the fraction only moves customers from
champion to canary, never back, so a ramp keeps every customer's experience consistent.
Change the salt (e.g. the canary version) to draw a fresh sample of customers.
"""

from __future__ import annotations

import hashlib
from typing import Literal

import numpy as np

Route = Literal["champion", "canary"]
_SCALE = float(2**64)


def bucket(customer_id: int | str, salt: str = "") -> float:
    """The customer's fixed point in [0, 1) for ``salt``."""
    digest = hashlib.blake2b(str(customer_id).encode(), digest_size=8, key=salt.encode()[:64]).digest()
    return int.from_bytes(digest, "big") / _SCALE


def route(customer_id: int | str, fraction: float, salt: str = "") -> Route:
    """``canary`` for a sticky ``fraction`` (0..1) of customers, else ``champion``."""
    if fraction <= 0.0:
        return "champion"
    return "canary" if bucket(customer_id, salt) < fraction else "champion"


def routes(customer_ids: list[int] | np.ndarray, fraction: float, salt: str = "") -> np.ndarray:
    """Vectorised :func:`route`: a boolean array, True where the customer goes to the canary."""
    if fraction <= 0.0:
        return np.zeros(len(customer_ids), dtype=bool)
    return np.fromiter((bucket(c, salt) < fraction for c in customer_ids), dtype=bool,
                       count=len(customer_ids))
