"""GET /features, /health, /metrics: in process (TestClient) and over a real uvicorn socket."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from ports import ServerThread
from wait_support import wait_until

from mlflow_churn.config import ChurnConfig, load_config
from mlflow_churn.features.api import create_app
from mlflow_churn.features.materialize import materialize, served_features
from mlflow_churn.features.offline import compute_latest
from mlflow_churn.features.online import BatchInfo, new_batch_id, open_store
from mlflow_churn.features.registry import load_registry
from mlflow_churn.features.skew import same_value

T1 = datetime(2026, 3, 20, tzinfo=UTC)
WEEK_LATER = T1 + timedelta(days=7)


class Clock:
    """A settable UTC clock for the app's edge."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def _cfg(workspace: Path, small_data: Path, **overrides: object) -> ChurnConfig:
    data = workspace / "data"
    if not data.exists():
        data.symlink_to(small_data, target_is_directory=True)
    return load_config(workspace=workspace, overrides=overrides, environ={})


@pytest.fixture
def cfg(workspace: Path, small_data: Path) -> ChurnConfig:
    return _cfg(workspace, small_data, **{"features.cache_ttl_seconds": 3600.0})


@pytest.fixture
def served(cfg: ChurnConfig):
    """A materialized SQLite store at T1 and a client whose clock is one hour later."""
    store = open_store(cfg, must_exist=False)
    batch = materialize(cfg, T1, store=store)
    clock = Clock(T1 + timedelta(hours=1))
    with TestClient(create_app(cfg, store=store, clock=clock)) as client:
        yield client, store, batch, clock
    store.close()


def _latest(cfg: ChurnConfig, as_of: datetime):
    return compute_latest(cfg.data_dir, served_features(cfg), as_of).frame.set_index("customer_id")


def test_features_values_versions_status(cfg: ChurnConfig, served) -> None:
    client, _store, batch, _clock = served
    expected = _latest(cfg, T1)
    ids = [int(i) for i in expected.index[:5]]
    resp = client.get("/features", params={"ids": ",".join(map(str, ids + [10**9, ids[0]]))})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["batch_id"] == batch.batch_id and body["watermark"] == batch.watermark.isoformat()
    results = body["results"]
    assert [r["customer_id"] for r in results] == ids + [10**9]  # duplicates dropped, order kept
    assert results[-1]["status"] == "missing" and results[-1]["values"] is None
    for r in results[:-1]:
        assert r["status"] == "found"
        exp = expected.loc[r["customer_id"]]
        assert r["event_time"] == exp["event_time"].isoformat()
        assert set(r["values"]) == set(batch.features)
        for name, value in r["values"].items():
            want = exp[name].item() if hasattr(exp[name], "item") else exp[name]
            assert same_value(value, want), (name, value, want)
        assert r["versions"]["monthly_usage"] == 1 and r["versions"]["monthly_usage_v2"] == 2


def test_feature_selection_and_feature_set(served) -> None:
    client, store, _batch, _clock = served
    cid = store.customer_ids()[0]
    body = client.get("/features", params={"ids": str(cid), "features": "monthly_usage_v2,plan"}).json()
    assert body["features"] == ["monthly_usage_v2", "plan"]
    assert list(body["results"][0]["values"]) == ["monthly_usage_v2", "plan"]
    assert body["results"][0]["versions"] == {"monthly_usage_v2": 2, "plan": 1}
    body = client.get("/features", params={"ids": str(cid), "feature_set": "churn_v2"}).json()
    fs = load_registry().feature_set("churn_v2")
    assert body["feature_set"] == "churn_v2" and body["feature_set_hash"] == fs.hash
    assert list(body["results"][0]["values"]) == fs.columns


def test_stale_rows_and_health_follow_the_sla(served) -> None:
    client, store, batch, clock = served
    cid = store.customer_ids()[0]
    health = client.get("/health")
    assert health.status_code == 200
    assert health.json()["age_seconds"] == 3600.0 and health.json()["sla_seconds"] == 26 * 3600.0
    clock.now = batch.watermark + timedelta(hours=30)
    health = client.get("/health")
    assert health.status_code == 503
    assert health.json()["status"] == "stale" and health.json()["age_seconds"] == 30 * 3600.0
    assert client.get("/features", params={"ids": str(cid)}).json()["results"][0]["status"] == "stale"


def test_new_batch_invalidates_the_cache(cfg: ChurnConfig, served) -> None:
    """The seed's stale-cache scenario: a week-old value must not outlive a fresh batch."""
    client, store, batch, clock = served
    ids = [int(i) for i in _latest(cfg, WEEK_LATER).index[:20]]
    params = {"ids": ",".join(map(str, ids)), "features": "monthly_usage,minutes_7d"}
    old = client.get("/features", params=params).json()
    again = client.get("/features", params=params).json()
    assert again == old
    metrics = client.get("/metrics").text
    assert "feature_cache_hits_total 20" in metrics and "feature_cache_misses_total 20" in metrics
    # a fresh batch (a week later) lands while the cache still holds the old rows (TTL 1 h)
    fresh = materialize(cfg, WEEK_LATER, store=store)
    clock.now = WEEK_LATER + timedelta(hours=1)
    new = client.get("/features", params=params).json()
    assert new["batch_id"] == fresh.batch_id != batch.batch_id
    expected = _latest(cfg, WEEK_LATER)
    changed = 0
    for before, after in zip(old["results"], new["results"], strict=True):
        exp = expected.loc[after["customer_id"]]
        assert after["event_time"] == exp["event_time"].isoformat()
        assert same_value(after["values"]["monthly_usage"], exp["monthly_usage"].item())
        changed += before["values"]["monthly_usage"] != after["values"]["monthly_usage"]
    assert changed >= 15  # the week-old values are really gone
    assert "feature_cache_invalidations_total 1" in client.get("/metrics").text


@pytest.mark.parametrize(
    ("params", "code", "needle"),
    [
        ({}, 400, "ids is required"),
        ({"ids": ""}, 400, "ids is required"),
        ({"ids": "1,abc"}, 400, "'abc'"),
        ({"ids": "1,,2"}, 400, "''"),
        ({"ids": "-4"}, 400, "'-4'"),
        ({"ids": "99999999999999999999"}, 400, "larger than"),
        ({"ids": "1,2,3,4,5,6"}, 400, "at most 5"),
        ({"ids": "1", "features": "monthly_usage_v9"}, 404, "monthly_usage_v2 (v2)"),
        ({"ids": "1", "features": "no_such_feature"}, 404, "monthly_usage_v2"),
        ({"ids": "1", "feature_set": "churn_v9"}, 404, "churn_default"),
        ({"ids": "1", "features": "plan", "feature_set": "churn_v2"}, 400, "not both"),
        ({"ids": "1", "features": ""}, 400, "features= is empty"),
        ({"ids": "1", "features": " "}, 400, "features= is empty"),
        ({"ids": "1", "feature_set": ""}, 400, "feature_set= is empty"),
        ({"ids": "1", "features": "", "feature_set": ""}, 400, "not both"),
        ([("ids", "1"), ("feature_set", "churn_v2"), ("feature_set", "churn_default")], 400,
         "feature_set= given more than once"),
        ([("ids", "1,2,3"), ("ids", "4,5,6")], 400, "at most 5"),  # repeated ids count together
    ],
)
def test_bad_input_is_a_4xx_with_detail(workspace: Path, small_data: Path, params: dict, code: int,
                                        needle: str) -> None:
    cfg = _cfg(workspace, small_data, **{"features.max_ids": 5})
    store = open_store(cfg, must_exist=False)
    materialize(cfg, T1, store=store)
    with TestClient(create_app(cfg, store=store)) as client:
        resp = client.get("/features", params=params)
    store.close()
    assert resp.status_code == code, resp.text
    assert needle in resp.json()["detail"]
    if code == 404 and "features" in params:
        assert "monthly_usage_v2" in resp.json()["available"]


def test_repeated_ids_and_features_are_merged(served) -> None:
    client, store, _batch, _clock = served
    a, b, c = store.customer_ids()[:3]
    resp = client.get("/features", params=[("ids", f"{a},{b}"), ("ids", str(c)), ("ids", str(a)),
                                           ("features", "plan"), ("features", "monthly_usage")])
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert [r["customer_id"] for r in body["results"]] == [a, b, c]
    assert body["features"] == ["plan", "monthly_usage"]


def _user_definitions(workspace: Path, expression: str) -> Path:
    """A definitions file with feature ``calls_x2`` (v1, ``expression``) and set ``mine``."""
    path = workspace / "features.yaml"
    path.write_text(
        "features:\n"
        "  - {name: calls_x2, version: 1, dtype: float64, source: activity, window_days: 30,\n"
        f"     expression: '{expression}', default: 0, description: support calls x2}}\n"
        "feature_sets:\n"
        "  - {name: mine, base: churn_default, add: [calls_x2]}\n")
    return path


def test_values_under_another_definition_are_refused(workspace: Path, small_data: Path) -> None:
    """The definition of calls_x2 is edited without a version bump after materialize: the
    features and sets holding it get a 409 naming it; the others are still served."""
    path = _user_definitions(workspace, "sum(support_calls) * 2")
    cfg = _cfg(workspace, small_data, **{"features.definitions_file": str(path)})
    batch = materialize(cfg, T1)
    assert batch.feature_hashes["calls_x2"] == load_registry(path).get("calls_x2").hash
    _user_definitions(workspace, "sum(support_calls) * 3")  # same name and version, new SQL
    os.utime(path, (time.time() + 5, time.time() + 5))  # a new mtime however fast the edit
    with TestClient(create_app(cfg, clock=Clock(T1))) as client:
        for params in ({"feature_set": "mine"}, {"features": "plan,calls_x2"}, {}):
            resp = client.get("/features", params={"ids": "1,2", **params})
            assert resp.status_code == 409, resp.text
            assert resp.json()["features"] == ["calls_x2"]
            assert "calls_x2" in resp.json()["detail"] and "another definition" in resp.json()["detail"]
        resp = client.get("/features", params={"ids": "1,2", "feature_set": "churn_default"})
        assert resp.status_code == 200, resp.text


def test_batch_without_definition_hashes_is_served(cfg: ChurnConfig) -> None:
    """Batches written before hashes were recorded stay readable."""
    latest = compute_latest(cfg.data_dir, served_features(cfg), T1)
    store = open_store(cfg, must_exist=False)
    names = tuple(f.full_name for f in served_features(cfg))
    store.write_batch(latest.frame, BatchInfo(new_batch_id(T1), T1, latest.watermark, len(latest.frame),
                                              names, datetime.now(UTC)))
    with TestClient(create_app(cfg, store=store, clock=Clock(T1))) as client:
        resp = client.get("/features", params={"ids": "1,2", "feature_set": "churn_v2"})
    store.close()
    assert resp.status_code == 200, resp.text


@pytest.mark.redis
def test_store_that_lost_its_rows_is_503(workspace: Path, small_data: Path, redis_url: str,
                                        redis_prefix: str) -> None:
    """Redis evicted the serving batch's rows (maxmemory): the store's fault, not the client's."""
    cfg = _cfg(workspace, small_data, **{"features.online_backend": "redis", "features.redis_url": redis_url,
                                         "features.redis_prefix": redis_prefix})
    batch = materialize(cfg, T1)
    store = open_store(cfg)
    store._r.unlink(store._k("rows", batch.batch_id))
    with TestClient(create_app(cfg, store=store, clock=Clock(T1))) as client:
        resp = client.get("/features", params={"ids": "1,2"})
    store.close()
    assert resp.status_code == 503 and "no longer keeps its rows" in resp.json()["detail"]


def test_missing_store_is_404_then_served_once_materialized(cfg: ChurnConfig) -> None:
    with TestClient(create_app(cfg, clock=Clock(T1))) as client:
        resp = client.get("/features", params={"ids": "1"})
        assert resp.status_code == 404 and "churn features materialize" in resp.json()["detail"]
        assert client.get("/health").status_code == 503
        assert "feature_freshness_seconds NaN" in client.get("/metrics").text
        materialize(cfg, T1)  # another process materializes; the app opens the store lazily
        assert client.get("/features", params={"ids": "1"}).status_code == 200
        assert client.get("/health").status_code == 200


def test_metrics_prometheus_text(served) -> None:
    client, _store, batch, _clock = served
    for _ in range(3):
        client.get("/features", params={"ids": "1,2,3"})
    client.get("/features", params={"ids": "x"})
    text = client.get("/metrics").text
    assert "# TYPE feature_freshness_seconds gauge" in text
    assert "feature_freshness_seconds 3600.0" in text
    assert f"feature_batch_rows {batch.rows}" in text
    assert "# TYPE feature_request_duration_seconds histogram" in text
    assert 'feature_request_duration_seconds_count{endpoint="/features"} 4' in text
    assert 'feature_request_duration_seconds_bucket{endpoint="/features",le="+Inf"} 4' in text
    assert 'feature_requests_total{code="200",endpoint="/features"} 3' in text  # labels sorted
    assert 'feature_requests_total{code="400",endpoint="/features"} 1' in text


@pytest.mark.redis
def test_real_socket_on_redis(workspace: Path, small_data: Path, redis_url: str, redis_prefix: str) -> None:
    cfg = _cfg(workspace, small_data, **{"features.online_backend": "redis",
                                         "features.redis_url": redis_url,
                                         "features.redis_prefix": redis_prefix})
    batch = materialize(cfg, T1)
    # the socket is bound before uvicorn starts (tests/ports.py): no port can be lost meanwhile
    with ServerThread(create_app(cfg, clock=Clock(T1 + timedelta(hours=2)))) as srv, \
            httpx.Client(base_url=srv.url) as http:
        health = http.get("/health")
        assert health.status_code == 200 and health.json()["batch_id"] == batch.batch_id
        ids = ",".join(str(i) for i in range(100))
        body = http.get("/features", params={"ids": ids, "feature_set": "churn_default"}).json()
        assert len(body["results"]) == 100
        found = [r for r in body["results"] if r["status"] == "found"]
        assert len(found) >= 60 and all(r["versions"]["monthly_usage"] == 1 for r in found)  # alive ones
        bad = http.get("/features", params={"ids": "1;2"})
        assert bad.status_code == 400 and "detail" in bad.json()
        assert "feature_freshness_seconds 7200.0" in http.get("/metrics").text


def test_scoring_refuses_online_values_under_other_definitions(workspace: Path, small_data: Path,
                                                              register_version) -> None:
    """The scoring service's online path: a champion trained on set ``mine`` (calls_x2 v1 =
    2 x calls). (1) The batch was materialized with another definitions file (3 x calls):
    409 naming calls_x2. (2) The server's registry itself changed: the model is refused (503,
    no champion served)."""
    from serving_support import signed_gate, wait_ready

    from mlflow_churn.serving.app import create_app as scoring_app

    trained = _cfg(workspace, small_data, **{"features.definitions_file": str(
        _user_definitions(workspace, "sum(support_calls) * 2").rename(workspace / "a.yaml"))})
    edited = load_config(workspace=workspace, environ={}, overrides={"features.definitions_file": str(
        _user_definitions(workspace, "sum(support_calls) * 3").rename(workspace / "b.yaml"))})
    signed_gate(trained, register_version(trained, alias="champion", feature_set="mine"))
    materialize(edited, T1)  # the materializer reads another definitions file
    ids = {"customer_ids": [1, 2, 3]}
    with TestClient(scoring_app(trained)) as client:
        wait_ready(client)
        resp = client.post("/predict", json=ids)
        assert resp.status_code == 409, resp.text
        assert "calls_x2" in resp.json()["detail"] and "model version 1" in resp.json()["detail"]
    materialize(trained, T1)  # same definitions again: served
    with TestClient(scoring_app(trained)) as client:
        wait_ready(client)
        assert client.post("/predict", json=ids).status_code == 200
    with TestClient(scoring_app(edited)) as client:  # the registry's definition changed
        refused = "differs from the registry's definition"  # 503 while loading, then 503 naming it
        resp = wait_until(lambda: r if refused in (r := client.post("/predict", json=ids)).text
                          or r.status_code != 503 else None, 60, "the edited definition refused")
        assert resp.status_code == 503 and refused in resp.text  # no champion is served: it was refused
