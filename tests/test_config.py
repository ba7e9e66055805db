"""The typed configuration: defaults, YAML, CHURN_* variables, precedence, errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlflow_churn.config import ChurnConfig, load_config
from mlflow_churn.errors import ConfigError


def test_defaults_are_documented_and_valid(workspace: Path) -> None:
    cfg = load_config(workspace=workspace, environ={})
    assert cfg.training.window_days == 30
    assert cfg.features.online_backend == "sqlite"
    assert cfg.mlflow_tracking_uri == f"sqlite:///{workspace.resolve() / 'mlflow.db'}"
    for name, field in ChurnConfig.model_fields.items():
        assert field.description or name in ("simulation", "features", "training", "evaluation",
                                             "monitoring", "serving", "hooks"), name


def test_yaml_then_env_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "churn.yaml"
    path.write_text("training:\n  window_days: 14\n  n_trials: 3\nworkspace: from-yaml\n")
    cfg = load_config(path, environ={"CHURN_TRAINING__N_TRIALS": "7"})
    assert (cfg.training.window_days, cfg.training.n_trials) == (14, 7)
    assert cfg.workspace == Path("from-yaml")
    cfg = load_config(path, workspace=tmp_path / "w", overrides={"training.window_days": 9},
                      environ={"CHURN_WORKSPACE": "from-env"})
    assert cfg.training.window_days == 9 and cfg.workspace == tmp_path / "w"
    assert load_config(path, environ={"CHURN_WORKSPACE": "from-env"}).workspace == Path("from-env")


def test_config_path_from_env(tmp_path: Path) -> None:
    path = tmp_path / "other.yaml"
    path.write_text("evaluation:\n  top_k_pct: 5\n")
    assert load_config(environ={"CHURN_CONFIG": str(path)}).evaluation.top_k_pct == 5


def test_mlflow_tracking_uri_wins(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config(workspace=workspace, environ={}, overrides={"tracking_uri": "sqlite:///x.db"})
    assert cfg.mlflow_tracking_uri == "sqlite:///x.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert cfg.mlflow_tracking_uri == "http://127.0.0.1:5999"


def _refused(tmp_path: Path, text: str) -> str:
    """The ConfigError message load_config gives for ``text`` as churn.yaml."""
    path = tmp_path / "churn.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    return str(err.value)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("training:\n  windw_days: 3\n", "training.windw_days"),
        ("bogus: 1\n", "'bogus'"),
        ("training:\n  window_days: many\n", "training.window_days"),
        ("training:\n  window_days: -1\n", "training.window_days"),
        ("simulation:\n  scenario: chaos\n", "simulation.scenario"),
        ("- a\n- b\n", "mapping"),
        ("training: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_yaml_names_the_key(tmp_path: Path, text: str, needle: str) -> None:
    message = _refused(tmp_path, text)
    assert needle in message and "\n" not in message


def test_bad_env_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="CHURN_TRAINING__WINDOWDAYS"):
        load_config(environ={"CHURN_TRAINING__WINDOWDAYS": "3"})
    with pytest.raises(ConfigError, match="training.window_days"):
        load_config(environ={"CHURN_TRAINING__WINDOW_DAYS": "abc"})


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml", environ={})


# --- settings that can never work ----------------------------------------------------

@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("evaluation:\n  min_auc_delta: .inf\n", "evaluation.min_auc_delta"),
        ("evaluation:\n  min_auc_delta: 2\n", "evaluation.min_auc_delta"),
        ("evaluation:\n  save_rate: .nan\n", "evaluation.save_rate"),
        ("evaluation:\n  segment_tolerance: 1.5\n", "evaluation.segment_tolerance"),
        ("serving:\n  canary_fraction: 1.2\n", "serving.canary_fraction"),
        ("serving:\n  reload_seconds: .inf\n", "serving.reload_seconds"),
        ("serving:\n  max_p99_ms: .nan\n", "serving.max_p99_ms"),
        ("features:\n  freshness_sla_hours: -.inf\n", "features.freshness_sla_hours"),
        ("training:\n  timeout_seconds: .inf\n", "training.timeout_seconds"),
        ("training:\n  history_weight: 1.5\n", "training.history_weight"),
        ("monitoring:\n  psi_epsilon: 1\n", "monitoring.psi_epsilon"),
        ("monitoring:\n  auc_noise_z: .inf\n", "monitoring.auc_noise_z"),
        ("monitoring:\n  policy:\n    max_null_increase: 2\n", "monitoring.policy.max_null_increase"),
        ("monitoring:\n  policy:\n    triggers:\n      - {metric: psi, op: '>', value: -1}\n",
         "monitoring.policy.triggers.0.value"),
        ("monitoring:\n  policy:\n    triggers:\n      - {metric: psi, op: '>=', value: 0}\n",
         "always fires"),
        ("monitoring:\n  policy:\n    triggers:\n      - {metric: ks, op: '>', value: 1}\n", "never fires"),
        ("monitoring:\n  policy:\n    triggers:\n      - {metric: chi2_p, op: '<', value: 1.5}\n",
         "always fires"),
        ("monitoring:\n  policy:\n    triggers:\n      - {metric: chi2_p, op: '<', value: 0}\n",
         "never fires"),
        ("monitoring:\n  policy:\n    triggers:\n      - {metric: auc_drop, value: 1}\n", "never fires"),
        ("monitoring:\n  policy:\n    triggers:\n      - {metric: psi, value: .inf}\n",
         "monitoring.policy.triggers.0.value"),
        ("monitoring:\n  policy:\n    triggers:\n      - {metric: psi, value: .nan}\n",
         "monitoring.policy.triggers.0.value"),
        ("monitoring:\n  policy:\n    persistence: {windows: 2, required: 3}\n",
         "monitoring.policy.persistence.required"),
        ("monitoring:\n  policy:\n    triggers:\n      - {metric: psi, value: 0.2, persistence: "
         "{windows: 1, required: 2}}\n", "monitoring.policy.triggers.0.persistence.required"),
        ("monitoring:\n  policy:\n    combine: k_of_n\n    k: 4\n", "monitoring.policy.k"),
        ("monitoring:\n  early_label_days: 40\n", "monitoring.early_label_days"),
    ],
)
def test_settings_that_can_never_work_are_refused(tmp_path: Path, text: str, needle: str) -> None:
    message = _refused(tmp_path, text)
    assert needle in message and "\n" not in message


@pytest.mark.parametrize("raw", ["inf", "nan", "-inf", "Infinity"])
def test_env_and_overrides_refuse_non_finite_numbers(raw: str) -> None:
    with pytest.raises(ConfigError, match="evaluation.min_auc_delta"):
        load_config(environ={"CHURN_EVALUATION__MIN_AUC_DELTA": raw})
    with pytest.raises(ConfigError, match="serving.canary_fraction"):
        load_config(environ={}, overrides={"serving.canary_fraction": float(raw.replace("Infinity", "inf"))})


def test_sensible_triggers_still_load(tmp_path: Path) -> None:
    path = tmp_path / "churn.yaml"
    path.write_text(
        "monitoring:\n  policy:\n    combine: k_of_n\n    k: 2\n    persistence: {windows: 3, required: 3}\n"
        "    triggers:\n"
        "      - {metric: psi, op: '>', value: 0}\n"
        "      - {metric: chi2_p, op: '<', value: 0.01}\n"
        "      - {metric: ks}\n"
        "      - {metric: auc_drop, op: '>=', value: -0.5}\n"
        "      - {metric: lift_drop, value: 5}\n")
    cfg = load_config(path, environ={})
    assert [t.metric for t in cfg.monitoring.policy.triggers] == ["psi", "chi2_p", "ks", "auc_drop",
                                                                  "lift_drop"]


def test_masked_hides_tokens_secrets_and_url_passwords() -> None:
    from mlflow_churn.config import masked

    cfg = load_config(environ={"CHURN_SERVING__ADMIN_TOKEN": "adm1n",
                               "CHURN_HOOKS__SECRET": "h00k",
                               "CHURN_SERVING__PREDICTION_LOG": "postgresql://churn:pg-pw@db:5432/churn",
                               "CHURN_FEATURES__REDIS_URL": "redis://:r3dis@cache:6379/0",
                               "CHURN_TRAINING__STORAGE": "postgresql://u:opt%40pw@db/optuna?sslmode=off"})
    shown = masked(cfg.model_dump(mode="json"))
    text = repr(shown)
    for secret in ("adm1n", "h00k", "pg-pw", "r3dis", "opt%40pw"):
        assert secret not in text, secret
    assert shown["serving"]["admin_token"] == "***" and shown["hooks"]["secret"] == "***"
    assert shown["serving"]["prediction_log"] == "postgresql://churn:***@db:5432/churn"
    assert shown["features"]["redis_url"] == "redis://:***@cache:6379/0"
    # keys other helpers add (serving.api_token, features.api_token) are masked by their name
    assert masked({"serving": {"api_token": "t"}, "features": {"api_token": "u", "max_ids": 3}}) == {
        "serving": {"api_token": "***"}, "features": {"api_token": "***", "max_ids": 3}}
    assert masked({"serving": {"admin_token": None}}) == {"serving": {"admin_token": None}}


def test_canary_min_requests_is_the_promotion_floor(tmp_path: Path) -> None:
    """`canary.min_requests` defaults to the verdict's serving.min_canary_samples."""
    cfg = load_config(workspace=tmp_path, environ={})
    assert cfg.canary.min_requests is None and cfg.canary.needed(cfg.serving) == 500
    cfg = load_config(workspace=tmp_path, environ={"CHURN_CANARY__MIN_REQUESTS": "5000"})
    assert cfg.canary.needed(cfg.serving) == 5000
    assert "canary.min_requests" in _refused(tmp_path, "canary:\n  min_requests: 0\n")
