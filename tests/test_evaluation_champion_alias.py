"""`churn evaluate --champion ALIAS`: an alias the model does not have is an error, raised
before any run, tag or alias is written; only the champion alias itself may be unset (the
first model, gated against the absolute floors).

The issue: `--champion chmpion` gated the challenger against "champion none (floors)",
printed PASSED, exited 0 and moved `canary` to it while v1 was champion.
Real registered models (small_data) in a real sqlite MLflow store; the outage case in front
of a real `mlflow server`.
"""

from __future__ import annotations

import shlex
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from mlflow.projects import _project_spec
from mlflow.tracking import MlflowClient
from proxy_support import FlakyProxy

from mlflow_churn.config import ChurnConfig, load_config
from mlflow_churn.errors import ChurnError
from mlflow_churn.evaluation.evaluate import evaluate
from mlflow_churn.registry.aliases import CANARY, CHAMPION

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
AS_OF = datetime(2026, 5, 1, tzinfo=UTC)
SAMPLE = 3000  # drift-report rows (the gate's metrics use the whole holdout)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One workspace (sqlite MLflow store, data linked to small_data) for the module."""
    return tmp_path_factory.mktemp("champion-alias") / "ws"


@pytest.fixture
def config(workspace: Path, store: Path, request: pytest.FixtureRequest) -> ChurnConfig:
    """The default config on the module's store, with a model name of this test's own."""
    return load_config(workspace=store, environ={},
                       overrides={"training.model_name": f"churn-{request.node.name[5:40]}"})


def _state(client: MlflowClient, name: str) -> tuple:
    """Everything the gate may write: versions (tags, aliases, stages), the model's aliases, runs."""
    versions = sorted((v.version, dict(v.tags), sorted(v.aliases), v.current_stage)
                      for v in client.search_model_versions(f"name = '{name}'"))
    aliases = {a: str(v) for a, v in client.get_registered_model(name).aliases.items()}
    exps = [e.experiment_id for e in client.search_experiments()]
    runs = sorted(r.info.run_id for r in client.search_runs(exps, max_results=5000))
    return versions, aliases, runs


def _gate_runs(client: MlflowClient, version: str) -> list:
    exps = [e.experiment_id for e in client.search_experiments()]
    query = f"tags.`churn.decision` = 'gate' and tags.challenger_version = '{version}'"
    return client.search_runs(exps, query)


def _typo_message(name: str, listing: str) -> str:
    return (f"--champion chmpion: model '{name}' has no alias 'chmpion' (aliases: {listing}); "
            "pass an existing alias or a version number, or omit --champion")


def test_cli_typo_in_champion_exits_2_before_anything_is_written(config, register_version, churn_main,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    name = config.training.model_name
    champ = register_version(config, "bad", alias=CHAMPION)
    chal = register_version(config, "good", alias="challenger")
    client = MlflowClient(config.mlflow_tracking_uri)
    before = _state(client, name)
    monkeypatch.setenv("CHURN_TRAINING__MODEL_NAME", name)
    expected = "error: " + _typo_message(name, f"champion -> v{champ.version}, challenger -> v{chal.version}")

    res = churn_main(["--workspace", str(config.workspace), "evaluate", "--as-of", "2026-05-01",
                      "--champion", "chmpion", "--no-progress"])
    assert res.returncode == 2, res.stdout + res.stderr
    assert res.stderr.strip().splitlines() == [expected]
    assert "PASSED" not in res.stdout and "floors" not in res.stdout
    assert _state(client, name) == before  # no run, no tag, no alias (canary never set)
    assert CANARY not in before[1] and not _gate_runs(client, chal.version)

    # the MLproject's `evaluate` entry point passes `champion` through: the same error
    entry = _project_spec.load_project(str(ROOT)).get_entry_point("evaluate")
    argv = shlex.split(entry.compute_command({"workspace": str(config.workspace), "as_of": "2026-05-01",
                                              "champion": "chmpion"}, None))
    assert argv[:3] == ["python", "-m", "mlflow_churn.cli"] and "--champion" in argv
    res = churn_main(argv[3:])
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [expected]
    assert _state(client, name) == before


def test_no_champion_at_all_still_gates_against_the_floors(config, register_version, churn_main,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    name = config.training.model_name
    chal = register_version(config, "good", alias="challenger")
    monkeypatch.setenv("CHURN_TRAINING__MODEL_NAME", name)
    res = churn_main(["--workspace", str(config.workspace), "evaluate", "--as-of", "2026-05-01",
                      "--no-progress"])  # the default: --champion champion
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"challenger v{chal.version} vs champion none (floors) -> PASSED" in res.stdout
    client = MlflowClient(config.mlflow_tracking_uri)
    assert str(client.get_registered_model(name).aliases[CANARY]) == str(chal.version)
    (run,) = _gate_runs(client, chal.version)
    assert run.data.tags["champion_version"] == "none"
    # the same through the Python API, with the champion alias named explicitly (reused decision)
    decision = evaluate(config, AS_OF, champion_alias=CHAMPION, drift_sample_rows=SAMPLE)
    assert decision.passed and decision.champion_version is None and decision.reused
    assert {r.rule for r in decision.rules} == {"auc_floor", "lift_floor"}


def test_python_api_typo_raises_churn_error_with_or_without_a_champion(config, register_version) -> None:
    name = config.training.model_name
    chal = register_version(config, "good", alias="challenger")
    client = MlflowClient(config.mlflow_tracking_uri)
    before = _state(client, name)
    # no champion yet: a typo is still no reason to gate against the floors
    with pytest.raises(ChurnError) as err:
        evaluate(config, AS_OF, champion_alias="chmpion", drift_sample_rows=SAMPLE)
    assert str(err.value) == _typo_message(name, f"challenger -> v{chal.version}")
    assert _state(client, name) == before

    champ = register_version(config, "bad", alias=CHAMPION, seed=3)
    before = _state(client, name)
    with pytest.raises(ChurnError, match=f"aliases: challenger -> v{chal.version}, champion -> "
                                         f"v{champ.version}\\)"):
        evaluate(config, AS_OF, champion_alias="chmpion", drift_sample_rows=SAMPLE)
    with pytest.raises(ChurnError, match="no alias 'Champion'"):  # aliases are case-sensitive
        evaluate(config, AS_OF, champion_alias="Champion", drift_sample_rows=SAMPLE)
    assert _state(client, name) == before


def test_an_outage_looking_up_the_champion_is_not_no_champion(mlflow_server, workspace: Path,
                                                             register_version) -> None:
    """The registry failing to answer must not read as "the alias does not exist" (nor as
    "no champion": the old lookup swallowed every error and gated against the floors)."""
    name = f"churn-outage-{uuid.uuid4().hex[:8]}"
    client = MlflowClient(mlflow_server.url)
    proxy = FlakyProxy(mlflow_server.url)
    try:
        cfg = load_config(workspace=workspace, environ={}, overrides={
            "tracking_uri": proxy.url, "training.model_name": name, "mlflow.http_max_retries": 1,
            "mlflow.http_backoff_factor": 0})
        chal = register_version(cfg, "good", alias="challenger")
        register_version(cfg, "bad", alias=CHAMPION, seed=3)
        before = _state(client, name)
        proxy.fail("/registered-models/alias", method="GET")  # looking a version up by alias
        with pytest.raises(ChurnError) as err:  # the challenger by number: only the champion lookup fails
            evaluate(cfg, AS_OF, challenger_alias=str(chal.version), drift_sample_rows=SAMPLE)
    finally:
        proxy.close()
    msg = str(err.value)
    assert msg.startswith(f"the MLflow tracking server at {proxy.url} failed while gating '{name}' (")
    assert "HTTP 503" in msg and "no alias" not in msg
    assert _state(client, name) == before


def test_a_gate_the_registry_moved_past_does_not_move_canary_back(config, register_version) -> None:
    """A gate that started before a promotion and passes after it (the receiver's reconcile
    gate of v1 while a person promoted v1): `canary` is not put back on the champion, nor
    taken from a newer canary; otherwise it moves as usual."""
    from mlflow_churn.evaluation.evaluate import _move_canary
    from mlflow_churn.registry.aliases import alias_version, move_alias

    client = MlflowClient(config.mlflow_tracking_uri, config.mlflow_tracking_uri)
    name = config.training.model_name
    v1 = register_version(config, alias=CHAMPION)
    v2 = register_version(config, alias=None, seed=1)
    v3 = register_version(config, alias=None, seed=2)
    assert _move_canary(client, config, name, str(v1.version)) is False  # v1 is the champion now
    assert alias_version(client, name, CANARY) is None
    move_alias(client, name, CANARY, v3.version)
    assert _move_canary(client, config, name, str(v2.version)) is False  # a newer canary stays
    assert str(alias_version(client, name, CANARY).version) == str(v3.version)
    client.delete_registered_model_alias(name, CANARY)
    assert _move_canary(client, config, name, str(v2.version)) is True
    assert str(alias_version(client, name, CANARY).version) == str(v2.version)
