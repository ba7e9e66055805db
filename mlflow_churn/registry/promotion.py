"""May this version take a protected alias? The one promotion policy of the project.

Used by the guard plugin of ``mlflow server`` (:mod:`mlflow_churn.registry.guard`), by
``churn canary promote`` and by the webhook receiver (unguarded moves). A version may take a
protected alias (``registry.protected_aliases``, default ``[champion]``) when one of these
rules allows it, checked in this order:

==================  ==========================================================================
rule                allowed when
==================  ==========================================================================
rollback            the version is the one behind ``previous-champion`` (it was champion just
                    before); needs no approval, so an incident never waits for a person
override            the version carries tag ``promotion_override`` with a non-empty reason
                    (a person sets it in the UI, ``churn canary promote --force`` sets it)
first_champion      the model has no champion and no ``previous-champion`` and no version of
                    it was ever promoted (tags ``promoted_at``, ``promotion_rule``,
                    ``replaced_by``), and the version's gate run says ``passed``
gate_and_canary     the version's gate run says ``passed`` and its latest canary evaluation
                    run (tag ``canary_run_id``, written by ``churn canary evaluate``) says
                    ``promote``, measured against the champion the model has now
==================  ==========================================================================

Refusals name the rule the version fails: ``unknown_version``, ``not_gated`` (no gate run),
``gate_rejected``, ``canary_pending`` (no canary verdict yet, ``wait``, or a verdict against
another champion), ``canary_rollback`` and, with ``registry.require_approval``,
``approval_missing`` (tag ``approved_by`` absent) for every allowed rule but ``rollback``.

The gate's and the canary's decisions are read from their runs (tags ``gate`` and
``decision``), not only from the version's tags, so a tag typed into the UI does not pass a
version that was never gated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mlflow_churn.config import ChurnConfig
from mlflow_churn.registry.aliases import CHAMPION, PREVIOUS_CHAMPION, aliases_of

OVERRIDE_TAG = "promotion_override"  # version tag: a person's reason for an explicit override
APPROVAL_TAG = "approved_by"  # version tag: who approved (registry.require_approval)
GATE_TAG = "gate"  # version tag the gate writes: passed | rejected
GATE_RUN_TAG = "gate_run_id"  # version tag the gate writes: its decision run
CANARY_DECISION_TAG = "canary_decision"  # version tag: latest canary verdict (promote | rollback | wait)
CANARY_RUN_TAG = "canary_run_id"  # version tag: the canary-evaluate run of that verdict
CANARY_AT_TAG = "canary_evaluated_at"  # version tag: as_of of that evaluation (UTC ISO 8601)

ALLOWED_RULES = ("gate_and_canary", "first_champion", "rollback", "override")
REFUSED_RULES = ("not_gated", "gate_rejected", "canary_pending", "canary_rollback", "approval_missing",
                 "unknown_version")


@dataclass(frozen=True)
class PromotionCheck:
    """Whether ``version`` of ``name`` may take the protected ``alias``, by which rule, and why."""

    allowed: bool
    name: str  # registered model
    version: str
    alias: str  # the protected alias being set / deleted, e.g. "champion"
    rule: str  # ALLOWED_RULES when allowed, REFUSED_RULES when not
    message: str  # one sentence: names the version, the rule it fails and how to pass it
    evidence: dict[str, Any] = field(default_factory=dict)


def record_canary_verdict(client: MlflowClient, name: str, version: str, verdict: str, run_id: str,
                          as_of: datetime) -> None:
    """Tag ``version`` with its latest canary verdict and the run that holds the evidence
    (what :func:`check_promotion` reads). ``as_of`` is the evaluation's business time (UTC)."""
    for key, value in {CANARY_DECISION_TAG: verdict, CANARY_RUN_TAG: run_id,
                       CANARY_AT_TAG: as_of.isoformat()}.items():
        client.set_model_version_tag(name, str(version), key, value)


def check_approval(client: MlflowClient, name: str, version: str, cfg: ChurnConfig,
                   alias: str = CHAMPION) -> PromotionCheck:
    """Allowed unless ``registry.require_approval`` is on and the version has no ``approved_by``
    tag (rule ``approval_missing``; allowed: ``approved`` / ``approval_not_required``)."""
    version = str(version)
    if not cfg.registry.require_approval:
        return PromotionCheck(True, name, version, alias, "approval_not_required",
                              "registry.require_approval is off", {})
    try:
        tags = client.get_model_version(name, version).tags
    except MlflowException:
        return _unknown(name, version, alias)
    who = (tags.get(APPROVAL_TAG) or "").strip()
    if who:
        return PromotionCheck(True, name, version, alias, "approved",
                              f"version {version} of '{name}' was approved by {who}", {"approved_by": who})
    return PromotionCheck(
        False, name, version, alias, "approval_missing",
        f"version {version} of '{name}' may not become {alias}: rule approval_missing "
        f"(registry.require_approval is on); a person must approve it first by setting tag "
        f"'{APPROVAL_TAG}' = their name on version {version}", {})


def check_promotion(client: MlflowClient, name: str, version: str, cfg: ChurnConfig,
                    alias: str = CHAMPION) -> PromotionCheck:
    """May ``version`` of model ``name`` take the protected ``alias`` now? (rules: module doc).

    Reads the registry through ``client`` (the version's tags, the model's aliases, the
    gate and canary runs); changes nothing.
    """
    version = str(version)
    try:
        mv = client.get_model_version(name, version)
    except MlflowException:
        return _unknown(name, version, alias)
    tags = dict(mv.tags)
    aliases = {a: str(v) for a, v in aliases_of(client, name).items()}
    current = aliases.get(alias)
    previous = aliases.get(PREVIOUS_CHAMPION)
    evidence: dict[str, Any] = {"current": current, "previous_champion": previous}
    refuse_head = f"version {version} of '{name}' may not become {alias}"

    def result(allowed: bool, rule: str, message: str) -> PromotionCheck:
        return PromotionCheck(allowed, name, version, alias, rule, message, dict(evidence))

    def approved(rule: str, message: str) -> PromotionCheck:
        approval = check_approval(client, name, version, cfg, alias)
        evidence.update(approval.evidence)
        if not approval.allowed:
            return result(False, approval.rule, approval.message)
        return result(True, rule, message)

    if previous is not None and previous == version and current != version:
        return result(True, "rollback", f"version {version} of '{name}' was champion before "
                      f"(alias {PREVIOUS_CHAMPION}): a rollback")
    reason = (tags.get(OVERRIDE_TAG) or "").strip()
    if reason:
        evidence["override_reason"] = reason
        return approved("override", f"version {version} of '{name}' carries an explicit override: {reason}")

    gate_run_id = tags.get(GATE_RUN_TAG)
    gate = _run_tags(client, gate_run_id)
    evidence.update({"gate_run_id": gate_run_id, "gate": gate.get(GATE_TAG) if gate else None})
    how_override = (f"or set tag '{OVERRIDE_TAG}' = a reason on version {version} to override "
                    "(recorded)")
    if gate is None or gate.get("challenger_version", version) != version:
        why = ("it has no gate run" if not gate_run_id
               else f"its gate run {gate_run_id} is missing or gated another version")
        return result(False, "not_gated", f"{refuse_head}: rule not_gated ({why}); run the gate "
                      f"(`churn evaluate --challenger {version}`, or alias challenger -> {version} with "
                      f"the webhook receiver running) {how_override}")
    if gate.get(GATE_TAG) != "passed":
        why = tags.get("gate_reasons") or "see the gate run"
        return result(False, "gate_rejected", f"{refuse_head}: rule gate_rejected (gate run {gate_run_id}: "
                      f"{why[:300]}); train and gate a better version {how_override}")

    other = current if current != version else None  # the champion this version would replace
    if other is None and previous is None and not _ever_promoted(client, name, version):
        return approved("first_champion", f"version {version} of '{name}' passed the gate (run "
                        f"{gate_run_id}) and the model has no champion yet")

    canary_run_id = tags.get(CANARY_RUN_TAG)
    canary = _run_tags(client, canary_run_id)
    decision = canary.get("decision") if canary else None
    evidence.update({"canary_run_id": canary_run_id, "canary_decision": decision})
    if tags.get("rolled_back") == "true" or (decision == "rollback"
                                             and canary.get("canary_version") == version):
        why = tags.get("rollback_reason") or f"canary run {canary_run_id} says rollback"
        return result(False, "canary_rollback", f"{refuse_head}: rule canary_rollback ({why[:300]}); "
                      f"this version failed its canary, train a new one {how_override}")
    if canary is None or canary.get("canary_version") != version or decision != "promote":
        why = ("it has no canary evaluation" if canary is None or canary.get("canary_version") != version
               else f"canary run {canary_run_id} says {decision}")
        return result(False, "canary_pending", f"{refuse_head}: rule canary_pending ({why}); serve it as "
                      f"canary until `churn canary evaluate` says promote {how_override}")
    against = canary.get("champion_version")
    if other is not None and against != other:
        return result(False, "canary_pending", f"{refuse_head}: rule canary_pending (its canary run "
                      f"{canary_run_id} compared it with version {against}, the champion is now {other}); "
                      f"re-run `churn canary evaluate` {how_override}")
    return approved("gate_and_canary", f"version {version} of '{name}' passed the gate (run {gate_run_id}) "
                    f"and its canary (run {canary_run_id}: promote)")


def _unknown(name: str, version: str, alias: str) -> PromotionCheck:
    return PromotionCheck(False, name, version, alias, "unknown_version",
                          f"version {version} of '{name}' may not become {alias}: rule unknown_version "
                          "(no such registered model version); check the model name and version", {})


def _ever_promoted(client: MlflowClient, name: str, version: str) -> bool:
    """Was another version of ``name`` champion at some time (tags promote / the guard write)?"""
    marks = ("promoted_at", "promotion_rule", "replaced_by")
    return any(str(mv.version) != version and any(k in mv.tags for k in marks)
               for mv in client.search_model_versions(f"name = '{name}'"))


def _run_tags(client: MlflowClient, run_id: str | None) -> dict[str, str] | None:
    """Tags of run ``run_id``; None when it is not given or does not exist."""
    if not run_id:
        return None
    try:
        return dict(client.get_run(run_id).data.tags)
    except MlflowException:
        return None
