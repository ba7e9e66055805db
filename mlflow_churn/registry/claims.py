"""What the project's own processes claim about an alias move they make: who, why, on which run.

:func:`mlflow_churn.registry.aliases.move_alias` / ``remove_alias`` make their registry call
inside :func:`claiming`. The writer of the alias history (:mod:`mlflow_churn.registry.history`)
is then told the claim:

- a ``churn-guard`` server reads it from request headers (:data:`ACTOR_HEADER`,
  :data:`REASON_HEADER`, :data:`EVIDENCE_HEADER`, percent-encoded UTF-8), which MLflow's own
  HTTP client sends through the request-header provider
  ``mlflow_churn.mlflow_plugin:ChurnClaimHeaderProvider`` (entry point group
  ``mlflow.request_header_provider`` in pyproject.toml) while a claim is set, and only then;
- the webhook receiver (no guard) reads it from the registered-model tag
  ``churn.claim.<alias>`` (:func:`write_tag` before the move, :func:`read_tag` when it
  records the move's delivery: MLflow's deliveries carry no request headers).

A claim is information, never authority: any client can send these headers or write that
tag. The history marks a claimed actor as claimed; only a basic-auth user the guard
authenticated is a verified actor. Nothing here imports MLflow: MLflow loads the header
provider while it is itself being imported.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote, unquote

from mlflow_churn.tags import CLAIM_PREFIX as TAG_PREFIX

ACTOR_HEADER = "X-Churn-Actor"
REASON_HEADER = "X-Churn-Reason"
EVIDENCE_HEADER = "X-Churn-Evidence-Run"
#: claims kept per alias in that tag (the newest last)
TAG_KEEP = 8
#: a claim names a delivered move when it was made at most this long before the delivery
TAG_WINDOW = timedelta(seconds=300)
_REASON_LIMIT = 1000
_TAG_LIMIT = 4900


@dataclass(frozen=True)
class Claim:
    """Who says they move an alias, why, and the run holding their evidence (all optional)."""

    actor: str = ""
    reason: str = ""
    evidence_run_id: str = ""

    def __bool__(self) -> bool:
        return bool(self.actor or self.reason or self.evidence_run_id)


_current: ContextVar[Claim | None] = ContextVar("churn_alias_claim", default=None)


@contextmanager
def claiming(claim: Claim | None) -> Iterator[None]:
    """Make ``claim`` the claim of every registry request this thread / task sends inside."""
    token = _current.set(claim if claim else None)
    try:
        yield
    finally:
        _current.reset(token)


def current() -> Claim | None:
    """The claim set by the innermost :func:`claiming`, or None."""
    return _current.get()


def claim_headers(claim: Claim | None) -> dict[str, str]:
    """The request headers of ``claim`` (percent-encoded; empty fields left out)."""
    if not claim:
        return {}
    out = {ACTOR_HEADER: claim.actor[:200], REASON_HEADER: claim.reason[:_REASON_LIMIT],
           EVIDENCE_HEADER: claim.evidence_run_id[:64]}
    return {k: quote(v, safe=" ") for k, v in out.items() if v}


def claim_from_headers(headers: Mapping[str, str]) -> Claim | None:
    """The claim a request carries (None when it carries none)."""
    def get(key: str, limit: int) -> str:
        raw = headers.get(key) or ""
        try:
            return unquote(raw, errors="strict")[:limit].strip()
        except UnicodeDecodeError:
            return ""

    claim = Claim(get(ACTOR_HEADER, 200), get(REASON_HEADER, _REASON_LIMIT), get(EVIDENCE_HEADER, 64))
    return claim if claim else None


# --------------------------------------------------------------------------- receiver mode
def tag_key(alias: str) -> str:
    return f"{TAG_PREFIX}{alias}"


def _entries(raw: str | None) -> list[dict[str, Any]]:
    try:
        data = json.loads(raw) if raw else []
    except ValueError:
        return []
    return [d for d in data if isinstance(d, dict)] if isinstance(data, list) else []


def write_tag(client: Any, model: str, alias: str, to_version: str | None, claim: Claim | None,
              at: datetime) -> None:
    """Add ``claim`` about moving ``alias`` to ``to_version`` (None: deleting it) at ``at`` to
    the model's tag ``churn.claim.<alias>`` (the newest :data:`TAG_KEEP` kept)."""
    if not claim:
        return
    key = tag_key(alias)
    entries = _entries(client.get_registered_model(model).tags.get(key))
    entries.append({"to": to_version or "", "at": at.astimezone(UTC).isoformat(), **asdict(claim)})
    entries = entries[-TAG_KEEP:]
    text = json.dumps(entries, separators=(",", ":"))
    while len(text) > _TAG_LIMIT and len(entries) > 1:
        entries = entries[1:]
        text = json.dumps(entries, separators=(",", ":"))
    if len(text) > _TAG_LIMIT:  # one claim with a very long reason
        entries[0]["reason"] = entries[0]["reason"][:500]
        text = json.dumps(entries, separators=(",", ":"))
    client.set_registered_model_tag(model, key, text)


def read_tag(tags: Mapping[str, str], alias: str, to_version: str | None, at: datetime,
             taken: set[str] | None = None) -> Claim | None:
    """The newest claim in ``tags`` (a registered model's) about moving ``alias`` to
    ``to_version`` made within :data:`TAG_WINDOW` before ``at`` (a delivery's time); None.
    ``taken``: the ``at`` stamps of claims already matched to other deliveries (skipped;
    the match's stamp is added)."""
    want = to_version or ""
    found: list[tuple[bool, datetime, str, dict[str, Any]]] = []
    for entry in _entries(tags.get(tag_key(alias))):
        stamp = str(entry.get("at"))
        try:
            made = datetime.fromisoformat(stamp)
        except ValueError:
            continue
        if entry.get("to") != want or (taken is not None and stamp in taken) or made.tzinfo is None:
            continue
        if at - TAG_WINDOW <= made <= at + timedelta(seconds=5):  # 5 s: two machines' clocks
            found.append((made <= at, made, stamp, entry))
    if not found:
        return None
    _, _, stamp, entry = max(found, key=lambda f: (f[0], f[1]))  # the newest one made before `at`
    if taken is not None:
        taken.add(stamp)
    return Claim(str(entry.get("actor") or ""), str(entry.get("reason") or ""),
                 str(entry.get("evidence_run_id") or ""))

__all__ = ["ACTOR_HEADER", "EVIDENCE_HEADER", "REASON_HEADER", "Claim", "claim_from_headers", "claim_headers",
           "claiming", "current", "read_tag", "tag_key", "write_tag"]
