"""``mlflow server --app-name churn-guard``: MLflow's own server with protected aliases and
immutable registered model files.

An ``mlflow.app`` plugin (entry point ``churn-guard`` in pyproject.toml), built like MLflow's
``basic-auth`` app: :func:`create_app` adds ``before_request`` / ``after_request`` /
``teardown_request`` hooks to MLflow's Flask app and, under uvicorn (MLflow's default
server), wraps it in MLflow's FastAPI app exactly as ``mlflow server`` does, with an ASGI
layer in front for the artifact routes FastAPI serves itself (``PUT mlflow-artifacts``).

Threat model (docs/promotion.md): a user with write access to the registry and no signing
key. The guard holds only verify keys (``registry.verify_key_file``) and allows a protected
move only on a decision signed for exactly that move
(:func:`~mlflow_churn.registry.promotion.check_promotion`). Requests are matched by the
Flask route MLflow itself resolved (so path, encoding and version variants are the same
route) and read with MLflow's own request parser (query string, JSON object, JSON string);
a guarded request that cannot be read is refused (400), never let through.

Guarded (REST ``/api/...`` and the UI's ``/ajax-api/...``, every API version, ``/preview``):

- alias set / delete of ``champion``, ``previous-champion``, ``canary`` and
  ``registry.protected_aliases``; a ``Production`` stage transition (checked as champion);
- delete of a version or a model that a guarded alias points at; rename of such a model;
  a copy (``models:/<name>/<version>`` source) into such a model;
- the signed-decision tags ``churn.sig.*`` (set only with a signature for exactly that
  version, never older than the one there; never deleted) and the tags only the guard
  writes; under basic-auth, ``promotion_override`` only by ``registry.override_users`` (or
  MANAGE on the model) and ``approved_by`` only by ``registry.approvers``, as themselves;
- artifact writes and deletes (``mlflow-artifacts`` PUT / DELETE / multipart,
  ``upload-artifact``) at, under or above the files of a registered version: a registered
  version's files are immutable.

Check and write happen under one lock per model (:func:`~mlflow_churn.registry.lock.model_lock`:
a PostgreSQL advisory lock on a PostgreSQL store, ``fcntl`` otherwise), held from the check
until MLflow has answered, so of concurrent requests each sees the registry the previous
one left. A refusal is HTTP 403 with MLflow's error body ``{"error_code":
"PERMISSION_DENIED", "message": ...}`` (the UI shows the message), an audit run
(``kind=guard-promotion``, ``decision=refused``, the actor named) and an alert to
``hooks.alert_url``. An allowed protected move is recorded on the version (tags
``promoted_by``, ``promotion_rule`` ...) and as an audit run; an override or approval is
consumed by the promotion it served.

The guard is also the one writer of the alias history (:mod:`mlflow_churn.registry.history`)
of every model on its server: every alias set / delete it lets through, of any alias (and
the aliases MLflow drops with a deleted version or model), takes the model lock too; under
it the move is read from the registry, announced as a RUNNING history run numbered after the
model's last move before MLflow's handler writes, and finished once MLflow answered (FAILED
when it refused). The actor is the basic-auth user, else what the client claims
(:mod:`mlflow_churn.registry.claims`, headers ``X-Churn-*``) marked ``(claimed)``, else
``unknown``. ``GET /churn-guard/health`` and the header ``X-Churn-Guard`` on every response
tell clients that the guard writes the history (so they do not).

The churn configuration comes from the server's environment (``CHURN_CONFIG``, ``CHURN_*``,
``churn.yaml`` in the working directory). With ``registry.guard_auth: basic-auth`` the plugin
wraps MLflow's ``basic-auth`` app too (extra ``guard-auth``) and records the authenticated
user name.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mlflow_churn.alerts import fire
from mlflow_churn.config import ChurnConfig, load_config
from mlflow_churn.errors import is_missing
from mlflow_churn.registry import history
from mlflow_churn.registry.aliases import CHAMPION, aliases_of
from mlflow_churn.registry.claims import claim_from_headers
from mlflow_churn.registry.lock import model_lock
from mlflow_churn.registry.promotion import (
    APPROVAL_TAG,
    GUARD_ONLY_TAGS,
    OVERRIDE_AGAINST_TAG,
    OVERRIDE_BY_TAG,
    OVERRIDE_TAG,
    PromotionCheck,
    check_promotion,
    guarded_aliases,
    read_evidence,
)
from mlflow_churn.registry.signing import (
    SIG_PREFIX,
    SignatureError,
    Verifier,
    verifier_for,
    verify_key_path,
    version_identity,
)
from mlflow_churn.tracking import client_run
from mlflow_churn.web.mlflow_ui import open_on_runs

_log = logging.getLogger("mlflow_churn.guard")

#: the registry routes the guard looks at (Flask's resolved rule, after the static prefix)
_ROUTE = re.compile(
    r"/(?P<api>api|ajax-api)/\d+\.\d+(?:/preview)?/mlflow/(?P<op>registered-models/alias"
    r"|model-versions/transition-stage|model-versions/delete|registered-models/delete"
    r"|registered-models/rename|model-versions/create|model-versions/set-tag|model-versions/delete-tag)/?"
)
_ARTIFACT_WRITE = ("PUT", "POST", "DELETE", "PATCH")
#: the artifact PUT FastAPI serves itself under uvicorn (never reaches Flask's hooks)
_ASGI_ARTIFACT = re.compile(r"/(?:api|ajax-api)/\d+\.\d+/mlflow-artifacts/artifacts/(?P<path>.*)")
_COPY_SOURCE = re.compile(r"models:/[^/@]+[/@].+")
#: the requests that move aliases (the guard records each one it lets through in the alias history)
_MOVES_ALIASES = ("registered-models/alias", "model-versions/delete", "registered-models/delete")
#: a refusal or an override is an event: its alert clears by itself this long after
EVENT_ALERT_TTL_S = 3600.0
TAG_LIMIT = 4900  # MLflow's tag values hold 5000 characters (8000 on newer stores)


def _proto(op: str, method: str) -> Any:
    """MLflow's request message of a guarded registry route (None: the method is not guarded)."""
    from mlflow.protos import model_registry_pb2 as pb

    table = {
        ("registered-models/alias", "POST"): pb.SetRegisteredModelAlias,
        ("registered-models/alias", "DELETE"): pb.DeleteRegisteredModelAlias,
        ("model-versions/transition-stage", "POST"): pb.TransitionModelVersionStage,
        ("model-versions/delete", "DELETE"): pb.DeleteModelVersion,
        ("registered-models/delete", "DELETE"): pb.DeleteRegisteredModel,
        ("registered-models/rename", "POST"): pb.RenameRegisteredModel,
        ("model-versions/create", "POST"): pb.CreateModelVersion,
        ("model-versions/set-tag", "POST"): pb.SetModelVersionTag,
        ("model-versions/delete-tag", "DELETE"): pb.DeleteModelVersionTag,
    }
    return table.get((op, method))


@dataclass(frozen=True)
class GuardedMove:
    """One guarded request, and the check that allowed or refused it."""

    action: str  # set_alias | delete_alias | transition_stage | set_tag | delete_tag | ...
    route: str  # "ui" (/ajax-api) or "api"
    check: PromotionCheck


@dataclass
class PendingMoves:
    """The alias moves a request let through will make, announced (RUNNING history runs) under
    the model lock before MLflow's handler runs; finished once it answered."""

    name: str
    run_ids: list[str]
    evidence_from_audit: bool  # the history runs' evidence is the guard's audit run (no claim)


class Unreadable(Exception):
    """A guarded request whose parameters cannot be read as MLflow reads them."""


class Guard:
    """The request hooks. ``client`` reads / tags the registry of this server's stores."""

    def __init__(self, cfg: ChurnConfig, client: MlflowClient | None = None,
                 verifier: Verifier | None = None) -> None:
        self.cfg = cfg
        self.protected = guarded_aliases(cfg)
        self._client = client
        self._fixed = verifier
        self._keys: tuple[Any, Verifier] | None = None
        self._history_exp: str | None = None

    @property
    def verifier(self) -> Verifier:
        """The verify keys, re-read when a key file changes (a rotation needs no restart)."""
        if self._fixed is not None:
            return self._fixed
        files = (verify_key_path(self.cfg), *self.cfg.registry.extra_verify_key_files)
        stamp = tuple(_mtime(p) for p in files)
        if self._keys is None or self._keys[0] != stamp:
            self._keys = (stamp, verifier_for(self.cfg))
        return self._keys[1]

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.store_uri, self.registry_uri)
        return self._client

    @property
    def store_uri(self) -> str:
        from mlflow.server.constants import BACKEND_STORE_URI_ENV_VAR

        return os.environ.get(BACKEND_STORE_URI_ENV_VAR) or self.cfg.mlflow_tracking_uri

    @property
    def registry_uri(self) -> str:
        from mlflow.server.constants import REGISTRY_STORE_URI_ENV_VAR

        return os.environ.get(REGISTRY_STORE_URI_ENV_VAR) or self.store_uri

    @property
    def stage_alias(self) -> str:
        """The alias a transition to Production is checked as."""
        return CHAMPION

    # ------------------------------------------------------------------ hooks
    def before_request(self) -> Any:
        from flask import g, request

        rule = _rule(request)
        if rule is None:
            return None  # MLflow answers 404 / 405 itself
        if "mlflow-artifacts" in rule or rule.endswith("/mlflow/upload-artifact"):
            if not self.protected or request.method not in _ARTIFACT_WRITE:
                return None
            return self._artifact_request(request, g, rule)
        m = _ROUTE.fullmatch(rule)
        proto = _proto(m["op"], request.method) if m else None
        if proto is None:
            return None
        op = m["op"]
        if not self.protected and op not in _MOVES_ALIASES:
            return None
        route = "ui" if m["api"] == "ajax-api" else "api"
        try:
            msg = _read(request, proto)
        except Unreadable as exc:
            return _error(400, "INVALID_PARAMETER_VALUE",
                          f"churn-guard could not read this request ({exc}); send the parameters as a JSON "
                          "object (Content-Type: application/json); nothing was changed")
        name = str(getattr(msg, "name", "") or "")
        if not name:
            return _error(400, "INVALID_PARAMETER_VALUE", "churn-guard: the request names no registered "
                          "model ('name'); nothing was changed")
        if not self._may_concern(op, msg):
            return None  # an ordinary tag: no lock, no store read on the hot path
        actor = _actor(request, g)
        try:
            stack = contextlib.ExitStack()
            g.churn_guard_lock = stack
            stack.enter_context(model_lock(self.store_uri, name, self.cfg.workspace / "locks"))
            decision = self._decide(op, request.method, name, msg, route, actor) if self.protected else None
            if decision is None or decision.check.allowed:
                # announced before MLflow writes: a move the history cannot take is not made
                g.churn_guard_history = self._announce(op, request.method, name, msg, request, g, decision)
        except Exception as exc:  # the store is unreachable, ...: refuse (closed), never a traceback
            _log.exception("churn-guard could not check %s %s", request.method, request.path)
            code = exc.error_code if isinstance(exc, MlflowException) else type(exc).__name__
            return _error(503, "TEMPORARILY_UNAVAILABLE",
                          f"churn-guard could not check this registry change ({code}); "
                          "nothing was changed, try again")
        if decision is None:
            return None
        if not decision.check.allowed:
            self._refused(decision, actor)
            return _error(403, "PERMISSION_DENIED", f"churn-guard: {decision.check.message}")
        g.churn_guard_move = decision
        return None

    def after_request(self, response: Any) -> Any:
        from flask import g, request

        response.headers[history.GUARD_HEADER] = "1"  # how clients know the guard writes the history
        move: GuardedMove | None = g.pop("churn_guard_move", None)
        pending: PendingMoves | None = g.pop("churn_guard_history", None)
        made = response.status_code == 200
        audit_run_id = None
        if move is not None and made:
            try:
                audit_run_id = self._record(move, _actor(request, g))
            except Exception:  # the move is made; a failed record must not turn it into an error
                _log.exception("churn-guard could not record %s of %s v%s", move.action, move.check.name,
                               move.check.version)
        if pending is not None:
            try:
                self._finish_history(pending, made, audit_run_id)
            except Exception:  # a RUNNING run left behind is resolved at the model's next move
                _log.exception("churn-guard could not finish the alias history of %s", pending.name)
        return response

    def teardown_request(self, exc: BaseException | None = None) -> None:
        from flask import g

        stack = g.pop("churn_guard_lock", None)
        if stack is not None:
            stack.close()

    # ------------------------------------------------------------------ decisions
    def _may_concern(self, op: str, msg: Any) -> bool:
        """False for requests :meth:`_decide` lets through on their parameters alone (a tag the
        guard does not protect), so they take no lock. Every alias request takes the model's lock:
        the alias history records each move in server order."""
        if op in ("model-versions/set-tag", "model-versions/delete-tag"):
            return msg.key.startswith(SIG_PREFIX) or msg.key in (*GUARD_ONLY_TAGS, OVERRIDE_TAG, APPROVAL_TAG)
        return True

    # ------------------------------------------------------------------ alias history
    def _announce(self, op: str, method: str, name: str, msg: Any, request: Any, g: Any,
                  decision: GuardedMove | None) -> PendingMoves | None:
        """Under the model lock, before MLflow's handler: the alias moves this request makes,
        read from the registry as it is now, announced as RUNNING history runs numbered after
        the model's last move (so the history's order is the server's order); None when it moves
        no alias (a set to the version already there, a delete of an absent alias)."""
        if op not in _MOVES_ALIASES:
            return None  # a tag, a stage, a new version: no alias moves
        client = self.client
        recorded = history.read_moves(client, name, include_running=True, running_max_age_s=float("inf"))
        current = aliases_of(client, name)  # after the history: no writer is mid-move (we hold the lock)
        if op == "registered-models/alias":
            holder = current.get(msg.alias)
            if method == "POST":
                moves = [(msg.alias, holder, msg.version)] if msg.version and holder != msg.version else []
            else:
                moves = [(msg.alias, holder, None)] if holder is not None else []
        elif op == "model-versions/delete":  # MLflow drops the aliases of a deleted version
            moves = [(a, v, None) for a, v in sorted(current.items()) if v == msg.version]
        elif op == "registered-models/delete" and method == "DELETE":
            moves = [(a, v, None) for a, v in sorted(current.items())]
        else:
            moves = []
        if not moves:
            return None
        recorded = history.resolve_running(client, recorded, current)  # a worker that died mid-move
        state = history.last_state(recorded)
        exp = self._history_experiment()
        now = _now()
        actor, claimed = _history_actor(request, g)
        claim = claim_from_headers(request.headers)
        reason = (claim.reason if claim else "") or (decision.check.message if decision else "")
        if op != "registered-models/alias":
            what = f"{op.replace('/', ' ')} of {name}" + (f" v{msg.version}" if msg.version else "")
            reason = reason or what
        run_ids: list[str] = []
        for alias, holder, to in moves:
            if state.get(alias) != holder:  # moved past the guard (a direct write to the store)
                recorded.append(history.reconcile_alias(
                    client, name, alias, state.get(alias), holder, recorded, now, exp,
                    "found by churn-guard before a move of this alias (moved past the guard)"))
            position, seq = history.next_numbers(recorded, alias)
            prev_ref = next((m.to_ref for m in reversed(recorded) if m.alias == alias), "") if holder else ""
            move = history.record_move(
                client, name, alias, holder, to, position=position, seq=seq, actor=actor, reason=reason,
                evidence_run_id=(claim.evidence_run_id if claim else "") or None, source="guard",
                moved_at=now, from_ref=prev_ref or history.version_ref_of(client, name, holder),
                to_ref=history.version_ref_of(client, name, to), claimed=claimed,
                via="mlflow-churn" if claim else "", experiment=exp, running=True)
            recorded.append(move)
            state[alias] = to
            run_ids.append(move.run_id)
        return PendingMoves(name, run_ids, not (claim and claim.evidence_run_id))

    def _finish_history(self, pending: PendingMoves, made: bool, audit_run_id: str | None) -> None:
        """After MLflow answered: the announced moves FINISHED (made) or FAILED (refused)."""
        for run_id in pending.run_ids:
            if made and audit_run_id and pending.evidence_from_audit:
                self.client.set_tag(run_id, "evidence_run_id", audit_run_id)
            history.end_move(self.client, run_id, ok=made)

    def _history_experiment(self) -> str:
        """The alias-history experiment, made through the server's own store when missing."""
        if self._history_exp is None:
            exp = self.client.get_experiment_by_name(history.HISTORY_EXPERIMENT)
            if exp is None:
                self._experiment(history.HISTORY_EXPERIMENT)
            self._history_exp = history.experiment_id(self.client)  # its tags (note, experiment kind)
        return self._history_exp

    def _decide(self, op: str, method: str, name: str, msg: Any, route: str,
                actor: str) -> GuardedMove | None:
        client = self.client

        def check(version: str | None, alias: str) -> PromotionCheck:
            return check_promotion(client, name, version, self.cfg, alias, actor=actor,
                                   verifier=self.verifier)

        def refuse(action: str, version: str, what: str, rule: str, message: str) -> GuardedMove:
            return GuardedMove(action, route, PromotionCheck(False, name, version, what, rule,
                                                             f"{message}", {}))

        if op == "registered-models/alias":
            alias = msg.alias
            if alias not in self.protected:
                return None
            holder = aliases_of(client, name).get(alias)
            if method == "POST":
                if not msg.version or holder == msg.version:
                    return None  # MLflow rejects the request itself / nothing moves
                return GuardedMove("set_alias", route, check(msg.version, alias))
            if holder is None:
                return None
            return GuardedMove("delete_alias", route, check(None, alias))
        if op == "model-versions/transition-stage":
            if msg.stage.strip().lower() != "production":
                return None
            if not msg.version or aliases_of(client, name).get(self.stage_alias) == msg.version:
                return None  # the alias holder entering its stage (evaluation.mirror_stages)
            return GuardedMove("transition_stage", route, check(msg.version, self.stage_alias))
        held = {a: v for a, v in aliases_of(client, name).items() if a in self.protected}
        if op == "model-versions/delete":
            hit = sorted(a for a, v in held.items() if v == msg.version)
            if hit:
                return refuse("delete_version", msg.version, ",".join(hit), "lifecycle",
                              f"version {msg.version} of '{name}' holds protected alias {', '.join(hit)}; "
                              "move the alias first (the guard checks that)")
            return None
        if op in ("registered-models/delete", "registered-models/rename"):
            if held:
                what = "deleted" if op.endswith("delete") else "renamed"
                return refuse(op.split("/")[1] + "_model", "", ",".join(sorted(held)), "lifecycle",
                              f"model '{name}' has protected alias(es) "
                              f"{', '.join(f'{a} -> v{v}' for a, v in sorted(held.items()))}; it cannot be "
                              f"{what} while they exist (roll back or remove them through the lifecycle)")
            return None
        if op == "model-versions/create":
            # tags a new version may not be born with: set-tag checks who writes them (see _tag_request)
            basic = self.cfg.registry.guard_auth == "basic-auth"
            smuggled = sorted({t.key for t in msg.tags if t.key in GUARD_ONLY_TAGS
                               or (basic and t.key in (OVERRIDE_TAG, APPROVAL_TAG))})
            if smuggled:
                return refuse("create_version", "", ",".join(smuggled), "protected_tag",
                              f"a version of '{name}' may not be created with tag(s) {', '.join(smuggled)}; "
                              "set them on the version afterwards (churn-guard checks who writes them)")
            if held and _COPY_SOURCE.fullmatch(msg.source or ""):
                return refuse("copy_version", "", msg.source[:200], "lifecycle",
                              f"model '{name}' has protected alias(es) {', '.join(sorted(held))}: a version "
                              f"copied from {msg.source[:200]} may not be added to it; register the model's "
                              "files from their run instead")
            return None
        return self._tag_request(op, name, msg, route, actor)

    def _tag_request(self, op: str, name: str, msg: Any, route: str, actor: str) -> GuardedMove | None:
        key, version = msg.key, msg.version
        action = "set_tag" if op.endswith("set-tag") else "delete_tag"

        def refused(rule: str, message: str) -> GuardedMove:
            return GuardedMove(action, route, PromotionCheck(False, name, version, key, rule, message, {}))

        def allowed(rule: str, message: str, evidence: dict[str, Any] | None = None) -> GuardedMove:
            return GuardedMove(action, route, PromotionCheck(True, name, version, key, rule, message,
                                                             evidence or {}))

        if key in GUARD_ONLY_TAGS:
            return refused("protected_tag", f"tag '{key}' is written by churn-guard only")
        if key.startswith(SIG_PREFIX):
            if action == "delete_tag":
                return refused("protected_tag", f"signed decision tag '{key}' of version {version} of "
                               f"'{name}' cannot be deleted (a newer signed decision replaces it)")
            return self._signed_tag(name, version, key, msg.value, refused, allowed)
        basic = self.cfg.registry.guard_auth == "basic-auth"
        if key == OVERRIDE_TAG and basic:
            if action == "delete_tag":
                return allowed("override_withdrawn", f"override of version {version} withdrawn")
            if not self._may(actor, name, self.cfg.registry.override_users):
                return refused("override_not_allowed", f"user {actor} may not override the promotion "
                               "rules (not in registry.override_users, no MANAGE on the model); ask an "
                               "override user, or promote through the gate and canary")
            return allowed("override_set", f"override of version {version} by {actor}: {msg.value[:300]}")
        if key == APPROVAL_TAG and basic and action == "set_tag":
            if not self._may(actor, name, self.cfg.registry.approvers):
                return refused("approval_not_allowed", f"user {actor} may not approve promotions (not in "
                               "registry.approvers, no MANAGE on the model)")
            if msg.value.strip() != actor:
                return refused("approval_not_allowed", f"an approval names the approver: set "
                               f"'{APPROVAL_TAG}' = '{actor}' (your user name), not '{msg.value[:100]}'")
            return allowed("approved", f"version {version} approved by {actor}")
        return None

    def _signed_tag(self, name: str, version: str, key: str, value: str, refused: Any,
                    allowed: Any) -> GuardedMove:
        kind = key[len(SIG_PREFIX):]
        try:
            d = self.verifier.verify(value)
            mv = self.client.get_model_version(name, version)
        except SignatureError as exc:
            return refused("bad_signature", f"tag '{key}' of version {version} of '{name}': {exc}; only the "
                           "project's signing key writes it")
        except MlflowException as exc:
            if not is_missing(exc):
                raise
            return refused("unknown_version", f"tag '{key}': there is no version {version} of '{name}'")
        wrong = [f for f, want in (("kind", kind), ("model", name), ("version", str(mv.version)),
                                   ("identity", version_identity(mv))) if getattr(d, f) != want]
        if wrong:
            return refused("bad_signature", f"tag '{key}' of version {version} of '{name}' is signed for "
                           f"another {'/'.join(wrong)}")
        current = read_evidence(self.client, name, version, self.verifier)
        old = current.decisions.get(kind) if current else None
        if old is not None and d.issued < old.issued:
            return refused("stale_signature", f"tag '{key}' of version {version} of '{name}': a decision of "
                           f"{d.issued_at} may not replace the newer one of {old.issued_at}")
        return allowed("signed", f"signed {kind} decision {d.decision} of version {version}",
                       {"decision": d.to_dict()})

    def _may(self, actor: str, name: str, users: list[str]) -> bool:
        """``actor`` (authenticated) is in ``users`` or has MANAGE on model ``name`` (or is admin)."""
        from flask import g

        user = getattr(g, "mlflow_authenticated_user", None)
        if not user:
            return False
        if user in users:
            return True
        try:
            from mlflow.server.auth import store as auth_store

            if auth_store.get_user(user).is_admin:
                return True
            return auth_store.get_registered_model_permission(name, user).permission == "MANAGE"
        except Exception:  # no permission row, or the auth store failing: not MANAGE (refused, closed)
            return False

    # ------------------------------------------------------------------ artifacts
    def _artifact_request(self, request: Any, g: Any, rule: str) -> Any:
        if rule.endswith("/mlflow/upload-artifact"):
            run_id, sub = request.args.get("run_uuid"), request.args.get("path")
            if not run_id or not sub:
                return None  # MLflow refuses it itself
            try:
                root = self.client.get_run(run_id).info.artifact_uri
            except MlflowException as exc:
                if not is_missing(exc):
                    raise
                return None  # MLflow answers the unknown run
            path = _relative(root.rstrip("/") + "/" + sub.lstrip("/"))
        else:
            raw = (request.view_args or {}).get("artifact_path")
            if raw is None:
                return _error(400, "INVALID_PARAMETER_VALUE", "churn-guard: an artifact write must name its "
                              "path; nothing was changed")
            path = raw
        refusal = self.artifact_refusal(path, request.method, _actor(request, g))
        return None if refusal is None else _error(403, "PERMISSION_DENIED", refusal)

    def artifact_refusal(self, path: str | None, method: str, actor: str) -> str | None:
        """Why a write / delete of artifact ``path`` (relative to the artifact root) is refused:
        it is at, under or above the files of a registered version. None when allowed."""
        if path is None:
            return "churn-guard: an artifact write must name its path"
        norm = posixpath.normpath("/" + path.replace("\\", "/")).lstrip("/")
        try:
            hit = next(((loc, n, v) for loc, n, v in self._registered_locations(norm.split("/")[0])
                        if norm == loc or norm.startswith(loc + "/") or loc.startswith(norm + "/")
                        or norm in ("", ".")), None)
        except Exception as exc:  # the store is unreachable: refuse (closed)
            _log.exception("churn-guard could not check artifact %s %s", method, path)
            return (f"churn-guard could not check this artifact write ({type(exc).__name__}); "
                    "nothing was changed")
        if hit is None:
            return None
        loc, name, version = hit
        message = (f"churn-guard: {path} is part of the files of version {version} of registered model "
                   f"'{name}'; a registered version's files are immutable (register a new version instead)")
        check = PromotionCheck(False, name, version, path[:200], "immutable_files", message,
                               {"location": loc})
        self._refused(GuardedMove(f"artifact_{method.lower()}", "api", check), actor)
        return message

    def _registered_locations(self, top: str = "") -> list[tuple[str, str, str]]:
        """(artifact-root-relative location, model, version) of the registered versions' files
        whose location lies under the root folder ``top`` ("" or ".": every version). On a SQL
        store the folder filters in the query: an artifact write (every ``log_artifact`` of every
        run passes here) reads only the versions of its own experiment folder."""
        from mlflow.server.handlers import _get_model_registry_store

        store = _get_model_registry_store()
        rows: list[tuple[str, str, str]] = []
        if hasattr(store, "ManagedSessionMaker"):
            from mlflow.store.model_registry.dbmodels.models import SqlModelVersion
            from sqlalchemy import or_

            uris = (SqlModelVersion.storage_location, SqlModelVersion.source)
            with store.ManagedSessionMaker() as session:
                query = session.query(SqlModelVersion.name, SqlModelVersion.version, *uris)
                if top not in ("", "."):  # a location under top has "/<top>/" (or ends "/<top>") in its URI
                    esc = top.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
                    query = query.filter(or_(*(col.like(pattern, escape="\\") for col in uris
                                               for pattern in (f"%/{esc}/%", f"%/{esc}"))))
                for mv in query:
                    for uri in {mv.storage_location, mv.source} - {None, ""}:
                        rel = _relative(uri)
                        if rel:
                            rows.append((rel, mv.name, str(mv.version)))
            return rows
        for mv in self.client.search_model_versions(max_results=100000):  # a file store
            uri = self.client.get_model_version_download_uri(mv.name, mv.version)
            rel = _relative(uri)
            if rel:
                rows.append((rel, mv.name, str(mv.version)))
        return rows

    # ------------------------------------------------------------------ records
    def _record(self, move: GuardedMove, actor: str) -> str | None:
        """Version tags, audit run and alert of an allowed guarded move; the audit run id."""
        chk = move.check
        client = self.client
        if move.action in ("set_tag", "delete_tag"):
            if chk.rule == "override_set":
                holder = aliases_of(client, chk.name).get(CHAMPION)
                ref = ""
                if holder:
                    ref = f"{holder}:{version_identity(client.get_model_version(chk.name, holder))}"
                client.set_model_version_tag(chk.name, chk.version, OVERRIDE_BY_TAG, actor[:TAG_LIMIT])
                client.set_model_version_tag(chk.name, chk.version, OVERRIDE_AGAINST_TAG, ref)
                self._audit(move, actor, "allowed")
                self._alert(move, actor, "PromotionOverride", "warning")
            elif chk.rule == "override_withdrawn":
                _drop_tags(client, chk.name, chk.version, GUARD_ONLY_TAGS)
            elif chk.rule == "approved":
                self._audit(move, actor, "allowed")
            return None
        if move.action.endswith("_model") or move.action.startswith(("delete_version", "copy_")):
            return None
        run_id = self._audit(move, actor, "allowed")
        if move.action == "delete_alias":
            return run_id
        tags = {"promoted_by": actor, "promotion_rule": chk.rule, "promotion_reason": chk.message,
                "promotion_route": f"{move.route}:{move.action}", "promotion_at": _now().isoformat()}
        if run_id:
            tags["promotion_audit_run_id"] = run_id
        for key, value in tags.items():
            client.set_model_version_tag(chk.name, chk.version, key, value[:TAG_LIMIT])
        if chk.alias == CHAMPION and chk.rule in ("override", "gate_and_canary", "first_champion"):
            # an override or approval ends with the promotion it served
            _drop_tags(client, chk.name, chk.version, (OVERRIDE_TAG, *GUARD_ONLY_TAGS, APPROVAL_TAG))
            if chk.rule == "override":
                self._alert(move, actor, "PromotionOverride", "warning")
        return run_id

    def _refused(self, move: GuardedMove, actor: str) -> None:
        self._audit(move, actor, "refused")
        self._alert(move, actor, "PromotionRefused", "warning")

    def _alert(self, move: GuardedMove, actor: str, name: str, severity: str) -> None:
        """An event alert through the project's alert path (the outbox, delivered with retries by
        this process's sender): it clears by itself after an hour. The actor is a label, so
        another person's refusal within that hour is an alert of its own."""
        chk = move.check
        labels = {"alertname": name, "severity": severity, "model": chk.name, "alias": chk.alias,
                  "version": chk.version, "rule": chk.rule, "actor": actor}
        notes = {"summary": chk.message[:1000], "action": move.action, "route": move.route}
        fire(self.cfg, None, labels, notes, starts_at=_now(), ttl_seconds=EVENT_ALERT_TTL_S)

    def _audit(self, move: GuardedMove, actor: str, decision: str) -> str | None:
        """An audit run of the move in ``registry.audit_experiment``; its id (None on failure)."""
        chk = move.check
        try:
            exp_id = self._audit_experiment()
            client = self.client
            with client_run(client, self.cfg, f"guard {decision} {move.action} {chk.alias} v{chk.version}",
                            experiment_id=exp_id,
                            tags={"kind": "guard-promotion", "decision": decision, "rule": chk.rule,
                                  "action": move.action, "model_name": chk.name, "version": chk.version,
                                  "alias": chk.alias[:TAG_LIMIT], "actor": actor[:TAG_LIMIT],
                                  "route": move.route, "mlflow.user": actor[:TAG_LIMIT]}) as run_id:
                client.log_param(run_id, "reason", chk.message[:5000])
                client.log_param(run_id, "evidence",
                                 json.dumps(chk.evidence, sort_keys=True, default=str)[:5000])
            return run_id
        except Exception:  # the audit run is a record beside the decision already taken: logged
            _log.exception("churn-guard could not write the audit run of %s v%s", chk.name, chk.version)
            return None

    def _audit_experiment(self) -> str:
        return self._experiment(self.cfg.registry.audit_experiment)

    def _experiment(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        from mlflow.server.handlers import _get_tracking_store

        try:  # the server's own store: experiments get the server's artifact root
            return _get_tracking_store().create_experiment(name)
        except MlflowException:  # another worker created it first
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id


def _mtime(path: Any) -> float | None:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


def _drop_tags(client: MlflowClient, name: str, version: str, keys: tuple[str, ...]) -> None:
    tags = client.get_model_version(name, version).tags
    for key in keys:
        if key in tags:
            client.delete_model_version_tag(name, version, key)


def _now() -> datetime:
    return datetime.now(UTC)


def _rule(request: Any) -> str | None:
    """The Flask route MLflow resolved for ``request``, without the static prefix."""
    from mlflow.server.handlers import STATIC_PREFIX_ENV_VAR

    rule = request.url_rule.rule if request.url_rule is not None else None
    if rule is None:
        return None
    prefix = os.environ.get(STATIC_PREFIX_ENV_VAR, "").rstrip("/")
    return rule[len(prefix):] if prefix and rule.startswith(prefix) else rule


def _read(request: Any, proto: Any) -> Any:
    """The request's parameters exactly as MLflow's handler will read them (query string for a
    GET, else the JSON body, a JSON string decoded a second time), as MLflow's message."""
    from mlflow.server.handlers import _get_request_message

    try:
        raw = request.get_json(force=True, silent=True)
        if isinstance(raw, str):
            raw = json.loads(raw)
        if raw is not None and not isinstance(raw, dict):
            raise Unreadable(f"the body is JSON {type(raw).__name__}, not an object")
        msg = _get_request_message(proto(), flask_request=request)
        if "version" in msg.DESCRIPTOR.fields_by_name and msg.version:
            # the version number as MLflow's store reads it (int(): "02", " 2", "+2" are version 2)
            try:
                msg.version = str(int(msg.version))
            except ValueError:
                raise Unreadable(f"version {msg.version[:50]!r} is not a version number") from None
        return msg
    except Unreadable:
        raise
    except (MlflowException, ValueError, TypeError) as exc:
        raise Unreadable(type(exc).__name__) from None


def _relative(uri: str) -> str | None:
    """An artifact URI as a path relative to the server's proxied artifact root (``mlflow-artifacts:``
    URIs and the server's ``/api/2.0/mlflow-artifacts/artifacts/`` URLs); None for other schemes."""
    parts = urlsplit(uri)
    if parts.scheme == "mlflow-artifacts":
        path = parts.path
    elif parts.scheme in ("http", "https") and "/mlflow-artifacts/artifacts/" in parts.path:
        path = parts.path.split("/mlflow-artifacts/artifacts/", 1)[1]
    else:
        return None
    norm = posixpath.normpath("/" + path).lstrip("/")
    return norm if norm not in ("", ".") else None


def _actor(request: Any, g: Any) -> str:
    """Who asked: the basic-auth user when the guard wraps basic-auth, the HTTP basic user
    otherwise, else ``anonymous@<client address>``."""
    user = getattr(g, "mlflow_authenticated_user", None)
    if user:
        return str(user)
    auth = request.authorization
    if auth is not None and auth.username:
        return f"{auth.username} (unverified)"
    return f"anonymous@{request.remote_addr or 'unknown'}"


def _history_actor(request: Any, g: Any) -> tuple[str, bool]:
    """(actor, claimed) of an alias move for the history: the basic-auth user the guard
    authenticated; else what the client claims (header X-Churn-Actor, else an HTTP basic user
    name nobody checked), marked ``(claimed)``; else ``unknown``."""
    user = getattr(g, "mlflow_authenticated_user", None)
    if user:
        return str(user), False
    claim = claim_from_headers(request.headers)
    if claim is not None and claim.actor:
        return f"{claim.actor} (claimed)", True
    auth = request.authorization
    if auth is not None and auth.username:
        return f"{auth.username} (claimed)", True
    return history.UNKNOWN, False


def _health() -> Any:
    """``GET /churn-guard/health``: this server is a churn-guard and writes the alias history."""
    from flask import jsonify

    return jsonify({"guard": "churn-guard", "history_writer": "guard"})


def _error(status: int, code: str, message: str) -> Any:
    from flask import Response

    return Response(json.dumps({"error_code": code, "message": message}), status=status,
                    mimetype="application/json")


class ArtifactGuard:
    """ASGI layer in front of MLflow's FastAPI app: the artifact ``PUT`` that FastAPI serves
    itself (``mlflow-artifacts/artifacts/<path>``) is checked like the Flask routes."""

    def __init__(self, app: Any, guard: Guard) -> None:
        self.app, self.guard = app, guard

    def __getattr__(self, attr: str) -> Any:  # FastAPI attributes (state, routes, ...) pass through
        return getattr(self.app, attr)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") == "http" and scope.get("method") in _ARTIFACT_WRITE:
            from mlflow.server.handlers import STATIC_PREFIX_ENV_VAR

            path = scope.get("path", "")
            prefix = os.environ.get(STATIC_PREFIX_ENV_VAR, "").rstrip("/")
            if prefix and path.startswith(prefix):
                path = path[len(prefix):]
            m = _ASGI_ARTIFACT.fullmatch(path)
            if m is not None:
                import anyio

                client = scope.get("client") or ("unknown", 0)
                actor = f"anonymous@{client[0]}"
                refusal = await anyio.to_thread.run_sync(self.guard.artifact_refusal, m["path"],
                                                         scope["method"], actor)
                if refusal is not None:
                    body = json.dumps({"error_code": "PERMISSION_DENIED", "message": refusal}).encode()
                    await send({"type": "http.response.start", "status": 403,
                                "headers": [(b"content-type", b"application/json"),
                                            (b"content-length", str(len(body)).encode())]})
                    await send({"type": "http.response.body", "body": body})
                    return
        await self.app(scope, receive, send)


def create_app(app: Any = None) -> Any:
    """The ``mlflow.app`` factory: MLflow's server app with the guard's hooks (see module doc).

    Returns MLflow's FastAPI app (behind :class:`ArtifactGuard`) under uvicorn
    (``mlflow server``'s default), else the Flask app.
    """
    from mlflow.environment_variables import _MLFLOW_SGI_NAME
    from mlflow.server import app as flask_app

    app = flask_app if app is None else app
    open_on_runs(app)  # the UI opens experiments on their runs, not in GenAI mode
    cfg = load_config()
    guard = Guard(cfg)
    wrapped: Any = None
    if cfg.registry.guard_auth == "basic-auth":
        from mlflow.server.auth import create_app as basic_auth_app

        wrapped = basic_auth_app(app)  # its hooks run first: the user is known to ours
    from mlflow.server.handlers import STATIC_PREFIX_ENV_VAR

    prefix = os.environ.get(STATIC_PREFIX_ENV_VAR, "").rstrip("/")
    app.add_url_rule(prefix + history.GUARD_ROUTE, "churn_guard_health", _health, methods=["GET"])
    app.before_request(guard.before_request)
    app.after_request(guard.after_request)
    app.teardown_request(guard.teardown_request)
    keys = guard.verifier.key_ids
    _log.warning("churn-guard: guarded aliases %s, verify keys %s (approval %s) on model registry",
                 list(guard.protected),
                 keys or "NONE (every protected move is refused: registry.verify_key_file)",
                 "required" if cfg.registry.require_approval else "not required")
    if _MLFLOW_SGI_NAME.get() != "uvicorn":
        return wrapped if wrapped is not None else app
    if wrapped is None:
        from mlflow.server.fastapi_app import create_fastapi_app

        wrapped = create_fastapi_app(app)
    return ArtifactGuard(wrapped, guard)
