"""check_promotion's rules on the embedded store, on decisions signed by the project's own
recording code (the gate's ``_record_verdict``, the canary evaluation, ``record_signed``);
the guard's server tests: test_guard.py."""

from __future__ import annotations

import json

from guard_support import canary_verdict, gate, new_version
from mlflow.tracking import MlflowClient

from mlflow_churn.registry.aliases import CANARY, CHAMPION, PREVIOUS_CHAMPION
from mlflow_churn.registry.promotion import OVERRIDE_TAG, check_approval, check_promotion
from mlflow_churn.registry.signing import record_signed, sig_tag


def test_rules_that_depend_on_the_history_of_the_model(config) -> None:
    uri = config.mlflow_tracking_uri
    client = MlflowClient(uri, uri)
    name = config.training.model_name
    v1, v2, v3, v4 = (new_version(client, config) for _ in range(4))
    gate(client, config, v1, passed=True)
    assert check_promotion(client, name, v1, config).rule == "first_champion"
    client.set_registered_model_alias(name, CHAMPION, v1)
    mv1 = client.get_model_version(name, v1)

    # a canary that failed: refused with the canary's reason
    gate(client, config, v2, passed=True)
    assert canary_verdict(config, v2, canary_status="error") == "rollback"
    chk = check_promotion(client, name, v2, config)
    assert (chk.allowed, chk.rule) == (False, "canary_rollback") and "says rollback" in chk.message

    # a verdict measured against another champion is stale
    gate(client, config, v3, passed=True)
    assert canary_verdict(config, v3) == "promote"
    assert check_promotion(client, name, v3, config).rule == "gate_and_canary"
    # a typed override is a note for people, not a reason (no basic-auth guard wrote it)
    gate(client, config, v4, passed=False)
    client.set_model_version_tag(name, v4, OVERRIDE_TAG, "incident 7")
    assert check_promotion(client, name, v4, config).rule == "gate_rejected"
    record_signed(client, config, name, v4, "override", "override", champion=mv1, run_id="",
                  reason="incident 7")
    assert check_promotion(client, name, v4, config).rule == "override"
    client.set_registered_model_alias(name, CHAMPION, v4)
    assert check_promotion(client, name, v1, config, PREVIOUS_CHAMPION).rule == "promotion_left_behind"
    assert check_promotion(client, name, v3, config, PREVIOUS_CHAMPION).rule == "lifecycle"
    client.set_registered_model_alias(name, PREVIOUS_CHAMPION, v1)
    chk = check_promotion(client, name, v3, config)
    assert (chk.allowed, chk.rule) == (False, "canary_pending")
    assert f"version {v1}, the champion is {v4}" in chk.message
    # going back needs a signed rollback of the champion naming the version it replaced
    assert check_promotion(client, name, v1, config).allowed is False
    assert check_promotion(client, name, None, config, PREVIOUS_CHAMPION).rule == "lifecycle"
    record_signed(client, config, name, v4, "rollback", "rollback",
                  champion=client.get_model_version(name, v1), run_id="", reason="v4 scores NaN")
    assert check_promotion(client, name, v1, config).rule == "rollback"
    assert check_promotion(client, name, None, config, PREVIOUS_CHAMPION).rule == "rollback"
    assert check_promotion(client, name, None, config, CANARY).rule == "canary_removed"

    # no champion and no previous-champion: the gate alone makes a first champion again
    client.delete_registered_model_alias(name, CHAMPION)
    client.delete_registered_model_alias(name, PREVIOUS_CHAMPION)
    assert check_promotion(client, name, v3, config).rule == "first_champion"
    assert check_approval(client, name, v3, config).rule == "approval_not_required"


def test_a_changed_signature_or_a_copied_decision_does_not_count(config) -> None:
    uri = config.mlflow_tracking_uri
    client = MlflowClient(uri, uri)
    name = config.training.model_name
    v1, v2 = new_version(client, config), new_version(client, config)
    gate(client, config, v1, passed=True)
    tag = sig_tag("gate")
    good = client.get_model_version(name, v1).tags[tag]
    env = json.loads(good)
    env["payload"]["decision"] = "passed "  # one character more
    client.set_model_version_tag(name, v1, tag, json.dumps(env))
    chk = check_promotion(client, name, v1, config)
    assert (chk.allowed, chk.rule) == (False, "bad_signature") and "does not verify" in chk.message
    # a valid decision of v1 copied onto v2: signed for another version
    client.set_model_version_tag(name, v1, tag, good)
    client.set_model_version_tag(name, v2, tag, good)
    chk = check_promotion(client, name, v2, config)
    assert (chk.allowed, chk.rule) == (False, "bad_signature") and "another version" in chk.message
    assert check_promotion(client, name, v1, config).rule == "first_champion"
