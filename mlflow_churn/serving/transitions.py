"""Promote and roll back the canary: the transitions that act on a canary verdict.

:func:`promote` moves ``champion`` to the canary version, ``previous-champion`` to the old
champion and removes ``canary`` (refused unless the canary evidence says ``promote``, or
``force`` with a reason recorded as the ``promotion_override`` tag);
:func:`adopt_promotion` does the same for a ``champion`` a person set by hand in the UI;
:func:`rollback` removes ``canary`` and tags the version with the reason, or, after a
promotion, puts ``champion`` back on ``previous-champion``. Every alias move is recorded in
the alias history (:mod:`mlflow_churn.registry.history`) with the run as evidence.
Transitions run under a cross-process lock (a PostgreSQL advisory lock when the
tracking store is PostgreSQL, else ``fcntl`` on ``<workspace>/locks/registry-<model>.lock``)
and re-read the aliases after taking it, so of two concurrent promotions one acts and the
other is a no-op ("already promoted"). Every evaluation and transition is an MLflow run
(tags ``decision``, metrics, params and ``decision.json``).
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from mlflow_churn.config import ChurnConfig
from mlflow_churn.errors import ChurnError, first_line
from mlflow_churn.jsonable import jsonable
from mlflow_churn.registry.aliases import (
    CANARY,
    CHAMPION,
    PREVIOUS_CHAMPION,
    STAGE_OF,
    aliases_of,
    move_alias,
    remove_alias,
)
from mlflow_churn.registry.lock import registry_lock
from mlflow_churn.registry.promotion import OVERRIDE_TAG, check_approval
from mlflow_churn.serving.canary import (
    CanaryEvaluation,
    decision_run,
    default_as_of,
    evaluate_canary,
    log_json,
    metrics_of,
    registry_client,
)
from mlflow_churn.tracking import fail_fast, failed_on_error


@dataclass
class TransitionResult:
    """What a promote / rollback did (``noop`` when another process already did it)."""

    action: str  # promote | rollback
    noop: bool
    message: str
    model_name: str
    version: str | None
    before: dict[str, str]
    after: dict[str, str]
    reason: str
    run_id: str | None = None
    evidence: dict[str, Any] = field(default_factory=dict)  # CanaryEvaluation.to_dict()
    evidence_error: str | None = None  # why no evidence could be computed

    def to_dict(self) -> dict[str, Any]:
        return jsonable(asdict(self))


# --------------------------------------------------------------------------- transitions
def promote(cfg: ChurnConfig, reason: str, version: str | None = None,
            evidence: CanaryEvaluation | None = None, as_of: datetime | None = None,
            since: datetime | None = None, force: bool = False, actor: str | None = None) -> TransitionResult:
    """Make the canary the champion (old champion -> ``previous-champion``; canary removed).

    ``version``: the canary version the caller saw; when another process promoted it
    already, this is a no-op. Raises ChurnError when there is no canary to promote.
    The run carries ``evidence``, by default the canary analysis of the logged traffic in
    ``[since, as_of]`` (see :func:`_transition_evidence`).

    When there is a champion to replace, the evidence must say ``promote`` (so the canary
    served at least ``serving.min_canary_samples`` logged predictions within every limit);
    else ChurnError naming the verdict, unless ``force``: then ``reason`` is recorded as
    the version's ``promotion_override`` tag (the override a guarded server accepts) and on
    the run (tag ``override``). ``actor`` (default: the OS user) goes to the alias history.
    """
    client = registry_client(cfg)
    name = cfg.training.model_name
    if force and not reason.strip():
        raise ChurnError("a forced promotion needs a reason (--reason TEXT): it is recorded as the "
                         f"version's {OVERRIDE_TAG} tag")
    with registry_lock(cfg) as lock:
        before = aliases_of(client, name)  # re-read under the lock
        canary = before.get(CANARY)
        if canary is None or (version is not None and str(version) != canary):
            if version is not None and before.get(CHAMPION) == str(version):
                return _noop(cfg, "promote", name, str(version), before, reason,
                             f"already promoted: version {version} is the champion of '{name}'")
            if canary is None:
                raise ChurnError(f"'{name}' has no canary to promote (aliases: {before or 'none'}); "
                                 "pass a challenger through `churn evaluate` first")
            raise ChurnError(f"version {version} is not the canary of '{name}' (canary is {canary}); "
                             "check --version")
        approval = check_approval(client, name, canary, cfg)  # registry.require_approval
        if not approval.allowed:
            raise ChurnError(approval.message)
        old = before.get(CHAMPION)
        # logged as a canary-evaluate run: the verdict tag on the version is what a guarded
        # server (registry.promotion.check_promotion) reads
        proof, proof_error = _transition_evidence(cfg, evidence, as_of, since, log_run=old is not None)
        if old is not None and old != canary and not force:
            _require_promote_verdict(cfg, canary, proof, proof_error)
        if force:
            client.set_model_version_tag(name, canary, OVERRIDE_TAG, reason[:500])
        with fail_fast(cfg, f"promoting v{canary} of '{name}'"), \
                decision_run(cfg, f"promote v{canary}") as run, failed_on_error(cfg):
            who = {"actor": actor, "reason": reason, "evidence_run_id": run.info.run_id}
            # ordered so that an interruption between two moves leaves a consistent registry that
            # the same command completes: previous-champion first (the champion stays), then
            # champion, then canary removed (champion and canary on one version until then)
            if old is not None and old != canary:
                move_alias(client, name, PREVIOUS_CHAMPION, old, cfg.evaluation.mirror_stages, **who)
            move_alias(client, name, CHAMPION, canary, cfg.evaluation.mirror_stages, **who)
            result = _finish_promotion(cfg, client, canary, old, before, reason, run.info.run_id, who)
            if force:
                mlflow.set_tag("override", reason[:500])
            _log_transition(result, lock, proof, proof_error)
        return result


def _require_promote_verdict(cfg: ChurnConfig, canary: str, proof: CanaryEvaluation | None,
                             proof_error: str | None) -> None:
    """ChurnError unless ``proof`` is a ``promote`` verdict on ``canary`` with enough traffic."""
    fix = "; to promote anyway pass --force with --reason TEXT (recorded as an override)"
    if proof is None:
        raise ChurnError(f"cannot promote version {canary}: no canary evidence ({proof_error}){fix}")
    rows = proof.routes["canary"].rows if "canary" in proof.routes else 0
    need = cfg.canary.needed(cfg.serving)
    if proof.verdict != "promote" or rows < need:
        why = "; ".join(proof.reasons) or "no reason given"
        raise ChurnError(f"cannot promote version {canary}: the canary verdict is '{proof.verdict}' on "
                         f"{rows} logged predictions (canary.min_requests={need}): {why}{fix}")


def _finish_promotion(cfg: ChurnConfig, client: MlflowClient, canary: str, old: str | None,
                      before: dict[str, str], reason: str, run_id: str,
                      who: dict[str, Any]) -> TransitionResult:
    """After ``champion`` moved to ``canary``: ``previous-champion`` -> ``old``, ``canary``
    removed, version tags; inside the transition run ``run_id``."""
    name = cfg.training.model_name
    mirror = cfg.evaluation.mirror_stages
    if old is not None and old != canary and aliases_of(client, name).get(PREVIOUS_CHAMPION) != old:
        move_alias(client, name, PREVIOUS_CHAMPION, old, mirror, **who)
    if aliases_of(client, name).get(CANARY) == canary:  # champion owns the stage now: no mirroring
        remove_alias(client, name, CANARY, False, **who)
    after = aliases_of(client, name)
    stamp = datetime.now(UTC).isoformat()
    tags = {"promoted_at": stamp, "promote_reason": reason[:500], "promote_run_id": run_id}
    for key, value in tags.items():
        client.set_model_version_tag(name, canary, key, value)
    if old is not None and old != canary:
        client.set_model_version_tag(name, old, "replaced_by", canary)
    return TransitionResult("promote", False, f"version {canary} is now champion of '{name}'"
                            + (f"; version {old} is previous-champion" if old else ""),
                            name, canary, before, after, reason, run_id)


def adopt_promotion(cfg: ChurnConfig, version: str, previous: str | None, actor: str, reason: str,
                    moved_at: datetime | None = None) -> TransitionResult:
    """Complete a promotion someone made by hand (``champion`` set to the canary ``version``
    in the UI or over REST, away from ``previous``) as :func:`promote` would have: the
    transition run with the canary evidence, ``previous-champion`` -> ``previous``,
    ``canary`` removed, stages mirrored when configured. A no-op (decision ``noop``) when
    ``champion`` is no longer on ``version``."""
    client = registry_client(cfg)
    name = cfg.training.model_name
    with registry_lock(cfg) as lock:
        before = aliases_of(client, name)
        if before.get(CHAMPION) != str(version):
            return _noop(cfg, "promote", name, str(version), before, reason,
                         f"champion of '{name}' is no longer version {version} ({before.get(CHAMPION)})")
        proof, proof_error = _transition_evidence(cfg, None, None, None)
        with decision_run(cfg, f"promote v{version} (by hand)") as run:
            who = {"actor": actor, "reason": reason, "evidence_run_id": run.info.run_id}
            if cfg.evaluation.mirror_stages:  # the champion's stage, as move_alias mirrors it
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)
                    client.transition_model_version_stage(name, str(version), STAGE_OF[CHAMPION])
                    if previous and previous != str(version) and \
                            client.get_model_version(name, previous).current_stage == STAGE_OF[CHAMPION]:
                        client.transition_model_version_stage(name, previous, "None")
            result = _finish_promotion(cfg, client, str(version), previous, before, reason, run.info.run_id,
                                       who)
            when = (moved_at or datetime.now(UTC)).isoformat()
            mlflow.set_tags({"promoted_by": actor, "promoted_at": when})
            _log_transition(result, lock, proof, proof_error)
        return result


def rollback(cfg: ChurnConfig, reason: str, version: str | None = None,
             evidence: CanaryEvaluation | None = None, as_of: datetime | None = None,
             since: datetime | None = None, actor: str | None = None) -> TransitionResult:
    """Undo the last step: with a canary, remove ``canary`` and tag its version with
    ``reason`` (champion untouched); without one, after a promotion, put ``champion`` back
    on ``previous-champion`` (the demoted version is tagged, ``previous-champion`` removed,
    stages mirrored when configured).

    ``version``: the canary (or champion) version the caller saw; a no-op when it was
    already rolled back. Raises ChurnError when there is nothing to roll back.
    Evidence as in :func:`promote`; its failure never blocks a rollback.
    """
    client = registry_client(cfg)
    name = cfg.training.model_name
    with registry_lock(cfg) as lock:
        before = aliases_of(client, name)
        canary = before.get(CANARY)
        champion_back = before.get(CHAMPION) is not None and before.get(PREVIOUS_CHAMPION) is not None
        if version is not None:
            mv = client.get_model_version(name, str(version))
            if mv.tags.get("rolled_back") == "true" and str(version) not in (canary, before.get(CHAMPION)):
                return _noop(cfg, "rollback", name, str(version), before, reason,
                             f"already rolled back: version {version} ({mv.tags.get('rollback_reason')})")
        if version is not None and str(version) == before.get(CHAMPION) and str(version) != canary:
            if not champion_back:
                raise ChurnError(f"version {version} is the champion of '{name}' but there is no "
                                 "previous-champion to go back to")
            return _rollback_champion(cfg, client, before, reason, evidence, as_of, since, actor, lock)
        if canary is None:
            if version is None and champion_back:
                return _rollback_champion(cfg, client, before, reason, evidence, as_of, since, actor, lock)
            raise ChurnError(f"'{name}' has no canary to roll back and no previous-champion to go back to "
                             f"(aliases: {before or 'none'})")
        if version is not None and str(version) != canary:
            raise ChurnError(f"version {version} is not the canary of '{name}' (canary is {canary})")
        proof, proof_error = _transition_evidence(cfg, evidence, as_of, since)
        with fail_fast(cfg, f"rolling back v{canary} of '{name}'"), \
                decision_run(cfg, f"rollback v{canary}") as run, failed_on_error(cfg):
            who = {"actor": actor, "reason": reason, "evidence_run_id": run.info.run_id}
            remove_alias(client, name, CANARY, cfg.evaluation.mirror_stages, **who)
            _tag_rolled_back(client, name, canary, reason, run.info.run_id)
            after = aliases_of(client, name)
            result = TransitionResult("rollback", False, f"canary version {canary} of '{name}' rolled back",
                                      name, canary, before, after, reason, run.info.run_id)
            _log_transition(result, lock, proof, proof_error)
        return result


def _tag_rolled_back(client: MlflowClient, name: str, version: str, reason: str, run_id: str) -> None:
    for key, value in {"rolled_back": "true", "rollback_reason": reason[:500],
                       "rolled_back_at": datetime.now(UTC).isoformat(), "rollback_run_id": run_id}.items():
        client.set_model_version_tag(name, version, key, value)


def _rollback_champion(cfg: ChurnConfig, client: MlflowClient, before: dict[str, str], reason: str,
                       evidence: CanaryEvaluation | None, as_of: datetime | None, since: datetime | None,
                       actor: str | None, lock: str) -> TransitionResult:
    """``champion`` back to ``previous-champion`` (caller holds the lock)."""
    name = cfg.training.model_name
    demoted, restored = before[CHAMPION], before[PREVIOUS_CHAMPION]
    mirror = cfg.evaluation.mirror_stages
    proof, proof_error = _transition_evidence(cfg, evidence, as_of, since)
    with fail_fast(cfg, f"rolling champion of '{name}' back to v{restored}"), \
            decision_run(cfg, f"rollback champion v{demoted} -> v{restored}") as run, failed_on_error(cfg):
        who = {"actor": actor, "reason": reason, "evidence_run_id": run.info.run_id}
        # champion first: a guarded server accepts the version behind previous-champion
        move_alias(client, name, CHAMPION, restored, mirror, **who)
        remove_alias(client, name, PREVIOUS_CHAMPION, False, **who)  # its stage is Production now
        if mirror:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                client.transition_model_version_stage(name, demoted, "Archived")
        _tag_rolled_back(client, name, demoted, reason, run.info.run_id)
        client.set_model_version_tag(name, restored, "restored_at", datetime.now(UTC).isoformat())
        after = aliases_of(client, name)
        result = TransitionResult("rollback", False, f"champion of '{name}' back on version {restored} "
                                  f"(version {demoted} rolled back)", name, demoted, before, after, reason,
                                  run.info.run_id)
        mlflow.set_tags({"rollback_of": "champion", "restored_version": restored})
        _log_transition(result, lock, proof, proof_error)
    return result


def _transition_evidence(cfg: ChurnConfig, evidence: CanaryEvaluation | None, as_of: datetime | None,
                        since: datetime | None,
                        log_run: bool = False) -> tuple[CanaryEvaluation | None, str | None]:
    """``(evidence, None)``; when none is given, the canary analysis of ``[since, as_of]``
    (``as_of`` default :func:`default_as_of`), with a run of its own when ``log_run``. When
    it cannot be computed (prediction log unreachable, unreadable labels): ``(None, why)``, so that a
    transition, above all a rollback during an incident, never waits on its evidence."""
    if evidence is not None:
        return evidence, None
    try:
        when = as_of or default_as_of(cfg, datetime.now(UTC))
        return evaluate_canary(cfg, when, since, log_run=log_run), None
    except Exception as exc:  # any failure: record why, do not block the alias move
        first = first_line(exc)
        return None, f"{type(exc).__name__}: {first}"


def _log_transition(result: TransitionResult, lock: str, evidence: CanaryEvaluation | None,
                    evidence_error: str | None) -> None:
    """Tags, params, the evidence's metrics (as a canary-evaluate run names them) and
    ``decision.json`` of a transition run; fills ``result.evidence``."""
    if evidence is not None:
        result.evidence = evidence.to_dict()
    result.evidence_error = evidence_error
    mlflow.set_tags({"decision": {"promote": "promoted", "rollback": "rolled_back"}[result.action],
                     "kind": f"canary-{result.action}", "model_name": result.model_name,
                     "version": str(result.version), "lock": lock,
                     "evidence": evidence.verdict if evidence else "unavailable"})
    params = {"reason": result.reason[:500], "version": result.version,
              "champion_before": result.before.get(CHAMPION, ""),
              "canary_before": result.before.get(CANARY, ""),
              "champion_after": result.after.get(CHAMPION, "")}
    if evidence is not None:
        params.update({"evidence_as_of": evidence.as_of.isoformat(),
                       "evidence_since": evidence.since.isoformat() if evidence.since else ""})
        mlflow.log_metrics(metrics_of(evidence))
    else:
        params["evidence_error"] = (evidence_error or "")[:500]
    mlflow.log_params(params)
    log_json(result.to_dict(), "decision.json")


def _noop(cfg: ChurnConfig, action: str, name: str, version: str, before: dict[str, str],
          reason: str, message: str) -> TransitionResult:
    """Record a transition that another process already made (decision ``noop``)."""
    with decision_run(cfg, f"{action} v{version} (no-op)") as run:
        result = TransitionResult(action, True, message, name, version, before, before, reason,
                                  run.info.run_id)
        mlflow.set_tags({"decision": "noop", "kind": f"canary-{action}", "model_name": name,
                         "version": version})
        mlflow.log_params({"reason": reason[:500], "version": version})
        log_json(result.to_dict(), "decision.json")
    return result


def act_on_verdict(cfg: ChurnConfig, as_of: datetime, since: datetime | None = None,
                   reason: str | None = None) -> tuple[CanaryEvaluation, TransitionResult | None]:
    """Evaluate, then promote / roll back on the verdict (nothing on ``wait``): what
    `churn canary auto` and `churn canary evaluate --auto` run."""
    evaluation = evaluate_canary(cfg, as_of, since)
    why = (reason + ": " if reason else "") + "; ".join(evaluation.reasons)
    if evaluation.verdict == "promote":
        return evaluation, promote(cfg, f"auto: {why}", version=evaluation.canary_version,
                                   evidence=evaluation)
    if evaluation.verdict == "rollback":
        return evaluation, rollback(cfg, f"auto: {why}", version=evaluation.canary_version,
                                    evidence=evaluation)
    return evaluation, None
