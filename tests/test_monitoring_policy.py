"""Retraining policy: each rule on hand-made window histories."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from mlflow_churn.config import PolicyConfig, load_config
from mlflow_churn.errors import ChurnError
from mlflow_churn.monitoring.policy import (
    DECISION_SCHEMA_VERSION,
    PolicyAction,
    WindowStats,
    decide,
    decision_from_dict,
    decision_to_dict,
)

T0 = datetime(2026, 4, 1, tzinfo=UTC)


def win(i: int, psi: float = 0.02, auc_drop: float | None = 0.0, **kw) -> WindowStats:
    return WindowStats(
        as_of=T0 + timedelta(days=7 * i), psi={"monthly_usage": psi, "age": 0.01},
        psi_threshold={"monthly_usage": 0.2, "age": 0.2}, auc_drop=auc_drop,
        null_rate={"data_mb_30d": 0.0}, ref_null_rate={"data_mb_30d": 0.0}, **kw,
    )


def cfg(**kw) -> PolicyConfig:
    base = PolicyConfig().model_dump()
    base.update(kw)
    return PolicyConfig.model_validate(base)


def test_seed_case_psi_035_auc_steady_is_investigate_with_segments() -> None:
    seg = {"segment_psi": {"region=pacific": 0.6, "region=north": 0.03},
           "segment_threshold": {"region=pacific": 0.25, "region=north": 0.25},
           "segment_features": {"region=pacific": ["monthly_usage", "sessions_30d"]}}
    hist = [win(0, 0.35, 0.0, **seg), win(1, 0.35, 0.0, **seg)]
    d = decide(hist, cfg(), hist[-1].as_of)
    assert d.action == "investigate"
    assert "monthly_usage" in d.features
    # a segment's PSI is context: it never names the segment for the segment rule (performance)
    assert d.drift_segments == ["region=pacific"] and d.segments == [] and d.segment_drops == []
    assert any("drift without evidence" in r for r in d.reasons)
    # a config can choose otherwise: drift alone retrains
    assert decide(hist, cfg(drift_alone="retrain"), hist[-1].as_of).action == "retrain"


def test_quiet_history_is_ok_and_auc_drop_retrains() -> None:
    quiet = [win(i) for i in range(3)]
    assert decide(quiet, cfg(), quiet[-1].as_of).action == "ok"
    drop = [win(0), win(1, auc_drop=0.08), win(2, auc_drop=0.09)]
    d = decide(drop, cfg(), drop[-1].as_of)
    assert d.action == "retrain"
    assert d.fired == ["auc_drop > 0.05"]


def test_persistence_needs_m_of_n_windows() -> None:
    once = [win(0), win(1), win(2, auc_drop=0.1)]
    d = decide(once, cfg(), once[-1].as_of)
    assert d.action == "ok"
    assert any("only in 1 of the last 3" in r for r in d.reasons)
    # one window required -> the single spike is enough
    one = cfg(persistence={"windows": 3, "required": 1})
    assert decide(once, one, once[-1].as_of).action == "retrain"


def test_hysteresis_keeps_alarm_until_clearly_below() -> None:
    p = cfg(triggers=[{"metric": "auc_drop", "op": ">", "value": 0.05}],
            persistence={"windows": 2, "required": 2}, cooldown_days=0)
    # 0.06, 0.06 fire; then 0.04 is below 0.05 but above 0.05 * 0.5 -> still active
    hist = [win(0, auc_drop=0.06), win(1, auc_drop=0.06), win(2, auc_drop=0.04)]
    assert decide(hist, p, hist[-1].as_of).action == "retrain"
    # without hysteresis (fraction 1) the alarm clears at 0.04
    no_h = cfg(triggers=[{"metric": "auc_drop", "op": ">", "value": 0.05}],
               persistence={"windows": 2, "required": 2}, hysteresis={"clear_below_fraction": 1.0})
    assert decide(hist, no_h, hist[-1].as_of).action == "ok"
    # clearly below (0.02 < 0.025) clears it
    hist2 = hist[:2] + [win(2, auc_drop=0.02)]
    assert decide(hist2, p, hist2[-1].as_of).action == "ok"


def test_cooldown_turns_retrain_into_investigate() -> None:
    hist = [win(0, auc_drop=0.1), win(1, auc_drop=0.1)]
    last = hist[-1].as_of - timedelta(days=3)
    d = decide(hist, cfg(cooldown_days=7), hist[-1].as_of, last_retrain=last)
    assert d.action == "investigate"
    assert any("cooldown" in r for r in d.reasons)
    assert decide(hist, cfg(cooldown_days=2), hist[-1].as_of, last_retrain=last).action == "retrain"
    # a retrain recorded in the history counts too
    hist_r = [win(0, auc_drop=0.1, retrained=True), win(1, auc_drop=0.1)]
    assert decide(hist_r, cfg(cooldown_days=10), hist_r[-1].as_of).action == "investigate"


def test_integrity_blocks_never_retrains() -> None:
    bad = win(1, psi=0.9, auc_drop=0.2)
    bad.null_rate = {"data_mb_30d": 0.3}
    hist = [win(0, psi=0.9, auc_drop=0.2), bad]
    d = decide(hist, cfg(), bad.as_of)
    assert d.action == "blocked"
    assert d.features == ["data_mb_30d"]
    assert "null rate of feature 'data_mb_30d' rose" in d.reasons[0]
    missing = win(1)
    missing.missing_features = ["tenure_days"]
    assert decide([missing], cfg(), missing.as_of).action == "blocked"
    # warn mode: the fault is a reason, the triggers decide
    assert decide(hist, cfg(integrity="warn"), bad.as_of).action == "retrain"


def test_segment_attribution_uses_size_aware_thresholds() -> None:
    p = cfg(triggers=[{"metric": "segment_psi", "feature": "region", "op": ">", "value": 0.2}],
            persistence={"windows": 1, "required": 1})
    w = win(0)
    # pacific moved beyond its threshold; tiny 'islands' has a bigger PSI but a noise
    # threshold above it (small segment), so it is not named
    w.segment_psi = {"region=pacific": 0.45, "region=islands": 0.5, "plan=basic": 0.1}
    w.segment_threshold = {"region=pacific": 0.2, "region=islands": 0.8, "plan=basic": 0.2}
    w.segment_features = {"region=pacific": ["monthly_usage"]}
    d = decide([w], p, w.as_of)
    assert d.action == "investigate"
    assert d.drift_segments[0] == "region=pacific"
    assert "region=islands" not in d.drift_segments
    assert d.segments == []
    assert "monthly_usage" in d.features


def test_combine_all_and_k_of_n_and_strict_preset() -> None:
    two = [{"metric": "psi", "value": 0.2}, {"metric": "auc_drop", "value": 0.05}]
    hist = [win(0, psi=0.3, auc_drop=0.0), win(1, psi=0.3, auc_drop=0.0)]
    assert decide(hist, cfg(combine="all", triggers=two), hist[-1].as_of).action == "ok"
    both = [win(0, psi=0.3, auc_drop=0.06), win(1, psi=0.3, auc_drop=0.06)]
    assert decide(both, cfg(combine="all", triggers=two), both[-1].as_of).action == "retrain"
    # the default's third trigger (early_auc_drop) is not measured here: "all" cannot hold
    assert decide(both, cfg(combine="all"), both[-1].as_of).action == "ok"
    assert decide(hist, cfg(combine="k_of_n", k=2), hist[-1].as_of).action == "ok"
    # stricter preset: one config line (YAML/env) changes the triggers
    triggers = '[{"metric": "psi", "value": 0.15}, {"metric": "auc_drop", "value": 0.03}]'
    strict = load_config(environ={"CHURN_MONITORING__POLICY__TRIGGERS": triggers})
    mild = [win(0, psi=0.17, auc_drop=0.04), win(1, psi=0.17, auc_drop=0.04)]
    assert decide(mild, cfg(), mild[-1].as_of).action == "ok"
    assert decide(mild, strict.monitoring.policy, mild[-1].as_of).action == "retrain"


def test_round_trip_and_errors() -> None:
    w = win(0, psi=0.3)
    assert WindowStats.from_dict(w.to_dict()) == w
    assert decide([w.to_dict()], cfg(), w.as_of).action in ("ok", "investigate")
    with pytest.raises(ChurnError, match="at least one"):
        decide([], cfg(), T0)
    with pytest.raises(ChurnError, match="timezone"):
        decide([w], cfg(), datetime(2026, 1, 1))


def test_auc_drop_threshold_is_size_aware() -> None:
    noisy = [win(0, auc_drop=0.08), win(1, auc_drop=0.08)]
    for w in noisy:
        w.auc_drop_threshold = 0.1  # small window: a 0.08 drop is within noise
    assert decide(noisy, cfg(), noisy[-1].as_of).action == "ok"
    for w in noisy:
        w.auc_drop_threshold = 0.03
    assert decide(noisy, cfg(), noisy[-1].as_of).action == "retrain"


def test_early_auc_drop_acts_on_one_window_beyond_its_noise() -> None:
    quiet = win(0)
    drop = win(1, early_auc_drop=0.12, early_auc_drop_threshold=0.08)
    d = decide([quiet, drop], cfg(), drop.as_of)
    assert d.action == "retrain" and d.fired == ["early_auc_drop > 0.05"]
    assert any("in 1 of the last 1 windows" in r for r in d.reasons)
    drop.early_auc_drop_threshold = 0.15  # a small window: within noise
    assert decide([quiet, drop], cfg(), drop.as_of).action == "ok"
    # the same trigger under the policy's persistence (2 of 3) waits for a second window
    drop.early_auc_drop_threshold = 0.08
    p = cfg(triggers=[{"metric": "early_auc_drop", "value": 0.05}])
    assert decide([quiet, drop], p, drop.as_of).action == "ok"
    assert decide([quiet, drop, drop], p, drop.as_of).action == "retrain"


def test_raw_source_null_spike_and_missing_day_block() -> None:
    col = "activity.data_used_mb"
    w = win(0, source_null_rate={col: 0.3}, ref_source_null_rate={col: 0.0},
            source_null_threshold={col: 0.01})
    d = decide([w], cfg(), w.as_of)
    assert d.action == "blocked" and d.features == ["data_used_mb"]
    assert "null rate of source column 'activity.data_used_mb' rose from 0.0% to 30.0%" in d.reasons[0]
    # size-aware: on a small day an 8% rise is within noise; on a big one it is not
    w.source_null_rate, w.source_null_threshold = {col: 0.08}, {col: 0.1}
    assert decide([w], cfg(), w.as_of).action == "ok"
    w.source_null_threshold = {col: 0.01}
    assert decide([w], cfg(), w.as_of).action == "blocked"
    gap = win(0, missing_days=["2026-04-01"])
    d = decide([gap], cfg(), gap.as_of)
    assert d.action == "blocked" and "no source rows on 2026-04-01" in d.reasons[0]


def test_categorical_and_ks_triggers() -> None:
    once = {"windows": 1, "required": 1}
    w = win(0, js={"plan": 0.3, "region": 0.01}, chi2_p={"plan": 1e-9, "region": 0.4},
            ks={"monthly_usage": 0.15}, ks_threshold={"monthly_usage": 0.02})
    d = decide([w], cfg(triggers=[{"metric": "js", "value": 0.1}], persistence=once), w.as_of)
    assert d.action == "investigate" and d.features == ["plan"]
    chi2_policy = cfg(triggers=[{"metric": "chi2_p", "op": "<", "value": 0.001}], persistence=once)
    d = decide([w], chi2_policy, w.as_of)
    assert d.action == "investigate" and d.features == ["plan"] and d.fired == ["chi2_p[*] < 0.001"]
    # a ks trigger without a value takes monitoring.ks_threshold (KS D, default 0.1)
    env = {"CHURN_MONITORING__POLICY__TRIGGERS": '[{"metric": "ks"}]',
           "CHURN_MONITORING__POLICY__PERSISTENCE__REQUIRED": "1",
           "CHURN_MONITORING__POLICY__PERSISTENCE__WINDOWS": "1"}
    ks_policy = load_config(environ=env).monitoring.policy
    assert ks_policy.triggers[0].value == 0.1
    assert decide([w], ks_policy, w.as_of).features == ["monthly_usage"]
    strict = load_config(environ={**env, "CHURN_MONITORING__KS_THRESHOLD": "0.2"}).monitoring.policy
    assert decide([w], strict, w.as_of).action == "ok"
    # size-aware: D below the critical value of a small sample does not fire
    w.ks_threshold = {"monthly_usage": 0.3}
    assert decide([w], ks_policy, w.as_of).action == "ok"
    with pytest.raises(Exception, match="needs a value"):
        load_config(environ={"CHURN_MONITORING__POLICY__TRIGGERS": '[{"metric": "psi"}]'})


def test_segment_alarm_has_persistence_and_hysteresis() -> None:
    def seg(i: int, value: float) -> WindowStats:
        return win(i, segment_psi={"region=pacific": value}, segment_threshold={"region=pacific": 0.1},
                   segment_features={"region=pacific": ["monthly_usage"]})

    once = decide([seg(0, 0.01), seg(1, 0.5)], cfg(), seg(1, 0.5).as_of)
    assert once.action == "ok" and once.drift_segments == []
    assert any("region=pacific moved" in r and "only in 1 of the last 2" in r for r in once.reasons)
    twice = [seg(0, 0.5), seg(1, 0.5)]
    d = decide(twice, cfg(), twice[-1].as_of)
    assert d.drift_segments == ["region=pacific"] and d.action == "investigate" and d.segments == []
    # below the 0.2 floor but above half of it: still moved (hysteresis); clearly below: cleared
    assert decide([*twice, seg(2, 0.15)], cfg(), seg(2, 0.15).as_of).action == "investigate"
    assert decide([*twice, seg(2, 0.05)], cfg(), seg(2, 0.05).as_of).action == "ok"


def test_refresh_after_drift_retrains_once_the_window_holds_later_data() -> None:
    quiet = [win(0), win(1)]
    now = quiet[-1].as_of
    d = decide(quiet, cfg(), now, refresh_due=now - timedelta(days=1))
    assert d.action == "retrain" and d.fired == ["refresh_after_drift"]
    assert any("refresh due since" in r for r in d.reasons)
    assert decide(quiet, cfg(), now, refresh_due=now + timedelta(days=1)).action == "ok"
    assert decide(quiet, cfg(refresh_after_drift=False), now, refresh_due=now).action == "ok"
    # the cooldown still applies
    d = decide(quiet, cfg(), now, last_retrain=now - timedelta(days=2), refresh_due=now)
    assert d.action == "investigate" and any("cooldown" in r for r in d.reasons)


def test_refresh_due_tag_of_a_challenger() -> None:
    from mlflow_churn.monitoring.retrain import refresh_due

    c = load_config(environ={})
    lag = timedelta(days=30 + 7 + 30)  # label horizon + holdout + training window
    drop = {"as_of": T0.isoformat(), "fired": ["early_auc_drop > 0.05"]}
    assert refresh_due(c, drop, {}) == (T0 + lag).isoformat()
    # a pending refresh of the champion carries over (the earlier one wins)
    pending = {"refresh_due": (T0 + timedelta(days=10)).isoformat()}
    assert refresh_due(c, drop, pending) == pending["refresh_due"]
    # drift alone or the refresh itself schedules none
    assert refresh_due(c, {"as_of": T0.isoformat(), "fired": ["psi[*] > 0.2"]}, {}) is None
    assert refresh_due(c, {"as_of": T0.isoformat(), "fired": ["refresh_after_drift"]}, pending) is None
    assert refresh_due(load_config(environ={"CHURN_MONITORING__POLICY__REFRESH_AFTER_DRIFT": "false"}),
                       drop, {}) is None


def perf_win(i: int, drops: dict[str, tuple[float, float]],
             psi: dict[str, float] | None = None) -> WindowStats:
    """A window whose segments' AUC dropped by ``drop`` with standard error ``se`` (noise level
    3 x se, as monitoring records it with a Bonferroni z of 3)."""
    w = win(i)
    for key, (drop, se) in drops.items():
        w.segment_auc_drop[key] = drop
        w.segment_auc_drop_threshold[key] = 3.0 * se
        w.segment_performance[key] = {"segment": key, "source": "realised", "auc": 0.76 - drop,
                                      "reference": 0.76, "reference_source": "first window", "drop": drop,
                                      "drop_se": se, "z": 3.0}
    for key, value in (psi or {}).items():
        w.segment_psi[key], w.segment_threshold[key] = value, 0.1
    return w


def test_segment_rule_fires_on_a_performance_drop_beyond_its_noise() -> None:
    hist = [perf_win(0, {"region=pacific": (0.14, 0.03), "plan=basic": (0.01, 0.02)}),
            perf_win(1, {"region=pacific": (0.15, 0.03), "plan=basic": (0.02, 0.02)})]
    d = decide(hist, cfg(), hist[-1].as_of)
    assert d.action == "retrain"
    assert d.segments == ["region=pacific"]
    (drop,) = d.segment_drops
    assert (drop.segment, drop.source) == ("region=pacific", "realised")
    assert drop.baseline_source == "first window"
    assert drop.drop == pytest.approx(0.15) and drop.se == pytest.approx(0.03)
    assert drop.auc == pytest.approx(0.61) and drop.baseline == pytest.approx(0.76)
    assert drop.limit == pytest.approx(0.09) and (drop.hits, drop.windows) == (2, 2)
    assert d.fired == ["segment_auc_drop[region=pacific] > 0.05"]
    # the decision text names the segment, its drop and its SE
    text = " ".join(d.reasons)
    assert "region=pacific" in text and "drop 0.150" in text and "SE 0.030" in text
    assert d.to_dict()["segment_drops"][0]["se"] == pytest.approx(0.03)
    # the decision as a payload: written and read back through its one writer / reader
    payload = json.loads(json.dumps(decision_to_dict(d)))
    assert payload["schema_version"] == DECISION_SCHEMA_VERSION == 1 and payload["action"] == "retrain"
    back = decision_from_dict(payload)
    assert back == d and back.action is PolicyAction.RETRAIN
    # investigate instead, when the config says so
    assert decide(hist, cfg(segment_action="investigate"), hist[-1].as_of).action == "investigate"


def test_segment_rule_ignores_noise_small_drops_and_psi_alone() -> None:
    # the same drop in a noisy (small) segment: within 3 x SE, not named
    noisy = [perf_win(i, {"region=islands": (0.15, 0.06)}) for i in range(3)]
    d = decide(noisy, cfg(), noisy[-1].as_of)
    assert d.action == "ok" and d.segments == [] and d.segment_drops == []
    # beyond its (tiny) noise but below policy.segment_min_drop
    tiny = [perf_win(i, {"plan=basic": (0.04, 0.005)}) for i in range(3)]
    assert decide(tiny, cfg(), tiny[-1].as_of).action == "ok"
    assert decide(tiny, cfg(segment_min_drop=0.03), tiny[-1].as_of).segments == ["plan=basic"]
    # a segment whose inputs drifted (PSI) but whose AUC holds: context, investigate, never retrain
    psi = [perf_win(i, {"region=pacific": (0.0, 0.03)}, psi={"region=pacific": 0.6}) for i in range(3)]
    d = decide(psi, cfg(), psi[-1].as_of)
    assert d.action == "investigate" and d.segments == [] and d.drift_segments == ["region=pacific"]


def test_segment_rule_has_persistence_and_hysteresis() -> None:
    quiet = perf_win(0, {"region=pacific": (0.0, 0.03)})
    once = [quiet, perf_win(1, {"region=pacific": (0.2, 0.03)})]
    d = decide(once, cfg(), once[-1].as_of)
    assert d.action == "ok" and d.segments == [] and d.pending_drops == {"region=pacific": pytest.approx(0.2)}
    assert any("not yet in 2 of the last 2" in r and "region=pacific" in r for r in d.reasons)
    twice = [*once, perf_win(2, {"region=pacific": (0.2, 0.03)})]
    assert decide(twice, cfg(), twice[-1].as_of).segments == ["region=pacific"]
    # below the 0.09 noise level but above half of it: still named (hysteresis); clearly below: cleared
    held = decide([*twice, perf_win(3, {"region=pacific": (0.06, 0.03)})], cfg(), T0 + timedelta(days=21))
    assert held.segments == ["region=pacific"]
    cleared = decide([*twice, perf_win(3, {"region=pacific": (0.03, 0.03)})], cfg(), T0 + timedelta(days=21))
    assert cleared.segments == [] and cleared.action == "ok"
    # a retrain on a segment drop respects the cooldown
    d = decide(twice, cfg(), twice[-1].as_of, last_retrain=twice[-1].as_of - timedelta(days=2))
    assert d.action == "investigate" and d.segments == ["region=pacific"]



def test_decision_payload_versions() -> None:
    """A decision without schema_version (the previous release's decision.json) reads as
    version 1 with its missing lists empty; a newer version, a missing action or an unknown
    action is a ChurnError naming it."""
    previous_release = {"action": "investigate", "reasons": ["psi"], "features": ["age"], "segments": [],
                        "fired": ["psi[*] > 0.2"], "as_of": T0.isoformat()}
    d = decision_from_dict(previous_release)
    assert d.action == PolicyAction.INVESTIGATE == "investigate" and d.as_of == T0
    assert (d.features, d.triggers, d.segment_drops, d.pending_drops) == (["age"], [], [], {})
    assert decision_to_dict(d)["schema_version"] == 1
    with pytest.raises(ChurnError, match="schema_version 2, newer than the 1"):
        decision_from_dict({**previous_release, "schema_version": 2})
    with pytest.raises(ChurnError, match="lacks action"):
        decision_from_dict({"as_of": T0.isoformat()})
    with pytest.raises(ChurnError, match="unknown action 'panic'"):
        decision_from_dict({**previous_release, "action": "panic"})

