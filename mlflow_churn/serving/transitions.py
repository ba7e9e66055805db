"""Promote and roll back the canary: the transitions that act on a canary verdict.

:func:`promote` moves ``champion`` to the canary version, ``previous-champion`` to the old
champion and removes ``canary`` (refused unless the canary's signed decision says
``promote`` against the current champion, or ``force`` with a reason: then an override
decision is signed); :func:`adopt_promotion` does the same for a ``champion`` a person set
by hand in the UI; :func:`rollback` signs a rollback decision and removes ``canary``, or,
after a promotion, puts ``champion`` back on the version the champion's signed promotion
replaced. Every move follows the lifecycle of :mod:`mlflow_churn.registry.promotion` (the
guard of ``mlflow server --app-name churn-guard`` allows exactly these moves, in this
order) on decisions signed with the project's key (:mod:`mlflow_churn.registry.signing`).
Every alias move is recorded in the alias history (:mod:`mlflow_churn.registry.history`)
with the run as evidence. Transitions run under a cross-process lock (a PostgreSQL advisory
lock when the tracking store is PostgreSQL, else ``fcntl`` on
``<workspace>/locks/registry-<model>.lock``) and re-read the aliases after taking it, so of
two concurrent promotions one acts and the other is a no-op ("already promoted"); an
interrupted promotion or rollback is completed by running the same command again. Every
evaluation and transition is an MLflow run (tags ``decision``, metrics, params and
``decision.json``).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mlflow_churn.config import ChurnConfig
from mlflow_churn.errors import ChurnError, Conflict, NotFound, first_line, is_missing
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
from mlflow_churn.registry.promotion import check_approval, check_promotion, read_evidence
from mlflow_churn.registry.signing import (
    Decision,
    Verifier,
    default_actor,
    record_signed,
    verifier_for,
    version_ref,
)
from mlflow_churn.registry.vocab import CanaryVerdict, SignedKind
from mlflow_churn.serving.canary import (
    CanaryEvaluation,
    decision_run,
    default_as_of,
    evaluate_canary,
    metrics_of,
    registry_client,
)
from mlflow_churn.tracking import (
    client_run,
    ensure_experiment,
    fail_fast,
    failed_on_error,
    project_run_id,
    sqlite_store_ready,
)

_log = logging.getLogger("mlflow_churn.transitions")


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
    ``[since, as_of]`` (see :func:`_transition_evidence`; logged as a canary-evaluate run,
    which signs its verdict).

    When there is a champion to replace, the evidence must say ``promote`` (so the canary
    served at least ``serving.min_canary_samples`` logged predictions within every limit);
    else ChurnError naming the verdict, unless ``force``: then an override decision
    (``reason``, ``actor``, against the current champion) is signed on the version and
    ``reason`` goes on the run (tag ``override``). Either way the move must pass
    :func:`~mlflow_churn.registry.promotion.check_promotion` on the signed decisions
    (ChurnError with its message otherwise), and, with ``registry.require_approval``, an
    approval by someone other than ``actor`` (default: the OS user; also the actor of the
    alias history and of the signed decisions).

    Moves, in the lifecycle's order: ``champion`` -> the canary (allowed by its signed canary
    ``promote``, its override, or as the first champion), then ``previous-champion`` -> the
    old champion (the one the new champion's signed promotion names), then ``canary``
    removed. An interruption between two moves leaves a registry that running the same
    command again completes (the champion is already on the canary: the old champion is
    read from its signed promotion).
    """
    client = registry_client(cfg)
    name = cfg.training.model_name
    actor = actor or default_actor()
    if force and not reason.strip():
        raise ChurnError("a forced promotion needs a reason (--reason TEXT): it is signed into the "
                         "version's override decision")
    verifier = verifier_for(cfg)
    with registry_lock(cfg) as lock:
        before = aliases_of(client, name)  # re-read under the lock
        canary = before.get(CANARY)
        if canary is None or (version is not None and str(version) != canary):
            if version is not None and before.get(CHAMPION) == str(version):
                return _noop(cfg, client, "promote", name, str(version), before, reason,
                             f"already promoted: version {version} is the champion of '{name}'")
            if canary is None:
                raise Conflict(f"'{name}' has no canary to promote (aliases: {before or 'none'}); "
                               "pass a challenger through `churn evaluate` first")
            raise Conflict(f"version {version} is not the canary of '{name}' (canary is {canary}); "
                           "check --version")
        resuming = before.get(CHAMPION) == canary  # an interrupted promotion: champion moved already
        if resuming:
            replaced = _replaced_champion(client, name, canary, verifier)
            old = str(replaced.version) if replaced is not None else None
            proof, proof_error = _transition_evidence(cfg, evidence, as_of, since)
        else:
            old = before.get(CHAMPION)
            approval = check_approval(client, name, canary, cfg, actor=actor, verifier=verifier)
            if not approval.allowed:  # registry.require_approval
                raise Conflict(approval.message)
            # logged as a canary-evaluate run: it signs its verdict against the current champion,
            # the decision a guarded server (registry.promotion.check_promotion) reads
            proof, proof_error = _transition_evidence(cfg, evidence, as_of, since, log_run=old is not None)
            if old is not None and not force:
                _require_promote_verdict(cfg, canary, proof, proof_error)
        with fail_fast(cfg, f"promoting v{canary} of '{name}'"), \
                decision_run(cfg, f"promote v{canary}") as run, failed_on_error(cfg):
            run_id = run.info.run_id
            who = {"actor": actor, "reason": reason, "evidence_run_id": run_id}
            if not resuming:
                if force:
                    record_signed(client, cfg, name, canary, SignedKind.OVERRIDE, "override",
                                  champion=client.get_model_version(name, old) if old else None,
                                  run_id=run_id, reason=reason, actor=actor)
                check = check_promotion(client, name, canary, cfg, CHAMPION, actor=actor, verifier=verifier)
                if not check.allowed:
                    raise Conflict(check.message)
                mlflow.set_tag("promotion_rule", check.rule)
                move_alias(client, name, CHAMPION, canary, cfg.evaluation.mirror_stages, **who)
            result = _finish_promotion(cfg, client, canary, old, before, reason, run_id, who)
            if force:
                mlflow.set_tag("override", reason[:500])
            _log_transition(client, result, lock, proof, proof_error)
        return result


def _replaced_champion(client: MlflowClient, name: str, champion: str, verifier: Verifier) -> Any:
    """The version (ModelVersion) the signed promotion of ``champion`` replaced; None when it
    has no signed promotion (the first champion) or its promotion replaced none. ChurnError
    when that version is gone or is another version now (its identity changed)."""
    ev = read_evidence(client, name, champion, verifier)
    promo = ev.promotion if ev is not None else None
    if promo is None or not promo.champion:
        return None
    return _version_of_ref(client, name, promo.champion, f"the signed promotion of version {champion}")


def _version_of_ref(client: MlflowClient, name: str, ref: str, what: str) -> Any:
    """The ModelVersion ``ref`` (``"<version>:<identity>"``) names; ChurnError when it is gone
    or the version with that number is another one now."""
    number = ref.split(":")[0]
    try:
        mv = client.get_model_version(name, number)
    except MlflowException as exc:
        if not is_missing(exc):
            raise
        raise NotFound(f"{what} names version {number} of '{name}', which no longer exists") from None
    if version_ref(mv) != ref:
        raise Conflict(f"{what} names version {number} of '{name}', but that version was re-created "
                         "since (another identity); nothing was changed")
    return mv


def _require_promote_verdict(cfg: ChurnConfig, canary: str, proof: CanaryEvaluation | None,
                             proof_error: str | None) -> None:
    """ChurnError unless ``proof`` is a ``promote`` verdict on ``canary`` with enough traffic."""
    fix = "; to promote anyway pass --force with --reason TEXT (recorded as an override)"
    if proof is None:
        raise Conflict(f"cannot promote version {canary}: no canary evidence ({proof_error}){fix}")
    rows = proof.routes["canary"].rows if "canary" in proof.routes else 0
    need = cfg.canary.needed(cfg.serving)
    if proof.verdict != CanaryVerdict.PROMOTE or rows < need:
        why = "; ".join(proof.reasons) or "no reason given"
        raise Conflict(f"cannot promote version {canary}: the canary verdict is '{proof.verdict}' on "
                       f"{rows} logged predictions (canary.min_requests={need}): {why}{fix}")


def _finish_promotion(cfg: ChurnConfig, client: MlflowClient, canary: str, old: str | None,
                      before: dict[str, str], reason: str, run_id: str,
                      who: dict[str, Any]) -> TransitionResult:
    """After ``champion`` moved to ``canary``: ``previous-champion`` -> ``old`` (the champion
    the new champion's signed promotion replaced; the lifecycle allows nothing else), then
    ``canary`` removed, version tags; inside the transition run ``run_id``. Each step is
    skipped when it is done already (a re-run after an interruption)."""
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
    transition run with the canary evidence, ``previous-champion`` -> the champion the
    version's signed promotion replaced (``previous`` when it has none, as after the first
    champion; ChurnError when the two disagree), ``canary`` removed, stages mirrored when
    configured. A no-op (decision ``noop``) when ``champion`` is no longer on ``version``.

    It runs on the alias watcher's thread: explicit client calls only (:func:`_client_decision_run`),
    no fluent run, no process-wide tracking URI or experiment."""
    uri = cfg.mlflow_tracking_uri
    sqlite_store_ready(uri)
    client = MlflowClient(uri, uri)
    name = cfg.training.model_name
    with registry_lock(cfg) as lock:
        before = aliases_of(client, name)
        if before.get(CHAMPION) != str(version):
            return _noop(cfg, client, "promote", name, str(version), before, reason,
                         f"champion of '{name}' is no longer version {version} ({before.get(CHAMPION)})")
        replaced = _replaced_champion(client, name, str(version), verifier_for(cfg))
        if replaced is not None and previous and previous != str(replaced.version):
            raise Conflict(f"champion of '{name}' moved from version {previous} to {version} by hand, "
                           f"but the signed promotion of version {version} replaced version "
                           f"{replaced.version}; previous-champion left as it is")
        # previous-champion goes only onto the version the signed promotion names (none after
        # the first champion, or a promotion no signed decision records)
        left_behind = str(replaced.version) if replaced is not None else None
        proof, proof_error = _transition_evidence(cfg, None, None, None)
        with _client_decision_run(cfg, client, f"promote v{version} (by hand)") as run_id:
            who = {"actor": actor, "reason": reason, "evidence_run_id": run_id}
            if cfg.evaluation.mirror_stages:  # the champion's stage, as move_alias mirrors it
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)
                    client.transition_model_version_stage(name, str(version), STAGE_OF[CHAMPION])
                    if previous and previous != str(version) and \
                            client.get_model_version(name, previous).current_stage == STAGE_OF[CHAMPION]:
                        client.transition_model_version_stage(name, previous, "None")
            result = _finish_promotion(cfg, client, str(version), left_behind, before, reason,
                                       run_id, who)
            when = (moved_at or datetime.now(UTC)).isoformat()
            _log_transition(client, result, lock, proof, proof_error,
                            tags={"promoted_by": actor, "promoted_at": when})
        return result


def rollback(cfg: ChurnConfig, reason: str, version: str | None = None,
             evidence: CanaryEvaluation | None = None, as_of: datetime | None = None,
             since: datetime | None = None, actor: str | None = None) -> TransitionResult:
    """Undo the last step: with a canary, sign a rollback decision on its version, remove
    ``canary`` and tag the version with ``reason`` (champion untouched); without one, after a
    promotion, put ``champion`` back on the version the champion's signed promotion replaced
    (:func:`_rollback_champion`).

    ``version``: the canary (or champion) version the caller saw; a no-op when it was
    already rolled back. Raises ChurnError when there is nothing to roll back.
    Evidence as in :func:`promote`; its failure never blocks a rollback. ``actor`` (default:
    the OS user) signs the decision and goes to the alias history.
    """
    client = registry_client(cfg)
    name = cfg.training.model_name
    actor = actor or default_actor()
    verifier = verifier_for(cfg)
    with registry_lock(cfg) as lock:
        before = aliases_of(client, name)
        canary, champion = before.get(CANARY), before.get(CHAMPION)
        if version is not None:
            mv = client.get_model_version(name, str(version))
            if mv.tags.get("rolled_back") == "true" and str(version) not in (canary, champion):
                return _noop(cfg, client, "rollback", name, str(version), before, reason,
                             f"already rolled back: version {version} ({mv.tags.get('rollback_reason')})")
        # a champion to go back from: previous-champion is set, or a signed rollback of the
        # champion was interrupted after previous-champion was removed
        champion_back = champion is not None and (before.get(PREVIOUS_CHAMPION) is not None
                                                  or _pending_rollback(client, name, champion, verifier))
        if version is not None and str(version) == champion and str(version) != canary:
            if not champion_back:
                raise Conflict(f"version {version} is the champion of '{name}' but there is no "
                               "previous-champion to go back to")
            return _rollback_champion(cfg, client, before, reason, evidence, as_of, since, actor, lock,
                                      verifier)
        if canary is None:
            if version is None and champion_back:
                return _rollback_champion(cfg, client, before, reason, evidence, as_of, since, actor, lock,
                                          verifier)
            raise Conflict(f"'{name}' has no canary to roll back and no previous-champion to go back to "
                           f"(aliases: {before or 'none'})")
        if version is not None and str(version) != canary:
            raise Conflict(f"version {version} is not the canary of '{name}' (canary is {canary})")
        proof, proof_error = _transition_evidence(cfg, evidence, as_of, since)
        with fail_fast(cfg, f"rolling back v{canary} of '{name}'"), \
                decision_run(cfg, f"rollback v{canary}") as run, failed_on_error(cfg):
            who = {"actor": actor, "reason": reason, "evidence_run_id": run.info.run_id}
            # signed first: the version may never be promoted on its earlier decisions again.
            # Removing a canary is always allowed, so a signing key that cannot be used (missing,
            # readable by others) does not hold the incident up: the run says it was not signed
            try:
                record_signed(client, cfg, name, canary, SignedKind.ROLLBACK, "rollback",
                              champion=client.get_model_version(name, champion) if champion else None,
                              run_id=run.info.run_id, reason=reason, actor=actor)
            except ChurnError as exc:
                _log.warning("canary v%s of '%s' rolled back unsigned: %s", canary, name, exc)
                mlflow.set_tag("rollback_unsigned", str(exc)[:500])
            remove_alias(client, name, CANARY, cfg.evaluation.mirror_stages, **who)
            _tag_rolled_back(client, name, canary, reason, run.info.run_id)
            after = aliases_of(client, name)
            result = TransitionResult("rollback", False, f"canary version {canary} of '{name}' rolled back",
                                      name, canary, before, after, reason, run.info.run_id)
            _log_transition(client, result, lock, proof, proof_error)
        return result


def _pending_rollback(client: MlflowClient, name: str, champion: str, verifier: Verifier) -> Decision | None:
    """The signed rollback of ``champion`` newer than its promotion (a rollback that was
    interrupted before ``champion`` moved back), or None."""
    ev = read_evidence(client, name, champion, verifier)
    return ev.rolled_back_after(ev.promotion) if ev is not None and ev.promotion is not None else None


def _tag_rolled_back(client: MlflowClient, name: str, version: str, reason: str, run_id: str) -> None:
    for key, value in {"rolled_back": "true", "rollback_reason": reason[:500],
                       "rolled_back_at": datetime.now(UTC).isoformat(), "rollback_run_id": run_id}.items():
        client.set_model_version_tag(name, version, key, value)


def _rollback_champion(cfg: ChurnConfig, client: MlflowClient, before: dict[str, str], reason: str,
                       evidence: CanaryEvaluation | None, as_of: datetime | None, since: datetime | None,
                       actor: str, lock: str, verifier: Verifier) -> TransitionResult:
    """``champion`` back on the version the demoted champion's signed promotion replaced
    (caller holds the lock). That version must be the one behind ``previous-champion`` when
    it is set (ChurnError naming both otherwise).

    In the lifecycle's order: a rollback decision naming the restored version is signed on
    the demoted version, then ``previous-champion`` is removed, then ``champion`` moves to
    the restored version (a guarded server allows both on that signed rollback). Interrupted
    after the signature, the same command completes it."""
    name = cfg.training.model_name
    demoted = before[CHAMPION]
    replaced = _replaced_champion(client, name, demoted, verifier)
    left = before.get(PREVIOUS_CHAMPION)
    if replaced is None:
        raise Conflict(f"version {demoted} of '{name}' has no signed promotion naming the champion it "
                       f"replaced (previous-champion: {left or 'none'}); there is nothing to roll back to "
                       "(promote another version, or `churn canary promote --force --reason TEXT`)")
    restored = str(replaced.version)
    if left is not None and left != restored:
        raise Conflict(f"cannot roll back '{name}': previous-champion is version {left} but the signed "
                       f"promotion of the champion (version {demoted}) replaced version {restored}; "
                       "run `churn registry verify` and fix previous-champion first")
    mirror = cfg.evaluation.mirror_stages
    proof, proof_error = _transition_evidence(cfg, evidence, as_of, since)
    with fail_fast(cfg, f"rolling champion of '{name}' back to v{restored}"), \
            decision_run(cfg, f"rollback champion v{demoted} -> v{restored}") as run, failed_on_error(cfg):
        who = {"actor": actor, "reason": reason, "evidence_run_id": run.info.run_id}
        record_signed(client, cfg, name, demoted, SignedKind.ROLLBACK, "rollback", champion=replaced,
                      run_id=run.info.run_id, reason=reason, actor=actor)
        remove_alias(client, name, PREVIOUS_CHAMPION, False, **who)  # its stage becomes Production below
        move_alias(client, name, CHAMPION, restored, mirror, **who)
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
        _log_transition(client, result, lock, proof, proof_error)
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


@contextmanager
def _client_decision_run(cfg: ChurnConfig, client: MlflowClient, run_name: str) -> Iterator[str]:
    """A decision run made with explicit ``client`` calls (:func:`~mlflow_churn.tracking.client_run`):
    a child of the ``mlflow run`` project run when there is one, else in the training
    experiment; yields its id. For threads (the alias watcher), where :func:`decision_run`'s
    fluent run and process-wide experiment have no place."""
    parent = project_run_id()
    experiment_id = None if parent else ensure_experiment(client, cfg, cfg.training.experiment)
    with client_run(client, cfg, run_name, experiment_id=experiment_id, parent_run_id=parent) as run_id:
        yield run_id


def _log_run(client: MlflowClient, run_id: str, tags: dict[str, Any], params: dict[str, Any],
             metrics: dict[str, float] | None = None) -> None:
    """``tags``, ``params`` and ``metrics`` of run ``run_id`` in one explicit batch."""
    import time

    from mlflow.entities import Metric, Param, RunTag

    now_ms = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now_ms, 0) for k, v in (metrics or {}).items()],
                     params=[Param(k, str(v)) for k, v in params.items()],
                     tags=[RunTag(k, str(v)) for k, v in tags.items()])


def _log_transition(client: MlflowClient, result: TransitionResult, lock: str,
                    evidence: CanaryEvaluation | None, evidence_error: str | None,
                    tags: dict[str, str] | None = None) -> None:
    """Tags (``tags`` too), params, the evidence's metrics (as a canary-evaluate run names
    them) and ``decision.json`` of the transition run ``result.run_id``, with explicit
    ``client`` calls (the same run whether a fluent run is active or not: the alias watcher's
    thread has none); fills ``result.evidence``."""
    if evidence is not None:
        result.evidence = evidence.to_dict()
    result.evidence_error = evidence_error
    run_tags = {"decision": {"promote": "promoted", "rollback": "rolled_back"}[result.action],
                "kind": f"canary-{result.action}", "model_name": result.model_name,
                "version": str(result.version), "lock": lock,
                "evidence": evidence.verdict if evidence else "unavailable", **(tags or {})}
    params = {"reason": result.reason[:500], "version": result.version,
              "champion_before": result.before.get(CHAMPION, ""),
              "canary_before": result.before.get(CANARY, ""),
              "champion_after": result.after.get(CHAMPION, "")}
    metrics: dict[str, float] = {}
    if evidence is not None:
        params.update({"evidence_as_of": evidence.as_of.isoformat(),
                       "evidence_since": evidence.since.isoformat() if evidence.since else ""})
        metrics = metrics_of(evidence)
    else:
        params["evidence_error"] = (evidence_error or "")[:500]
    assert result.run_id is not None
    _log_run(client, result.run_id, run_tags, params, metrics)
    client.log_dict(result.run_id, result.to_dict(), "decision.json")


def _noop(cfg: ChurnConfig, client: MlflowClient, action: str, name: str, version: str,
          before: dict[str, str], reason: str, message: str) -> TransitionResult:
    """Record a transition that another process already made (decision ``noop``), with
    explicit ``client`` calls (:func:`_client_decision_run`)."""
    with _client_decision_run(cfg, client, f"{action} v{version} (no-op)") as run_id:
        result = TransitionResult(action, True, message, name, version, before, before, reason, run_id)
        _log_run(client, run_id, {"decision": "noop", "kind": f"canary-{action}", "model_name": name,
                                  "version": version}, {"reason": reason[:500], "version": version})
        client.log_dict(run_id, result.to_dict(), "decision.json")
    return result


def act_on_verdict(cfg: ChurnConfig, as_of: datetime, since: datetime | None = None,
                   reason: str | None = None) -> tuple[CanaryEvaluation, TransitionResult | None]:
    """Evaluate, then promote / roll back on the verdict (nothing on ``wait``): what
    `churn canary auto` and `churn canary evaluate --auto` run."""
    evaluation = evaluate_canary(cfg, as_of, since)
    why = (reason + ": " if reason else "") + "; ".join(evaluation.reasons)
    if evaluation.verdict == CanaryVerdict.PROMOTE:
        return evaluation, promote(cfg, f"auto: {why}", version=evaluation.canary_version,
                                   evidence=evaluation)
    if evaluation.verdict == CanaryVerdict.ROLLBACK:
        return evaluation, rollback(cfg, f"auto: {why}", version=evaluation.canary_version,
                                    evidence=evaluation)
    return evaluation, None
