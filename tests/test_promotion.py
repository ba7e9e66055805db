"""check_promotion's rules on the embedded store (the guard's server tests: test_guard.py)."""

from __future__ import annotations

from guard_support import canary_verdict, gate, new_version
from mlflow.tracking import MlflowClient

from mlflow_churn.registry.aliases import CHAMPION, PREVIOUS_CHAMPION
from mlflow_churn.registry.promotion import OVERRIDE_TAG, check_approval, check_promotion


def test_rules_that_depend_on_the_history_of_the_model(config) -> None:
    uri = config.mlflow_tracking_uri
    client = MlflowClient(uri, uri)
    name = config.training.model_name
    v1, v2, v3, v4 = (new_version(client, config) for _ in range(4))
    gate(client, config, v1, passed=True)
    assert check_promotion(client, name, v1, config).rule == "first_champion"
    client.set_registered_model_alias(name, CHAMPION, v1)
    client.set_model_version_tag(name, v1, "promoted_at", "2026-05-01T00:00:00+00:00")  # as promote does

    # a canary that failed: refused with the canary's reason
    gate(client, config, v2, passed=True)
    assert canary_verdict(config, v2, canary_status="error") == "rollback"
    chk = check_promotion(client, name, v2, config)
    assert (chk.allowed, chk.rule) == (False, "canary_rollback") and "says rollback" in chk.message

    # a verdict measured against another champion is stale
    gate(client, config, v3, passed=True)
    assert canary_verdict(config, v3) == "promote"
    assert check_promotion(client, name, v3, config).rule == "gate_and_canary"
    client.set_model_version_tag(name, v4, OVERRIDE_TAG, "incident 7")
    assert check_promotion(client, name, v4, config).rule == "override"
    client.set_registered_model_alias(name, CHAMPION, v4)
    client.set_registered_model_alias(name, PREVIOUS_CHAMPION, v1)
    chk = check_promotion(client, name, v3, config)
    assert (chk.allowed, chk.rule) == (False, "canary_pending") and f"champion is now {v4}" in chk.message
    assert check_promotion(client, name, v1, config).rule == "rollback"

    # no champion any more, but the model had one: the first-champion rule does not apply again
    client.delete_registered_model_alias(name, CHAMPION)
    client.delete_registered_model_alias(name, PREVIOUS_CHAMPION)
    assert check_promotion(client, name, v3, config).rule == "gate_and_canary"
    assert check_approval(client, name, v3, config).rule == "approval_not_required"
