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
    path = tmp_path / "churn.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_env_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="CHURN_TRAINING__WINDOWDAYS"):
        load_config(environ={"CHURN_TRAINING__WINDOWDAYS": "3"})
    with pytest.raises(ConfigError, match="training.window_days"):
        load_config(environ={"CHURN_TRAINING__WINDOW_DAYS": "abc"})


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml", environ={})
