"""The canary judge (mlflow_churn.serving.judge): per-metric tests against scipy and hand
numbers, tolerance bands, NODATA, excluded statuses, weights, critical metrics, the verdict."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from mlflow_churn.config import CanaryJudgeConfig, load_config
from mlflow_churn.serving.judge import judge, trim, two_proportion_z


@pytest.fixture(scope="module")
def cfg():
    return load_config(environ={})


def arm(n: int, seed: int, score_shift: float = 0.0, error_rate: float = 0.0, latency: float = 20.0,
        not_found: int = 0, refused: int = 0) -> pd.DataFrame:
    """``n`` prediction-log rows of one arm: beta(1, 9) scores, lognormal latency (ms)."""
    rng = np.random.default_rng(seed)
    status = np.where(rng.random(n) < error_rate, "error", "ok").astype(object)
    status[:not_found] = "not_found"
    status[not_found:not_found + refused] = "refused"
    scores = np.clip(rng.beta(1, 9, n) + score_shift, 0, 1)
    return pd.DataFrame({"request_id": [f"r{seed}-{i}" for i in range(n)],
                         "customer_id": np.arange(n) + seed * n, "status": status,
                         "score": np.where(status == "ok", scores, np.nan),
                         "latency_ms": rng.lognormal(math.log(latency), 0.3, n)})


def test_two_proportion_z_matches_hand_numbers():
    # 10/1000 vs 30/1000: pooled 0.02, SE sqrt(0.02 * 0.98 * 2/1000) = 0.0062610
    z, p = two_proportion_z(10, 1000, 30, 1000)
    assert z == pytest.approx(0.02 / math.sqrt(0.02 * 0.98 * 0.002), rel=1e-9)
    assert z == pytest.approx(3.1944, abs=1e-4)
    assert p == pytest.approx(sps.norm.sf(3.1944), rel=1e-3)
    assert two_proportion_z(0, 500, 0, 500) == (0.0, 1.0)
    z, p = two_proportion_z(30, 1000, 10, 1000)  # canary better: not significant one-sided
    assert z < 0 and p > 0.99


def test_rate_band_test_matches_hand_numbers(cfg):
    # 2/1000 champion vs 40/1000 canary errors: effect 0.038, unpooled SE
    # sqrt(0.002 * 0.998 / 1000 + 0.04 * 0.96 / 1000) = 0.0063561; against the 0.005 band edge
    # z = (0.038 - 0.005) / 0.0063561 = 5.1918
    champ = pd.DataFrame({"status": ["error"] * 2 + ["ok"] * 998, "score": 0.1, "latency_ms": 5.0})
    can = pd.DataFrame({"status": ["error"] * 40 + ["ok"] * 960, "score": 0.1, "latency_ms": 5.0})
    m = judge(champ, can, cfg).metric("error_rate")
    se = math.sqrt(0.002 * 0.998 / 1000 + 0.04 * 0.96 / 1000)
    assert m.effect == pytest.approx(0.038) and se == pytest.approx(0.0063561, rel=1e-4)
    assert m.p_band == pytest.approx(sps.norm.sf((0.038 - 0.005) / se), rel=1e-9) and m.decision == "fail"
    # 1 error in 100 canary requests vs 1 in 900: significant-looking, inside what the band allows
    small = judge(champ.iloc[:900].assign(status=["error"] + ["ok"] * 899),
                  can.iloc[:100].assign(status=["error"] + ["ok"] * 99), cfg).metric("error_rate")
    assert small.decision == "pass" and small.p_band > 0.2


def test_mann_whitney_matches_scipy_on_trimmed_values(cfg):
    champ, can = arm(400, 1), arm(400, 2, latency=23.0, score_shift=0.02)
    v = judge(champ, can, cfg)
    frac = cfg.canary.judge.trim
    for name, col in (("latency_ms", "latency_ms"), ("score", "score")):
        a = trim(champ[col].dropna().to_numpy(), frac)
        b = trim(can[col].dropna().to_numpy(), frac)
        ref = sps.mannwhitneyu(b, a, alternative="greater" if name == "latency_ms" else "two-sided")
        m = v.metric(name)
        assert m.statistic == pytest.approx(ref.statistic)
        assert m.p_value == pytest.approx(ref.pvalue)
        assert m.n_champion == 400 and m.n_canary == 400
    assert v.metric("score").effect == pytest.approx(v.metric("score").statistic / (392 * 392) - 0.5)
    lat = v.metric("latency_ms")
    assert lat.effect == pytest.approx(lat.canary / lat.champion - 1)
    # the decision's test: the canary against the champion's latencies x (1 + tolerance), or + the
    # absolute floor when that is more
    a = trim(champ["latency_ms"].to_numpy(), frac)
    b = trim(can["latency_ms"].to_numpy(), frac)
    tol, floor = cfg.canary.judge.tolerance["latency_ms"], cfg.canary.judge.latency_min_ms
    edge = np.maximum(a * (1 + tol), a + floor)
    assert lat.p_band == pytest.approx(sps.mannwhitneyu(b, edge, alternative="greater").pvalue)
    assert lat.p_value < lat.p_band


def test_latency_below_the_absolute_floor_is_no_regression(cfg):
    # 2 ms -> 3 ms is +50 % (beyond the 25 % band) but only 1 ms: inside canary.judge.latency_min_ms
    fast, slower = arm(3000, 23, latency=2.0), arm(3000, 24, latency=3.0)
    m = judge(fast, slower, cfg).metric("latency_ms")
    assert m.effect > 0.4 and m.p_value < 1e-6 and m.decision == "pass"
    no_floor = cfg.model_copy(deep=True)
    no_floor.canary.judge.latency_min_ms = 0.0
    assert judge(fast, slower, no_floor).metric("latency_ms").decision == "fail"
    assert len(trim(np.arange(100.0), 0.05)) == 90 and trim(np.arange(100.0), 0.05)[0] == 5.0


def test_tolerance_band_a_significant_difference_inside_it_passes(cfg):
    champ = arm(3000, 3)
    inside = judge(champ, arm(3000, 4, latency=22.0), cfg).metric("latency_ms")  # ~10 % slower
    assert inside.p_value < 1e-6 and 0.03 < inside.effect < cfg.canary.judge.tolerance["latency_ms"]
    assert inside.decision == "pass"
    beyond = judge(champ, arm(3000, 4, latency=30.0), cfg)  # ~50 % slower
    assert beyond.metric("latency_ms").decision == "fail"
    # latency is not critical: one failed metric of the latency group (weight 20 of 100) -> marginal
    assert beyond.score == pytest.approx(80.0) and beyond.verdict == "marginal" and beyond.action == "wait"
    # with a wider band the same canary passes
    wide = cfg.model_copy(deep=True)
    wide.canary.judge.tolerance = {**wide.canary.judge.tolerance, "latency_ms": 0.8}
    assert judge(champ, arm(3000, 4, latency=30.0), wide).verdict == "pass"


def test_nodata_is_explicit_and_never_a_pass(cfg):
    v = judge(arm(500, 5), arm(20, 6), cfg)
    assert {m.name: m.decision for m in v.metrics} == dict.fromkeys(
        ("error_rate", "refusal_rate", "latency_ms", "score", "auc", "recall_at_k"), "nodata")
    assert v.verdict == "marginal" and v.action == "wait" and v.performance_source == "none"
    assert math.isnan(v.score)
    # only the latency column missing on the canary: that metric NODATA, the rest judged, no pass
    can = arm(500, 7)
    can["latency_ms"] = np.nan
    v = judge(arm(500, 5), can, cfg)
    assert v.metric("latency_ms").decision == "nodata" and v.metric("score").decision == "pass"
    assert v.verdict == "marginal" and any("NODATA" in r for r in v.reasons)
    assert v.to_dict()["metrics"][2]["decision"] == "nodata"


def test_not_found_and_refused_are_excluded_and_counted(cfg):
    champ = arm(600, 8, not_found=30)
    can = arm(600, 9, not_found=150, refused=12)
    v = judge(champ, can, cfg)
    assert v.excluded == {"champion": {"not_found": 30, "refused": 0},
                          "canary": {"not_found": 150, "refused": 12}}
    assert v.rows == {"champion": 570, "canary": 438}
    assert v.metric("error_rate").n_canary == 438
    assert v.metric("score").n_canary == 438 and v.metric("score").n_champion == 570
    ref = v.metric("refusal_rate")  # refusals over the requests asked for (not_found left out)
    assert ref.n_canary == 450 and ref.canary == pytest.approx(12 / 450)
    # 150 not_found rows on the canary alone do not fail it
    assert v.metric("error_rate").decision == "pass" and v.metric("score").decision == "pass"


def test_critical_error_rate_fails_whatever_the_score(cfg):
    v = judge(arm(2000, 10, error_rate=0.002), arm(2000, 11, error_rate=0.05), cfg)
    m = v.metric("error_rate")
    assert m.decision == "fail" and m.critical and m.p_value < 0.02 and m.effect > 0.005
    assert v.score >= 75 and v.verdict == "fail" and v.action == "rollback"
    assert "critical metric(s) failed: error_rate" in v.reasons[0]
    # within the 0.005 band (0.2 % -> 0.5 %): significant or not, a pass
    v = judge(arm(20000, 10, error_rate=0.002), arm(20000, 11, error_rate=0.005), cfg)
    assert v.metric("error_rate").p_value < 0.02 and v.metric("error_rate").decision == "pass"


def test_weights_move_the_score_and_the_verdict(cfg):
    slow = (arm(3000, 12), arm(3000, 13, latency=40.0))
    assert judge(*slow, cfg).verdict == "marginal"
    heavy = cfg.model_copy(deep=True)
    heavy.canary.judge.weights = {"errors": 10.0, "latency": 60.0, "scores": 10.0, "performance": 20.0}
    v = judge(*slow, heavy)
    assert v.score == pytest.approx(40.0) and v.verdict == "fail"
    light = cfg.model_copy(deep=True)
    light.canary.judge.weights = {"errors": 30.0, "latency": 0.0, "scores": 20.0, "performance": 30.0}
    assert judge(*slow, light).verdict == "pass"
    assert judge(*slow, light).groups["latency"] == 0.0


def test_shifted_scores_fail_and_estimate_says_so(cfg):
    v = judge(arm(500, 14), arm(500, 15, score_shift=0.1), cfg)
    assert v.metric("score").decision == "fail" and v.verdict == "fail"
    assert v.performance_source == "estimated" and v.metric("auc").source == "estimated"
    aa = judge(arm(500, 14), arm(500, 16), cfg)
    assert aa.verdict == "pass" and aa.action == "promote" and aa.score == 100.0


def test_score_shift_the_gate_measured_is_expected_and_only_the_rest_judged(cfg):
    """A model retrained after drift scores differently from the drifted champion by design:
    the gate measures that shift on its holdout (tag gate_score_shift); the judge fails only a
    live shift beyond it, e.g. a feature read wrong in serving on top of the new model."""
    from mlflow_churn.stats.drift import score_shift

    champ, new = arm(2000, 21), arm(2000, 22, score_shift=0.05)
    measured = score_shift(champ["score"], new["score"])  # what the gate would record
    assert 0.1 < measured < 0.5
    assert measured == pytest.approx(sps.mannwhitneyu(new["score"], champ["score"]).statistic / 2000**2 - 0.5)
    live_champ, live_new = arm(800, 23), arm(800, 24, score_shift=0.05)
    assert judge(live_champ, live_new, cfg).metric("score").decision == "fail"  # not expected: fails
    ok = judge(live_champ, live_new, cfg, expected_score_shift=measured)
    assert ok.metric("score").decision == "pass", ok.reasons  # (its estimate judges the rest)
    assert abs(ok.metric("score").effect) < 0.05 and "the gate measured" in ok.metric("score").reason
    # the same new model reading a feature wrong: its scores shift further than the gate saw
    broken = judge(live_champ, arm(800, 24, score_shift=0.15), cfg, expected_score_shift=measured)
    assert broken.metric("score").decision == "fail" and "score" in broken.reasons[0]


def test_realised_performance_once_labels_matured(cfg):
    rng = np.random.default_rng(17)
    champ, can = arm(1500, 18), arm(1500, 19)
    labels = []
    for rows, informative in ((champ, True), (can, False)):
        s = rows["score"].fillna(0.1).to_numpy()
        p = s if informative else rng.permutation(s)  # the canary's scores carry no signal
        labels.append(pd.DataFrame({"request_id": rows["request_id"], "customer_id": rows["customer_id"],
                                    "label": (rng.random(len(rows)) < p).astype(int)}))
    v = judge(champ, can, cfg, labels=pd.concat(labels))
    auc = v.metric("auc")
    assert v.performance_source == "realised" and auc.source == "realised"
    assert auc.n_champion == 1500 and auc.champion > 0.65 and auc.canary < 0.6
    assert auc.decision == "fail" and v.verdict == "fail"
    few = judge(champ, can, cfg, labels=pd.concat(labels).head(100))  # too few labels: the estimate
    assert few.performance_source == "estimated"


def test_config_names_are_checked():
    with pytest.raises(ValueError, match="unknown \\['latency'\\]"):
        CanaryJudgeConfig(tolerance={"latency": 0.1})
    with pytest.raises(ValueError, match="marginal_score"):
        CanaryJudgeConfig(pass_score=70, marginal_score=80)
    with pytest.raises(ValueError, match="unknown"):
        CanaryJudgeConfig(weights={"speed": 1.0})


def test_decision_json_carries_every_metric(cfg):
    d = judge(arm(300, 20), arm(300, 21), cfg).to_dict()
    assert d["verdict"] in ("pass", "marginal", "fail") and d["action"] in ("promote", "wait", "rollback")
    assert [m["name"] for m in d["metrics"]] == ["error_rate", "refusal_rate", "latency_ms", "score", "auc",
                                                 "recall_at_k"]
    for m in d["metrics"]:
        assert {"statistic", "effect", "p_value", "decision", "tolerance", "n_champion", "n_canary"} <= set(m)


# --------------------------------------------------------------------------- evaluate_canary
def _log_arms(cfg, versions: dict[str, str], canary_shift: float, n: int = 400) -> None:
    """``n`` logged rows per route (``ok``, beta(1, 9) scores; the canary's shifted), served now."""
    from datetime import UTC, datetime

    from serving_support import BATCH_AS_OF

    from mlflow_churn.serving.prediction_log import PredictionLog, PredictionRecord

    rng = np.random.default_rng(30)
    now = datetime.now(UTC)
    records = []
    for route, version in versions.items():
        shift = canary_shift if route == "canary" else 0.0
        for i in range(n):
            records.append(PredictionRecord(f"{route}-{i}", i, version, route,
                                            float(min(1.0, rng.beta(1, 9) + shift)),
                                            float(rng.lognormal(math.log(5), 0.2)), "ok", now, BATCH_AS_OF))
        records.append(PredictionRecord(f"{route}-nf", -1, version, route, None, 1.0, "not_found", now,
                                        BATCH_AS_OF))
    log = PredictionLog(cfg.prediction_log_url)
    log.write(records)
    log.close()


@pytest.mark.slow
def test_evaluate_canary_takes_the_judges_verdict_and_logs_it(config, register_version):
    from datetime import timedelta

    from mlflow.tracking import MlflowClient
    from serving_support import BATCH_AS_OF, serving_config

    from mlflow_churn.registry.aliases import move_alias
    from mlflow_churn.serving.canary import evaluate_canary

    cfg = serving_config(config, min_canary_samples=300)
    champ = register_version(cfg, alias=None, seed=0)
    move_alias(MlflowClient(cfg.mlflow_tracking_uri), cfg.training.model_name, "champion", champ.version,
               reason="first champion")
    canary = register_version(cfg, alias="canary", seed=1)
    _log_arms(cfg, {"champion": str(champ.version), "canary": str(canary.version)}, canary_shift=0.15)
    as_of = BATCH_AS_OF + timedelta(seconds=1)
    fixed = evaluate_canary(cfg, as_of, log_run=False)  # the fixed limits: no judge in the result
    assert fixed.judge is None
    ev = evaluate_canary(cfg, as_of, use_judge=True)
    assert ev.verdict == "rollback" and ev.reasons[0].startswith("judge: fail"), ev.reasons
    assert ev.judge["excluded"]["canary"] == {"not_found": 1, "refused": 0}
    client = MlflowClient(cfg.mlflow_tracking_uri)
    run = client.get_run(ev.run_id)
    assert run.data.tags["judge_verdict"] == "fail"
    assert "judge.png" in [a.path for a in client.list_artifacts(ev.run_id)]
    assert run.data.metrics["judge_score_failed"] == 1.0 and run.data.metrics["judge_score_p_value"] < 0.02
    decision = json.loads(Path(client.download_artifacts(ev.run_id, "decision.json")).read_text())
    metrics = {m["name"]: m for m in decision["judge"]["metrics"]}
    assert metrics["score"]["decision"] == "fail" and metrics["auc"]["source"] == "estimated"
    assert all({"statistic", "effect", "p_value", "decision"} <= set(m) for m in metrics.values())
    mv = client.get_model_version(cfg.training.model_name, canary.version)
    assert mv.tags["canary_decision"] == "rollback"
    # the config key turns it on for `churn canary evaluate`; too few rows still wait
    on = cfg.model_copy(deep=True)
    on.canary.judge.enabled = True
    on.serving.min_canary_samples = 1000
    ev = evaluate_canary(on, as_of, log_run=False)
    assert ev.verdict == "wait" and ev.judge is not None and "min_canary_samples" in ev.reasons[0]


def test_estimate_standard_errors_match_a_bootstrap():
    from mlflow_churn.serving.judge import estimated_auc_se, estimated_recall_se
    from mlflow_churn.stats.performance import expected_auc, expected_business

    class TopK:
        top_k_pct, save_rate, monthly_revenue = 10.0, 0.0, 0.0

    rng = np.random.default_rng(22)
    p = 1 / (1 + np.exp(-rng.normal(-2.3, 0.8, 800)))
    auc, se = estimated_auc_se(p)
    recall, rse = estimated_recall_se(p, 10.0)
    assert auc == pytest.approx(expected_auc(p), rel=1e-9)
    assert recall == pytest.approx(expected_business(p, TopK())["recall_at_k"], rel=1e-9)
    boot = [rng.integers(0, p.size, p.size) for _ in range(400)]
    b_auc = np.std([expected_auc(p[i]) for i in boot])
    b_rec = np.std([expected_business(p[i], TopK())["recall_at_k"] for i in boot])
    assert se == pytest.approx(b_auc, rel=0.15) and rse == pytest.approx(b_rec, rel=0.15)


# --------------------------------------------------------------------------- backtest
def test_backtest_aa_passes_and_bad_model_rolls_back(workspace, small_data, churn_main):
    """`churn canary backtest` on the shared small dataset: real models, few replays."""
    (workspace / "data").symlink_to(small_data)
    res = churn_main(["--workspace", str(workspace), "canary", "backtest", "--scenario", "aa", "--scenario",
                      "bad_model", "--scenario", "bad_feature", "--replays", "6", "--json"])
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    by = {s["scenario"]: s for s in out["scenarios"]}
    assert set(by) == {"aa", "bad_model", "bad_feature"} and out["min_requests"] == 500
    assert set(out["holdout_auc"]) == {"champion", "good", "bad_model", "bad_feature"}
    assert by["aa"]["promoted"] >= 5 / 6 and by["aa"]["rolled_back"] <= 1 / 6
    for bad in ("bad_model", "bad_feature"):
        assert by[bad]["rolled_back"] == 1.0 and by[bad]["requests_median"] <= out["min_requests"]
        assert by[bad]["failed_metrics"]
    for s in by.values():
        assert s["promoted"] + s["rolled_back"] + s["paused"] == pytest.approx(1.0)
