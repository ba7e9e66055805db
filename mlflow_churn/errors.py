"""The one exception type that means "the user gave us something we cannot use".

The CLI turns it into a one-line message and exit code 2; the HTTP apps into a 4xx with
a JSON ``detail``. Messages name the bad value and say how to fix it.
"""

from __future__ import annotations


class ChurnError(Exception):
    """Bad input or an unusable environment, with a message fit for a person."""


class ConfigError(ChurnError):
    """A configuration key or value that cannot be loaded."""


def first_line(exc: BaseException, limit: int = 300, empty: str | None = None) -> str:
    """The first line of ``exc``'s message, whitespace collapsed, at most ``limit``
    characters (``empty``, by default the exception's type name, when the message is empty):
    what a one-line error may quote of a library's exception."""
    lines = str(exc).strip().splitlines()
    text = " ".join(lines[0].split()) if lines else (type(exc).__name__ if empty is None else empty)
    return text[:limit]


__all__ = ["ChurnError", "ConfigError", "first_line"]
