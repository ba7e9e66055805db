"""Alias history on the embedded SQLite store: project moves recorded once, foreign moves
recorded by sync, in-flight moves not duplicated, reconciled moves flagged, --at answers."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from mlflow.tracking import MlflowClient
from serving_support import run_cli

from mlflow_churn.config import ChurnConfig
from mlflow_churn.errors import ChurnError
from mlflow_churn.registry.aliases import move_alias, remove_alias
from mlflow_churn.registry.history import (
    RECONCILED,
    UNKNOWN,
    begin_move,
    end_move,
    read_moves,
    sync,
    version_at,
)


def _model(config: ChurnConfig, versions: int = 3) -> tuple[MlflowClient, str]:
    """A registered model with ``versions`` versions (no model files: the registry is enough)."""
    uri = config.mlflow_tracking_uri
    config.workspace.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(uri, uri)
    name = config.training.model_name
    client.create_registered_model(name)
    for _ in range(versions):
        client.create_model_version(name, (config.workspace / "model").as_uri())
    return client, name


def test_project_moves_are_recorded_once_and_foreign_moves_by_sync(config) -> None:
    client, name = _model(config)
    t0 = datetime.now(UTC)
    move_alias(client, name, "champion", "1", actor="alice", reason="first", evidence_run_id="run-a")
    move_alias(client, name, "champion", "1")  # not a move: not recorded
    move_alias(client, name, "champion", "2", reason="promoted")
    t1 = datetime.now(UTC)
    assert sync(client, name, actor=UNKNOWN, reason="x", source="webhook", now=datetime.now(UTC)) == []
    client.set_registered_model_alias(name, "champion", "3")  # by someone else
    client.set_registered_model_alias(name, "canary", "1")
    hint_at = datetime.now(UTC)
    new = sync(client, name, actor=UNKNOWN, reason="delivery d1", source="webhook", now=datetime.now(UTC),
               hint=("champion", "3", hint_at))
    assert [(m.alias, m.from_version, m.to_version, m.actor) for m in new] == [
        ("canary", None, "1", UNKNOWN),
        ("champion", "2", "3", UNKNOWN),
    ]
    assert new[1].moved_at == hint_at  # dated by the delivery
    assert sync(client, name, actor=UNKNOWN, reason="again", source="webhook", now=datetime.now(UTC)) == []
    remove_alias(client, name, "canary", reason="rolled back")
    moves = read_moves(client, name)
    assert [(m.alias, m.from_version, m.to_version) for m in moves] == [
        ("champion", None, "1"),
        ("champion", "1", "2"),
        ("champion", "2", "3"),
        ("canary", None, "1"),
        ("canary", "1", None),
    ] or [(m.alias, m.from_version, m.to_version) for m in moves] == [
        ("champion", None, "1"),
        ("champion", "1", "2"),
        ("canary", None, "1"),
        ("champion", "2", "3"),
        ("canary", "1", None),
    ]
    first = moves[0]
    assert (first.actor, first.reason, first.evidence_run_id, first.source) == (
        "alice",
        "first",
        "run-a",
        "project",
    )
    assert moves[1].actor.endswith("@mlflow-churn")
    assert len({m.move_key for m in moves}) == len(moves)
    champion = read_moves(client, name, "champion")
    assert version_at(champion, name, "champion", t0 - timedelta(seconds=1)).version is None
    assert version_at(champion, name, "champion", t1).version == "2"
    assert version_at(champion, name, "champion", datetime.now(UTC)).version == "3"
    with pytest.raises(ChurnError, match="time zone"):
        version_at(champion, name, "champion", datetime(2026, 1, 1))


def test_in_flight_project_move_is_waited_for_not_recorded_twice(config) -> None:
    client, name = _model(config)
    run_id = begin_move(client, name, "champion", None, "1", reason="announced")  # RUNNING
    client.set_registered_model_alias(name, "champion", "1")
    slept: list[float] = []

    def finish_then_sleep(seconds: float) -> None:  # the project finishes while sync waits
        slept.append(seconds)
        end_move(client, run_id)

    found = sync(client, name, actor=UNKNOWN, reason="d", source="webhook", now=datetime.now(UTC),
                 sleep=finish_then_sleep)
    assert found == []
    assert slept and [m.run_id for m in read_moves(client, name)] == [run_id]
    # a failed move (FAILED run) is not history
    failed = begin_move(client, name, "canary", None, "2")
    end_move(client, failed, ok=False)
    assert [m.alias for m in read_moves(client, name)] == ["champion"]


def test_reconciled_move_is_uncertain_between_last_known_and_noticed(config) -> None:
    client, name = _model(config)
    move_alias(client, name, "champion", "1")
    known = datetime.now(UTC)
    client.set_registered_model_alias(name, "champion", "2")  # while the receiver is down
    noticed = known + timedelta(minutes=5)
    (move,) = sync(
        client, name, actor=RECONCILED, reason="start", source="reconcile", now=noticed, moved_after=known
    )
    assert (move.from_version, move.to_version, move.actor) == ("1", "2", RECONCILED)
    moves = read_moves(client, name, "champion")
    between = version_at(moves, name, "champion", known + timedelta(minutes=1))
    assert between.version == "1" and between.uncertain
    after = version_at(moves, name, "champion", noticed + timedelta(seconds=1))
    assert after.version == "2" and not after.uncertain
    res = run_cli(
        config, ["registry", "history", "--at", (noticed + timedelta(seconds=1)).isoformat(), "--json"]
    )
    assert res.returncode == 0, res.stderr
    (answer,) = json.loads(res.stdout)["aliases"]
    assert answer["alias"] == "champion" and answer["version"] == "2"
    assert answer["move"]["actor"] == RECONCILED
    listing = run_cli(config, ["registry", "history", "--alias", "champion", "--json"])
    assert [m["to_version"] for m in json.loads(listing.stdout)["moves"]] == ["1", "2"]
    bad = run_cli(config, ["registry", "history", "--at", "yesterday"])
    assert bad.returncode == 2 and "--at" in bad.stderr and "Traceback" not in bad.stderr
