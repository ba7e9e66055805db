"""The package's exceptions, by kind, and the one table mapping each kind to its answer.

Every failure a person should see is a :class:`ChurnError` of one of four kinds:

- :class:`BadInput` (plain ``ChurnError`` too, and :class:`ConfigError`): the user gave us
  something we cannot use -> HTTP 422, exit code 2;
- :class:`NotFound`: a run, version, alias or batch the request names does not exist -> 404, exit 2;
- :class:`Conflict`: the request is valid but the state refuses it (no canary to promote, a
  version that is not the canary, a lock held) -> 409, exit 2;
- :class:`Unavailable`: a dependency (``dependency``: "tracking server", "PostgreSQL",
  "Redis", "online store", ...) did not answer or failed: an outage, worth retrying, never a
  decision -> 503, exit 3; the message names the dependency.

:data:`ANSWERS` is the one place where a kind gets its HTTP status and exit code; the CLI's
``main()`` and the HTTP apps' handlers read it through :func:`http_status` / :func:`exit_code`.
:func:`outage` recognises a library's connection-type failure (Redis, PostgreSQL, a database
behind SQLAlchemy) as an :class:`Unavailable`; :func:`is_missing` is the one test for MLflow's
"does not exist" (by its error code, never its text).
"""

from __future__ import annotations

import sys
from typing import NamedTuple


class ChurnError(Exception):
    """A failure with a message fit for a person. Plain ``ChurnError`` means bad input."""


class BadInput(ChurnError):
    """The user gave us something we cannot use (a value, a path, a combination of options)."""


class ConfigError(BadInput):
    """A configuration key or value that cannot be loaded."""


class NotFound(ChurnError):
    """What the request names (a run, a model version, an alias, a batch) does not exist."""


class Conflict(ChurnError):
    """A valid request the current state refuses (e.g. promoting when there is no canary)."""


class Unavailable(ChurnError):
    """A dependency did not answer, dropped the connection, timed out or failed (5xx): an
    outage, worth retrying later. ``dependency`` names it ("tracking server", "PostgreSQL",
    "Redis", "online store", ...; a subclass sets its own default); the message should name
    it too."""

    default_dependency = "a dependency"

    def __init__(self, message: str, dependency: str | None = None) -> None:
        super().__init__(message)
        self.dependency = dependency or type(self).default_dependency


class Answer(NamedTuple):
    """What a kind of failure answers: its HTTP status and the CLI's exit code."""

    status: int
    exit_code: int


#: THE mapping of a failure's kind to its HTTP status and exit code (most specific first;
#: a ChurnError that is none of the subclasses is bad input)
ANSWERS: dict[type[ChurnError], Answer] = {
    Unavailable: Answer(503, 3),
    Conflict: Answer(409, 2),
    NotFound: Answer(404, 2),
    BadInput: Answer(422, 2),
    ChurnError: Answer(422, 2),
}


def answer(exc: ChurnError) -> Answer:
    """The :data:`ANSWERS` row of ``exc``'s kind (its nearest class in the table)."""
    for cls in type(exc).__mro__:
        if cls in ANSWERS:
            return ANSWERS[cls]  # type: ignore[index]
    return ANSWERS[ChurnError]


def http_status(exc: ChurnError) -> int:
    """The HTTP status an app answers ``exc`` with (see :data:`ANSWERS`)."""
    return answer(exc).status


def exit_code(exc: ChurnError) -> int:
    """The exit code the CLI ends with on ``exc`` (see :data:`ANSWERS`)."""
    return answer(exc).exit_code


#: (module, exception class, dependency) of libraries' connection-type failures: the
#: dependency is down or unreachable, not the input wrong. Looked up only when the module is
#: already imported (an exception cannot come from one that is not).
_OUTAGES: tuple[tuple[str, str, str], ...] = (
    ("redis.exceptions", "ConnectionError", "Redis"), ("redis.exceptions", "TimeoutError", "Redis"),
    ("psycopg", "OperationalError", "PostgreSQL"), ("psycopg2", "OperationalError", "PostgreSQL"),
    ("sqlalchemy.exc", "OperationalError", "database"),
)


def outage(exc: BaseException, dependency: str | None = None) -> Unavailable | None:
    """``exc`` as an :class:`Unavailable` when it is one, a library's connection-type failure
    listed in ``_OUTAGES``, or a connection refused / reset / timed out (``ConnectionError``,
    ``TimeoutError``: of ``dependency``, the caller's name for what it was talking to); else
    None (bad input, a missing resource, a bug such as a KeyError). The message names the
    dependency. The tracking server's failures, which MLflow wraps in its own exceptions, are
    recognised by ``mlflow_churn.tracking.server_failure``."""
    if isinstance(exc, Unavailable):
        return exc
    found = (dependency or "a server") if isinstance(exc, ConnectionError | TimeoutError) else None
    for module, name, library_dependency in _OUTAGES:
        mod = sys.modules.get(module)
        cls = getattr(mod, name, None) if mod is not None else None
        if found is None and isinstance(cls, type) and isinstance(exc, cls):
            found = library_dependency
    if found is None:
        return None
    return Unavailable(f"{found} is unavailable: {first_line(exc, 200, empty='failed')} "
                       f"({type(exc).__name__})", found)


#: MLflow's error code for "no such run / experiment / model version / alias"
RESOURCE_DOES_NOT_EXIST = "RESOURCE_DOES_NOT_EXIST"


def is_missing(exc: BaseException, *, or_invalid: bool = False) -> bool:
    """True when ``exc`` is MLflow's "does not exist" (``error_code`` RESOURCE_DOES_NOT_EXIST):
    the one test the package uses before treating a failure as "absent". ``or_invalid``: also
    INVALID_PARAMETER_VALUE, which MLflow's stores (hence `mlflow server`) answer for an alias
    the model does not have, or a malformed version number. Any other failure (a server down,
    a 5xx, a bug) is not "missing" and must propagate."""
    code = getattr(exc, "error_code", None)
    return code == RESOURCE_DOES_NOT_EXIST or (or_invalid and code == "INVALID_PARAMETER_VALUE")


def first_line(exc: BaseException, limit: int = 300, empty: str | None = None) -> str:
    """The first line of ``exc``'s message, whitespace collapsed, at most ``limit``
    characters (``empty``, by default the exception's type name, when the message is empty):
    what a one-line error may quote of a library's exception."""
    lines = str(exc).strip().splitlines()
    text = " ".join(lines[0].split()) if lines else (type(exc).__name__ if empty is None else empty)
    return text[:limit]


__all__ = ["ANSWERS", "RESOURCE_DOES_NOT_EXIST", "Answer", "BadInput", "ChurnError", "ConfigError",
           "Conflict", "NotFound", "Unavailable", "answer", "exit_code", "first_line", "http_status",
           "is_missing", "outage"]
