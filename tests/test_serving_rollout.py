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
from guard_support import aliases, gate, guard_config, guard_server, new_version, set_alias
from mlflow.tracking import MlflowClient
from serving_support import CHURN, BATCH_AS_OF, ServeProcess, cli_env, run_cli, two_versions, wait_ready

from mlflow_churn.config import ChurnConfig, load_config
from mlflow_churn.errors import ChurnError, ConfigError
from mlflow_churn.features.online import open_store
from mlflow_churn.registry.aliases import CHAMPION, move_alias
from mlflow_churn.serving.prediction_log import PredictionLog, PredictionRecord
from mlflow_churn.serving.rollout import STATE_TAG, JudgeOutcome, rollout_state, resume, tick
from mlflow_churn.serving.routing import WEIGHT_TAG

T0 = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
AS_OF = datetime(2026, 5, 1, tzinfo=UTC)
PLAN = [{"weight": 10, "bake": "10m"}, {"weight": 50, "bake": "10m"}, {"pause": True}, {"weight": 100}]


def _cfg(workspace: Path, steps: list[dict], **extra) -> ChurnConfig:
    return load_config(workspace=workspace, environ={},
                       overrides={"canary.steps": steps, "training.model_name": f"ro-{uuid.uuid4().hex[:6]}",
                                  **extra})


def _pair(cfg: ChurnConfig) -> tuple[str, str]:
    """Cheap champion and canary versions (signed gates; the champion a first champion)."""
    client = MlflowClient(cfg.mlflow_tracking_uri, cfg.mlflow_tracking_uri)
    champ = new_version(client, cfg)
    gate(client, cfg, champ, passed=True)
    move_alias(client, cfg.training.model_name, CHAMPION, champ, reason="first champion")
    canary = new_version(client, cfg)
    gate(client, cfg, canary, passed=True)  # alias canary
    return champ, canary


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
        {"weight": 5, "bake": "30m"}, {"weight": 25, "bake": "2h"}, {"weight": 50, "bake": "2h"}, {"pause": True},
        {"weight": 100}]})
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
