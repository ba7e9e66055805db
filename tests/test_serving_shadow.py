"""Shadow mode, header routing and per-stage latency of the scoring service over a real
socket (issue 24 item 3, the stage part of item 4): shadow scores logged and never returned,
a failing shadow model sparing the response, the X-Churn-Route header (token, values, no
canary) and its rows left out of the judge, the stage histogram, the judge's attribution."""

from __future__ import annotations

import math
from datetime import timedelta

import httpx
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from serving_support import BATCH_AS_OF, ServerThread, signed_gate, two_versions, wait_ready

from mlflow_churn.config import load_config
from mlflow_churn.features.materialize import materialize
from mlflow_churn.features.online import open_store
from mlflow_churn.serving.app import create_app
from mlflow_churn.serving.canary import evaluate_canary
from mlflow_churn.serving.judge import judge
from mlflow_churn.serving.prediction_log import PredictionLog
from mlflow_churn.training.model import load_scorer

ADMIN = {"Authorization": "Bearer tok-9f3"}


def _config(config, **overrides):
    """``config`` with dotted overrides (e.g. ``{"canary.mode": "shadow"}``) and the admin token."""
    return load_config(workspace=config.workspace, environ={},
                       overrides={"serving.admin_token": "tok-9f3", **overrides})


def _ids(cfg, n: int | None = None) -> list[int]:
    store = open_store(cfg)
    try:
        ids = store.customer_ids()
    finally:
        store.close()
    return ids[:n] if n else ids


def _log(cfg) -> pd.DataFrame:
    log = PredictionLog(cfg.prediction_log_url)
    try:
        return log.read()
    finally:
        log.close()


def test_shadow_scores_are_logged_and_never_returned(config, register_version) -> None:
    champ, canary = two_versions(config, register_version)
    # a split fraction is set too: shadow mode answers everyone with the champion anyway
    cfg = _config(config, **{"canary.mode": "shadow", "serving.canary_fraction": 0.5})
    ids = _ids(cfg, 1200)
    app = create_app(cfg)
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        ready = wait_ready(client).json()
        assert (ready["champion"], ready["canary"], ready["canary_mode"]) == (champ, canary, "shadow")
        assert client.get("/health").json()["canary_fraction"] == 0.0
        got = []
        for start in range(0, len(ids), 100):
            res = client.post("/predict", json={"customer_ids": ids[start:start + 100] + [99_999_999]})
            assert res.status_code == 200, res.text
            got += res.json()["predictions"]
        assert {(p["route"], p["model_version"]) for p in got} == {("champion", champ)}
        assert "shadow" not in res.text
        assert app.state.service.shadow.flush(60)  # the background scorings have run
        metrics = client.get("/metrics").text
        for stage in ("feature", "model", "log"):
            for route in ("champion", "shadow"):
                assert f'churn_stage_latency_seconds_count{{route="{route}",stage="{stage}"}}' in metrics
        assert f'churn_predictions_total{{route="shadow",status="ok",version="{canary}"}} {len(ids)}.0' \
            in metrics
        assert "churn_shadow_dropped_total 0.0" in metrics
    frame = _log(cfg)
    shadow = frame[frame["route"] == "shadow"]
    champion = frame[frame["route"] == "champion"]
    # every found row scored by the canary beside the champion (the not-found ids are not shadowed)
    assert len(champion) == len(got) and len(shadow) == len(ids)
    assert set(shadow["model_version"]) == {canary} and set(shadow["status"]) == {"ok"}
    assert sorted(shadow["customer_id"]) == sorted(ids)
    # the same request ids as the champion's rows, the canary's own scores
    assert set(shadow["request_id"]) <= set(champion["request_id"])
    store = open_store(cfg)
    rows = store.get(ids[:20])
    store.close()
    scorer = load_scorer(f"models:/{cfg.training.model_name}/{canary}")
    first = shadow.set_index("customer_id").loc[ids[:20], "score"].to_numpy()
    expect = scorer.predict_proba(pd.DataFrame([{c: rows[i].values[c] for c in scorer.feature_set.columns}
                                                for i in ids[:20]]))
    np.testing.assert_allclose(first, expect, rtol=0, atol=1e-9)
    assert (frame["model_ms"].notna() & frame["feature_ms"].notna()).all()
    assert (frame["forced"] == 0).all()
    # the judge takes the shadow rows as the canary's arm, with each arm's stage p99
    ev = evaluate_canary(cfg, BATCH_AS_OF + timedelta(seconds=1), log_run=False, use_judge=True)
    assert ev.routes["canary"].rows == len(ids) and ev.routes["canary"].version == canary
    assert ev.routes["champion"].rows == len(champion)
    stages = ev.judge["stages"]
    assert set(stages) == {"champion", "canary"} and all(stages[a]["model"] > 0 for a in stages)
    # the same traffic in split mode has no canary arm: shadow rows are not a split canary's
    split = evaluate_canary(_config(config), BATCH_AS_OF + timedelta(seconds=1), log_run=False)
    assert split.routes["canary"].rows == 0


def test_a_failing_shadow_model_never_touches_the_response(config, register_version) -> None:
    champ = signed_gate(config, register_version(config, quality="good", alias="champion", seed=0))
    # the canary needs monthly_usage_v2, which the clients' records (the champion's set) lack
    canary = signed_gate(config, register_version(config, quality="good", alias="canary", seed=1,
                                                  feature_set="churn_v2"))
    materialize(config, BATCH_AS_OF)
    cfg = _config(config, **{"canary.mode": "shadow"})
    scorer = load_scorer(f"models:/{cfg.training.model_name}/{champ}")
    ids = _ids(cfg, 60)
    store = open_store(cfg)
    rows = store.get(ids)
    store.close()
    records = [{"customer_id": i, **{c: rows[i].values[c] for c in scorer.feature_set.columns}} for i in ids]
    app = create_app(cfg)
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        assert wait_ready(client).json()["canary"] == canary
        got = []
        for start in range(0, len(records), 20):
            res = client.post("/predict", json={"records": records[start:start + 20]})
            assert res.status_code == 200, res.text
            got += res.json()["predictions"]
        assert {(p["status"], p["route"], p["model_version"]) for p in got} == {("ok", "champion", champ)}
        assert app.state.service.shadow.flush(60)
        metrics = client.get("/metrics").text
        assert f'churn_prediction_errors_total{{route="shadow",version="{canary}"}} {len(ids)}.0' in metrics
        assert "churn_shadow_job_failures_total 0.0" in metrics
    frame = _log(cfg)
    shadow = frame[frame["route"] == "shadow"]
    assert len(shadow) == len(ids) and set(shadow["status"]) == {"error"} and shadow["score"].isna().all()
    assert (frame.loc[frame["route"] == "champion", "status"] == "ok").sum() == len(ids)


def test_header_route_needs_the_admin_token_and_is_left_out_of_the_judge(config, register_version) -> None:
    champ, canary = two_versions(config, register_version)
    cfg = _config(config, **{"serving.canary_fraction": 0.0})
    ids = _ids(cfg, 40)
    body = {"customer_ids": ids}
    with ServerThread(create_app(cfg)) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        wait_ready(client)
        for headers in ({"X-Churn-Route": "canary"},
                        {"X-Churn-Route": "canary", "Authorization": "Bearer wrong"}):
            res = client.post("/predict", json=body, headers=headers)
            assert res.status_code == 403, res.text
            detail = res.json()["detail"]
            assert "X-Churn-Route" in detail and "serving.admin_token" in detail and "tok-9f3" not in detail
        res = client.post("/predict", json=body, headers={**ADMIN, "X-Churn-Route": "both"})
        assert res.status_code == 422 and "champion, canary" in res.json()["detail"], res.text
        res = client.post("/predict", json=body, headers={**ADMIN, "X-Churn-Route": "canary"})
        assert res.status_code == 200, res.text
        assert {(p["route"], p["model_version"]) for p in res.json()["predictions"]} == {("canary", canary)}
        res = client.post("/predict", json=body, headers={**ADMIN, "X-Churn-Route": "Champion"})
        assert {(p["route"], p["model_version"]) for p in res.json()["predictions"]} == {("champion", champ)}
        normal = client.post("/predict", json=body)  # routed by customer id: fraction 0, champion
        assert {p["route"] for p in normal.json()["predictions"]} == {"champion"}
        # no canary served: forcing it is a clear 409
        MlflowClient(cfg.mlflow_tracking_uri).delete_registered_model_alias(cfg.training.model_name, "canary")
        assert client.post("/admin/reload", headers=ADMIN).json()["canary"] is None
        res = client.post("/predict", json=body, headers={**ADMIN, "X-Churn-Route": "canary"})
        assert res.status_code == 409 and "no canary model is being served" in res.json()["detail"], res.text
    frame = _log(cfg)
    forced = frame[frame["forced"] == 1]
    assert len(forced) == 2 * len(ids) and set(forced["route"]) == {"champion", "canary"}
    assert (frame.loc[frame["forced"] == 0, "route"] == "champion").all()
    # the judge's arms leave the test requests out (the alias back on the canary version)
    from mlflow_churn.registry.aliases import move_alias

    move_alias(MlflowClient(cfg.mlflow_tracking_uri), cfg.training.model_name, "canary", canary,
               reason="test: back")
    ev = evaluate_canary(cfg, BATCH_AS_OF + timedelta(seconds=1), log_run=False, use_judge=True)
    assert ev.routes["canary"].rows == 0 and ev.routes["champion"].rows == len(ids)


def _arm(n: int, seed: int, feature: float, model: float) -> pd.DataFrame:
    """``n`` log rows whose latency is 0.2 ms parsing + a feature and a model stage (ms)."""
    rng = np.random.default_rng(seed)
    feature_ms = rng.lognormal(math.log(feature), 0.2, n)
    model_ms = rng.lognormal(math.log(model), 0.2, n)
    return pd.DataFrame({"status": "ok", "score": rng.beta(1, 9, n),
                         "latency_ms": 0.2 + feature_ms + model_ms, "feature_ms": feature_ms,
                         "model_ms": model_ms})


def test_judge_attributes_a_latency_regression_to_its_stage() -> None:
    cfg = load_config(environ={})
    champion = _arm(2000, 1, feature=4.0, model=2.0)
    slow_model = judge(champion, _arm(2000, 2, feature=4.0, model=8.0), cfg)
    assert slow_model.metric("latency_ms").decision == "fail"
    assert "model stage p99" in slow_model.latency_attribution
    assert "churn compress" in slow_model.latency_attribution
    assert slow_model.latency_attribution in slow_model.reasons
    ratio = slow_model.stages["canary"]["model"] / slow_model.stages["champion"]["model"]
    assert f"{ratio:.1f}x the champion's" in slow_model.latency_attribution
    evidence = slow_model.to_dict()
    assert set(evidence["stages"]["canary"]) == {"feature", "model"}
    assert "judge_stage_model_p99_ms_canary" in slow_model.mlflow_metrics()
    slow_feature = judge(champion, _arm(2000, 3, feature=12.0, model=2.0), cfg)
    assert "feature stage p99" in slow_feature.latency_attribution
    assert "the feature path, not the model" in slow_feature.latency_attribution
    same = judge(champion, _arm(2000, 4, feature=4.0, model=2.0), cfg)
    assert same.metric("latency_ms").decision == "pass" and same.latency_attribution == ""
    # rows without the stage columns (an older log): judged, said so when latency fails
    old = judge(champion.drop(columns=["feature_ms", "model_ms"]),
                _arm(2000, 2, feature=4.0, model=8.0).drop(columns=["feature_ms", "model_ms"]), cfg)
    assert "no per-stage times" in old.latency_attribution


@pytest.mark.parametrize("mode", ["split", "shadow"])
def test_mode_config_key(mode) -> None:
    cfg = load_config(environ={}, overrides={"canary.mode": mode, "canary.shadow_fraction": 0.25})
    assert cfg.canary.mode == mode and cfg.canary.shadow_fraction == 0.25
    assert load_config(environ={}).canary.mode == "split"


def test_shadow_executor_drops_and_counts_when_its_queue_is_full() -> None:
    import threading

    from mlflow_churn.serving.shadow import ShadowExecutor
    from mlflow_churn.web.metrics import Metrics

    metrics = Metrics()
    ex = ShadowExecutor(metrics, max_queued=2)
    ex.start()
    started, release, ran = threading.Event(), threading.Event(), []

    def blocking() -> None:
        started.set()
        release.wait(30)

    def boom() -> None:
        raise RuntimeError("a job that raises")

    assert ex.submit(blocking) and started.wait(30)  # the worker is busy with it
    assert ex.submit(lambda: ran.append(1)) and ex.submit(boom)  # the queue (2) is full now
    assert not ex.submit(lambda: ran.append(2))  # dropped at once, never waits
    assert ex.dropped() == 1 and "churn_shadow_dropped_total 1.0" in metrics.render([])
    release.set()
    assert ex.flush(30) and ran == [1]
    assert metrics.counter("churn_shadow_job_failures_total") == 1  # the worker outlived it
    assert ex.submit(lambda: ran.append(3)) and ex.flush(30) and ran == [1, 3]
    ex.stop()
    assert not ex.submit(lambda: ran.append(4)) and ex.dropped() == 2
