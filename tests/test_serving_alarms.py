"""Rollout alarms (canary.alarms, mlflow_churn.serving.alarms): a breach over the last window of
the real prediction log rolls the canary back mid-bake, records the alarm on the step change's
run and raises ChurnCanaryAlarm to a real receiver (resolved when the next rollout starts); no
alarm below min_requests; a healthy canary never alarms; a real `churn serve` whose canary
fails is rolled back by the controller's alarm."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from guard_support import aliases, champion_and_canary, gate, new_version
from mlflow.tracking import MlflowClient
from serving_support import BATCH_AS_OF, ServeProcess, wait_ready
from wait_support import wait_until

from mlflow_churn.alerts import stop_sender
from mlflow_churn.alerts.receiver import AlertReceiver
from mlflow_churn.config import ChurnConfig, load_config
from mlflow_churn.errors import ConfigError
from mlflow_churn.features.materialize import materialize
from mlflow_churn.features.online import open_store
from mlflow_churn.registry.aliases import CHAMPION, move_alias
from mlflow_churn.serving.alarms import ALERT_NAME, check_alarms
from mlflow_churn.serving.prediction_log import PredictionLog, PredictionRecord
from mlflow_churn.serving.rollout import STATE_TAG, JudgeOutcome, rollout_state, tick
from mlflow_churn.serving.routing import WEIGHT_TAG
from mlflow_churn.training.model import load_scorer

AS_OF = datetime(2026, 5, 1, tzinfo=UTC)


def _cfg(workspace: Path, **extra) -> ChurnConfig:
    return load_config(workspace=workspace, environ={}, overrides={
        "training.model_name": f"al-{uuid.uuid4().hex[:6]}", "canary.steps": [{"weight": 20, "bake": "1h"},
                                                                              {"weight": 100}],
        "canary.alarms.min_requests": 50, **extra})


_pair = champion_and_canary  # cheap champion and canary versions, signed gates


def _serve(cfg: ChurnConfig, route: str, version: str, n: int, status: str = "ok", latency_ms: float = 4.0,
           score=lambda i: (i % 100) / 100, forced: bool = False) -> None:
    """``n`` rows served now by ``route`` / ``version`` into the real prediction log
    (``forced``: test requests routed by the X-Churn-Route header)."""
    log = PredictionLog(cfg.prediction_log_url)
    stamp, now = uuid.uuid4().hex[:6], datetime.now(UTC)
    log.write([PredictionRecord(f"{stamp}-{i}", i, version, route, score(i) if status == "ok" else None,
                                latency_ms, status, now, AS_OF, forced=forced) for i in range(n)])
    log.close()


class Judge:
    """An injected judge that always passes; counts its calls (an alarm never asks it)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, cfg, as_of, served_since, record) -> JudgeOutcome:
        self.calls += 1
        return JudgeOutcome("pass", ["injected pass"], {"champion": 1000, "canary": 1000})


def _alarm_alerts(rx: AlertReceiver, status: str) -> list[dict]:
    return [a for a in rx.alerts if a["labels"].get("alertname") == ALERT_NAME and a["status"] == status]


def test_an_alarm_rolls_back_mid_bake_records_it_and_alerts_until_the_next_rollout(workspace) -> None:
    with AlertReceiver() as rx:
        cfg = _cfg(workspace, **{"alerts.webhook_url": rx.url})
        try:
            champ, canary = _pair(cfg)
            judge = Judge()
            start = tick(cfg, datetime.now(UTC), judge, as_of=AS_OF)
            assert start.action == "start" and start.state.weight == 20
            # below canary.alarms.min_requests an all-failing canary is NODATA, never a breach
            _serve(cfg, "champion", champ, 200)
            _serve(cfg, "canary", canary, 40, status="error")
            res = tick(cfg, datetime.now(UTC), judge, as_of=AS_OF)
            assert res.action == "wait" and "baking" in res.message
            states = {a.metric: a.state for a in res.alarms.alarms}
            assert states == {"error_rate": "nodata", "p99_latency_ms": "nodata", "mean_score": "off",
                              "score_psi": "nodata"}, states
            assert res.alarms.rows == {"champion": 200, "canary": 40}
            # 20 more failures: 60 of 60 canary rows fail, the champion's none -> rolled back mid-bake
            _serve(cfg, "canary", canary, 20, status="error")
            calls = judge.calls
            res = tick(cfg, datetime.now(UTC), judge, as_of=AS_OF)
            assert res.action == "rollback", res.message
            assert judge.calls == calls  # no judge asked
            assert "alarm" in res.message and "error rate 1.0000 (60 of 60)" in res.message
            assert res.state.status == "rolled_back" and res.state.weight == 0 and res.transition_run_id
            client = MlflowClient(cfg.mlflow_tracking_uri)
            name = cfg.training.model_name
            assert aliases(client, name) == {"champion": champ}
            tags = client.get_model_version(name, canary).tags
            assert tags["rolled_back"] == "true" and tags[WEIGHT_TAG] == "0" and "churn.sig.rollback" in tags
            assert json.loads(tags[STATE_TAG])["history"][-1]["alarm"] == "error_rate"
            # the step change's run records the alarm: metric, value, limit, the arms' counts
            run = client.get_run(res.run_id)
            assert run.data.tags["decision"] == "rollback" and run.data.tags["alarm"] == "error_rate"
            m = run.data.metrics
            assert m["alarm_error_rate_value"] == 1.0 and m["alarm_error_rate_limit"] == pytest.approx(0.05)
            assert m["alarm_error_rate_breach"] == 1.0 and m["alarm_canary_rows"] == 60
            assert m["alarm_champion_rows"] == 200 and m["alarm_canary_errors"] == 60
            decision = json.loads(Path(client.download_artifacts(res.run_id, "decision.json")).read_text())
            assert decision["alarms"]["breaches"] == ["error_rate"]
            assert decision["alarms"]["rows"] == {"champion": 200, "canary": 60}
            # the transition run carries the alarm check as its evidence
            transition = client.get_run(res.transition_run_id)
            assert transition.data.tags["evidence"] == "rollback"
            assert transition.data.metrics["canary_error_rate"] == 1.0
            # the alert reached a real receiver, labelled model, version, metric
            firing = rx.wait_for(lambda r: _alarm_alerts(r, "firing"), timeout=60)
            assert firing, rx.alerts
            labels = firing[0]["labels"]
            assert (labels["model"], labels["version"], labels["metric"]) == (name, canary, "error_rate")
            assert labels["severity"] == "critical" and "rolled back" in firing[0]["annotations"]["summary"]
            assert firing[0]["annotations"]["limit"] == "0.05"
            assert tick(cfg, datetime.now(UTC), judge, as_of=AS_OF).action == "idle"
            # the next rollout resolves it
            nxt = new_version(client, cfg)
            gate(client, cfg, nxt, passed=True)
            assert tick(cfg, datetime.now(UTC), judge, as_of=AS_OF).action == "start"
            resolved = rx.wait_for(lambda r: _alarm_alerts(r, "resolved"), timeout=60)
            assert resolved and resolved[0]["labels"]["version"] == canary, rx.alerts
        finally:
            stop_sender(cfg, wait=5)


def test_a_healthy_canary_never_alarms_and_a_slow_one_does(workspace, churn_main) -> None:
    name = f"al-{uuid.uuid4().hex[:6]}"
    path = workspace / "churn.yaml"  # a file: `churn canary status` reads it too
    path.write_text(f"training:\n  model_name: {name}\ncanary:\n  steps: [{{weight: 20, bake: 1h}}, "
                    "{weight: 100}]\n  alarms: {min_requests: 50, max_p99_ms: 50}\n")
    cfg = load_config(path, workspace, environ={})
    champ, canary = _pair(cfg)
    judge = Judge()
    assert tick(cfg, datetime.now(UTC), judge, as_of=AS_OF).action == "start"
    for _ in range(3):  # healthy traffic, tick after tick: baking, every alarm ok
        _serve(cfg, "champion", champ, 400)
        _serve(cfg, "canary", canary, 100, latency_ms=6.0)
        res = tick(cfg, datetime.now(UTC), judge, as_of=AS_OF)
        assert res.action == "wait" and "baking" in res.message, res.message
        assert {a.metric: a.state for a in res.alarms.alarms} == {
            "error_rate": "ok", "p99_latency_ms": "ok", "mean_score": "off", "score_psi": "ok"}
    assert res.alarms.rows == {"champion": 1200, "canary": 300}
    assert res.to_dict()["alarms"]["breaches"] == []
    # `churn canary status` shows what the next tick checks
    base = ["--config", str(path), "--workspace", str(workspace), "canary", "status"]
    out = churn_main([*base, "--json"])
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)["alarms"]
    assert shown["rows"] == {"champion": 1200, "canary": 300} and shown["breaches"] == []
    assert {a["metric"]: a["state"] for a in shown["alarms"]}["error_rate"] == "ok"
    out = churn_main(base)
    assert "alarms over the last 5m: error_rate ok (0, limit 0.05)" in out.stdout, out.stdout
    # a slow canary: p99 past max_p99_ms and 3 x the champion's
    _serve(cfg, "canary", canary, 100, latency_ms=400.0)
    res = tick(cfg, datetime.now(UTC), judge, as_of=AS_OF)
    assert res.action == "rollback", res.message
    assert [a.metric for a in res.alarms.breaches] == ["p99_latency_ms"]
    assert "p99 latency 400.0 ms > 50.0 ms" in res.message
    _, state = rollout_state(cfg)
    assert state is None  # no canary any more
    tags = MlflowClient(cfg.mlflow_tracking_uri).get_model_version(cfg.training.model_name, canary).tags
    assert json.loads(tags[STATE_TAG])["status"] == "rolled_back"


def test_shadow_mode_alarms_on_the_shadow_rows_and_forced_test_requests_count_for_nothing(workspace) -> None:
    cfg = _cfg(workspace, **{"canary.mode": "shadow"})
    champ, canary = _pair(cfg)
    judge = Judge()
    assert tick(cfg, datetime.now(UTC), judge, as_of=AS_OF).action == "start"
    _serve(cfg, "champion", champ, 300)
    _serve(cfg, "canary", canary, 100, status="error", forced=True)  # header-routed tests: no evidence
    _serve(cfg, "shadow", canary, 100)
    res = tick(cfg, datetime.now(UTC), judge, as_of=AS_OF)
    assert res.action == "wait" and res.alarms.rows == {"champion": 300, "canary": 100}
    assert res.alarms.breaches == []
    _serve(cfg, "shadow", canary, 100, status="error")  # the shadow canary fails half its scorings
    res = tick(cfg, datetime.now(UTC), judge, as_of=AS_OF)
    assert res.action == "rollback" and [a.metric for a in res.alarms.breaches] == ["error_rate"], res.message
    assert "error rate 0.5000 (100 of 200)" in res.message


def _rows(n: int, status: str = "ok", latency_ms: float = 4.0,
          scores: np.ndarray | None = None) -> pd.DataFrame:
    """``n`` prediction-log rows of one arm (the columns the alarms read)."""
    scores = scores if scores is not None else np.linspace(0.01, 0.99, n)
    return pd.DataFrame({"status": [status] * n, "latency_ms": [latency_ms] * n,
                         "score": scores if status == "ok" else np.full(n, np.nan)})


def test_check_alarms_limits_against_the_champion_and_the_counts(workspace) -> None:
    cfg = load_config(workspace=workspace, environ={}, overrides={
        "canary.alarms.min_requests": 100, "canary.alarms.max_p99_ms": 50,
        "canary.alarms.score_min_mean": 0.1, "canary.alarms.score_max_mean": 0.6})

    def states(champion: pd.DataFrame, canary: pd.DataFrame) -> dict[str, str]:
        return {a.metric: a.state for a in check_alarms(cfg, champion, canary)[1]}

    healthy = pd.concat([_rows(190), _rows(10, "error")])  # 5 % errors
    assert set(states(_rows(1000), healthy).values()) == {"ok"}
    # errors above 5 % but within the margin of a champion that fails as much: not the canary's
    bad = pd.concat([_rows(180), _rows(20, "error")])  # 10 %
    assert states(_rows(1000), bad)["error_rate"] == "breach"
    assert states(pd.concat([_rows(900), _rows(100, "error")]), bad)["error_rate"] == "ok"
    # a slow host slows both arms: 3 x the champion's p99 is the limit
    assert states(_rows(1000, latency_ms=20), _rows(200, latency_ms=80))["p99_latency_ms"] == "breach"
    assert states(_rows(1000, latency_ms=40), _rows(200, latency_ms=80))["p99_latency_ms"] == "ok"
    # scores: a shifted distribution (PSI), a mean outside the limits
    high = np.linspace(0.7, 0.99, 200)
    got = states(_rows(1000), _rows(200, scores=high))
    assert got["score_psi"] == "breach" and got["mean_score"] == "breach"
    _, alarms, psi = check_alarms(cfg, _rows(1000), _rows(200, scores=np.linspace(0.01, 0.2, 200)))
    assert {a.metric: a.state for a in alarms}["mean_score"] == "ok" and psi > 0.5
    # min_requests: 99 failing rows are NODATA; an empty champion leaves the absolute limits only
    assert set(states(_rows(1000), _rows(99, "error")).values()) == {"nodata"}
    got = states(_rows(0), _rows(100, "error"))
    assert got["error_rate"] == "breach" and got["score_psi"] == "nodata"


def test_alarm_settings_are_validated(tmp_path) -> None:
    for overrides, needle in (({"canary.alarms.window": "soon"}, "canary.alarms.window must be a duration"),
                              ({"canary.alarms.score_min_mean": 0.5, "canary.alarms.score_max_mean": 0.2},
                               "score_min_mean 0.5 > score_max_mean"),
                              ({"canary.alarms.max_p99_ratio": 0.5}, "max_p99_ratio")):
        with pytest.raises(ConfigError, match=needle):
            load_config(workspace=tmp_path, environ={}, overrides=overrides)


# --------------------------------------------------------------------------- a real service
def _wait(predicate, what: str, timeout: float = 120.0) -> None:
    wait_until(predicate, timeout, what, interval=0.2)


@pytest.mark.slow  # a churn serve process, two trained versions
def test_a_real_service_whose_canary_fails_is_rolled_back_by_the_alarm(workspace, register_version) -> None:
    with AlertReceiver() as rx:
        cfg = _cfg(workspace, **{"alerts.webhook_url": rx.url, "serving.reload_seconds": 0.3,
                                 "canary.steps": [{"weight": 50, "bake": "1h"}, {"weight": 100}]})
        (workspace / "churn.yaml").write_text(
            f"training:\n  model_name: {cfg.training.model_name}\nserving:\n  reload_seconds: 0.3\n")
        client = MlflowClient(cfg.mlflow_tracking_uri, cfg.mlflow_tracking_uri)
        name = cfg.training.model_name
        champ = str(register_version(cfg, quality="good", alias=None, seed=0).version)
        gate(client, cfg, champ, passed=True)
        move_alias(client, name, CHAMPION, champ, reason="first champion")
        # the canary needs monthly_usage_v2, which the clients' records (the champion's set) lack
        canary = str(register_version(cfg, quality="good", alias=None, seed=1,
                                      feature_set="churn_v2").version)
        gate(client, cfg, canary, passed=True)
        materialize(cfg, BATCH_AS_OF)
        store = open_store(cfg)
        ids = [int(i) for i in store.customer_ids()[:300]]
        rows = store.get(ids)
        store.close()
        try:
            with ServeProcess(cfg, CHURN_CONFIG=str(workspace / "churn.yaml")) as srv, \
                    httpx.Client(base_url=srv.url, timeout=60) as http:
                wait_ready(http, timeout=180)
                start = tick(cfg, datetime.now(UTC))
                assert start.action == "start" and start.state.weight == 50
                _wait(lambda: http.get("/health").json()["canary_fraction"] == 0.5,
                      "the service never routed 50 % to the canary")  # its next alias reload
                columns = load_scorer(f"models:/{name}/{champ}").feature_set.columns
                records = [{"customer_id": i, **{c: rows[i].values[c] for c in columns}} for i in ids]
                for at in range(0, len(records), 100):
                    res = http.post("/predict", json={"records": records[at:at + 100]})
                    assert res.status_code == 200, res.text  # the champion answers the canary's customers
                    assert {p["route"] for p in res.json()["predictions"]} == {"champion"}
                res = tick(cfg, datetime.now(UTC))
                assert res.action == "rollback", res.message
                assert [a.metric for a in res.alarms.breaches] == ["error_rate"]
                assert res.alarms.rows["canary"] >= 50 and res.alarms.arms["canary"].error_rate == 1.0
                assert aliases(client, name) == {"champion": champ}
                _wait(lambda: http.get("/ready").json().get("canary") is None,
                      "the service still serves the canary")  # its next alias reload
            firing = rx.wait_for(lambda r: _alarm_alerts(r, "firing"), timeout=60)
            assert firing and firing[0]["labels"]["version"] == canary, rx.alerts
        finally:
            stop_sender(cfg, wait=5)
