"""``mlflow server --app-name churn-guard``: MLflow's own server with protected aliases.

An ``mlflow.app`` plugin (entry point ``churn-guard`` in pyproject.toml), built like MLflow's
``basic-auth`` app: :func:`create_app` adds a ``before_request`` / ``after_request`` pair to
MLflow's Flask app and, under uvicorn (MLflow's default server), wraps it in MLflow's FastAPI
app exactly as ``mlflow server`` does without a plugin. Every other request passes through
untouched.

Guarded requests (REST ``/api/2.0/...``, the UI's ``/ajax-api/2.0/...``, also ``/preview``):

- ``POST registered-models/alias`` setting a protected alias (``registry.protected_aliases``,
  default ``[champion]``) to a version other than the one it points at;
- ``DELETE registered-models/alias`` of a protected alias (checked on the version it points at);
- ``POST model-versions/transition-stage`` to ``Production`` (legacy stages; checked as the
  ``champion`` alias) of a version that is not the champion already;
- ``DELETE model-versions/delete`` of a version, and ``DELETE registered-models/delete`` of a
  model, that a protected alias points at (delete the alias first; that is checked).

A move :func:`~mlflow_churn.registry.promotion.check_promotion` refuses gets HTTP 403 with
MLflow's error body ``{"error_code": "PERMISSION_DENIED", "message": ...}`` (the UI shows the
message). An allowed move, once MLflow has made it, is recorded: version tags
``promoted_by``, ``promotion_rule``, ``promotion_reason``, ``promotion_route``, ``promotion_at``
and ``promotion_audit_run_id``, and a run in experiment ``registry.audit_experiment``
(tags ``kind=guard-promotion``, ``decision``, ``rule``, ``actor``...). Refusals get an audit
run too (``decision=refused``), so attempts are visible.

The churn configuration comes from the server's environment (``CHURN_CONFIG``, ``CHURN_*``,
``churn.yaml`` in the working directory). With ``registry.guard_auth: basic-auth`` the
plugin wraps MLflow's ``basic-auth`` app too (extra ``guard-auth``) and records the
authenticated user name; basic-auth's settings apply (``MLFLOW_FLASK_SERVER_SECRET_KEY``,
``MLFLOW_AUTH_ADMIN_PASSWORD`` on the first start, ``MLFLOW_AUTH_CONFIG_PATH``).
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mlflow_churn.config import ChurnConfig, load_config
from mlflow_churn.registry.aliases import CHAMPION, aliases_of
from mlflow_churn.registry.promotion import PromotionCheck, check_promotion
from mlflow_churn.tracking import client_run

_log = logging.getLogger("mlflow_churn.guard")

#: the registry routes the guard looks at, after the optional static prefix
_ROUTE = re.compile(
    r"/(?P<api>api|ajax-api)/\d+\.\d+(?:/preview)?/mlflow/"
    r"(?P<op>registered-models/alias|model-versions/transition-stage|model-versions/delete"
    r"|registered-models/delete)/?$"
)
_METHOD = {"registered-models/alias": ("POST", "DELETE"), "model-versions/transition-stage": ("POST",),
           "model-versions/delete": ("DELETE",), "registered-models/delete": ("DELETE",)}
TAG_LIMIT = 4900  # MLflow's tag values hold 5000 characters (8000 on newer stores)


@dataclass(frozen=True)
class GuardedMove:
    """One protected move a request asks for, and the check that allowed it."""

    action: str  # set_alias | delete_alias | transition_stage
    route: str  # "ui" (/ajax-api) or "api"
    check: PromotionCheck


class Guard:
    """The request hooks. ``client`` reads / tags the registry of this server's stores."""

    def __init__(self, cfg: ChurnConfig, client: MlflowClient | None = None) -> None:
        self.cfg = cfg
        self.protected = tuple(cfg.registry.protected_aliases)
        self._client = client

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            from mlflow.server.constants import BACKEND_STORE_URI_ENV_VAR, REGISTRY_STORE_URI_ENV_VAR

            tracking = os.environ.get(BACKEND_STORE_URI_ENV_VAR)
            registry = os.environ.get(REGISTRY_STORE_URI_ENV_VAR) or tracking
            self._client = MlflowClient(tracking, registry)
        return self._client

    @property
    def stage_alias(self) -> str:
        """The alias a transition to Production is checked as."""
        return CHAMPION if CHAMPION in self.protected else self.protected[0]

    # ------------------------------------------------------------------ hooks
    def before_request(self) -> Any:
        from flask import g, request
        from mlflow.server.handlers import STATIC_PREFIX_ENV_VAR

        if not self.protected:
            return None
        path = request.path
        prefix = os.environ.get(STATIC_PREFIX_ENV_VAR, "").rstrip("/")
        if prefix and path.startswith(prefix):
            path = path[len(prefix):]
        m = _ROUTE.fullmatch(path)
        if m is None or request.method not in _METHOD[m["op"]]:
            return None
        route = "ui" if m["api"] == "ajax-api" else "api"
        params = _params(request)
        name = str(params.get("name") or "")
        if not name:
            return None  # MLflow answers the missing parameter itself
        try:
            decision = self._decide(m["op"], request.method, name, params, route)
        except Exception as exc:  # the store is unreachable, ...: refuse (closed), never a traceback
            _log.exception("churn-guard could not check %s %s", request.method, request.path)
            code = exc.error_code if isinstance(exc, MlflowException) else type(exc).__name__
            return _error(503, "TEMPORARILY_UNAVAILABLE",
                          f"churn-guard could not check this registry change ({code}); "
                          "nothing was changed, try again")
        if decision is None:
            return None
        if isinstance(decision, str):  # a refusal that is not a promotion check
            return _error(403, "PERMISSION_DENIED", decision)
        if not decision.check.allowed:
            self._audit(decision, _actor(request, g), "refused")
            return _error(403, "PERMISSION_DENIED", f"churn-guard: {decision.check.message}")
        g.churn_guard_move = decision
        return None

    def after_request(self, response: Any) -> Any:
        from flask import g, request

        move: GuardedMove | None = g.pop("churn_guard_move", None)
        if move is None or response.status_code != 200:
            return response
        try:
            self._record(move, _actor(request, g))
        except Exception:  # the move is made; a failed record must not turn it into an error
            _log.exception("churn-guard could not record %s of %s v%s", move.action, move.check.name,
                           move.check.version)
        return response

    # ------------------------------------------------------------------ decisions
    def _decide(self, op: str, method: str, name: str, params: dict[str, Any],
                route: str) -> GuardedMove | str | None:
        client = self.client

        def check(version: str, alias: str) -> PromotionCheck:
            return check_promotion(client, name, version, self.cfg, alias)

        if op == "registered-models/alias":
            alias = str(params.get("alias") or "")
            if alias not in self.protected:
                return None
            aliases = {a: str(v) for a, v in aliases_of(client, name).items()}
            if method == "POST":
                version = str(params.get("version") or "")
                if not version or aliases.get(alias) == version:
                    return None  # MLflow rejects the request itself / nothing moves
                return GuardedMove("set_alias", route, check(version, alias))
            holder = aliases.get(alias)
            if holder is None:
                return None
            return GuardedMove("delete_alias", route, check(holder, alias))
        if op == "model-versions/transition-stage":
            if str(params.get("stage") or "").strip().lower() != "production":
                return None
            version = str(params.get("version") or "")
            alias = self.stage_alias
            if not version or str(aliases_of(client, name).get(alias)) == version:
                return None  # the alias holder entering its stage (evaluation.mirror_stages)
            return GuardedMove("transition_stage", route, check(version, alias))
        held = {a: str(v) for a, v in aliases_of(client, name).items() if a in self.protected}
        if op == "model-versions/delete":
            version = str(params.get("version") or "")
            hit = sorted(a for a, v in held.items() if v == version)
            if hit:
                return (f"churn-guard: version {version} of '{name}' holds protected alias "
                        f"{', '.join(hit)}; move or delete the alias first (the guard checks that)")
            return None
        if held:  # registered-models/delete
            return (f"churn-guard: model '{name}' has protected alias(es) "
                    f"{', '.join(f'{a} -> v{v}' for a, v in sorted(held.items()))}; delete them first "
                    "(the guard checks that)")
        return None

    # ------------------------------------------------------------------ records
    def _record(self, move: GuardedMove, actor: str) -> None:
        run_id = self._audit(move, actor, "allowed")
        if move.action == "delete_alias":
            return
        chk = move.check
        tags = {"promoted_by": actor, "promotion_rule": chk.rule, "promotion_reason": chk.message,
                "promotion_route": f"{move.route}:{move.action}", "promotion_at": _now().isoformat()}
        if run_id:
            tags["promotion_audit_run_id"] = run_id
        for key, value in tags.items():
            self.client.set_model_version_tag(chk.name, chk.version, key, value[:TAG_LIMIT])

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
                                  "alias": chk.alias, "actor": actor[:TAG_LIMIT], "route": move.route,
                                  "mlflow.user": actor[:TAG_LIMIT]}) as run_id:
                client.log_param(run_id, "reason", chk.message[:5000])
                client.log_param(run_id, "evidence",
                                 json.dumps(chk.evidence, sort_keys=True, default=str)[:5000])
            return run_id
        except Exception:
            _log.exception("churn-guard could not write the audit run of %s v%s", chk.name, chk.version)
            return None

    def _audit_experiment(self) -> str:
        name = self.cfg.registry.audit_experiment
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


def _now() -> datetime:
    return datetime.now(UTC)


def _params(request: Any) -> dict[str, Any]:
    """The request's parameters: JSON body (POST / DELETE as MLflow's client sends them) over
    the query string (as some UI calls send them)."""
    out: dict[str, Any] = dict(request.args.items())
    raw = request.get_data(cache=True)
    if raw:
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if isinstance(body, dict):
            out.update(body)
    return out


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


def _error(status: int, code: str, message: str) -> Any:
    from flask import Response

    return Response(json.dumps({"error_code": code, "message": message}), status=status,
                    mimetype="application/json")


def create_app(app: Any = None) -> Any:
    """The ``mlflow.app`` factory: MLflow's server app with the guard's hooks (see module doc).

    Returns MLflow's FastAPI app under uvicorn (``mlflow server``'s default), else the Flask app.
    """
    from mlflow.environment_variables import _MLFLOW_SGI_NAME
    from mlflow.server import app as flask_app

    app = flask_app if app is None else app
    cfg = load_config()
    guard = Guard(cfg)
    wrapped: Any = None
    if cfg.registry.guard_auth == "basic-auth":
        from mlflow.server.auth import create_app as basic_auth_app

        wrapped = basic_auth_app(app)  # its hooks run first: the user is known to ours
    app.before_request(guard.before_request)
    app.after_request(guard.after_request)
    _log.warning("churn-guard: protected aliases %s (approval %s) on model registry",
                 list(guard.protected), "required" if cfg.registry.require_approval else "not required")
    if wrapped is not None:
        return wrapped
    if _MLFLOW_SGI_NAME.get() == "uvicorn":
        from mlflow.server.fastapi_app import create_fastapi_app

        return create_fastapi_app(app)
    return app
