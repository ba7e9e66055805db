"""The one exception type that means "the user gave us something we cannot use".

The CLI turns it into a one-line message and exit code 2; the HTTP apps into a 4xx with
a JSON ``detail``. Messages name the bad value and say how to fix it.
"""

from __future__ import annotations


class ChurnError(Exception):
    """Bad input or an unusable environment, with a message fit for a person."""


class ConfigError(ChurnError):
    """A configuration key or value that cannot be loaded."""
