"""Does the registry's current state of a model verify? ``churn registry verify``.

:func:`verify_model` looks at every protected alias (:func:`~mlflow_churn.registry.promotion.guarded_aliases`:
``champion``, ``previous-champion``, ``canary`` and ``registry.protected_aliases``) of one
registered model and the version behind it, and checks, with the verify keys only:

=================  =======================================================================
check              passes when
=================  =======================================================================
signatures         every signed decision (``churn.sig.*`` tag) of the version verifies, for
                   exactly that model / version / identity, with the gate's file digest
files              the version's files, as the artifact store serves them now, have the
                   SHA-256 its signed gate decision names (nothing replaced since the gate)
lifecycle          the alias is where the lifecycle can have put it: ``canary`` on a version
                   whose signed gate passed; ``champion`` (and every other protected alias)
                   on a version with a signed promotion (canary ``promote`` or override)
                   that no signed rollback ended, or, with no promotion at all (the first
                   champion), a signed gate ``passed`` and no ``previous-champion``;
                   ``previous-champion`` on exactly the version the champion's signed
                   promotion replaced
distinct           ``champion`` and ``previous-champion`` (and ``champion`` and ``canary``)
                   are on different versions
=================  =======================================================================

A registry that cannot be read (a tracking server that does not answer) is an error, never
"verified": the exception propagates.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mlflow_churn.config import ChurnConfig
from mlflow_churn.errors import NotFound, first_line, is_missing
from mlflow_churn.registry.aliases import CANARY, CHAMPION, PREVIOUS_CHAMPION
from mlflow_churn.registry.promotion import VersionEvidence, guarded_aliases, read_evidence
from mlflow_churn.registry.signing import (
    KINDS,
    SIG_PREFIX,
    Verifier,
    verifier_for,
    version_files_digest,
    version_ref,
)
from mlflow_churn.registry.vocab import GateVerdict, SignedKind
from mlflow_churn.tracking import server_failure

CHECKS = ("exists", "signatures", "files", "lifecycle", "distinct")


@dataclass(frozen=True)
class Finding:
    """One check of one alias and the version behind it."""

    alias: str
    version: str | None
    check: str  # CHECKS
    ok: bool
    message: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class VerifyReport:
    """Every finding of :func:`verify_model` for one model."""

    model: str
    aliases: dict[str, str]  # every alias of the model -> version
    checked: list[str]  # the protected aliases looked at
    verify_keys: list[str]  # key ids signatures were checked with
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(f.ok for f in self.findings)

    @property
    def failed(self) -> list[Finding]:
        return [f for f in self.findings if not f.ok]

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "ok": self.ok, "aliases": dict(self.aliases),
                "checked": list(self.checked), "verify_keys": list(self.verify_keys),
                "findings": [f.to_dict() for f in self.findings]}


def _model_aliases(client: MlflowClient, name: str) -> dict[str, str]:
    """Alias -> version of model ``name``; ChurnError when the model does not exist; every other
    error (an outage) propagates."""
    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        if is_missing(exc):
            raise NotFound(f"no registered model '{name}'; check --model / training.model_name") from None
        raise
    return {a: str(v) for a, v in model.aliases.items()}


def verify_model(client: MlflowClient, cfg: ChurnConfig, name: str,
                 verifier: Verifier | None = None) -> VerifyReport:
    """The findings of every check of the module doc on model ``name``'s protected aliases.
    Raises when the registry cannot be read (never reports an outage as verified)."""
    verifier = verifier or verifier_for(cfg)
    aliases = _model_aliases(client, name)
    checked = [a for a in guarded_aliases(cfg) if a in aliases]
    report = VerifyReport(name, aliases, checked, verifier.key_ids)
    evidence: dict[str, VersionEvidence | None] = {}
    for version in sorted({aliases[a] for a in checked}, key=lambda v: int(v) if v.isdigit() else 0):
        evidence[version] = read_evidence(client, name, version, verifier)
    champ = aliases.get(CHAMPION)
    cev = evidence.get(champ) if champ else None
    for alias in checked:
        version = aliases[alias]
        ev = evidence[version]

        def add(check: str, ok: bool, message: str, alias: str = alias, version: str = version) -> None:
            report.findings.append(Finding(alias, version, check, ok, message))

        if ev is None:
            add("exists", False, f"{alias} points at version {version} of '{name}', which does not exist")
            continue
        _signatures(ev, add)
        _files(client, name, version, ev, add)
        if alias == CANARY:
            _canary(ev, champ, add)
        elif alias == PREVIOUS_CHAMPION:
            _previous(ev, champ, cev, add)
        else:
            _promoted(ev, alias, aliases.get(PREVIOUS_CHAMPION) if alias == CHAMPION else None, add)
    return report


def _signatures(ev: VersionEvidence, add: Any) -> None:
    tags = dict(ev.mv.tags or {})
    unknown = sorted(k for k in tags if k.startswith(SIG_PREFIX) and k[len(SIG_PREFIX):] not in KINDS)
    for key in unknown:
        add("signatures", False, f"tag {key} is not a kind of signed decision ({', '.join(KINDS)})")
    for kind, why in sorted(ev.problems.items()):
        add("signatures", False, f"signed {kind} decision does not count: {why}")
    if not ev.problems and not unknown:
        kinds = ", ".join(sorted(ev.decisions)) or "none"
        add("signatures", True, f"every signed decision verifies ({kinds})")


def _files(client: MlflowClient, name: str, version: str, ev: VersionEvidence, add: Any) -> None:
    gate = ev.get(SignedKind.GATE)
    if gate is None:
        add("files", False, "no signed gate decision names the version's files")
        return
    try:
        digest = version_files_digest(client, name, version)
    except Exception as exc:  # files gone / unreadable is a finding; an outage is an error
        if server_failure(exc) is not None:
            raise
        add("files", False, f"the version's files cannot be read: {first_line(exc)[:300]}")
        return
    if digest != gate.files_sha256:
        add("files", False, f"file digest {digest[:16]}... is not the {gate.files_sha256[:16]}... the signed "
            f"gate decision (run {gate.run_id}) names: the model files were changed after the gate")
    else:
        add("files", True, f"file digest {digest[:16]}... is the one the signed gate decision names")


def _canary(ev: VersionEvidence, champ: str | None, add: Any) -> None:
    version = str(ev.mv.version)
    if champ == version:
        add("distinct", False, f"champion and canary are both on version {version} (an interrupted "
            "promotion: run `churn canary promote` again)")
    gate = ev.get(SignedKind.GATE)
    if gate is None or gate.decision != GateVerdict.PASSED:
        why = "no signed gate decision" if gate is None else f"its signed gate decision says {gate.decision}"
        add("lifecycle", False, f"canary on version {version}, but {why}"
            + (f" (run {gate.run_id})" if gate else ""))
    else:
        add("lifecycle", True, f"signed gate passed (run {gate.run_id})")


def _promoted(ev: VersionEvidence, alias: str, previous: str | None, add: Any) -> None:
    """``champion`` (or another protected alias): a signed promotion not rolled back, or the
    first champion (signed gate passed, no promotion, no previous-champion)."""
    version = str(ev.mv.version)
    promo = ev.promotion
    gate = ev.get(SignedKind.GATE)
    if promo is not None:
        rollback = ev.rolled_back_after(promo)
        if rollback is not None:
            add("lifecycle", False, f"{alias} on version {version}, whose signed rollback (run "
                f"{rollback.run_id}) is newer than its promotion: an interrupted rollback, run "
                "`churn canary rollback` again")
        elif promo.kind == SignedKind.CANARY and (gate is None or gate.decision != GateVerdict.PASSED):
            add("lifecycle", False, f"{alias} on version {version}: promoted on its canary, but its signed "
                "gate did not pass")
        else:
            how = "override" if promo.kind == SignedKind.OVERRIDE else "canary promote"
            replaced = promo.champion.split(":")[0] or "none"
            add("lifecycle", True, f"signed promotion ({how}, run {promo.run_id or '-'}, by {promo.actor}) "
                f"replacing version {replaced}")
        return
    if gate is None or gate.decision != GateVerdict.PASSED:
        why = "no signed gate decision" if gate is None else f"its signed gate decision says {gate.decision}"
        add("lifecycle", False, f"{alias} on version {version}, which has no signed promotion and {why}")
    elif previous is not None:
        add("lifecycle", False, f"{alias} on version {version}, which has no signed promotion, yet "
            f"previous-champion is set (version {previous}): only a signed promotion leaves one behind")
    else:
        add("lifecycle", True, f"first champion: signed gate passed (run {gate.run_id}), no promotion")


def _previous(ev: VersionEvidence, champ: str | None, cev: VersionEvidence | None, add: Any) -> None:
    version = str(ev.mv.version)
    if champ == version:
        add("distinct", False, f"champion and previous-champion are both on version {version}")
        return
    add("distinct", True, f"champion (version {champ or 'none'}) is another version")
    promo = cev.promotion if cev is not None else None
    if promo is None:
        add("lifecycle", False, f"previous-champion on version {version}, but the champion (version "
            f"{champ or 'none'}) has no signed promotion that replaced it")
    elif promo.champion != version_ref(ev.mv):
        left = promo.champion.split(":")[0] or "none"
        other = ("another version with that number (identity differs)" if left == version
                 else f"version {left}")
        add("lifecycle", False, f"previous-champion on version {version}, but the champion's signed "
            f"promotion replaced {other}")
    else:
        add("lifecycle", True, f"the version the champion's signed promotion (run {promo.run_id or '-'}) "
            "replaced")


__all__ = ["CHECKS", "Finding", "VerifyReport", "verify_model"]
