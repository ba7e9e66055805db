"""Input checks at serving (issue 23 item 6): the checks against a training profile, the
prediction log's warnings column and its counts, and the scoring service over a real socket
in both modes (flag: scored with warnings; reject: 422 naming the field and what it allows),
each row checked against the profile of the version that serves it."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from serving_support import BATCH_AS_OF, ServerThread, serving_config, two_versions, wait_ready

from mlflow_churn.errors import ChurnError
from mlflow_churn.features.online import open_store
from mlflow_churn.features.registry import load_registry
from mlflow_churn.monitoring.monitor import monitor
from mlflow_churn.serving.app import create_app
from mlflow_churn.serving.input_checks import InputChecker, encode_warnings, warning_counts
from mlflow_churn.serving.prediction_log import PredictionLog, PredictionRecord
from mlflow_churn.serving.routing import route
from mlflow_churn.training.profile import NoProfile, build_profile, profile_for_version, save_profile

FS = load_registry().feature_set("churn_default")


def _profile() -> dict:
    """A profile of a small hand-made frame: age 20..80 without nulls, usage_trend with nulls."""
    n = 61
    frame = pd.DataFrame({c: np.zeros(n) for c in FS.columns})
    for c, cats in FS.categorical.items():
        frame[c] = [cats[i % len(cats)] for i in range(n)]
    frame["age"] = np.linspace(20, 80, n)
    frame["usage_trend"] = [None if i % 10 == 0 else 1.0 for i in range(n)]
    return json.loads(json.dumps(build_profile(frame, FS, np.linspace(0.01, 0.9, n))))


def _row(**changes) -> dict:
    row = {c: 0.0 for c in FS.columns}
    row |= {c: cats[0] for c, cats in FS.categorical.items()}
    row |= {"age": 50, "usage_trend": 1.0}
    return row | changes


def test_checks_name_unknown_categories_ranges_with_margin_and_unexpected_nulls() -> None:
    checker = InputChecker(_profile(), FS.columns, range_margin=0.1, version="3")
    assert checker.unchecked == {}
    rows = [
        _row(),                                          # valid
        _row(age=86.0, plan="gold"),                     # 86 = 80 + 0.1 x 60: on the bound
        _row(age=86.01, usage_trend=None),               # beyond; null where training had some
        _row(age=13.99, monthly_charge=None, plan=None),  # below 20 - 6; nulls training never had
        _row(age="forty", tenure_days=float("nan")),     # not a number: the encoder's 422; NaN = null
        {"age": 500},                                    # absent columns: the encoder's 422
    ]
    result = checker.check(rows)
    got = {(i.row, i.feature, i.kind) for i in result.issues}
    assert got == {(1, "plan", "unknown_category"), (2, "age", "out_of_range"), (3, "age", "out_of_range"),
                   (3, "monthly_charge", "null"), (3, "plan", "null"), (4, "tenure_days", "null"),
                   (5, "age", "out_of_range")}
    plan = next(i for i in result.issues if i.kind == "unknown_category")
    assert plan.allowed == FS.categorical["plan"] and plan.value == "gold"
    assert "'gold'" in plan.message and "'basic'" in plan.message
    age = next(i for i in result.issues if i.row == 2)
    assert age.allowed == pytest.approx([14.0, 86.0]) and age.value == 86.01
    assert "[14, 86]" in age.message and "20 .. 80" in age.message and "range_margin 0.1" in age.message
    assert result.counts()[("age", "out_of_range")] == 3
    assert set(result.by_row()) == {1, 2, 3, 4, 5}
    # only the positions asked for; a wider margin accepts 86.01 and 13.99
    assert {i.row for i in checker.check(rows, [0, 2]).issues} == {2}
    wide = InputChecker(_profile(), FS.columns, range_margin=0.2).check(rows[:4])
    assert {(i.row, i.feature) for i in wide.issues} == {(1, "plan"), (3, "monthly_charge"), (3, "plan")}
    with pytest.raises(ChurnError, match="range_margin"):
        InputChecker(_profile(), FS.columns, range_margin=-0.1)


def test_older_profiles_are_read_as_far_as_they_go() -> None:
    old = _profile()
    for entry in old["features"].values():  # written before min/max/null_rate were recorded
        for key in ("min", "max", "null_rate"):
            entry.pop(key, None)
    old["features"]["region"].pop("categories")
    del old["features"]["contract"]
    checker = InputChecker(old, FS.columns, range_margin=0.0)
    assert checker.unchecked["contract"] == "not in the profile"
    assert "categories" in checker.unchecked["region"] and "nulls" in checker.unchecked["region"]
    # the range comes from the ends of the profile's sorted sample; nulls are not judged
    rows = [_row(age=80.5, region="atlantis", contract="decade", monthly_charge=None), _row(age=80.0)]
    assert [(i.row, i.feature, i.kind) for i in checker.check(rows).issues] == [(0, "age", "out_of_range")]
    with pytest.raises(ChurnError, match="features"):
        InputChecker({"format": 1}, FS.columns, 0.1)


def test_log_keeps_warnings_and_counts_them_per_feature(tmp_path: Path) -> None:
    issues = InputChecker(_profile(), FS.columns, 0.1).check([_row(age=200, plan="gold"), _row()]).by_row()
    text = encode_warnings(issues[0])
    assert json.loads(text) == {"age": "out_of_range", "plan": "unknown_category"}
    assert encode_warnings([]) is None
    log = PredictionLog(tmp_path / "p.db")
    t = datetime(2026, 3, 1, tzinfo=UTC)
    log.write([PredictionRecord("r", i, "1", "champion", 0.5, 1.0, "ok", t, t, input_warnings=w)
               for i, w in enumerate([text, None, '{"age":"null"}'])])
    frame = log.read()
    log.close()
    counts = warning_counts(frame["input_warnings"], len(frame))
    assert (counts.rows, counts.flagged_rows) == (3, 2)
    assert counts.counts == {("age", "out_of_range"): 1, ("plan", "unknown_category"): 1, ("age", "null"): 1}
    assert counts.metrics() == {"input_checked_rows": 3.0, "input_flagged_rows": 2.0,
                                "input_invalid.age.out_of_range": 1.0, "input_invalid.age.null": 1.0,
                                "input_invalid.plan.unknown_category": 1.0, "input_invalid.age": 2.0,
                                "input_invalid.plan": 1.0}
    with pytest.raises(ChurnError, match="input_warnings"):
        warning_counts(["not json"], 1)


def test_an_old_log_gets_the_warnings_column(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE predictions (request_id TEXT NOT NULL, customer_id BIGINT NOT NULL, "
                "model_version TEXT, route TEXT NOT NULL, score DOUBLE PRECISION, "
                "latency_ms DOUBLE PRECISION, status TEXT NOT NULL, served_at TEXT NOT NULL, "
                "as_of TEXT NOT NULL)")
    con.execute("INSERT INTO predictions VALUES ('r', 1, '1', 'champion', 0.2, 1.0, 'ok', "
                "'2026-03-01T00:00:00+00:00', '2026-03-01T00:00:00+00:00')")
    con.commit()
    con.close()
    log = PredictionLog(path)
    t = datetime(2026, 3, 2, tzinfo=UTC)
    log.write([PredictionRecord("s", 2, "1", "champion", 0.3, 1.0, "ok", t, t,
                                input_warnings='{"age":"null"}')])
    frame = log.read()
    log.close()
    assert list(frame["customer_id"]) == [1, 2]
    assert frame["input_warnings"].isna().tolist() == [True, False]


# --------------------------------------------------------------------------- over a socket
def _log_profile(cfg, version: str, frame: pd.DataFrame, tmp: Path, drop_plan: str | None = None) -> dict:
    """Log a reference profile of ``frame`` into ``version``'s training run (what training does),
    optionally without the category ``drop_plan`` of ``plan``."""
    profile = json.loads(json.dumps(build_profile(frame, FS, np.full(len(frame), 0.2))))
    if drop_plan is not None:
        entry = profile["features"]["plan"]
        k = entry["categories"].index(drop_plan)
        entry["categories"].pop(k)
        entry["shares"].pop(k)
    client = MlflowClient(cfg.mlflow_tracking_uri, cfg.mlflow_tracking_uri)
    run_id = client.get_model_version(cfg.training.model_name, version).tags["train_run_id"]
    client.log_artifact(run_id, str(save_profile(profile, tmp / f"v{version}" / "profile.json")), "reference")
    return profile


def _metric(text: str, feature: str, kind: str, route_: str) -> float:
    prefix = f'churn_input_invalid_total{{feature="{feature}",kind="{kind}",route="{route_}"}} '
    line = next((ln for ln in text.splitlines() if ln.startswith(prefix)), None)
    return float(line.split()[-1]) if line else 0.0


@pytest.mark.slow
def test_invalid_inputs_in_both_modes_over_a_socket(config, register_version, tmp_path: Path) -> None:
    champ, canary = two_versions(config, register_version)
    store = open_store(config)
    ids = store.customer_ids()
    stored = store.get(ids)
    store.close()
    online = pd.DataFrame([{c: stored[i].values[c] for c in FS.columns} for i in ids])
    client_ml = MlflowClient(config.mlflow_tracking_uri, config.mlflow_tracking_uri)
    with pytest.raises(NoProfile):  # register_version logs no profile: no checks for that version yet
        profile_for_version(client_ml, config.training.model_name, canary)
    # the champion learnt from all current values; the canary never saw plan 'unlimited'
    profile = _log_profile(config, champ, online, tmp_path)
    age_high = profile["features"]["age"]["max"] + 0.1 * (profile["features"]["age"]["max"]
                                                           - profile["features"]["age"]["min"])
    cfg = serving_config(config, canary_fraction=0.5, routing_salt="ic", admin_token="adm")
    to_champ = [i for i in ids if route(i, 0.5, "ic") == "champion"]
    to_canary = [i for i in ids if route(i, 0.5, "ic") == "canary"]
    a, b = to_champ[0], to_canary[0]
    rec = {c: stored[a].values[c] for c in FS.columns}
    as_of = {"as_of": BATCH_AS_OF.isoformat()}  # filed in the monitoring window ending BATCH_AS_OF
    admin = {"Authorization": "Bearer adm"}

    # flag (the default): the canary has no profile yet -> its rows are scored unchecked
    with ServerThread(create_app(cfg)) as srv, httpx.Client(base_url=srv.url, timeout=30) as http:
        status = wait_ready(http).json()
        assert status["on_invalid"] == "flag" and status["input_checks"]["champion"] == "on"
        assert status["input_checks"]["canary"].startswith("off: no training profile")
        res = http.post("/predict", json={"records": [{**rec, "customer_id": b, "plan": "gold"}]})
        assert res.status_code == 200 and res.json()["predictions"][0]["warnings"] == []

    canary_profile = _log_profile(config, canary, online, tmp_path, drop_plan="unlimited")
    assert "unlimited" not in canary_profile["features"]["plan"]["categories"]
    records = [
        {**rec, "customer_id": a},                                   # valid
        {**rec, "customer_id": a, "age": age_high + 1, "plan": "gold"},  # two fields
        {**rec, "customer_id": a, "monthly_charge": None},           # training had no nulls
        {**rec, "customer_id": a, "plan": "unlimited"},              # the champion knows it
        {**rec, "customer_id": b, "plan": "unlimited"},              # the canary does not
    ]
    with ServerThread(create_app(cfg)) as srv, httpx.Client(base_url=srv.url, timeout=30) as http:
        assert wait_ready(http).json()["input_checks"] == {"champion": "on", "canary": "on"}
        res = http.post("/predict", json={"records": records, **as_of}, headers=admin)
        assert res.status_code == 200, res.text
        preds = res.json()["predictions"]
        assert all(p["status"] == "ok" and 0 < p["churn_probability"] < 1 for p in preds)
        assert [p["route"] for p in preds] == ["champion"] * 4 + ["canary"]
        assert preds[0]["warnings"] == [] and preds[3]["warnings"] == []
        w = {x["feature"]: x for x in preds[1]["warnings"]}
        assert set(w) == {"age", "plan"} and w["age"]["kind"] == "out_of_range"
        assert w["age"]["allowed"] == pytest.approx([profile["features"]["age"]["min"] - 0.1 * (
            profile["features"]["age"]["max"] - profile["features"]["age"]["min"]), age_high])
        assert w["plan"] == {"feature": "plan", "kind": "unknown_category", "value": "gold",
                             "allowed": profile["features"]["plan"]["categories"],
                             "message": w["plan"]["message"]}
        assert [(x["feature"], x["kind"]) for x in preds[2]["warnings"]] == [("monthly_charge", "null")]
        assert [(x["feature"], x["kind"], x["allowed"]) for x in preds[4]["warnings"]] == [
            ("plan", "unknown_category", canary_profile["features"]["plan"]["categories"])]
        # the online store's values: canary customers on plan unlimited are flagged, no one else
        res = http.post("/predict", json={"customer_ids": ids[:400]})
        assert res.status_code == 200, res.text
        flagged = {p["customer_id"] for p in res.json()["predictions"] if p["warnings"]}
        unlimited_on_canary = {i for i in ids[:400]
                               if i in to_canary and stored[i].values["plan"] == "unlimited"}
        assert unlimited_on_canary and flagged == unlimited_on_canary
        metrics = http.get("/metrics").text
        assert _metric(metrics, "age", "out_of_range", "champion") == 1
        assert _metric(metrics, "plan", "unknown_category", "champion") == 1
        assert _metric(metrics, "monthly_charge", "null", "champion") == 1
        assert _metric(metrics, "plan", "unknown_category", "canary") == 1 + len(unlimited_on_canary)
    log = PredictionLog(cfg.prediction_log_url)
    logged = log.read()
    log.close()
    mine = logged[logged["as_of"] == pd.Timestamp(BATCH_AS_OF)].sort_values("customer_id", kind="stable")
    warned = [json.loads(t) for t in mine["input_warnings"].dropna()]
    assert {"age": "out_of_range", "plan": "unknown_category"} in warned
    assert {"monthly_charge": "null"} in warned and {"plan": "unknown_category"} in warned
    # the monitor run of the champion counts its served rows' warnings per feature
    result = monitor(cfg, BATCH_AS_OF, report=False)
    run = MlflowClient(cfg.mlflow_tracking_uri, cfg.mlflow_tracking_uri).get_run(result.run_id)
    champ_rows = mine[(mine["model_version"] == champ) & (mine["status"] == "ok")]
    assert run.data.tags["monitor.input_warnings"] == "counted"
    assert run.data.metrics["input_checked_rows"] == len(champ_rows) >= 4 + 150
    assert run.data.metrics["input_flagged_rows"] == 2
    assert run.data.metrics["input_invalid.age.out_of_range"] == 1
    assert run.data.metrics["input_invalid.plan.unknown_category"] == 1  # the canary's are its own
    assert run.data.metrics["input_invalid.monthly_charge.null"] == 1
    assert run.data.metrics["input_invalid.plan"] == 1
    names = {a.path for a in MlflowClient(cfg.mlflow_tracking_uri).list_artifacts(result.run_id)}
    assert "input_warnings.png" in names

    # reject: 422 before anything is scored, naming each field and what it allows
    strict = serving_config(config, canary_fraction=0.5, routing_salt="ic", on_invalid="reject")
    rows_before = len(logged)
    with ServerThread(create_app(strict)) as srv, httpx.Client(base_url=srv.url, timeout=30) as http:
        assert wait_ready(http).json()["on_invalid"] == "reject"
        ok = http.post("/predict", json={"records": [records[0], records[3]]})
        assert ok.status_code == 200 and [p["warnings"] for p in ok.json()["predictions"]] == [[], []]
        res = http.post("/predict", json={"records": records})
        assert res.status_code == 422, res.text
        body = res.json()
        detail = body["detail"]
        assert detail.startswith("invalid input (serving.on_invalid=reject): ")
        assert "records.1.age" in detail and f"{age_high:.6g}" in detail
        assert "records.1.plan" in detail and "'gold'" in detail and "'basic', 'standard'" in detail
        assert "records.2.monthly_charge" in detail and "records.4.plan" in detail
        assert "Traceback" not in detail and "Error" not in detail
        fields = {x["field"]: x for x in body["invalid"]}
        assert set(fields) == {"records.1.age", "records.1.plan", "records.2.monthly_charge",
                               "records.4.plan"}
        assert fields["records.4.plan"]["allowed"] == canary_profile["features"]["plan"]["categories"]
        assert body["invalid_total"] == 4
        # the online store's values are checked too: the canary's unlimited customers
        res = http.post("/predict", json={"customer_ids": sorted(unlimited_on_canary)[:2] + [a]})
        assert res.status_code == 422
        first = sorted(unlimited_on_canary)[0]
        assert f"customer_ids.0 (customer {first}, online store) feature plan" in res.json()["detail"]
        metrics = http.get("/metrics").text
        assert _metric(metrics, "age", "out_of_range", "champion") == 1
        assert _metric(metrics, "plan", "unknown_category", "canary") == 1 + 2
        assert 'churn_http_requests_total{code="422",path="/predict"} 2.0' in metrics
    log = PredictionLog(cfg.prediction_log_url)
    assert log.count() == rows_before + 2  # only the valid request was scored and logged
    log.close()
