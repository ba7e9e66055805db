"""Alias history on the embedded SQLite store (the ``project`` writer): project moves recorded
once in order with position, sequence and version identity; a move made past the project
reconciled only when the registry proves it, under the lock; a writer that died mid-move
resolved; the receiver writer's event-time order, idempotence and reconciled moves a late
delivery explains; ``churn registry history`` (--at, --json, the table)."""

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
    history_lock,
    read_moves,
    reconcile,
    record_delivery,
    record_move,
    version_at,
    writer_of,
)
from mlflow_churn.registry.signing import version_ref


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


def _steps(moves) -> list[tuple]:
    return [(m.seq, m.alias, m.position, m.from_version, m.to_version, m.source) for m in moves]


def test_project_moves_are_recorded_once_in_order_with_identity(config) -> None:
    client, name = _model(config)
    assert writer_of(client, name) == "project"
    t0 = datetime.now(UTC)
    move_alias(client, name, "champion", "1", actor="alice", reason="first", evidence_run_id="run-a")
    move_alias(client, name, "champion", "1")  # not a move: not recorded
    move_alias(client, name, "canary", "2", reason="gate passed")
    move_alias(client, name, "champion", "2", reason="promoted")
    t1 = datetime.now(UTC)
    assert remove_alias(client, name, "canary", reason="promoted") == "2"
    assert remove_alias(client, name, "canary") is None  # nothing to remove: not a move
    moves = read_moves(client, name)
    assert _steps(moves) == [
        (1, "champion", 1, None, "1", "project"),
        (2, "canary", 1, None, "2", "project"),
        (3, "champion", 2, "1", "2", "project"),
        (4, "canary", 2, "2", None, "project"),
    ]
    first = moves[0]
    assert (first.actor, first.reason, first.evidence_run_id) == ("alice", "first", "run-a")
    assert not first.claimed  # the writer itself: nothing claimed to anyone
    assert moves[1].actor.endswith("@mlflow-churn")
    refs = {v: version_ref(client.get_model_version(name, v)) for v in ("1", "2")}
    assert [(m.from_ref, m.to_ref) for m in moves] == [("", refs["1"]), ("", refs["2"]),
                                                        (refs["1"], refs["2"]), (refs["2"], "")]
    assert len({m.move_key for m in moves}) == len(moves)
    assert [m.alias for m in read_moves(client, name, "champion")] == ["champion", "champion"]
    champion = read_moves(client, name, "champion")
    assert version_at(champion, name, "champion", t0 - timedelta(seconds=1)).version is None
    assert version_at(champion, name, "champion", t1).version == "2"
    with pytest.raises(ChurnError, match="time zone"):
        version_at(champion, name, "champion", datetime(2026, 1, 1))


def test_a_move_past_the_project_is_reconciled_only_when_the_registry_proves_it(config) -> None:
    client, name = _model(config)
    move_alias(client, name, "champion", "1")
    known = datetime.now(UTC)
    with history_lock(client, name):  # what the receiver's start does on this store
        assert reconcile(client, name, now=datetime.now(UTC), reason="start") == []  # nothing moved
    client.set_registered_model_alias(name, "champion", "2")  # a plain client, past the project
    client.set_registered_model_alias(name, "shadow", "3")
    noticed = known + timedelta(minutes=5)
    with history_lock(client, name):
        new = reconcile(client, name, now=noticed, reason="start")
        assert reconcile(client, name, now=noticed, reason="again") == []  # proven once, recorded once
    assert [(m.alias, m.from_version, m.to_version, m.actor, m.source) for m in new] == [
        ("champion", "1", "2", RECONCILED, "reconcile"),
        ("shadow", None, "3", RECONCILED, "reconcile"),
    ]
    assert all(m.moved_after is not None and m.moved_after < noticed for m in new)
    champion = read_moves(client, name, "champion")
    between = version_at(champion, name, "champion", known + timedelta(minutes=1))
    assert between.version == "1" and between.uncertain
    after = version_at(champion, name, "champion", noticed + timedelta(seconds=1))
    assert after.version == "2" and not after.uncertain
    # the next project move of an alias moved past it: the registry's state first, then the move
    client.set_registered_model_alias(name, "champion", "3")
    move_alias(client, name, "champion", "1", actor="bob")
    champion = read_moves(client, name, "champion")
    assert [(m.from_version, m.to_version, m.source, m.position) for m in champion] == [
        (None, "1", "project", 1), ("1", "2", "reconcile", 2), ("2", "3", "reconcile", 3),
        ("3", "1", "project", 4)]
    assert [m.seq for m in read_moves(client, name)] == [1, 2, 3, 4, 5]


def test_a_writer_that_died_mid_move_is_resolved_by_the_next_one(config) -> None:
    client, name = _model(config)
    # one writer announced champion -> 1, moved it and died; another announced canary -> 2, died first
    record_move(client, name, "champion", None, "1", position=1, seq=1, running=True)
    client.set_registered_model_alias(name, "champion", "1")
    failed = record_move(client, name, "canary", None, "2", position=1, seq=2, running=True)
    assert read_moves(client, name) == []  # in flight: not history yet
    move_alias(client, name, "champion", "3", actor="carol")
    assert _steps(read_moves(client, name)) == [(1, "champion", 1, None, "1", "project"),
                                                (2, "champion", 2, "1", "3", "project")]
    assert client.get_run(failed.run_id).info.status == "FAILED"


def test_receiver_deliveries_once_in_event_time_order(config) -> None:
    client, name = _model(config)
    t = datetime(2026, 6, 1, tzinfo=UTC)
    s = timedelta(seconds=1)
    first = record_delivery(client, name, "shadow", "1", t, "d1")
    assert (first.position, first.seq, first.from_version) == (1, 1, None)
    record_delivery(client, name, "shadow", "3", t + 3 * s, "d3")
    record_delivery(client, name, "blue", "1", t + 4 * s, "d4", actor="dora (claimed)", claimed=True,
                    reason="try", via="mlflow-churn")
    late = record_delivery(client, name, "shadow", "2", t + 2 * s, "d2")  # sent before d3, arrived after
    assert (late.position, late.seq, late.from_version) == (2, 2, "1")
    assert record_delivery(client, name, "shadow", "2", t + 2 * s, "d2") is None  # a duplicate
    assert record_delivery(client, name, "shadow", "3", t + 5 * s, "d5") is None  # shadow is on 3: no move
    assert [(m.seq, m.alias, m.position, m.from_version, m.to_version) for m in read_moves(client, name)] == [
        (1, "shadow", 1, None, "1"), (2, "shadow", 2, "1", "2"), (3, "shadow", 3, "2", "3"),
        (4, "blue", 1, None, "1")]
    blue = read_moves(client, name, "blue")[0]
    assert (blue.actor, blue.claimed, blue.via) == ("dora (claimed)", True, "mlflow-churn")
    assert blue.delivery_id == "d4"
    # a move the receiver missed, reconciled at its start; its delivery arrives late: it takes
    # the reconciled move's place (the reconciled run is dropped, not history)
    client.set_registered_model_alias(name, "blue", "1")  # the registry as the deliveries said
    client.set_registered_model_alias(name, "shadow", "1")
    (guessed,) = reconcile(client, name, now=t + 10 * s, reason="start")
    explained = record_delivery(client, name, "shadow", "1", t + 6 * s, "d6")
    shadow = read_moves(client, name, "shadow")
    last = shadow[-1]
    assert (last.from_version, last.to_version, last.source, last.delivery_id) == ("3", "1", "webhook", "d6")
    assert explained.position == 4 and len(shadow) == 4 and UNKNOWN == shadow[-1].actor
    assert client.get_run(guessed.run_id).info.status == "KILLED"
    assert [m.seq for m in read_moves(client, name)] == [1, 2, 3, 4, 5]
    # a delete that arrives before the set it undoes: no move at first, a move once the set is in
    assert record_delivery(client, name, "green", None, t + 21 * s, "d8") is None
    assert record_delivery(client, name, "green", "2", t + 20 * s, "d7").to_version == "2"
    assert [(m.from_version, m.to_version, m.delivery_id) for m in read_moves(client, name, "green")] == [
        (None, "2", "d7"), ("2", None, "d8")]
    assert [m.seq for m in read_moves(client, name)] == [1, 2, 3, 4, 5, 6, 7]


@pytest.mark.slow  # among the slowest of make test-fast (churn CLI processes)
def test_registry_history_cli_lists_positions_actors_and_identities(config) -> None:
    client, name = _model(config)
    move_alias(client, name, "champion", "1", actor="alice", reason="first")
    client.set_registered_model_alias(name, "champion", "2")  # past the project
    with history_lock(client, name):
        reconcile(client, name, now=datetime.now(UTC) + timedelta(seconds=1), reason="start")
    ref = version_ref(client.get_model_version(name, "2"))
    later = (datetime.now(UTC) + timedelta(minutes=1)).isoformat()
    res = run_cli(config, ["registry", "history", "--at", later, "--json"])
    assert res.returncode == 0, res.stderr
    (answer,) = json.loads(res.stdout)["aliases"]
    assert answer["alias"] == "champion" and answer["version"] == "2"
    assert answer["move"]["actor"] == RECONCILED and answer["move"]["to_ref"] == ref
    listing = run_cli(config, ["registry", "history", "--alias", "champion", "--json"])
    moves = json.loads(listing.stdout)["moves"]
    assert [(m["position"], m["seq"], m["to_version"], m["actor"]) for m in moves] == [
        (1, 1, "1", "alice"), (2, 2, "2", RECONCILED)]
    table = run_cli(config, ["registry", "history"])
    assert table.returncode == 0 and "alice" in table.stdout
    assert f"2 ({ref.split(':')[1][:8]})" in table.stdout  # the version and its identity
    bad = run_cli(config, ["registry", "history", "--at", "yesterday"])
    assert bad.returncode == 2 and "--at" in bad.stderr and "Traceback" not in bad.stderr
