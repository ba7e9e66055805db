"""The canary rollout controller (`churn canary run` / `resume`): the plan in config, the state
on the canary version, the judge's decisions, a real `churn serve` following the weight, two
controllers at once, and the final promotion through a `churn-guard` server."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import mlflow
import pytest
import yaml
from guard_support import (
    aliases,
    champion_and_canary,
    guard_config,
    guard_server,
    set_alias,
)
from mlflow.tracking import MlflowClient
from serving_support import CHURN, ServeProcess, cli_env, two_versions, wait_ready
from wait_support import wait_until

from mlflow_churn.config import ChurnConfig, load_config
from mlflow_churn.errors import ChurnError, ConfigError
from mlflow_churn.features.online import open_store
from mlflow_churn.serving.prediction_log import PredictionLog, PredictionRecord
from mlflow_churn.serving.rollout import STATE_TAG, JudgeOutcome, resume, rollout_state, tick
from mlflow_churn.serving.routing import WEIGHT_TAG, bucket
from mlflow_churn.serving.transitions import promote

T0 = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
AS_OF = datetime(2026, 5, 1, tzinfo=UTC)
PLAN = [{"weight": 10, "bake": "10m"}, {"weight": 50, "bake": "10m"}, {"pause": True}, {"weight": 100}]


def _cfg(workspace: Path, steps: list[dict], **extra) -> ChurnConfig:
    return load_config(workspace=workspace, environ={},
                       overrides={"canary.steps": steps, "training.model_name": f"ro-{uuid.uuid4().hex[:6]}",
                                  **extra})


_pair = champion_and_canary  # cheap champion and canary versions, signed gates


class Judge:
    """An injected judge: says ``verdict`` on ``rows`` per arm; records the calls."""

    def __init__(self) -> None:
        self.verdict, self.rows, self.calls = "pass", {"champion": 100, "canary": 100}, []

    def __call__(self, cfg, as_of, served_since, record) -> JudgeOutcome:
        self.calls.append((served_since, record))
        return JudgeOutcome(self.verdict, [f"injected {self.verdict}"], dict(self.rows))


def _tags(cfg: ChurnConfig, version: str) -> dict[str, str]:
    return MlflowClient(cfg.mlflow_tracking_uri).get_model_version(cfg.training.model_name, version).tags


def _rollout_runs(cfg: ChurnConfig) -> list:
    mlflow.set_tracking_uri(cfg.mlflow_tracking_uri)
    return mlflow.search_runs(search_all_experiments=True, output_format="list", order_by=["start_time ASC"],
                              filter_string=f"tags.kind = 'canary-rollout' and "
                                            f"tags.model_name = '{cfg.training.model_name}'")


def test_plan_is_validated_with_the_step_named(workspace) -> None:
    cfg = load_config(workspace=workspace, environ={})
    assert [(s.weight, s.bake) for s in cfg.canary.steps] == [(10, "30m"), (100, "0s")]
    assert cfg.canary.steps[0].bake_seconds == 1800
    bad = {
        "canary.steps.1": [{"weight": 5, "bake": "30m"}, {"weight": 25, "bake": "2 hours"}],
        "canary.steps.0.weight": [{"weight": 150}],
        "both": [{"weight": 5, "pause": True}, {"weight": 100}],
        "start the plan with a weight step": [{"pause": True}, {"weight": 100}],
        "end the plan": [{"weight": 5, "bake": "1h"}, {"pause": True}],
        "not the last step": [{"weight": 100}, {"weight": 50}],
        "empty": [],
    }
    for needle, steps in bad.items():
        with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
            load_config(workspace=workspace, environ={}, overrides={"canary.steps": steps})
    ok = load_config(workspace=workspace, environ={}, overrides={"canary.steps": [
        {"weight": 5, "bake": "30m"}, {"weight": 25, "bake": "2h"}, {"weight": 50, "bake": "2h"},
        {"pause": True}, {"weight": 100}]})
    assert [s.pause for s in ok.canary.steps] == [False, False, False, True, False]


def test_bake_min_counts_marginal_pause_resume_and_refused_promotion(workspace) -> None:
    cfg = _cfg(workspace, PLAN, **{"canary.min_requests": 50})
    champ, canary = _pair(cfg)
    judge = Judge()
    res = tick(cfg, T0, judge, as_of=AS_OF)
    assert res.action == "start" and res.state.step == 0 and res.state.weight == 10
    assert _tags(cfg, canary)[WEIGHT_TAG] == "10"
    # the bake is not over: no advance on a pass
    res = tick(cfg, T0 + timedelta(minutes=5), judge, as_of=AS_OF)
    assert res.action == "wait" and "baking" in res.message and res.state.step == 0
    assert judge.calls[-1] == (T0, False)  # the step's own traffic, nothing recorded
    # baked, but an arm short of canary.min_requests, then too little data for the judge
    judge.rows = {"champion": 400, "canary": 49}
    res = tick(cfg, T0 + timedelta(minutes=11), judge, as_of=AS_OF)
    assert res.action == "wait" and "canary.min_requests=50" in res.message and "canary 49" in res.message
    judge.rows, judge.verdict = {"champion": 400, "canary": 60}, "insufficient"
    assert tick(cfg, T0 + timedelta(minutes=11), judge, as_of=AS_OF).action == "wait"
    judge.verdict = "pass"
    t1 = T0 + timedelta(minutes=12)
    res = tick(cfg, t1, judge, as_of=AS_OF)
    assert res.action == "advance" and res.state.step == 1 and res.state.weight == 50
    assert res.state.step_started_at == t1 and _tags(cfg, canary)[WEIGHT_TAG] == "50"
    # marginal during the bake changes nothing; after it, the rollout pauses
    judge.verdict = "marginal"
    assert tick(cfg, t1 + timedelta(minutes=1), judge, as_of=AS_OF).action == "wait"
    res = tick(cfg, t1 + timedelta(minutes=11), judge, as_of=AS_OF)
    assert res.action == "pause" and res.state.status == "paused" and "marginal" in res.state.paused_reason
    judge.verdict = "pass"
    res = tick(cfg, t1 + timedelta(minutes=30), judge, as_of=AS_OF)
    assert res.action == "paused" and res.state.step == 1  # a pass does not unpause
    # resume restarts the same step: bake and counts from the resume
    t2 = t1 + timedelta(minutes=31)
    res = resume(cfg, t2, "looked at the scores")
    assert res.action == "resume" and res.state.status == "running" and res.state.step == 1
    assert res.state.step_started_at == t2
    assert tick(cfg, t2 + timedelta(minutes=5), judge, as_of=AS_OF).action == "wait"
    # pass after the bake: the plan's pause step (weight stays)
    res = tick(cfg, t2 + timedelta(minutes=11), judge, as_of=AS_OF)
    assert res.action == "pause" and res.state.step == 2 and res.state.weight == 50
    assert res.state.paused_reason == "plan pause at step 2"
    res = resume(cfg, t2 + timedelta(minutes=12))
    assert res.state.step == 3 and res.state.status == "running" and res.state.weight == 50
    with pytest.raises(ChurnError, match="only a paused rollout can be resumed"):
        resume(cfg, t2 + timedelta(minutes=12))
    # the end of the plan: an injected pass is no signed canary verdict -> the promotion is refused
    res = tick(cfg, t2 + timedelta(minutes=13), judge, as_of=AS_OF)
    assert judge.calls[-1] == (t2 + timedelta(minutes=12), True)  # asked to record before promoting
    assert res.action == "blocked" and res.state.status == "paused"
    assert "promotion refused" in res.state.paused_reason and "cannot promote" in res.state.paused_reason
    assert aliases(MlflowClient(cfg.mlflow_tracking_uri), cfg.training.model_name) == \
        {"champion": champ, "canary": canary}
    # the state lives on the version, not in this process
    version, state = rollout_state(cfg)
    assert version == canary and state.step == 3 and state.status == "paused"
    assert [h["action"] for h in state.history] == ["start", "advance", "pause", "resume", "pause", "resume",
                                                    "blocked"]
    runs = _rollout_runs(cfg)
    assert [r.data.tags["decision"] for r in runs] == [h["action"] for h in state.history]
    path = MlflowClient(cfg.mlflow_tracking_uri).download_artifacts(runs[1].info.run_id, "decision.json")
    decision = json.loads(Path(path).read_text())
    assert decision["judge"]["verdict"] == "pass" and decision["judge"]["rows"]["canary"] == 60
    assert decision["state"]["step"] == 1
    artifacts = {a.path for a in MlflowClient(cfg.mlflow_tracking_uri).list_artifacts(runs[-1].info.run_id)}
    assert {"decision.json", "rollout.png"} <= artifacts


def test_a_weight_tag_set_by_hand_routes_nobody(workspace) -> None:
    """Threat: a user with write access to the registry and no signing key sets the canary's
    churn.rollout.weight (100: every customer on a version no judge passed). The service routes
    with a weight only when its signed rollout decision verifies for this version and this
    value; the controller puts a changed tag right on its next tick."""
    from mlflow_churn.serving.models import ModelManager
    from mlflow_churn.web.metrics import Metrics

    cfg = _cfg(workspace, PLAN)
    _champ, canary = _pair(cfg)
    client, name = MlflowClient(cfg.mlflow_tracking_uri), cfg.training.model_name
    metrics = Metrics()
    manager = ModelManager(cfg, metrics)
    client.set_model_version_tag(name, canary, WEIGHT_TAG, "100")  # the tag alone
    assert manager.reload().canary_weight is None  # serving.canary_fraction routes
    assert tick(cfg, T0, Judge(), as_of=AS_OF).action == "start"  # signs step 0's weight
    assert "churn.sig.rollout" in _tags(cfg, canary)
    assert manager.reload().canary_weight == pytest.approx(0.10)
    client.set_model_version_tag(name, canary, WEIGHT_TAG, "100")  # the signature names 10
    assert manager.reload().canary_weight is None
    assert metrics.counter("churn_rollout_weight_refused_total", {"version": canary}) >= 1
    assert tick(cfg, T0 + timedelta(minutes=1), Judge(), as_of=AS_OF).action == "wait"
    assert _tags(cfg, canary)[WEIGHT_TAG] == "10" and manager.reload().canary_weight == pytest.approx(0.10)


def test_fail_rolls_back_at_once(workspace) -> None:
    cfg = _cfg(workspace, [{"weight": 20, "bake": "1h"}, {"weight": 100}])
    champ, canary = _pair(cfg)
    judge = Judge()
    assert tick(cfg, T0, judge, as_of=AS_OF).action == "start"
    judge.verdict = "fail"
    res = tick(cfg, T0 + timedelta(minutes=1), judge, as_of=AS_OF)  # inside the bake
    assert res.action == "rollback" and res.transition_run_id and res.state.status == "rolled_back"
    assert aliases(MlflowClient(cfg.mlflow_tracking_uri), cfg.training.model_name) == {"champion": champ}
    tags = _tags(cfg, canary)
    assert tags["rolled_back"] == "true" and tags[WEIGHT_TAG] == "0" and "churn.sig.rollback" in tags
    assert json.loads(tags[STATE_TAG])["status"] == "rolled_back"
    assert tick(cfg, T0 + timedelta(minutes=2), judge, as_of=AS_OF).action == "idle"


# --------------------------------------------------------------------------- real processes
def _file_config(workspace: Path, flat: dict) -> ChurnConfig:
    """``flat`` (dotted keys) written to ``<workspace>/churn.yaml``, the file the subprocesses
    read too (CHURN_CONFIG), and loaded."""
    tree: dict = {}
    for dotted, value in flat.items():
        node = tree
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    path = workspace / "churn.yaml"
    path.write_text(yaml.safe_dump(tree))
    return load_config(path, workspace, environ={})


def _log_traffic(cfg: ChurnConfig, versions: dict[str, str], rows: int) -> None:
    """``rows`` healthy predictions per route, served now, into the real prediction log."""
    log = PredictionLog(cfg.prediction_log_url)
    stamp, now = uuid.uuid4().hex[:6], datetime.now(UTC)
    log.write([PredictionRecord(f"{stamp}-{route}{i}", 2 * i + k, version, route, (i % 100) / 100, 4.0, "ok",
                                now, AS_OF)
               for i in range(rows) for k, (route, version) in enumerate(versions.items())])
    log.close()


@pytest.mark.slow  # three `churn` processes
def test_two_controllers_at_once_one_acts_and_a_restarted_one_goes_on(workspace, churn_main) -> None:
    cfg = _file_config(workspace, {
        "training.model_name": f"ro-{uuid.uuid4().hex[:6]}", "serving.min_canary_samples": 50,
        "canary.steps": [{"weight": 20, "bake": "1s"}, {"weight": 50, "bake": "1h"}, {"weight": 100}]})
    champ, canary = _pair(cfg)
    start = tick(cfg, datetime.now(UTC), as_of=AS_OF)  # the real judge from here on
    assert start.action == "start"
    _log_traffic(cfg, {"champion": champ, "canary": canary}, 80)
    while datetime.now(UTC) < start.state.step_started_at + timedelta(seconds=1.2):
        time.sleep(0.1)
    env = cli_env(cfg, CHURN_CONFIG=str(workspace / "churn.yaml"))
    args = CHURN + ["canary", "run", "--once", "--json", "--as-of", AS_OF.isoformat()]
    procs = [subprocess.Popen(args, env=env, cwd=workspace, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1] for o in outs]
    results = [json.loads(o[0]) for o in outs]
    assert sorted(r["action"] for r in results) == ["advance", "wait"], results
    waited = next(r for r in results if r["action"] == "wait")
    assert waited["state"]["step"] == 1 and "baking" in waited["message"]  # it saw the other's step
    _, state = rollout_state(cfg)
    assert state.step == 1 and state.weight == 50 and state.status == "running"
    assert [r.data.tags["decision"] for r in _rollout_runs(cfg)] == ["start", "advance"]
    advance = next(r for r in results if r["action"] == "advance")
    assert advance["judge"]["verdict"] == "pass"
    assert advance["judge"]["rows"] == {"champion": 80, "canary": 80}
    # a controller started again later finds the same step (the state is on the version)
    base = ["--config", str(workspace / "churn.yaml"), "--workspace", str(workspace), "canary"]
    res = churn_main([*base, "run", "--once", "--json", "--as-of", AS_OF.isoformat()])
    assert res.returncode == 0, res.stderr
    again = json.loads(res.stdout)
    assert again["action"] == "wait" and again["state"]["step"] == 1
    assert again["state"]["step_started_at"] == state.step_started_at.isoformat()
    res = churn_main([*base, "status", "--json"])
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["rollout"]["step"] == 1
    res = churn_main([*base, "resume"])
    assert res.returncode == 2 and "only a paused rollout can be resumed" in res.stderr
    res = churn_main([*base, "run", "--every", "soon"])
    assert res.returncode == 2 and "--every must be a duration" in res.stderr


def _score_all(url: str, ids: list[int]) -> None:
    with httpx.Client(base_url=url, timeout=60) as client:
        for start in range(0, len(ids), 100):
            res = client.post("/predict", json={"customer_ids": ids[start:start + 100]})
            assert res.status_code == 200, res.text


def _wait_fraction(url: str, fraction: float, timeout: float = 120.0) -> None:
    """Until the running service routes with ``fraction`` (its next alias reload)."""
    def routed() -> bool:
        return abs(httpx.get(f"{url}/health", timeout=10).json()["canary_fraction"] - fraction) < 1e-9

    wait_until(routed, timeout, f"the service to route {fraction} to the canary", interval=0.2)


def _canary_ids(cfg: ChurnConfig, since: datetime) -> tuple[set[int], int]:
    """Customers the canary route served since ``since``, and all rows since then."""
    log = PredictionLog(cfg.prediction_log_url)
    frame = log.read()
    log.close()
    frame = frame[frame["served_at"] >= since]
    return set(frame.loc[frame["route"] == "canary", "customer_id"].astype(int)), len(frame)


def _until(moment: datetime) -> None:
    while datetime.now(UTC) < moment:
        time.sleep(0.1)


@pytest.mark.slow  # a churn-guard server, a churn serve process, two trained versions
def test_a_real_service_follows_the_plan_and_the_guard_accepts_only_the_judged_promotion(
        tmp_path, register_version, churn_main) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    with guard_server(tmp_path / "server", CHURN_WORKSPACE=str(ws)) as server:
        base = guard_config(ws, server)
        cfg = _file_config(ws, {
            "tracking_uri": server.url, "training.model_name": base.training.model_name,
            "registry.signing_key_file": str(base.registry.signing_key_file),
            "registry.verify_key_file": str(base.registry.verify_key_file),
            "serving.reload_seconds": 0.3, "serving.min_canary_samples": 100, "serving.max_p99_ms": 60000,
            "canary.steps": [{"weight": 20, "bake": "2s"}, {"weight": 50, "bake": "1s"}, {"pause": True},
                             {"weight": 100}]})
        name = cfg.training.model_name
        champ, canary = two_versions(cfg, register_version)
        store = open_store(cfg)
        ids = [int(i) for i in store.customer_ids()]
        store.close()
        client = MlflowClient(server.url, server.url)
        with ServeProcess(cfg, CHURN_CONFIG=str(ws / "churn.yaml")) as srv:
            with httpx.Client(base_url=srv.url, timeout=30) as http:
                wait_ready(http, timeout=180)
            start = tick(cfg, datetime.now(UTC))
            assert start.action == "start" and start.state.weight == 20
            _wait_fraction(srv.url, 0.2)  # no restart: the next alias reload
            t0 = start.state.step_started_at
            assert tick(cfg, t0 + timedelta(seconds=1)).action == "wait"  # baking
            _score_all(srv.url, ids)
            served, rows = _canary_ids(cfg, t0)
            assert rows == len(ids)
            # sticky by customer: exactly the customers whose hash falls below the step's weight
            assert served == {i for i in ids if bucket(i, cfg.serving.routing_salt) < 0.2}
            _until(t0 + timedelta(seconds=2.2))
            res = tick(cfg, datetime.now(UTC))
            assert res.action == "advance" and res.state.weight == 50, res.message
            assert res.judge.verdict == "pass"
            _wait_fraction(srv.url, 0.5)
            t1 = res.state.step_started_at
            _until(t1 + timedelta(seconds=1.2))
            res = tick(cfg, datetime.now(UTC))  # baked, but no traffic since the step started
            assert res.action == "wait" and "canary.min_requests=100" in res.message
            _score_all(srv.url, ids)
            served, _ = _canary_ids(cfg, t1)
            assert served == {i for i in ids if bucket(i, cfg.serving.routing_salt) < 0.5}
            res = tick(cfg, datetime.now(UTC))
            assert res.action == "pause" and res.state.step == 2 and res.state.weight == 50, res.message
            # nothing signed a pass the guard would take: a champion move now is refused
            refused = set_alias(server, name, "champion", canary)
            assert refused.status_code in (400, 403), refused.text
            # nor does an in-process promotion on that unrecorded pass: only a signed verdict counts
            assert res.judge.evaluation.verdict == "promote" and res.judge.evaluation.run_id is None
            with pytest.raises(ChurnError, match="no signed canary decision"):
                promote(cfg, "by hand, before the plan ends", version=canary, evidence=res.judge.evaluation)
            assert aliases(client, name) == {"champion": champ, "canary": canary}
            # a controller started now finds the pause; resume goes on to the promotion step
            base = ["--config", str(ws / "churn.yaml"), "--workspace", str(ws), "canary"]
            out = churn_main([*base, "run", "--once", "--json"])
            assert out.returncode == 0, out.stderr
            assert json.loads(out.stdout)["action"] == "paused"
            out = churn_main([*base, "resume", "--reason", "scores look fine", "--json"])
            assert out.returncode == 0, out.stderr
            resumed = json.loads(out.stdout)["state"]
            assert resumed["step"] == 3 and resumed["status"] == "running" and resumed["weight"] == 50
            _score_all(srv.url, ids)
            res = tick(cfg, datetime.now(UTC))
            assert res.action == "promote", res.message
            assert aliases(client, name) == {"champion": canary, "previous-champion": champ}
            assert res.state.status == "promoted" and res.transition_run_id
            # the guard checked the move on the judge's signed verdict
            tags = client.get_model_version(name, canary).tags
            assert "churn.sig.canary" in tags and tags["promote_run_id"] == res.transition_run_id
            promoted = client.get_run(res.transition_run_id)
            assert promoted.data.tags["decision"] == "promoted"
            runs = _rollout_runs(cfg)
            assert [r.data.tags["decision"] for r in runs] == ["start", "advance", "pause", "resume",
                                                              "promote"]
            assert runs[-1].data.tags["judge_verdict"] == "pass"
            assert tick(cfg, datetime.now(UTC)).action == "idle"


def test_the_scheduler_canary_job_is_one_tick(workspace) -> None:
    from mlflow_churn.scheduler.jobs import run_job
    from mlflow_churn.scheduler.runs import list_runs

    cfg = _file_config(workspace, {"training.model_name": f"ro-{uuid.uuid4().hex[:6]}",
                                   "canary.steps": [{"weight": 30, "bake": "1h"}, {"weight": 100}]})
    assert not cfg.scheduler.canary.enabled  # opt-in: it moves aliases
    assert run_job("canary", str(workspace), str(workspace / "churn.yaml")) == "ok"
    [run] = list_runs(cfg.scheduler_store_url, "canary")
    assert run.detail.startswith("idle: ") and run.run_id is None  # no canary yet
    _, canary = _pair(cfg)
    assert run_job("canary", str(workspace), str(workspace / "churn.yaml")) == "ok"
    run = list_runs(cfg.scheduler_store_url, "canary")[-1]
    assert run.detail.startswith("start: ") and run.run_id
    _, state = rollout_state(cfg)
    assert state.step == 0 and state.weight == 30 and _tags(cfg, canary)[WEIGHT_TAG] == "30"


def test_a_marginal_recorded_verdict_at_the_end_pauses_instead_of_promoting(workspace) -> None:
    cfg = _cfg(workspace, [{"weight": 10}, {"weight": 100}], **{"canary.min_requests": 5})
    champ, canary = _pair(cfg)

    def judge(cfg, as_of, served_since, record) -> JudgeOutcome:  # passes until asked to record
        verdict = "marginal" if record else "pass"
        return JudgeOutcome(verdict, [f"injected {verdict}"], {"champion": 10, "canary": 10})

    assert tick(cfg, T0, judge, as_of=AS_OF).action == "start"
    res = tick(cfg, T0 + timedelta(seconds=1), judge, as_of=AS_OF)
    assert res.action == "pause" and res.state.status == "paused" and res.judge.verdict == "marginal"
    assert aliases(MlflowClient(cfg.mlflow_tracking_uri), cfg.training.model_name) == \
        {"champion": champ, "canary": canary}
