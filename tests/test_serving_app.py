"""The scoring service over a real socket: split and stickiness, records, bad input,
no model, admin token, feature-set hash refusal, reload without dropped requests, a
failing canary, a missing or broken online store, and `mlflow models serve` of the same
champion."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from ports import start_on_free_port
from serving_support import (
    BATCH_AS_OF,
    LABELS_AS_OF,
    ServerThread,
    serving_config,
    signed_gate,
    two_versions,
    wait_ready,
)
from wait_support import wait_until

from mlflow_churn.features.materialize import materialize
from mlflow_churn.features.online import open_store
from mlflow_churn.serving.app import create_app
from mlflow_churn.serving.canary import evaluate_canary
from mlflow_churn.serving.prediction_log import PredictionLog
from mlflow_churn.serving.routing import route
from mlflow_churn.training.model import load_scorer


def _all_ids(cfg) -> list[int]:
    store = open_store(cfg)
    try:
        return store.customer_ids()
    finally:
        store.close()


def test_split_stickiness_and_log_over_socket(config, register_version) -> None:
    champ, canary = two_versions(config, register_version)
    # the background writer: its rows must all be committed by the graceful shutdown
    cfg = serving_config(config, canary_fraction=0.3, routing_salt="s1", prediction_log_mode="async")
    ids = _all_ids(cfg)
    assert len(ids) > 2000
    app = create_app(cfg)
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        ready = wait_ready(client).json()
        assert (ready["champion"], ready["canary"]) == (champ, canary)
        first, second = [], []
        for start in range(0, len(ids), 1000):
            chunk = ids[start:start + 1000]
            first += client.post("/predict", json={"customer_ids": chunk}).json()["predictions"]
            second += client.post("/predict", json={"customer_ids": chunk}).json()["predictions"]
        assert [p["customer_id"] for p in first] == ids
        assert all(p["status"] == "ok" for p in first)
        got = np.array([p["route"] == "canary" for p in first])
        assert abs(got.mean() - 0.3) < 0.04  # binomial sd ~0.009 at n ~2600
        assert all(p["route"] == route(p["customer_id"], 0.3, "s1") for p in first)
        assert all(p["model_version"] == (canary if p["route"] == "canary" else champ) for p in first)
        assert [(p["route"], p["churn_probability"]) for p in first] == \
               [(p["route"], p["churn_probability"]) for p in second]  # sticky, same scores
        probs = np.array([p["churn_probability"] for p in first])
        assert ((probs > 0) & (probs < 1)).all()
        # the in-process scores equal the registered model's own predictions
        store = open_store(cfg)
        rows = store.get(ids[:50])
        store.close()
        frame = pd.DataFrame([rows[i].values for i in ids[:50]])
        by_route = {"champion": load_scorer(f"models:/{cfg.training.model_name}/{champ}"),
                    "canary": load_scorer(f"models:/{cfg.training.model_name}/{canary}")}
        for i, p in enumerate(first[:50]):
            expect = by_route[p["route"]].predict_proba(frame.iloc[[i]])[0]
            assert p["churn_probability"] == pytest.approx(expect, abs=1e-9)
        mixed = client.post("/predict", json={"customer_ids": [ids[0], 99_999_999]}).json()["predictions"]
        assert [p["status"] for p in mixed] == ["ok", "not_found"]
        assert mixed[1]["churn_probability"] is None
        metrics = client.get("/metrics").text
        assert f'churn_predictions_total{{route="canary",status="ok",version="{canary}"}}' in metrics
        assert "churn_predict_latency_seconds_bucket" in metrics
        assert 'churn_http_requests_total{code="200",path="/predict"}' in metrics
        assert f'churn_model_loaded{{alias="champion",version="{champ}"}} 1' in metrics
        assert "churn_prediction_log_dropped_total 0" in metrics
    # shutdown flushed the log: every scored id, with its route, version and batch time
    log = PredictionLog(cfg.prediction_log_url)
    frame = log.read()
    log.close()
    assert len(frame) == 2 * len(ids) + 2
    assert (frame["as_of"] == pd.Timestamp(BATCH_AS_OF)).all()
    assert set(frame.loc[frame["route"] == "canary", "model_version"]) == {canary}
    assert (frame["status"] == "not_found").sum() == 1


def test_records_and_bad_input_get_4xx_naming_fields(config, register_version) -> None:
    champ, _ = two_versions(config, register_version)
    cfg = serving_config(config, canary_fraction=0.0)
    store = open_store(cfg)
    cid = store.customer_ids()[0]
    values = store.get([cid])[cid].values
    store.close()
    scorer = load_scorer(f"models:/{cfg.training.model_name}/{champ}")
    record = {c: values[c] for c in scorer.feature_set.columns}
    with ServerThread(create_app(cfg)) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        wait_ready(client)
        res = client.post("/predict", json={"records": [{**record, "customer_id": cid}]})
        assert res.status_code == 200, res.text
        p = res.json()["predictions"][0]
        assert p["status"] == "ok" and p["model_version"] == champ and p["route"] == "champion"
        assert p["churn_probability"] == pytest.approx(scorer.predict_proba(pd.DataFrame([record]))[0])
        by_id = client.post("/predict", json={"customer_ids": [cid]}).json()["predictions"][0]
        assert by_id["churn_probability"] == pytest.approx(p["churn_probability"])  # same features online
        cases = [
            ({"records": [{k: v for k, v in record.items() if k not in ("age", "plan")}]}, ["age", "plan"]),
            ({"records": [{**record, "age": "forty"}]}, ["age", "forty"]),
            ({"records": [{**record, "age": [1, 2]}]}, ["records.0.age"]),
            ({"customer_ids": ["x"]}, ["customer_ids.0"]),
            ({"customer_ids": [1], "records": [record]}, ["exactly one"]),
            ({"customer_ids": []}, ["empty"]),
            ({"customer_ids": [1], "colour": "red"}, ["colour"]),
            ({"records": [{**record, "customer_id": "abc"}]}, ["customer_id"]),
        ]
        for body, needles in cases:
            res = client.post("/predict", json=body)
            assert res.status_code == 422, (body, res.text)
            detail = res.json()["detail"]
            for needle in needles:
                assert needle in detail, (needle, detail)
        res = client.post("/predict", content=b'{"customer_ids": [1, 2',
                          headers={"content-type": "application/json"})
        assert res.status_code == 422 and "malformed JSON" in res.json()["detail"]
        res = client.post("/predict", json={"customer_ids": list(range(cfg.features.max_ids + 1))})
        assert res.status_code == 422 and "max_ids" in res.json()["detail"]
        assert client.get("/health").json() == {"status": "ok", "model": cfg.training.model_name,
                                                "canary_fraction": cfg.serving.canary_fraction}


def test_no_model_503_and_admin_token_401(config) -> None:
    cfg = serving_config(config, admin_token="s3cret", reload_seconds=0.2)
    with ServerThread(create_app(cfg)) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        res = wait_until(lambda: r if "champion" in (r := client.get("/ready")).text else None, 30,
                         "the reloader to poll the empty registry", interval=0.05)
        assert res.status_code == 503 and "champion" in res.json()["detail"]
        res = client.post("/predict", json={"customer_ids": [1]})
        assert res.status_code == 503 and "no champion" in res.json()["detail"]
        assert client.get("/health").status_code == 200
        for headers in ({}, {"Authorization": "s3cret"}):  # no bearer token: 401
            res = client.post("/admin/reload", headers=headers)
            assert res.status_code == 401 and "Bearer" in res.json()["detail"]
            assert res.headers["www-authenticate"] == "Bearer"
        res = client.post("/admin/reload", headers={"Authorization": "Bearer wrong"})  # a wrong one: 403
        assert res.status_code == 403 and "serving.admin_token" in res.json()["detail"]
        assert "s3cret" not in res.text
        res = client.post("/admin/reload", headers={"Authorization": "Bearer s3cret"})
        assert res.status_code == 200 and res.json()["champion"] is None
        res = client.post("/admin/promote", headers={"Authorization": "Bearer s3cret"}, json={"reason": "x"})
        assert res.status_code == 409 and "no canary" in res.json()["detail"]


def test_feature_set_hash_mismatch_is_refused(config, register_version) -> None:
    champ, _ = two_versions(config, register_version)
    client_ml = MlflowClient(config.mlflow_tracking_uri, config.mlflow_tracking_uri)
    client_ml.set_model_version_tag(config.training.model_name, champ, "feature_set_hash", "0" * 64)
    cfg = serving_config(config, canary_fraction=0.5)
    with ServerThread(create_app(cfg)) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        wait_ready(client, expect=503)
        res = wait_until(lambda: r if "feature_set_hash" in (r := client.get("/ready")).json()["detail"]
                         else None, 30, "the feature-set hash refusal in /ready")
        assert f"version {champ}" in res.json()["detail"] and "feature_set_hash" in res.json()["detail"]
        res = client.post("/predict", json={"customer_ids": [1, 2, 3]})  # refused = no model loaded
        assert res.status_code == 503 and "feature_set_hash" in res.json()["detail"]


def test_alias_move_reloads_without_dropping_requests(config, register_version) -> None:
    champ, canary = two_versions(config, register_version)
    cfg = serving_config(config, canary_fraction=0.5, reload_seconds=0.3, admin_token="tok")
    ids = _all_ids(cfg)[:40]
    codes: list[int] = []
    answers: list[set[tuple[str, str]]] = []  # per answered request: {(route, version)}
    stop, warmed, swapped = threading.Event(), threading.Event(), threading.Event()
    with ServerThread(create_app(cfg)) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        wait_ready(client)

        def hammer() -> None:
            with httpx.Client(base_url=srv.url, timeout=30) as c:
                while not stop.is_set():
                    res = c.post("/predict", json={"customer_ids": ids})
                    codes.append(res.status_code)
                    if res.status_code == 200:
                        answers.append({(p["route"], p["model_version"]) for p in res.json()["predictions"]})
                        if len(answers) >= 3:
                            warmed.set()
                        if answers[-1] == {("champion", canary)}:
                            swapped.set()  # a request served wholly by the new champion

        worker = threading.Thread(target=hammer)
        worker.start()
        try:
            assert warmed.wait(60), "the client sent no requests before the promotion"
            res = client.post("/admin/promote", headers={"Authorization": "Bearer tok"},
                              json={"reason": "live promotion test", "version": canary, "force": True})
            assert res.status_code == 200, res.text
            serving = res.json()["serving"]
            assert serving["champion"] == canary and serving["canary"] is None, serving
            evidence = res.json()["transition"]["evidence"]  # the canary analysis rides along
            assert evidence["canary_version"] == canary and evidence["routes"]["canary"]["rows"] > 0
            # the same client kept sending through the swap until it got the new models' answer
            assert swapped.wait(60), "no request was answered by the promoted model"
        finally:
            stop.set()
            worker.join()
        after = client.post("/predict", json={"customer_ids": ids}).json()["predictions"]
    assert codes and set(codes) == {200}  # nothing dropped or failed while the models swapped
    # requests before the swap saw the old pair (both routes), after it the new champion alone
    assert {("champion", champ), ("canary", canary)} <= answers[0]
    assert answers[-1] == {("champion", canary)}
    assert {p["model_version"] for p in after} == {canary} and {p["route"] for p in after} == {"champion"}
    client_ml = MlflowClient(cfg.mlflow_tracking_uri)
    aliases = client_ml.get_registered_model(cfg.training.model_name).aliases
    assert {a: str(v) for a, v in aliases.items()} == {"champion": canary, "previous-champion": champ}
    run = client_ml.get_run(res.json()["transition"]["run_id"])
    assert run.data.tags["evidence"] == evidence["verdict"]  # the run records the evidence it carried
    assert run.data.metrics["canary_rows"] == evidence["routes"]["canary"]["rows"]


def test_failing_canary_falls_back_and_its_error_rate_rolls_it_back(config, register_version) -> None:
    champ = signed_gate(config, register_version(config, quality="good", alias="champion", seed=0))
    # the canary needs monthly_usage_v2, which the clients' records (the champion's set) lack
    canary = signed_gate(config, register_version(config, quality="good", alias="canary", seed=1,
                                                  feature_set="churn_v2"))
    materialize(config, BATCH_AS_OF)
    cfg = serving_config(config, canary_fraction=0.5, routing_salt="fb", min_canary_samples=20,
                         admin_token="adm")
    scorer = load_scorer(f"models:/{cfg.training.model_name}/{champ}")
    store = open_store(cfg)
    ids = store.customer_ids()[:200]
    rows = store.get(ids)
    store.close()
    records = [{"customer_id": i, **{c: rows[i].values[c] for c in scorer.feature_set.columns}} for i in ids]
    to_canary = [i for i in ids if route(i, 0.5, "fb") == "canary"]
    assert 60 < len(to_canary) < 140
    with ServerThread(create_app(cfg)) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        assert wait_ready(client).json()["canary"] == canary
        got = []
        for start in range(0, len(records), 50):
            res = client.post("/predict", json={"records": records[start:start + 50],  # a client as_of:
                                                "as_of": BATCH_AS_OF.isoformat()},  # admin token only
                              headers={"Authorization": "Bearer adm"})
            assert res.status_code == 200, res.text
            got += res.json()["predictions"]
        assert {(p["status"], p["route"], p["model_version"]) for p in got} == {("ok", "champion", champ)}
        expect = scorer.predict_proba(pd.DataFrame([{c: r[c] for c in scorer.feature_set.columns}
                                                    for r in records]))
        np.testing.assert_allclose([p["churn_probability"] for p in got], expect, rtol=0, atol=1e-9)
        metrics = client.get("/metrics").text
        assert (f'churn_prediction_errors_total{{route="canary",version="{canary}"}} '
                f"{len(to_canary)}") in metrics
    log = PredictionLog(cfg.prediction_log_url)
    frame = log.read()
    log.close()
    errors = frame[frame["status"] == "error"]
    assert sorted(errors["customer_id"]) == sorted(to_canary)
    assert set(zip(errors["route"], errors["model_version"], strict=True)) == {("canary", canary)}
    ev = evaluate_canary(cfg, LABELS_AS_OF, log_run=False)
    assert ev.verdict == "rollback" and ev.routes["canary"].error_rate == 1.0
    assert any("error rate" in r and "max_error_rate" in r for r in ev.reasons), ev.reasons


def test_missing_or_broken_online_store_is_503_never_500(config, register_version) -> None:
    champ = signed_gate(config, register_version(config, quality="good", alias="champion"))
    cfg = serving_config(config, canary_fraction=0.0)
    scorer = load_scorer(f"models:/{cfg.training.model_name}/{champ}")
    with ServerThread(create_app(cfg)) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        wait_ready(client)  # never materialized: no online store at all
        res = client.post("/predict", json={"customer_ids": [1, 2]})
        assert res.status_code == 503, res.text
        assert "online store" in res.json()["detail"] and "materialize" in res.json()["detail"]
        record = {c: None for c in scorer.feature_set.columns}  # raw records need no store
        assert client.post("/predict", json={"records": [record]}).status_code == 200
    # a store file that is not a database: an error no code path expects -> the catch-all
    cfg.online_store_path.write_bytes(b"not a database, " * 256)
    with ServerThread(create_app(cfg)) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        wait_ready(client)
        res = client.post("/predict", json={"customer_ids": [1, 2]})
        assert res.status_code == 503, res.text
        assert res.headers["content-type"] == "application/json"
        detail = res.json()["detail"]  # the store's failure by type, never the exception's text
        assert "online feature store unavailable" in detail and "DatabaseError" in detail
        assert "not a database" not in detail
        assert client.get("/health").status_code == 200
        assert 'churn_http_requests_total{code="503",path="/predict"} 1' in client.get("/metrics").text


@pytest.mark.postgres
def test_prediction_log_on_postgres(config, register_version, postgres_url) -> None:
    champ, canary = two_versions(config, register_version)
    cfg = serving_config(config, canary_fraction=0.5, prediction_log=postgres_url)
    ids = _all_ids(cfg)[:300]
    with ServerThread(create_app(cfg)) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        wait_ready(client)
        for start in range(0, len(ids), 100):
            assert client.post("/predict", json={"customer_ids": ids[start:start + 100]}).status_code == 200
    log = PredictionLog(postgres_url)
    frame = log.read()
    log.close()
    assert sorted(frame["customer_id"]) == sorted(ids)
    assert set(zip(frame["route"], frame["model_version"], strict=True)) == {("champion", champ),
                                                                             ("canary", canary)}
    assert (frame["as_of"] == pd.Timestamp(BATCH_AS_OF)).all()


@pytest.mark.slow
def test_mlflow_models_serve_returns_probabilities(config, register_version) -> None:
    champ, _ = two_versions(config, register_version)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHURN_")}
    env["MLFLOW_TRACKING_URI"] = config.mlflow_tracking_uri
    bindir = os.path.dirname(sys.executable)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    log = config.workspace / "models-serve.log"

    def start(port: int) -> tuple[subprocess.Popen, Path]:
        with log.open("w") as err:
            return subprocess.Popen(
                [os.path.join(bindir, "mlflow"), "models", "serve", "-m",
                 f"models:/{config.training.model_name}@champion", "--env-manager", "local", "-p", str(port),
                 "-h", "127.0.0.1", "-w", "1"],
                env=env, stdout=subprocess.DEVNULL, stderr=err, text=True), log

    port, proc, _ = start_on_free_port(start)  # it binds the port itself: retried if taken meanwhile
    try:
        store = open_store(config)
        some = store.customer_ids()[:20]
        rows = store.get(some)
        store.close()
        scorer = load_scorer(f"models:/{config.training.model_name}/{champ}")
        frame = pd.DataFrame([rows[i].values for i in some])[scorer.feature_set.columns]
        from mlflow_churn.training.model import to_model_input

        payload = {"dataframe_split": to_model_input(scorer.feature_set, frame).to_dict(orient="split")}
        payload["dataframe_split"].pop("index", None)
        deadline = time.monotonic() + 120
        while True:
            try:
                res = httpx.post(f"http://127.0.0.1:{port}/invocations", json=payload, timeout=30)
                break
            except httpx.TransportError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(
                        f"mlflow models serve did not start: {log.read_text()[-2000:]}") from None
                time.sleep(0.5)
        assert res.status_code == 200, res.text
        preds = np.array(res.json()["predictions"], dtype=float).reshape(-1)
        assert preds.shape == (20,) and ((preds > 0) & (preds < 1)).all()
        np.testing.assert_allclose(preds, scorer.predict_proba(frame), atol=1e-9)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
