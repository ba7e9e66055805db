"""May this alias move? The one promotion policy of the project, on signed evidence.

Used by the guard plugin of ``mlflow server`` (:mod:`mlflow_churn.registry.guard`), by
``churn canary promote``, by ``churn registry verify`` and by the webhook receiver (moves
made without the guard). The lifecycle aliases ``champion``, ``previous-champion`` and
``canary`` (and every alias of ``registry.protected_aliases``) move only along the
lifecycle, and only on decisions signed with the project's key
(:mod:`mlflow_churn.registry.signing`; a tag anyone can type is evidence for people, never
a reason to allow a move):

===================  =======================================================================
move                 allowed when (rule)
===================  =======================================================================
canary -> V          V carries a signed gate decision ``passed`` (``gate_passed``)
canary deleted       always (``canary_removed``): stopping a canary is always safe
champion -> V        ``rollback``: the champion C carries a signed rollback decision naming V,
                     newer than C's promotion, and C's signed promotion replaced V;
                     ``override``: V carries a signed override decision against the current
                     champion (``churn canary promote --force --reason``; under basic-auth
                     also tag ``promotion_override`` set by an override user);
                     ``first_champion``: no champion and no previous-champion, V's signed
                     gate passed; ``gate_and_canary``: V's signed gate passed and its signed
                     canary decision says ``promote`` against exactly the current champion
champion deleted     only while the champion carries a signed rollback newer than its
                     promotion (``rollback``)
previous-champion    only onto the version the champion's signed promotion replaced
-> V                 (``promotion_left_behind``); deleted only during a signed rollback
===================  =======================================================================

Every decision must verify for exactly that version (its identity, not just its number),
carry the same model-file digest as the version's gate decision, and be newer than any
signed rollback of the version (an override or a canary verdict ends with the promotion it
served). With ``registry.require_approval`` a promotion (not a rollback) also needs an
approval by someone other than the promoter: a signed approval (``churn registry approve``)
or, under basic-auth, tag ``approved_by`` written by a user of ``registry.approvers``.

Refusals name the rule the move fails: ``unknown_version``, ``not_gated``, ``gate_rejected``,
``canary_pending``, ``canary_rollback``, ``approval_missing``, ``self_approval``,
``bad_signature`` and ``lifecycle``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mlflow_churn.config import ChurnConfig
from mlflow_churn.errors import is_missing
from mlflow_churn.registry.aliases import CANARY, CHAMPION, PREVIOUS_CHAMPION, aliases_of
from mlflow_churn.registry.signing import (
    KINDS,
    Decision,
    SignatureError,
    Verifier,
    sig_tag,
    verifier_for,
    version_identity,
    version_ref,
)
from mlflow_churn.registry.vocab import CanaryVerdict, GateVerdict, SignedKind
from mlflow_churn.tags import (
    APPROVAL_TAG,
    CANARY_AT_TAG,
    CANARY_DECISION_TAG,
    CANARY_RUN_TAG,
    GATE_RUN_TAG,
    OVERRIDE_AGAINST_TAG,
    OVERRIDE_BY_TAG,
    OVERRIDE_TAG,
)

#: version tags only the guard writes (a REST write of them is refused)
GUARD_ONLY_TAGS = (OVERRIDE_BY_TAG, OVERRIDE_AGAINST_TAG)
LIFECYCLE = (CHAMPION, PREVIOUS_CHAMPION, CANARY)

ALLOWED_RULES = ("gate_and_canary", "first_champion", "rollback", "override", "gate_passed", "canary_removed",
                 "promotion_left_behind", "unchanged", "unprotected")
REFUSED_RULES = ("not_gated", "gate_rejected", "canary_pending", "canary_rollback", "approval_missing",
                 "self_approval", "unknown_version", "bad_signature", "lifecycle")


@dataclass(frozen=True)
class PromotionCheck:
    """Whether ``version`` of ``name`` may take (or, ``deleting``, leave) the protected
    ``alias``, by which rule, and why."""

    allowed: bool
    name: str  # registered model
    version: str
    alias: str  # the protected alias being set / deleted, e.g. "champion"
    rule: str  # ALLOWED_RULES when allowed, REFUSED_RULES when not
    message: str  # one sentence: names the version, the rule it fails and how to pass it
    evidence: dict[str, Any] = field(default_factory=dict)


@dataclass
class VersionEvidence:
    """The signed decisions of one registered version that verify for exactly that version."""

    mv: Any  # ModelVersion
    decisions: dict[str, Decision]  # kind -> decision
    problems: dict[str, str]  # kind -> why the tag of that kind does not count

    @property
    def ref(self) -> str:
        return version_ref(self.mv)

    def get(self, kind: str, decision: str | None = None) -> Decision | None:
        d = self.decisions.get(kind)
        return d if d is not None and (decision is None or d.decision == decision) else None

    @property
    def promotion(self) -> Decision | None:
        """The signed decision that made (or makes) this version champion: the newer of its
        canary ``promote`` and its override."""
        candidates = (self.get(SignedKind.CANARY, CanaryVerdict.PROMOTE), self.get(SignedKind.OVERRIDE))
        found = [d for d in candidates if d is not None]
        return max(found, key=lambda d: d.issued) if found else None

    def rolled_back_after(self, decision: Decision | None) -> Decision | None:
        """The version's signed rollback when it is newer than ``decision`` (or there is none)."""
        rb = self.get(SignedKind.ROLLBACK)
        if rb is None or (decision is not None and decision.issued > rb.issued):
            return None
        return rb

    def to_dict(self) -> dict[str, Any]:
        return {"version": str(self.mv.version), "identity": version_identity(self.mv),
                "decisions": {k: {"decision": d.decision, "champion": d.champion, "run_id": d.run_id,
                                  "issued_at": d.issued_at, "actor": d.actor, "key_id": d.key_id,
                                  "files_sha256": d.files_sha256} for k, d in self.decisions.items()},
                "problems": dict(self.problems)}


def verified_decision(mv: Any, name: str, kind: str,
                      verifier: Verifier) -> tuple[Decision | None, str | None]:
    """(the signed ``kind`` decision of the fetched version ``mv``, None) when its tag verifies
    and names exactly this kind, model, version number and identity; (None, why) when the tag
    is there but does not; (None, None) without the tag."""
    value = (mv.tags or {}).get(sig_tag(kind))
    if value is None:
        return None, None
    try:
        d = verifier.verify(value)
    except SignatureError as exc:
        return None, str(exc)
    wrong = [f for f, want in (("kind", kind), ("model", name), ("version", str(mv.version)),
                               ("identity", version_identity(mv))) if getattr(d, f) != want]
    if d.decision not in KINDS[kind]:
        wrong.append("decision")
    if wrong:
        return None, f"the signed {kind} decision is for another {'/'.join(wrong)}"
    return d, None


def read_evidence(client: MlflowClient, name: str, version: str | None,
                  verifier: Verifier) -> VersionEvidence | None:
    """The verified signed decisions of ``version`` (None when it does not exist). A tag whose
    signature does not verify, or verifies for another model / version / identity / kind, or
    names other model files than the gate decision, is listed in ``problems``, not used."""
    if version is None:
        return None
    try:
        mv = client.get_model_version(name, str(version))
    except MlflowException as exc:
        if is_missing(exc):
            return None
        raise
    decisions: dict[str, Decision] = {}
    problems: dict[str, str] = {}
    for kind in KINDS:
        d, problem = verified_decision(mv, name, kind, verifier)
        if problem:
            problems[kind] = problem
        elif d is not None:
            decisions[kind] = d
    gate = decisions.get(SignedKind.GATE)
    for kind, d in list(decisions.items()):
        if kind != SignedKind.GATE and (gate is None or d.files_sha256 != gate.files_sha256):
            problems[kind] = (f"the signed {kind} decision names other model files than the gate decision"
                              if gate else f"a signed {kind} decision without a signed gate decision")
            del decisions[kind]
    return VersionEvidence(mv, decisions, problems)


def record_canary_verdict(client: MlflowClient, name: str, version: str, verdict: str, run_id: str,
                          as_of: datetime) -> None:
    """Tag ``version`` with its latest canary verdict and the run that holds the evidence
    (for people; the signed canary decision is what the guard reads). ``as_of`` is the
    evaluation's business time (UTC)."""
    for key, value in {CANARY_DECISION_TAG: verdict, CANARY_RUN_TAG: run_id,
                       CANARY_AT_TAG: as_of.isoformat()}.items():
        client.set_model_version_tag(name, str(version), key, value)


def guarded_aliases(cfg: ChurnConfig) -> tuple[str, ...]:
    """The lifecycle aliases and ``registry.protected_aliases`` (an empty list turns the guard off)."""
    extra = tuple(a for a in cfg.registry.protected_aliases if a not in LIFECYCLE)
    return (LIFECYCLE + extra) if cfg.registry.protected_aliases else ()


def check_approval(client: MlflowClient, name: str, version: str, cfg: ChurnConfig,
                   alias: str = CHAMPION, actor: str | None = None,
                   verifier: Verifier | None = None) -> PromotionCheck:
    """Allowed unless ``registry.require_approval`` is on and ``version`` has no approval by
    someone other than ``actor`` (the promoter): a signed approval newer than any rollback of
    the version, or under basic-auth the guard-checked tag ``approved_by``."""
    version = str(version)
    if not cfg.registry.require_approval:
        return PromotionCheck(True, name, version, alias, "approval_not_required",
                              "registry.require_approval is off", {})
    ev = read_evidence(client, name, version, verifier or verifier_for(cfg))
    if ev is None:
        return _unknown(name, version, alias)
    return _approval(ev, name, alias, cfg, actor)


def _approval(ev: VersionEvidence, name: str, alias: str, cfg: ChurnConfig,
              actor: str | None) -> PromotionCheck:
    version = str(ev.mv.version)
    if not cfg.registry.require_approval:
        return PromotionCheck(True, name, version, alias, "approval_not_required",
                              "registry.require_approval is off", {})
    approvers: list[tuple[str, str]] = []
    signed = ev.get(SignedKind.APPROVAL)
    if signed is not None and ev.rolled_back_after(signed) is None:
        approvers.append((signed.actor, f"signed approval ({signed.run_id or 'cli'})"))
    tagged = (ev.mv.tags.get(APPROVAL_TAG) or "").strip()
    if tagged and cfg.registry.guard_auth == "basic-auth":  # the guard let only an approver write it
        approvers.append((tagged, "tag approved_by"))
    others = [(who, how) for who, how in approvers if not _same_person(who, actor)]
    if others:
        who, how = others[0]
        return PromotionCheck(True, name, version, alias, "approved",
                              f"version {version} of '{name}' was approved by {who} ({how})",
                              {"approved_by": who})
    if approvers:
        return PromotionCheck(False, name, version, alias, "self_approval",
                              f"version {version} of '{name}' may not become {alias}: rule self_approval "
                              f"({approvers[0][0]} approved it and is the one promoting it); another "
                              "approver must approve (four eyes)", {"approved_by": approvers[0][0]})
    how = ("a user of registry.approvers sets tag 'approved_by' = their own user name"
           if cfg.registry.guard_auth == "basic-auth"
           else "an approver runs `churn registry approve --version " + version + " --approver NAME`")
    return PromotionCheck(
        False, name, version, alias, "approval_missing",
        f"version {version} of '{name}' may not become {alias}: rule approval_missing "
        f"(registry.require_approval is on); {how}, someone other than the promoter", {})


def _same_person(a: str | None, b: str | None) -> bool:
    def norm(x: str) -> str:
        return x.split(" (")[0].strip().lower()
    return bool(a) and bool(b) and norm(a) == norm(b)


def check_promotion(client: MlflowClient, name: str, version: str | None, cfg: ChurnConfig,
                    alias: str = CHAMPION, *, actor: str | None = None,
                    verifier: Verifier | None = None) -> PromotionCheck:
    """May ``alias`` of ``name`` move to ``version`` now (``version`` None: be deleted)? Rules:
    module doc. ``actor`` is who asks (the promoter, for four eyes). Reads the registry through
    ``client``; changes nothing. An alias outside :func:`guarded_aliases` is always allowed."""
    version = None if version is None else str(version)
    if alias not in guarded_aliases(cfg):
        return PromotionCheck(True, name, version or "", alias, "unprotected", f"{alias} is not protected")
    verifier = verifier or verifier_for(cfg)
    aliases = aliases_of(client, name)
    holder = aliases.get(alias)
    evidence: dict[str, Any] = {"aliases": dict(aliases), "verify_keys": verifier.key_ids}
    shown = version if version is not None else (holder or "")
    head = (f"version {version} of '{name}' may not become {alias}" if version is not None
            else f"alias {alias} of '{name}' (version {holder}) may not be deleted")

    def result(allowed: bool, rule: str, message: str) -> PromotionCheck:
        return PromotionCheck(allowed, name, shown, alias, rule, message, dict(evidence))

    def refuse(rule: str, why: str, fix: str) -> PromotionCheck:
        return result(False, rule, f"{head}: rule {rule} ({why}); {fix}")

    if version is not None and version == holder:
        return result(True, "unchanged", f"{alias} already points at version {version}")
    ev = read_evidence(client, name, version, verifier) if version is not None else None
    if version is not None and ev is None:
        return _unknown(name, version, alias)
    if ev is not None:
        evidence["target"] = ev.to_dict()
    champ = aliases.get(CHAMPION)
    cev = read_evidence(client, name, champ, verifier) if champ else None
    if cev is not None:
        evidence["champion"] = cev.to_dict()
    keys = "" if verifier.key_ids else " (no verify key: registry.verify_key_file is missing or empty)"

    if alias == CANARY:
        if ev is None:
            return result(True, "canary_removed", f"canary of '{name}' removed")
        if version == champ:
            return refuse("lifecycle", f"version {version} is the champion",
                          "a canary is a challenger that passed the gate")
        return _gated(ev, refuse, result, version, keys) or \
            result(True, "gate_passed", f"version {version} of '{name}' passed the gate (signed, run "
                   f"{ev.decisions['gate'].run_id})")

    def removed(of: str | None, rb: Decision | None) -> PromotionCheck:
        """Deleting ``alias``: allowed only during the signed rollback ``rb`` of version ``of``."""
        if rb is not None:
            return result(True, "rollback", f"{alias} of '{name}' removed by the signed rollback of version "
                          f"{of} (run {rb.run_id})")
        return refuse("lifecycle", f"only a signed rollback removes {alias}",
                      "roll back with `churn canary rollback` (it is signed)")

    promo = cev.promotion if cev else None
    rollback = cev.rolled_back_after(promo) if cev else None
    if alias == PREVIOUS_CHAMPION:
        if ev is None:
            return removed(champ, rollback)
        if promo is not None and promo.champion == ev.ref:
            return result(True, "promotion_left_behind", f"version {version} is the champion that the "
                          f"signed promotion of version {champ} replaced")
        left = promo.champion.split(":")[0] if promo and promo.champion else None
        return refuse("lifecycle", f"previous-champion goes only onto the version the champion's signed "
                      f"promotion replaced ({'version ' + left if left else 'none'})",
                      "promote with `churn canary promote`; it moves previous-champion itself")

    # champion, or another protected alias (checked like champion)
    hev = cev if alias == CHAMPION else read_evidence(client, name, holder, verifier)
    hpromo = hev.promotion if hev else None
    hrollback = hev.rolled_back_after(hpromo) if hev else None
    if ev is None:
        return removed(holder, hrollback)
    if hrollback is not None and hrollback.champion == ev.ref and hpromo is not None \
            and hpromo.champion == ev.ref:
        return result(True, "rollback", f"version {version} of '{name}' is the champion that version "
                      f"{holder} replaced, restored by a signed rollback (run {hrollback.run_id})")
    current_ref = hev.ref if hev else ""
    v_rollback = ev.get(SignedKind.ROLLBACK)
    override = ev.get(SignedKind.OVERRIDE)
    how_override = ("or override: `churn canary promote --force --reason TEXT` (signed)"
                    + (", or tag promotion_override set by a user of registry.override_users"
                       if cfg.registry.guard_auth == "basic-auth" else ""))
    if override is not None and override.champion == current_ref and ev.rolled_back_after(override) is None:
        evidence["override_reason"] = override.reason
        return _approved(ev, name, alias, cfg, actor, result, evidence, SignedKind.OVERRIDE,
                         f"version {version} of '{name}' carries a signed override by {override.actor}: "
                         f"{override.reason}")
    tags = dict(ev.mv.tags or {})
    if cfg.registry.guard_auth == "basic-auth" and (tags.get(OVERRIDE_TAG) or "").strip() \
            and tags.get(OVERRIDE_BY_TAG) and tags.get(OVERRIDE_AGAINST_TAG) == current_ref:
        evidence["override_reason"] = tags[OVERRIDE_TAG]
        return _approved(ev, name, alias, cfg, actor, result, evidence, SignedKind.OVERRIDE,
                         f"version {version} of '{name}' carries an override by {tags[OVERRIDE_BY_TAG]}: "
                         f"{tags[OVERRIDE_TAG]}")
    refused = _gated(ev, refuse, result, version, keys, how_override)
    if refused is not None:
        return refused
    canary = ev.get(SignedKind.CANARY)
    if (v_rollback is not None and (canary is None or canary.issued <= v_rollback.issued)) or \
            (canary is not None and canary.decision == CanaryVerdict.ROLLBACK):
        why = (f"signed rollback {v_rollback.run_id}: {v_rollback.reason}" if v_rollback is not None
               and (canary is None or canary.issued <= v_rollback.issued)
               else f"canary run {canary.run_id} says rollback")
        return refuse("canary_rollback", why[:300], f"this version failed; train a new one {how_override}")
    if holder is None and aliases.get(PREVIOUS_CHAMPION) is None:
        return _approved(ev, name, alias, cfg, actor, result, evidence, "first_champion",
                         f"version {version} of '{name}' passed the gate (signed, run "
                         f"{ev.decisions['gate'].run_id}) and the model has no champion yet")
    if canary is None or canary.decision != CanaryVerdict.PROMOTE:
        why = "it has no signed canary decision" if canary is None else f"canary run {canary.run_id} says " \
            f"{canary.decision}"
        if SignedKind.CANARY in ev.problems:
            why = ev.problems[SignedKind.CANARY]
        return refuse("canary_pending", why, f"serve it as canary until `churn canary evaluate` says promote "
                      f"{how_override}")
    if canary.champion != current_ref:
        against = canary.champion.split(":")[0] or "none"
        return refuse("canary_pending", f"its signed canary decision (run {canary.run_id}) compared it with "
                      f"version {against}, the {alias} is {holder or 'none'}",
                      f"re-run `churn canary evaluate` {how_override}")
    return _approved(ev, name, alias, cfg, actor, result, evidence, "gate_and_canary",
                     f"version {version} of '{name}' passed the gate (run {ev.decisions['gate'].run_id}) "
                     f"and its canary (run {canary.run_id}: promote), both signed")


def _gated(ev: VersionEvidence, refuse: Any, result: Any, version: str, keys: str,
           how_override: str = "") -> PromotionCheck | None:
    """A refusal unless ``ev`` has a verified gate decision ``passed``."""
    gate = ev.get(SignedKind.GATE)
    if gate is None:
        if SignedKind.GATE in ev.problems:
            return refuse("bad_signature", ev.problems[SignedKind.GATE] + keys,
                          "re-run the gate (`churn evaluate`) with the project's signing key")
        run = ev.mv.tags.get(GATE_RUN_TAG)
        why = "it has no signed gate decision" + (f" (gate run {run} is not signed)" if run else "") + keys
        return refuse("not_gated", why, f"run the gate (`churn evaluate --challenger {version}`, or alias "
                      f"challenger -> {version} with the webhook receiver running) {how_override}".rstrip())
    if gate.decision != GateVerdict.PASSED:
        why = ev.mv.tags.get("gate_reasons") or "see the gate run"
        return refuse("gate_rejected", f"signed gate run {gate.run_id}: {why[:300]}",
                      f"train and gate a better version {how_override}".rstrip())
    return None


def _approved(ev: VersionEvidence, name: str, alias: str, cfg: ChurnConfig, actor: str | None,
              result: Any, evidence: dict[str, Any], rule: str, message: str) -> PromotionCheck:
    approval = _approval(ev, name, alias, cfg, actor)
    evidence.update(approval.evidence)  # who approved, in the audit run
    if not approval.allowed:
        return result(False, approval.rule, approval.message)
    return result(True, rule, message)


def _unknown(name: str, version: str, alias: str) -> PromotionCheck:
    return PromotionCheck(False, name, version, alias, "unknown_version",
                          f"version {version} of '{name}' may not become {alias}: rule unknown_version "
                          "(no such registered model version); check the model name and version", {})
