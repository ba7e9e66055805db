"""Helpers of the guard tests: a real ``mlflow server --app-name churn-guard`` and cheap
versions whose gate / canary records are written by the project's own recording code."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import requests
from guard_pg_support import make_keys, server_env
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mlflow_churn.config import ChurnConfig, load_config
from mlflow_churn.evaluation.evaluate import _record_verdict
from mlflow_churn.registry.aliases import CHAMPION, alias_version
from mlflow_churn.serving.canary import evaluate_canary
from mlflow_churn.serving.prediction_log import PredictionLog, PredictionRecord
from mlflow_churn.tracking import setup_mlflow
from mlflow_churn.tracking_server import TrackingServer, start_tracking_server

#: business time of the logged canary traffic
TRAFFIC_AS_OF = datetime(2026, 5, 1, tzinfo=UTC)
#: rows per route: above serving.min_canary_samples (default 500)
TRAFFIC_ROWS = 600


#: server url -> (signing key file, verify key file) of the project processes that talk to it
KEYS: dict[str, tuple[Path, Path]] = {}


@contextmanager
def guard_server(root: Path, **churn_env: str) -> Iterator[TrackingServer]:
    """``mlflow server --app-name churn-guard`` on SQLite under ``root``; ``churn_env`` are the
    server's CHURN_* variables (e.g. CHURN_REGISTRY__REQUIRE_APPROVAL="true"). A key pair is
    made under ``root/keys``: the server gets only the verify file."""
    keys = make_keys(root)
    env = server_env(keys, **churn_env)  # the PostgreSQL guard's environment (job runner off)
    server = start_tracking_server(f"sqlite:///{root}/db.sqlite", root / "artifacts", app_name="churn-guard",
                                   env=env, cwd=root, log_path=root / "server.log")
    KEYS[server.url] = (keys.signing_file, keys.verify_file)
    try:
        yield server
    finally:
        KEYS.pop(server.url, None)
        server.stop()


def guard_config(workspace: Path, server: TrackingServer, **overrides) -> ChurnConfig:
    """Config of one test: its own workspace and model name, tracking on ``server``, signing with
    the key pair whose verify key the server holds."""
    sign, verify = KEYS[server.url]
    flat = {"tracking_uri": server.url, "training.model_name": f"guard-{uuid.uuid4().hex[:8]}",
            "registry.signing_key_file": str(sign), "registry.verify_key_file": str(verify), **overrides}
    return load_config(workspace=workspace, environ={}, overrides=flat)


def new_version(client: MlflowClient, cfg: ChurnConfig) -> str:
    """A registered version of ``cfg.training.model_name`` with a small file of its own under
    ``model/`` (its digest is what the gate signs); the registered model is created on first use."""
    name = cfg.training.model_name
    exp_id = setup_mlflow(cfg)
    run = client.create_run(exp_id, run_name="guard-test-train")
    client.log_text(run.info.run_id, f"weights of {run.info.run_id}", "model/booster.txt")
    client.set_terminated(run.info.run_id)
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name)
    mv = client.create_model_version(name, f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    return str(mv.version)


def gate(client: MlflowClient, cfg: ChurnConfig, version: str, passed: bool) -> str:
    """Record a gate decision on ``version`` the way the gate does: a decision run with the
    gate's tags, then ``evaluation.evaluate._record_verdict`` (version tags, the signed gate
    decision over the version's files; ``canary`` alias on a pass)."""
    name = cfg.training.model_name
    champ = alias_version(client, name, CHAMPION)
    champ_v = str(champ.version) if champ else None
    exp_id = setup_mlflow(cfg)
    run = client.create_run(exp_id, run_name=f"gate v{version}", tags={
        "churn.decision": "gate", "gate": "passed" if passed else "rejected",
        "challenger_version": version, "champion_version": champ_v or "none"})
    client.set_terminated(run.info.run_id)
    reasons = [] if passed else ["auc_vs_champion: challenger 0.61 < champion 0.70"]
    metrics = {"challenger_roc_auc": 0.72 if passed else 0.61, "gate_passed": float(passed)}
    _record_verdict(client, cfg, version, passed, reasons, run.info.run_id, champ, metrics)
    return run.info.run_id


def champion_and_canary(cfg: ChurnConfig) -> tuple[str, str]:
    """Cheap champion and canary versions (signed gates; the champion a first champion)."""
    from mlflow_churn.registry.aliases import move_alias

    client = MlflowClient(cfg.mlflow_tracking_uri, cfg.mlflow_tracking_uri)
    champ = new_version(client, cfg)
    gate(client, cfg, champ, passed=True)
    move_alias(client, cfg.training.model_name, CHAMPION, champ, reason="first champion")
    canary = new_version(client, cfg)
    gate(client, cfg, canary, passed=True)  # alias canary
    return champ, canary


def canary_verdict(cfg: ChurnConfig, version: str, rows: int = TRAFFIC_ROWS,
                   canary_status: str = "ok") -> str:
    """Log ``rows`` predictions per route (champion: healthy; canary ``version``: with status
    ``canary_status``) and run the real canary evaluation (which records its verdict on the
    version); the verdict."""
    client = MlflowClient(cfg.mlflow_tracking_uri)
    champ = alias_version(client, cfg.training.model_name, CHAMPION)
    log = PredictionLog(cfg.prediction_log_url)
    t = TRAFFIC_AS_OF
    stamp = uuid.uuid4().hex[:6]
    records = []
    routes = {"canary": version, "champion": str(champ.version) if champ else None}
    for i in range(rows):
        for k, (route, v) in enumerate(routes.items()):
            if v is not None:
                status = canary_status if route == "canary" else "ok"
                score = (i % 100) / 100 if status == "ok" else None
                records.append(PredictionRecord(f"{stamp}-{route}{i}", 2 * i + k, v, route, score, 4.0,
                                                status, datetime.now(UTC), t))
    log.write(records)
    log.close()
    ev = evaluate_canary(cfg, t, since=t - timedelta(hours=1))
    assert ev.canary_version == version, ev
    return ev.verdict


def rest(server: TrackingServer, method: str, path: str, payload: dict, ui: bool = False,
         auth: tuple[str, str] | None = None) -> requests.Response:
    """One raw registry call: ``/api/2.0/mlflow/<path>`` or, with ``ui``, ``/ajax-api/2.0/...``;
    ``auth``: HTTP basic (user, password) for a server that wraps basic-auth."""
    base = "ajax-api" if ui else "api"
    return requests.request(method, f"{server.url}/{base}/2.0/mlflow/{path}", json=payload, timeout=30,
                            auth=auth)


def set_alias(server: TrackingServer, name: str, alias: str, version: str, ui: bool = False,
              auth: tuple[str, str] | None = None) -> requests.Response:
    payload = {"name": name, "alias": alias, "version": version}
    return rest(server, "POST", "registered-models/alias", payload, ui, auth)


def delete_alias(server: TrackingServer, name: str, alias: str, ui: bool = False) -> requests.Response:
    return rest(server, "DELETE", "registered-models/alias", {"name": name, "alias": alias}, ui)


def to_stage(server: TrackingServer, name: str, version: str, stage: str = "Production",
             ui: bool = False) -> requests.Response:
    return rest(server, "POST", "model-versions/transition-stage",
                {"name": name, "version": version, "stage": stage, "archive_existing_versions": False}, ui)


def aliases(client: MlflowClient, name: str) -> dict[str, str]:
    return {a: str(v) for a, v in client.get_registered_model(name).aliases.items()}
