"""Every documented CHURN_* variable works (pydantic-settings reads them); an unknown one is a
one-line error naming the nearest known variable."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest
from serving_support import churn_app, run_cli

from mlflow_churn.config import ChurnConfig, _known_keys, env_name, load_config
from mlflow_churn.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _documented() -> set[str]:
    """The CHURN_* names the package's strings and the docs mention (prefixes like
    ``CHURN_<SECTION>__`` and Python constants excluded)."""
    names: set[str] = set()
    for path in [*ROOT.joinpath("mlflow_churn").rglob("*.py"), *ROOT.joinpath("docs").rglob("*.md")]:
        names |= set(re.findall(r"\bCHURN_[A-Z0-9_]*[A-Z0-9]\b", path.read_text()))
    return names - {"CHURN_EVENTS_SCHEMA"}


def test_every_documented_variable_is_a_known_name() -> None:
    """Each documented name reaches a config key: a value of the wrong type is then refused
    naming that key, never as an unknown variable."""
    documented = _documented()
    assert {"CHURN_ADMIN_TOKEN", "CHURN_MLFLOW_BACKEND_URI", "CHURN_WORKSPACE"} <= documented
    for name in sorted(documented - {"CHURN_CONFIG"}):
        try:
            load_config(environ={name: "1"})
        except ConfigError as exc:
            assert str(exc).startswith("bad value for config key"), (name, str(exc))


def test_short_names_and_precedence(tmp_path: Path) -> None:
    cfg = load_config(environ={"CHURN_ADMIN_TOKEN": "abc", "CHURN_MLFLOW_BACKEND_URI": ""})
    assert cfg.serving.admin_token == "abc" and cfg.mlflow.server_backend_uri == ""
    both = {"CHURN_ADMIN_TOKEN": "short", "CHURN_SERVING__ADMIN_TOKEN": "long"}
    assert load_config(environ=both).serving.admin_token == "long"
    path = tmp_path / "churn.yaml"
    path.write_text("serving:\n  admin_token: from-file\n  port: 9100\n")
    cfg = load_config(path, environ={"CHURN_ADMIN_TOKEN": "from-env"})
    assert (cfg.serving.admin_token, cfg.serving.port) == ("from-env", 9100)
    cfg = load_config(path, environ={"CHURN_ADMIN_TOKEN": "from-env"},
                      overrides={"serving.admin_token": "from-flag"})
    assert cfg.serving.admin_token == "from-flag"


def test_every_key_has_its_variable() -> None:
    for key in _known_keys(ChurnConfig):
        assert env_name(key).startswith("CHURN_") and "." not in env_name(key)
    cfg = load_config(environ={"CHURN_SCHEDULER__MONITOR__EVERY_MINUTES": "60",
                               "CHURN_MONITORING__POLICY__TRIGGERS": json.dumps([{"metric": "ks"}]),
                               "CHURN_REGISTRY__APPROVERS": '["dana"]'})
    assert cfg.scheduler.monitor.every_minutes == 60
    assert [t.metric for t in cfg.monitoring.policy.triggers] == ["ks"]
    assert cfg.registry.approvers == ["dana"]


@pytest.mark.parametrize(("name", "needle"), [
    ("CHURN_ADMIN_TOKN", "did you mean CHURN_ADMIN_TOKEN?"),
    ("CHURN_TRAINING__WINDOWDAYS", "did you mean CHURN_TRAINING__WINDOW_DAYS?"),
    ("CHURN_SERVNG__PORT", "did you mean CHURN_SERVING__PORT?"),
])
def test_unknown_variable_names_the_nearest(name: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(environ={name: "1"})
    assert str(err.value) == f"unknown environment variable {name}; {needle}"


def test_bad_json_names_the_variable() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(environ={"CHURN_REGISTRY__APPROVERS": "[dana"})
    assert "CHURN_REGISTRY__APPROVERS is not valid JSON" in str(err.value)
    assert "\n" not in str(err.value)


def test_cli_config_show_with_the_short_name(config: ChurnConfig) -> None:
    proc = run_cli(config, ["config", "show", "--json"], CHURN_ADMIN_TOKEN="abc")
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)
    assert shown["serving"]["admin_token"] == "***"
    proc = run_cli(config, ["config", "show"], CHURN_ADMIN_TOKN="abc")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "did you mean CHURN_ADMIN_TOKEN?" in lines[0], proc.stderr


def test_serve_starts_with_the_short_name(config: ChurnConfig, tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    with churn_app(config, ["serve", "--host", "127.0.0.1"], log, CHURN_ADMIN_TOKEN="abc") as (port, _):
        url = f"http://127.0.0.1:{port}/admin/status"
        assert httpx.get(url, headers={"Authorization": "Bearer abc"}, timeout=30).status_code == 200
        assert httpx.get(url, headers={"Authorization": "Bearer abd"}, timeout=30).status_code in (401, 403)
    assert "from the config" in log.read_text()
    assert not (config.workspace / "secrets" / "admin_token").exists()


def test_postgres_urls_are_opened_with_psycopg3() -> None:
    from mlflow_churn.config import is_postgres_url, libpq_url, sqlalchemy_url

    for given in ("postgresql://u@h:5432/db", "postgres://u@h:5432/db", "postgresql+psycopg2://u@h:5432/db",
                  "postgresql+psycopg://u@h:5432/db"):
        assert is_postgres_url(given)
        assert sqlalchemy_url(given) == "postgresql+psycopg://u@h:5432/db"
        assert libpq_url(given) == "postgresql://u@h:5432/db"
    for other in ("sqlite:///x.db", "/tmp/predictions.db", "http://127.0.0.1:5000"):
        assert not is_postgres_url(other)
        assert sqlalchemy_url(other) == other == libpq_url(other)
