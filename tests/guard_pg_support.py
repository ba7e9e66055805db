"""Helpers of tests/test_guard_attacks.py: a real ``mlflow server --app-name churn-guard`` on
its own PostgreSQL database, registered versions with real files, decisions signed with a test
key (``signing.record_signed``) and the raw REST calls a keyless attacker makes."""

from __future__ import annotations

import json
import os
import secrets
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from mlflow.tracking import MlflowClient

from mlflow_churn.config import ChurnConfig, load_config
from mlflow_churn.registry import signing
from mlflow_churn.registry.guard import _relative
from mlflow_churn.registry.promotion import read_evidence
from mlflow_churn.tracking_server import TrackingServer, start_tracking_server

PG_HOST, PG_PORT = "127.0.0.1", 5432
AUDIT_EXPERIMENT = "churn-registry-audit"


# --------------------------------------------------------------------------- PostgreSQL
def _admin():
    import psycopg

    return psycopg.connect(host=PG_HOST, port=PG_PORT, user="postgres", dbname="postgres", autocommit=True)


@contextmanager
def pg_database(prefix: str = "guard") -> Iterator[str]:
    """A new database ``<prefix>_<uuid8>`` on the machine's PostgreSQL; its URL. Dropped on exit
    (its connections terminated first)."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    con = _admin()
    try:
        with con.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        yield f"postgresql://postgres@{PG_HOST}:{PG_PORT}/{name}"
    finally:
        with con.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = %s AND pid <> pg_backend_pid()", (name,))
            cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
        con.close()


# --------------------------------------------------------------------------- keys and servers
@dataclass(frozen=True)
class Keys:
    signing_file: Path
    verify_file: Path


def make_keys(root: Path) -> Keys:
    keys = Keys(root / "keys" / "signing.key", root / "keys" / "verify.pub")
    signing.keygen(keys.signing_file, keys.verify_file)
    return keys


def server_env(keys: Keys, **churn_env: str) -> dict[str, str]:
    """The server's environment: ours without CHURN_* / client-side MLflow run variables, the
    verify key file (the server never sees the signing key), plus ``churn_env``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("CHURN_") and k not in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID",
                                                       "MLFLOW_EXPERIMENT_ID", "MLFLOW_TRACKING_USERNAME",
                                                       "MLFLOW_TRACKING_PASSWORD")}
    env["CHURN_REGISTRY__VERIFY_KEY_FILE"] = str(keys.verify_file)
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    env.update(churn_env)
    return env


def start_guard(root: Path, backend: str, keys: Keys, workers: int = 2, **churn_env: str) -> TrackingServer:
    """``mlflow server --app-name churn-guard`` on ``backend`` with ``workers`` uvicorn workers."""
    root.mkdir(parents=True, exist_ok=True)
    return start_tracking_server(backend, root / "artifacts", app_name="churn-guard",
                                 env=server_env(keys, **churn_env), cwd=root, log_path=root / "server.log",
                                 workers=workers)


def basic_auth_env(root: Path, admin_password: str, default_permission: str = "EDIT") -> dict[str, str]:
    """CHURN_* / MLFLOW_* variables of a guard server that wraps MLflow's basic-auth app (its user
    store in SQLite under ``root``; every user gets ``default_permission`` on what they did not
    create)."""
    import mlflow.server.auth as basic_auth

    ini = (Path(basic_auth.__file__).parent / "basic_auth.ini").read_text()
    ini = ini.replace("sqlite:///basic_auth.db", f"sqlite:///{root}/basic_auth.db")
    ini = ini.replace("default_permission = READ", f"default_permission = {default_permission}")
    root.mkdir(parents=True, exist_ok=True)
    (root / "basic_auth.ini").write_text(ini + "\nauth_cache_ttl_seconds = 300\n")  # PBKDF2 once
    return {"CHURN_REGISTRY__GUARD_AUTH": "basic-auth",
            "MLFLOW_AUTH_CONFIG_PATH": str(root / "basic_auth.ini"),
            "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password,
            "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)}


def config(workspace: Path, server: TrackingServer, keys: Keys, name: str | None = None,
           **overrides: Any) -> ChurnConfig:
    """A test's config: tracking on ``server``, its own model name, the test signing key."""
    flat = {"tracking_uri": server.url, "training.model_name": name or f"atk-{uuid.uuid4().hex[:8]}",
            "registry.signing_key_file": str(keys.signing_file),
            "registry.verify_key_file": str(keys.verify_file), **overrides}
    return load_config(workspace=workspace, environ={}, overrides=flat)


# --------------------------------------------------------------------------- versions
def new_version(client: MlflowClient, name: str, experiment_id: str, content: bytes) -> str:
    """A registered version of ``name`` whose files (``model/MLmodel``, ``model/weights.bin``) are
    logged through the server; the registered model is created on first use."""
    import tempfile

    run = client.create_run(experiment_id, run_name="attack-test-train")
    with tempfile.TemporaryDirectory() as tmp:
        mlmodel = f"artifact_path: model\nflavors: {{}}\nrun_id: {run.info.run_id}\n"
        (Path(tmp) / "MLmodel").write_text(mlmodel)
        (Path(tmp) / "weights.bin").write_bytes(content)
        client.log_artifacts(run.info.run_id, tmp, artifact_path="model")
    client.set_terminated(run.info.run_id)
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    mv = client.create_model_version(name, f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    return str(mv.version)


def files_location(client: MlflowClient, name: str, version: str) -> str:
    """The artifact-root-relative location of the files of ``version`` (what the server serves)."""
    rel = _relative(client.get_model_version_download_uri(name, version))
    assert rel, f"version {version} of {name} is not stored under the proxied artifact root"
    return rel


def sign(client: MlflowClient, cfg: ChurnConfig, version: str, kind: str, decision: str,
         champion: str | None = None, run_id: str = "") -> signing.Decision:
    """Sign a ``kind`` decision about ``version`` of the config's model (stored as its
    ``churn.sig.<kind>`` tag through the guarded server); ``champion``: the version compared with."""
    name = cfg.training.model_name
    champ = client.get_model_version(name, champion) if champion else None
    return signing.record_signed(client, cfg, name, version, kind, decision, champion=champ,
                                 run_id=run_id or f"run-{kind}-{version}", metrics={"auc": 0.7})


def aliases(client: MlflowClient, name: str) -> dict[str, str]:
    return {a: str(v) for a, v in client.get_registered_model(name).aliases.items()}


def signed_kinds(client: MlflowClient, name: str, version: str, verifier: signing.Verifier) -> dict[str, str]:
    """kind -> decision of the signed decisions of ``version`` that verify for it."""
    ev = read_evidence(client, name, version, verifier)
    return {} if ev is None else {k: d.decision for k, d in ev.decisions.items()}


# --------------------------------------------------------------------------- raw REST calls
ENCODINGS = ("object", "string", "query")


def call(server: TrackingServer, method: str, path: str, payload: Any = None, *, encoding: str = "object",
         ui: bool = False, auth: tuple[str, str] | None = None, version: str = "2.0") -> requests.Response:
    """One raw registry call ``/api/<version>/mlflow/<path>`` (``ui``: ``/ajax-api/...``), the
    body ``payload`` sent as a JSON object (``object``), as a JSON string holding that object
    (``string``: what old clients send) or as the query string (``query``, no body)."""
    url = f"{server.url}/{'ajax-api' if ui else 'api'}/{version}/mlflow/{path}"
    kwargs: dict[str, Any] = {"timeout": 60, "auth": auth}
    if encoding == "object":
        kwargs["json"] = payload
    elif encoding == "string":
        kwargs["data"] = json.dumps(json.dumps(payload))
        kwargs["headers"] = {"Content-Type": "application/json"}
    elif encoding == "raw":  # payload is the body text itself
        kwargs["data"] = payload
        kwargs["headers"] = {"Content-Type": "application/json"}
    elif encoding == "query":
        kwargs["params"] = payload
    else:
        raise ValueError(encoding)
    return requests.request(method, url, **kwargs)


def artifact_call(server: TrackingServer, method: str, path: str, body: bytes | None = None,
                  ui: bool = False, auth: tuple[str, str] | None = None) -> requests.Response:
    """``<method> /api/2.0/mlflow-artifacts/artifacts/<path>`` (``ui``: ``/ajax-api/...``)."""
    url = f"{server.url}/{'ajax-api' if ui else 'api'}/2.0/mlflow-artifacts/artifacts/{path}"
    return requests.request(method, url, data=body, timeout=60, auth=auth)


@dataclass
class Legit:
    """What the legitimate setup left: the protected state no keyless call may change."""

    name: str
    versions: dict[int, str]  # 1..5 -> version number
    aliases: dict[str, str]  # alias -> version
    digests: dict[str, str]  # version -> files digest as registered (signed for gated ones)
    locations: dict[str, str]  # version -> artifact-root-relative location of its files
    sig_tags: dict[str, dict[str, str]] = field(default_factory=dict)  # version -> churn.sig.* tags
    experiment_id: str = ""
