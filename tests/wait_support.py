"""One polling helper for the suite: wait until something holds, or fail naming what."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.1,
               ignore: tuple[type[BaseException], ...] = (), detail: Callable[[], str] | None = None) -> T:
    """Call ``predicate`` every ``interval`` seconds until it returns a truthy value, and return
    that value. After ``timeout`` seconds: AssertionError "timed out after N s waiting for
    <what>" with the last value (or the last ignored exception). ``ignore``: exception types
    that mean "not yet" (a server still starting: ``httpx.TransportError``); any other
    exception propagates at once. ``detail``: called on a time-out for what the failure should
    show (a server's log)."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = predicate()
        except ignore as exc:
            value, last = None, exc  # type: ignore[assignment]
        else:
            if value:
                return value
            last = value
        if time.monotonic() >= deadline:
            more = f"; {detail()}" if detail is not None else ""
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what} (last: {last!r}){more}")
        time.sleep(interval)
