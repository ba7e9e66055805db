"""The champion/challenger gate on real registered models (small_data, sqlite MLflow store).

Each test registers real XGBoost versions with the ``register_version`` fixture and runs
the whole gate (holdout frame, scoring, metrics, drift report, decision run, alias moves).
"""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from mlflow_churn.config import ChurnConfig, load_config
from mlflow_churn.data.simulator import SimulationSpec, simulate
from mlflow_churn.errors import ChurnError
from mlflow_churn.evaluation.evaluate import DECISION_FILE, evaluate
from mlflow_churn.registry.aliases import CANARY, alias_version
from mlflow_churn.training.targeting import SegmentTargets

pytestmark = pytest.mark.slow

AS_OF = datetime(2026, 5, 1, tzinfo=UTC)
SAMPLE = 3000  # drift-report rows in tests (the gate's metrics use the whole holdout)


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One workspace (sqlite MLflow store) for the module: creating a store costs seconds.

    Its data: 12,000 simulated customers (small_data's 3000 leave the holdout customers
    of one region with 2-6 churners: too few for any segment AUC to mean something)."""
    ws = tmp_path_factory.mktemp("gate") / "ws"
    simulate(SimulationSpec(customers=12_000, days=120, start=date(2026, 1, 1), seed=7), ws / "data")
    return ws


@pytest.fixture
def config(workspace: Path, shared_store: Path, request: pytest.FixtureRequest) -> ChurnConfig:
    """The default config on the shared store, with a model name of this test's own."""
    return load_config(workspace=shared_store, environ={},
                       overrides={"training.model_name": f"churn-{request.node.name[5:40]}"})


def _json_artifact(client: MlflowClient, run_id: str, path: str, tmp: Path) -> dict:
    return json.loads(Path(client.download_artifacts(run_id, path, str(tmp))).read_text())


def _registry_state(client: MlflowClient, name: str) -> list:
    return sorted((v.version, dict(v.tags), sorted(v.aliases), v.current_stage)
                  for v in client.search_model_versions(f"name = '{name}'"))


def test_better_challenger_reaches_canary_and_rerun_changes_nothing(config, register_version,
                                                                    tmp_path) -> None:
    cfg = config.model_copy(deep=True)
    cfg.evaluation.mirror_stages = True
    cfg.evaluation.min_auc_delta = 0.05
    champ = register_version(cfg, "bad", alias="champion")
    chal = register_version(cfg, "good", alias="challenger")
    decision = evaluate(cfg, AS_OF, drift_sample_rows=SAMPLE)
    assert decision.passed, decision.reasons
    assert decision.challenger_version == chal.version and decision.champion_version == champ.version
    auc_rule = next(r for r in decision.rules if r.rule == "auc_vs_champion")
    assert auc_rule.required == pytest.approx(auc_rule.baseline + 0.05)
    client = MlflowClient()
    name = cfg.training.model_name
    assert alias_version(client, name, CANARY).version == chal.version
    mv = client.get_model_version(name, chal.version)
    assert mv.tags["gate"] == "passed" and mv.current_stage == "Staging"  # mirror_stages
    assert mv.tags["drift_report"] == f"runs:/{decision.run_id}/drift/report.html"
    assert mv.tags["gate_champion_version"] == str(champ.version)  # the canary analysis reads these two
    expected_psi = decision.metrics["score_psi_vs_champion"]
    assert float(mv.tags["gate_score_psi"]) == pytest.approx(expected_psi, abs=1e-6)
    # and the score shift the canary judge expects between the two (P(chal > champ) - 0.5)
    shift = decision.metrics["score_shift_vs_champion"]
    assert -0.5 <= shift <= 0.5 and float(mv.tags["gate_score_shift"]) == pytest.approx(shift, abs=1e-6)
    run = client.get_run(decision.run_id)
    assert run.data.metrics["challenger_roc_auc"] > run.data.metrics["champion_roc_auc"] + 0.05
    arts = {a.path for a in client.list_artifacts(decision.run_id)}
    assert {"plots", "drift", "segments", DECISION_FILE} <= arts
    plots = {Path(a.path).name for a in client.list_artifacts(decision.run_id, "plots")}
    assert plots == {"roc.png", "pr.png", "gain_lift.png", "calibration.png", "segment_auc.png"}
    html = Path(client.download_artifacts(decision.run_id, "drift/report.html", str(tmp_path)))
    assert html.stat().st_size > 10_000 and "<html" in html.read_text()[:2000].lower()
    data = _json_artifact(client, decision.run_id, DECISION_FILE, tmp_path)
    assert data["passed"] is True and data["holdout"]["start"] > chal.tags["window_end"]
    assert data["challenger"]["metrics"]["roc_auc"] == pytest.approx(decision.metrics["challenger_roc_auc"])
    assert data["holdout"]["rows"] == decision.holdout_rows > 0
    rules = {r["rule"] for r in data["rules"]}
    assert rules == {"auc_vs_champion", "recall_at_k", "revenue_lift", "segment_auc"}
    drift = _json_artifact(client, decision.run_id, "drift/drift.json", tmp_path)
    assert set(drift["features"]) >= {"monthly_usage", "region"} and "psi" in drift["score"]

    # same versions, same holdout, same config: same decision, nothing changes
    exp_ids = [e.experiment_id for e in client.search_experiments()]
    runs_before = len(client.search_runs(exp_ids))
    state_before = _registry_state(client, name)
    again = evaluate(cfg, AS_OF, drift_sample_rows=SAMPLE)
    assert again.reused and again.run_id == decision.run_id
    assert (again.passed, again.reasons) == (decision.passed, decision.reasons)
    assert again.metrics == decision.metrics
    assert len(client.search_runs(exp_ids)) == runs_before
    assert _registry_state(client, name) == state_before

    # a stricter config is a different decision (the config is part of the key)
    cfg.evaluation.min_auc_delta = 0.5
    strict = evaluate(cfg, AS_OF, drift_sample_rows=SAMPLE)
    assert not strict.reused and not strict.passed
    assert any("min_auc_delta 0.5" in r for r in strict.reasons)


def test_worse_challenger_rejected_with_reasons(config, register_version, tmp_path) -> None:
    register_version(config, "good", alias="champion")
    chal = register_version(config, "bad", alias="challenger")
    decision = evaluate(config, AS_OF, drift_sample_rows=SAMPLE)
    assert not decision.passed
    failed = {r.rule for r in decision.rules if not r.passed}
    assert {"auc_vs_champion", "recall_at_k", "revenue_lift"} <= failed
    assert any("ROC AUC" in r for r in decision.reasons)
    client = MlflowClient()
    name = config.training.model_name
    assert alias_version(client, name, CANARY) is None
    mv = client.get_model_version(name, chal.version)
    assert mv.tags["gate"] == "rejected" and "ROC AUC" in mv.tags["gate_reasons"]
    assert mv.tags["gate_run_id"] == decision.run_id
    data = _json_artifact(client, decision.run_id, DECISION_FILE, tmp_path)
    assert data["passed"] is False and data["reasons"] == decision.reasons
    assert client.get_run(decision.run_id).data.metrics["gate_passed"] == 0.0


def test_segment_rule_rejects_good_overall_bad_in_one_segment(config, register_version) -> None:
    # the rule on point estimates (segment_alpha = 0); the SE widening is tested on its own
    config.evaluation.segment_alpha = 0.0
    register_version(config, "bad", alias="champion")
    chal = register_version(config, "bad_segment", alias="challenger", bad_segment=("plan", "premium"))
    decision = evaluate(config, AS_OF, drift_sample_rows=SAMPLE)
    by_rule: dict[str, list] = {}
    for r in decision.rules:
        by_rule.setdefault(r.rule, []).append(r)
    # better overall, on recall and on lift ...
    assert all(r.passed for k in ("auc_vs_champion", "recall_at_k", "revenue_lift") for r in by_rule[k])
    # ... but one segment collapsed
    failed = [r.metric for r in by_rule["segment_auc"] if not r.passed]
    assert failed == ["roc_auc_plan_premium"]
    assert not decision.passed and len(decision.reasons) == 1 and "plan=premium" in decision.reasons[0]
    client = MlflowClient()
    assert client.get_model_version(config.training.model_name, chal.version).tags["gate"] == "rejected"
    assert alias_version(client, config.training.model_name, CANARY) is None


def test_segment_below_min_size_is_not_gated(config, register_version) -> None:
    cfg = config.model_copy(deep=True)
    cfg.evaluation.min_segment_size = 100_000  # every segment too small
    register_version(cfg, "bad", alias="champion")
    register_version(cfg, "bad_segment", alias="challenger")
    decision = evaluate(cfg, AS_OF, drift_sample_rows=SAMPLE)
    assert decision.passed and not [r for r in decision.rules if r.rule == "segment_auc"]


def test_first_model_uses_absolute_floors(config, register_version) -> None:
    good = register_version(config, "good", alias="challenger")
    decision = evaluate(config, AS_OF, drift_sample_rows=SAMPLE)
    assert decision.passed and decision.champion_version is None
    assert {r.rule for r in decision.rules} == {"auc_floor", "lift_floor"}
    client = MlflowClient()
    assert alias_version(client, config.training.model_name, CANARY).version == good.version
    strict = config.model_copy(deep=True)
    strict.evaluation.min_auc = 0.9
    weak = register_version(strict, "bad", alias="challenger")
    rejected = evaluate(strict, AS_OF, drift_sample_rows=SAMPLE)
    assert not rejected.passed and rejected.champion_version is None
    assert any("evaluation.min_auc" in r for r in rejected.reasons)
    assert client.get_model_version(strict.training.model_name, weak.version).tags["gate"] == "rejected"
    assert alias_version(client, config.training.model_name, CANARY).version == good.version


def test_a_version_number_reused_after_a_delete_is_gated_afresh(config, register_version) -> None:
    """Versions are known by identity: a model deleted and re-created gets a new v1, which is
    another model and must not be answered with the old v1's decision."""
    first = register_version(config, "good", alias="challenger")
    decision = evaluate(config, AS_OF, drift_sample_rows=SAMPLE)
    assert decision.passed and not decision.reused
    client = MlflowClient()
    client.delete_registered_model(config.training.model_name)
    second = register_version(config, "bad", alias="challenger")
    assert second.version == first.version  # the number comes back
    redo = evaluate(config, AS_OF, drift_sample_rows=SAMPLE)
    assert not redo.reused and redo.run_id != decision.run_id
    assert redo.metrics["challenger_roc_auc"] != decision.metrics["challenger_roc_auc"]


def test_missing_challenger_and_empty_holdout_are_named(config, register_version) -> None:
    register_version(config, "good", alias=None)
    with pytest.raises(ChurnError, match="alias 'challenger'"):
        evaluate(config, AS_OF)
    with pytest.raises(ChurnError, match="version 99 "):
        evaluate(config, AS_OF, challenger_alias="99")
    register_version(config, "good", alias="challenger", window_end=datetime(2026, 3, 31, tzinfo=UTC))
    with pytest.raises(ChurnError, match="empty holdout.*2026-03-31"):
        evaluate(config, datetime(2026, 4, 25, tzinfo=UTC))


def test_table_version_is_refused_and_a_later_pass_clears_old_reasons(config, register_version) -> None:
    table = register_version(config, "good", alias="challenger")
    client = MlflowClient()
    name = config.training.model_name
    client.set_model_version_tag(name, table.version, "source", "table")
    with pytest.raises(ChurnError, match="trained from a flat table"):
        evaluate(config, AS_OF, drift_sample_rows=SAMPLE)
    # a version rejected once (say, by a stricter config) and passing now keeps no stale reasons
    chal = register_version(config, "good", alias="challenger", seed=5)
    strict = config.model_copy(deep=True)
    strict.evaluation.min_auc = 0.99
    assert not evaluate(strict, AS_OF, drift_sample_rows=SAMPLE).passed
    assert "gate_reasons" in client.get_model_version(name, chal.version).tags
    assert evaluate(config, AS_OF, drift_sample_rows=SAMPLE).passed
    tags = client.get_model_version(name, chal.version).tags
    assert tags["gate"] == "passed" and "gate_reasons" not in tags


def test_targeted_challenger_must_improve_its_segments_and_degrade_no_other(config, register_version,
                                                                           tmp_path) -> None:
    """A challenger of a targeted retrain (the targets are tags of its source run) passes only
    when each named segment improves on the champion beyond noise and no other segment loses
    more than its tolerance; the decision names the targets."""
    from tests.conftest import TEST_WINDOW_END

    name, key = config.training.model_name, "contract=month-to-month"
    random_champ = register_version(config, "bad", alias="champion")
    client = MlflowClient()  # on the store the fixture set up

    def targeted(mv):
        for tag, value in SegmentTargets((key,), 3.0).to_tags().items():
            client.set_tag(mv.run_id, tag, value)
        return mv

    good = targeted(register_version(config, "good", alias=None))
    # 1. better than a champion that ranks at random, in the named segment too: passes
    passed = evaluate(config, AS_OF, good.version, "champion", drift_sample_rows=SAMPLE)
    assert passed.passed, passed.reasons
    assert passed.target_segments == [key] and passed.segment_weight == 3.0
    improves = [r for r in passed.rules if r.rule == "segment_improves"]
    assert [r.metric for r in improves] == ["roc_auc_contract_month-to-month"] and improves[0].passed
    assert improves[0].candidate >= improves[0].required > improves[0].baseline
    data = _json_artifact(client, passed.run_id, DECISION_FILE, tmp_path)
    assert data["targeted"] == {"segments": [key], "weight": 3.0, "source_run": good.run_id, "applied": True}
    assert client.get_run(passed.run_id).data.tags["gate.target_segments"] == key

    # 2. a model as good as the champion (the same recipe on cutoffs a few days apart): nothing
    #    else fails, but the named segment did not improve beyond noise -> rejected; untargeted,
    #    the same pair passes
    champ = register_version(config, "good", alias=None)
    same = register_version(config, "good", alias=None, window_end=TEST_WINDOW_END - timedelta(days=3),
                            window_days=14)
    plain = evaluate(config, AS_OF, same.version, champ.version, drift_sample_rows=SAMPLE)
    plain_failed = {r.rule for r in plain.rules if not r.passed}
    assert plain.target_segments == [] and "segment_auc" not in plain_failed
    assert "segment_improves" not in {r.rule for r in plain.rules}
    targeted(same)
    refused = evaluate(config, AS_OF, same.version, champ.version, drift_sample_rows=SAMPLE)
    assert not refused.reused and refused.run_id != plain.run_id  # the targets are part of the gate key
    assert not refused.passed and {r.rule for r in refused.rules if not r.passed} == plain_failed | {
        "segment_improves"}
    assert any(reason.startswith(f"targeted segment {key}") for reason in refused.reasons)
    assert client.get_model_version(name, same.version).tags["gate"] == "rejected"

    # 3. the named segment improves but another segment collapses -> rejected by segment_auc
    point = config.model_copy(deep=True)
    point.evaluation.segment_alpha = 0.0  # as in the segment rule's own test
    collapsed = targeted(register_version(point, "bad_segment", alias=None, bad_segment=("plan", "premium")))
    degraded = evaluate(point, AS_OF, collapsed.version, random_champ.version, drift_sample_rows=SAMPLE)
    failed = {r.metric: r.rule for r in degraded.rules if not r.passed}
    assert not degraded.passed and failed == {"roc_auc_plan_premium": "segment_auc"}
    assert all(r.passed for r in degraded.rules if r.rule == "segment_improves")
