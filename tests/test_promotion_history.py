"""Guarded promotion against a real `mlflow server` (PostgreSQL, webhooks) and a real
`churn hooks serve`: alias history (project, REST and reconciled moves; `churn registry history
--at`), unguarded moves (audit run, /metrics, revert), a promotion made in the UI completed by
the receiver, promote refusals / --force signed override, rollback after a promotion. Every
decision is signed by the project's own code (gate recording, canary evaluation, transitions)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

import httpx
import pytest
from guard_support import canary_verdict, gate
from hooks_support import Receiver, register_webhook
from mlflow.tracking import MlflowClient
from serving_support import BATCH_AS_OF, run_cli
from wait_support import wait_until

from mlflow_churn.alerts.receiver import AlertReceiver
from mlflow_churn.config import ChurnConfig
from mlflow_churn.errors import ChurnError
from mlflow_churn.registry.history import RECONCILED, UNKNOWN, read_moves, version_at
from mlflow_churn.registry.promotion import OVERRIDE_TAG, read_evidence
from mlflow_churn.registry.signing import record_signed, verifier_for
from mlflow_churn.serving.prediction_log import PredictionLog, PredictionRecord


@pytest.fixture
def server_cfg(config: ChurnConfig, mlflow_server, monkeypatch) -> ChurnConfig:
    """The test's config pointed at the session's `mlflow server`, with its own model name."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    cfg = config.model_copy(deep=True)
    cfg.training.model_name = f"churn-{uuid.uuid4().hex[:8]}"
    return cfg


def _client(url: str) -> MlflowClient:
    return MlflowClient(url, url)


def _aliases(client: MlflowClient, name: str) -> dict[str, str]:
    return {a: str(v) for a, v in client.get_registered_model(name).aliases.items()}


def _wait(
    what: str, ok: Callable[[], object], receiver: Receiver | None = None, timeout: float = 90
) -> object:
    return wait_until(ok, timeout, what, interval=0.3,
                      detail=(lambda: f"receiver log: {receiver.log()}") if receiver else None)


def _ui_set_alias(url: str, name: str, alias: str, version: str) -> None:
    """What the registry UI sends when a person sets an alias."""
    res = httpx.post(
        f"{url}/ajax-api/2.0/mlflow/registered-models/alias",
        json={"name": name, "alias": alias, "version": version},
        timeout=30,
    )
    assert res.status_code == 200, res.text


def _ui_delete_alias(url: str, name: str, alias: str) -> None:
    res = httpx.request("DELETE", f"{url}/ajax-api/2.0/mlflow/registered-models/alias",
                        json={"name": name, "alias": alias}, timeout=30)
    assert res.status_code == 200, res.text


def _gated(cfg: ChurnConfig, register_version, quality: str = "good", seed: int = 0,
           mirror_stages: bool = False) -> str:
    """A registered version passed through the gate's own recording (signed; alias canary)."""
    version = register_version(cfg, quality, alias=None, seed=seed, mirror_stages=mirror_stages).version
    gate(_client(cfg.mlflow_tracking_uri), cfg, version, passed=True)
    return version


def _first_champion(cfg: ChurnConfig, register_version, mirror_stages: bool = False) -> str:
    """A version gated and promoted as the model's first champion (signed, like `churn demo`)."""
    from mlflow_churn.serving.transitions import promote

    version = _gated(cfg, register_version, mirror_stages=mirror_stages)
    promote(cfg, "first model: passed the absolute floors of the gate", version=version)
    return version


def _audit_runs(client: MlflowClient, cfg: ChurnConfig, name: str):
    """The finished unguarded-promotion audit runs of model ``name`` (a run still being written
    may lack its decision.json)."""
    exp = client.get_experiment_by_name(cfg.registry.audit_experiment)
    if exp is None:
        return []
    return client.search_runs(
        [exp.experiment_id], f"tags.kind = 'unguarded_promotion' and tags.model_name = '{name}' "
        "and attributes.status = 'FINISHED'"
    )


def _counter(receiver: Receiver, alias: str = "champion") -> float:
    for line in receiver.metrics().splitlines():
        if line.startswith(f'churn_hooks_unguarded_promotions_total{{alias="{alias}"}}'):
            return float(line.split()[-1])
    return 0.0


def _history_at(cfg: ChurnConfig, url: str, at: datetime) -> dict:
    res = run_cli(
        cfg,
        ["registry", "history", "--alias", "champion", "--at", at.isoformat(), "--json"],
        MLFLOW_TRACKING_URI=url,
        CHURN_TRAINING__MODEL_NAME=cfg.training.model_name,
    )
    assert res.returncode == 0, res.stderr
    (answer,) = json.loads(res.stdout)["aliases"]
    return answer


@pytest.mark.slow
def test_receiver_history_unguarded_revert_ui_promotion_and_reconcile(
    server_cfg, register_version, mlflow_server, tmp_path
) -> None:
    cfg, url = server_cfg, mlflow_server.url
    name = cfg.training.model_name
    client = _client(url)
    t0 = datetime.now(UTC)
    v1 = _first_champion(cfg, register_version)  # project moves (recorded by it)
    v2 = register_version(cfg, "bad", alias=None, seed=1).version  # never gated
    v3 = register_version(cfg, "good", alias=None, seed=2).version
    # gated (signed, alias canary) before the receiver starts: its reconciliation gates only
    # versions above the champion and the canary that have no gate decision, so it leaves v2
    # (below the canary) and v3 alone instead of racing this test's own moves
    gate(client, cfg, v3, passed=True)
    sink = AlertReceiver()  # a webhook outlet (Alertmanager's webhook payload: firing, then resolved)
    receiver = Receiver(cfg, url, tmp_path / "hooks.log", CHURN_REGISTRY__REVERT_UNGUARDED="true",
                        CHURN_ALERTS__WEBHOOK_URL=sink.url)
    hook_id = register_webhook(client, f"{receiver.url}/webhook")
    try:
        with receiver:
            time.sleep(2)  # MLflow's webhook cache (1 s TTL) sees the new webhook
            t1 = datetime.now(UTC)
            # 1. unguarded: champion -> the ungated v2 over REST: audit run, counter, moved back to v1
            client.set_registered_model_alias(name, "champion", v2)
            (audit,) = _wait(
                "the unguarded_promotion audit run", lambda: _audit_runs(client, cfg, name), receiver
            )
            assert audit.data.tags["rule"] == "not_gated" and audit.data.tags["to_version"] == v2
            assert audit.data.tags["from_version"] == v1 and "decision.json" in {
                a.path for a in client.list_artifacts(audit.info.run_id)
            }
            _wait("the revert", lambda: _aliases(client, name).get("champion") == v1, receiver)
            assert _counter(receiver) == 1.0
            # one alert for the unguarded move, resolved once the revert moved champion back
            _wait("the alert and its resolution", lambda: len(sink.messages) >= 2, receiver)
            fired, cleared = sink.messages[:2]
            assert [fired["status"], cleared["status"]] == ["firing", "resolved"]
            labels = fired["alerts"][0]["labels"]
            assert labels["alertname"] == "UnguardedPromotion" and labels["version"] == v2
            assert fired["alerts"][0]["annotations"]["audit_run_id"] == audit.info.run_id
            t2 = datetime.now(UTC)
            # 2. a promotion in the UI of a canary-passed version: the receiver completes it
            assert canary_verdict(cfg, v3) == "promote"  # the real evaluation signs its verdict
            _ui_set_alias(url, name, "champion", v3)
            after = _wait(
                "previous-champion and canary dropped",
                lambda: (
                    (a := _aliases(client, name)).get("previous-champion") == v1 and "canary" not in a and a
                ),
                receiver,
            )
            assert after == {"champion": v3, "previous-champion": v1}
            run_id = _wait(
                "the transition run", lambda: client.get_model_version(name, v3).tags.get("promote_run_id")
            )
            run = _wait(
                "the transition run's end",
                lambda: (r := client.get_run(run_id)).info.status == "FINISHED" and r,
            )
            assert run.data.tags["kind"] == "canary-promote" and run.data.tags["decision"] == "promoted"
            assert _counter(receiver) == 1.0  # an allowed move is not counted
            # the receiver writes the history here: the completion's moves arrive as deliveries
            _wait("the completion's moves in the history",
                  lambda: len(read_moves(client, name, "canary")) == 4, receiver)
            time.sleep(1)
        t3 = datetime.now(UTC)
        # 3. receiver down and its webhook gone (MLflow delivers nothing, retries nothing): a
        # signed rollback of v3 (as `churn canary rollback` signs it), then by hand
        # previous-champion removed and champion back on v1 (both allowed by it), restart
        client.delete_webhook(hook_id)
        time.sleep(2)  # MLflow's webhook cache (1 s TTL) forgets it
        record_signed(client, cfg, name, v3, "rollback", "rollback",
                      champion=client.get_model_version(name, v1), run_id="", reason="conversion dropped",
                      actor="ops")
        _ui_delete_alias(url, name, "previous-champion")
        _ui_set_alias(url, name, "champion", v1)
        t_down = datetime.now(UTC)
        time.sleep(1)
        hook_id = register_webhook(client, f"{receiver.url}/webhook")
        receiver.start()
        _wait(
            "the reconciled move",
            lambda: any(m.actor == RECONCILED for m in read_moves(client, name, "champion")),
            receiver,
        )
        assert _aliases(client, name)["champion"] == v1  # a rollback is not reverted
        assert _counter(receiver) == 0.0  # a new process
        t4 = datetime.now(UTC)
    finally:
        receiver.stop()
        client.delete_webhook(hook_id)
        sink.close()

    moves = read_moves(client, name, "champion")
    steps = [
        (m.from_version, m.to_version, m.actor if m.actor in (UNKNOWN, RECONCILED) else m.source)
        for m in moves
    ]
    assert steps == [
        (None, v1, "project"),  # before the receiver: the project recorded its own move
        (v1, v2, UNKNOWN),  # from here the receiver records each delivery
        (v2, v1, "webhook"),  # its own revert, with the claim it made in the model tag
        (v1, v3, UNKNOWN),
        (v3, v1, RECONCILED),
    ], steps
    assert moves[2].actor == "churn hooks (revert_unguarded) (claimed)" and moves[2].via == "mlflow-churn"
    assert moves[2].evidence_run_id == audit.info.run_id
    assert [m.position for m in moves] == [1, 2, 3, 4, 5] and all(m.to_ref for m in moves)
    assert len({m.move_key for m in moves}) == len(moves)
    # which version was champion at T: through the CLI, --json
    assert _history_at(cfg, url, t0)["version"] is None
    assert _history_at(cfg, url, t1)["version"] == v1
    assert _history_at(cfg, url, t2)["version"] == v1
    assert _history_at(cfg, url, t3)["version"] == v3
    down = _history_at(cfg, url, t_down)
    assert down["version"] == v3 and down["uncertain"]  # moved while the receiver was down
    final = _history_at(cfg, url, t4)
    assert final["version"] == v1 and not final["uncertain"] and final["move"]["actor"] == RECONCILED
    # previous-champion / canary moves are in the history too
    assert [m.to_version for m in read_moves(client, name, "previous-champion")] == [v1, None]
    canary = read_moves(client, name, "canary")
    assert [(m.from_version, m.to_version) for m in canary] == [
        (None, v1),
        (v1, None),
        (None, v3),
        (v3, None),
    ], [(m.seq, m.from_version, m.to_version, m.source, m.actor, m.moved_at.isoformat(), m.delivery_id)
        for m in read_moves(client, name)]
    listing = run_cli(cfg, ["registry", "history"], MLFLOW_TRACKING_URI=url, CHURN_TRAINING__MODEL_NAME=name)
    assert listing.returncode == 0 and "previous-champion" in listing.stdout and RECONCILED in listing.stdout


@pytest.mark.slow
def test_unguarded_move_without_revert_stays_and_is_counted(
    server_cfg, register_version, mlflow_server, tmp_path
) -> None:
    cfg, url = server_cfg, mlflow_server.url
    name = cfg.training.model_name
    client = _client(url)
    v1 = _first_champion(cfg, register_version)
    v2 = register_version(cfg, "bad", alias=None, seed=1).version
    sink = AlertReceiver()
    alerts = sink.messages
    receiver = Receiver(cfg, url, tmp_path / "hooks.log", CHURN_ALERTS__ALERTMANAGER_URL=sink.api_url)
    hook_id = register_webhook(client, f"{receiver.url}/webhook")
    try:
        with receiver:
            time.sleep(2)
            _ui_set_alias(url, name, "champion", v2)
            (audit,) = _wait("the audit run", lambda: _audit_runs(client, cfg, name), receiver)
            assert audit.data.tags["revert"] == "false" and "reverted_to" not in audit.data.tags
            _wait("the counter", lambda: _counter(receiver) == 1.0, receiver)
            assert "# TYPE churn_hooks_unguarded_promotions_total counter" in receiver.metrics()
            assert _aliases(client, name)["champion"] == v2  # recorded and alerted, not moved back
            (move,) = [m for m in read_moves(client, name, "champion") if m.to_version == v2]
            assert move.from_version == v1 and move.actor == UNKNOWN
            _wait("the alert", lambda: alerts, receiver)
            ((alert,),) = alerts
            assert alert["labels"]["alertname"] == "UnguardedPromotion" and alert["labels"]["version"] == v2
            assert alert["annotations"]["audit_run_id"] == audit.info.run_id
    finally:
        client.delete_webhook(hook_id)
        sink.close()


def _log_canary(cfg: ChurnConfig, version: str, n: int) -> None:
    log = PredictionLog(cfg.prediction_log_url)
    try:
        log.write(
            [
                PredictionRecord(
                    f"r{version}-{i}", i, version, "canary", 0.2, 3.0, "ok", datetime.now(UTC), BATCH_AS_OF
                )
                for i in range(1, n + 1)
            ]
        )
    finally:
        log.close()


@pytest.mark.slow  # among the slowest of make test-fast (churn CLI processes)
def test_promote_refuses_wait_and_few_requests_force_records_override_and_rollback_restores(
    server_cfg, register_version, mlflow_server
) -> None:
    from mlflow_churn.serving.transitions import promote, rollback

    cfg, url = server_cfg, mlflow_server.url
    cfg.evaluation.mirror_stages = True
    name = cfg.training.model_name
    client = _client(url)
    v1 = _first_champion(cfg, register_version, mirror_stages=True)
    v2 = _gated(cfg, register_version, seed=1, mirror_stages=True)
    with pytest.raises(ChurnError, match=r"verdict is 'wait' on 0 logged predictions.*--force"):
        promote(cfg, "looks fine")
    _log_canary(cfg, v2, 40)
    with pytest.raises(ChurnError, match=r"on 40 logged predictions \(canary.min_requests=500\)"):
        promote(cfg, "looks fine")
    # a promote verdict on 40 predictions, but canary.min_requests asks for more
    cfg.serving.min_canary_samples, cfg.canary.min_requests = 40, 41
    with pytest.raises(ChurnError, match=r"is .promote. on 40 logged predictions \(canary.min_requests=41\)"):
        promote(cfg, "looks fine")
    assert _aliases(client, name) == {"champion": v1, "canary": v2}
    # enough requests within every limit: promoted without --force
    cfg.canary.min_requests = 40
    res = promote(cfg, "canary healthy")
    assert not res.noop and _aliases(client, name) == {"champion": v2, "previous-champion": v1}
    assert OVERRIDE_TAG not in client.get_model_version(name, v2).tags
    # rollback after the promotion: champion back on previous-champion in one step, stages mirrored
    env = {
        "MLFLOW_TRACKING_URI": url,
        "CHURN_TRAINING__MODEL_NAME": name,
        "CHURN_EVALUATION__MIRROR_STAGES": "true",
    }
    back = run_cli(cfg, ["canary", "rollback", "--reason", "conversion dropped", "--json"], **env)
    assert back.returncode == 0, back.stderr
    assert json.loads(back.stdout)["after"] == {"champion": v1}
    assert _aliases(client, name) == {"champion": v1}
    stages = {v: client.get_model_version(name, v).current_stage for v in (v1, v2)}
    assert stages == {v1: "Production", v2: "Archived"}
    demoted = client.get_model_version(name, v2).tags
    assert demoted["rolled_back"] == "true" and demoted["rollback_reason"] == "conversion dropped"
    run = client.get_run(demoted["rollback_run_id"])
    assert run.data.tags["rollback_of"] == "champion" and run.data.tags["restored_version"] == v1
    history = [(m.from_version, m.to_version) for m in read_moves(client, name, "champion")]
    assert history == [(None, v1), (v1, v2), (v2, v1)]
    assert version_at(read_moves(client, name), name, "champion", datetime.now(UTC)).version == v1
    # nothing left to roll back
    with pytest.raises(ChurnError, match="no canary to roll back and no previous-champion"):
        rollback(cfg, "again")
    # a new canary without traffic: refused, then --force --reason signs the override
    cfg.serving.min_canary_samples = 500
    v3 = _gated(cfg, register_version, seed=2, mirror_stages=True)
    refused = run_cli(cfg, ["canary", "promote", "--reason", "x"], **env)
    assert (
        refused.returncode == 2
        and "verdict is 'wait'" in refused.stderr
        and "Traceback" not in refused.stderr
    )
    forced = run_cli(
        cfg, ["canary", "promote", "--force", "--reason", "hotfix for the pricing bug", "--json"], **env
    )
    assert forced.returncode == 0, forced.stderr
    assert _aliases(client, name) == {"champion": v3, "previous-champion": v1}
    override = read_evidence(client, name, v3, verifier_for(cfg)).get("override")
    assert override.reason == "hotfix for the pricing bug" and override.champion.startswith(f"{v1}:")
    assert override.run_id == json.loads(forced.stdout)["run_id"]
    run = client.get_run(json.loads(forced.stdout)["run_id"])
    assert run.data.tags["override"] == "hotfix for the pricing bug"
    assert run.data.tags["promotion_rule"] == "override"
    no_reason = run_cli(cfg, ["canary", "promote", "--force"], **env)
    assert no_reason.returncode == 2 and "--reason" in no_reason.stderr
