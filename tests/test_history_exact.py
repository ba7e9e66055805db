"""Exact alias history (issue 22, item 3): every alias move recorded once, in server order, with
its actor, from the deployment's one writer, compared with the moves the test actually made.

- (a) a guarded ``mlflow server`` on PostgreSQL (two workers): 200+ seeded random moves, the
  project's promote / rollback / force, the gate's canary move, UI-style REST sets and deletes
  (champion with signed evidence, refused ones), project moves of free aliases, bursts of
  concurrent calls from threads and real ``churn`` CLI subprocesses (two of them at once);
- (b) the reported bug: ``promote --force`` then ``rollback`` back to back with a receiver
  running against the guarded server: no phantom (the receiver records nothing there);
- (c) a plain server with the receiver as the writer: 40 random moves, each once, in order;
- (d) the embedded SQLite store: three processes moving aliases at once, each move once, every
  process's moves in its order.

What a move "made" is comes from the call itself (its HTTP status, the state the test knows
before it, a transition's aliases before and after it), never from the history under test.
"""

from __future__ import annotations

import getpass
import itertools
import json
import random
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from guard_pg_support import aliases, call, make_keys, new_version, pg_database, start_guard
from guard_pg_support import config as guard_config
from hooks_support import Receiver, register_webhook
from mlflow.tracking import MlflowClient
from serving_support import run_cli
from wait_support import wait_until

from mlflow_churn.config import ChurnConfig, load_config
from mlflow_churn.errors import ChurnError
from mlflow_churn.registry.aliases import CANARY, CHAMPION, PREVIOUS_CHAMPION, move_alias, remove_alias
from mlflow_churn.registry.history import AliasMove, read_moves, writer_of
from mlflow_churn.registry.signing import record_signed, version_files_digest, version_ref
from mlflow_churn.serving import transitions
from mlflow_churn.tracking_server import _webhook_env

PROTECTED = (CHAMPION, PREVIOUS_CHAMPION, CANARY)
ANY = object()  # an expected `from` the test cannot know (concurrent sets of one alias)


def _pg_or_skip() -> None:
    import socket

    try:
        socket.create_connection(("127.0.0.1", 5432), timeout=1).close()
    except OSError:
        pytest.skip("PostgreSQL is not reachable at 127.0.0.1:5432")


# --------------------------------------------------------------------------- the ledger of made moves
@dataclass(frozen=True)
class Made:
    """One move a call made: ``alias`` from ``from_v`` (ANY: unknown) to ``to_v``; ``actor`` the
    history must name (None: not checked); ``group``: moves of one group were made concurrently
    (their order within an alias is the server's choice)."""

    alias: str
    from_v: object
    to_v: str | None
    actor: str | None
    group: int


class Ledger:
    def __init__(self) -> None:
        self.by_alias: dict[str, list[Made]] = defaultdict(list)
        self._lock = threading.Lock()
        self._groups = itertools.count(1)

    def group(self) -> int:
        return next(self._groups)

    def add(self, alias: str, from_v: object, to_v: str | None, actor: str | None,
            group: int | None = None) -> None:
        with self._lock:
            self.by_alias[alias].append(Made(alias, from_v, to_v, actor, group or self.group()))

    def diff(self, before: dict[str, str], after: dict[str, str], actor: str | None,
             only: tuple[str, ...] = PROTECTED, group: int | None = None) -> int:
        """The moves between two registry states of aliases ``only`` that one call alone moved
        (each alias at most once per call); how many."""
        group = group or self.group()
        n = 0
        for alias in only:
            if before.get(alias) != after.get(alias):
                self.add(alias, before.get(alias), after.get(alias), actor, group)
                n += 1
        return n

    @property
    def count(self) -> int:
        return sum(len(v) for v in self.by_alias.values())


def assert_exact(moves: list[AliasMove], ledger: Ledger, registry: dict[str, str], source: str) -> None:
    """No phantom, no loss, order kept: per alias, the history is the ledger's moves (a group's
    in any order), positions 1..n, each ``from`` the previous ``to``, ending on the registry;
    the model's ``seq`` is 1..N."""
    assert [m.seq for m in moves] == list(range(1, len(moves) + 1)), [m.seq for m in moves]
    assert {m.source for m in moves} <= {source}, Counter(m.source for m in moves)
    assert set(ledger.by_alias) >= {m.alias for m in moves}, "a move of an alias nobody moved"
    for alias, made in ledger.by_alias.items():
        hist = [m for m in moves if m.alias == alias]
        where = f"{alias}: history {[(m.from_version, m.to_version) for m in hist]}"
        assert [m.position for m in hist] == list(range(1, len(hist) + 1)), where
        prev = None
        for m in hist:
            assert m.from_version == prev, f"broken chain at #{m.position}; {where}"
            prev = m.to_version
        assert prev == registry.get(alias), f"history ends on {prev}, registry has {registry.get(alias)}"
        assert len(hist) == len(made), f"{len(hist)} recorded, {len(made)} made; {where}; made {made}"
        i = 0
        for _, group in itertools.groupby(made, key=lambda x: x.group):
            want = list(group)
            got = hist[i:i + len(want)]
            for w in want:
                hit = next((g for g in got if g.to_version == w.to_v
                            and (w.from_v is ANY or g.from_version == w.from_v)
                            and (w.actor is None or g.actor == w.actor)), None)
                assert hit is not None, f"move {w} not at positions {i + 1}..{i + len(want)}; {where}; " \
                                        f"actors {[m.actor for m in got]}"
                got.remove(hit)
            i += len(want)


# --------------------------------------------------------------------------- (a) the 200-move test
class Driver:
    """Makes random moves of one model through a guarded server and writes down what it made."""

    FREE = ("challenger", "shadow", "blue", "green")

    def __init__(self, cfg: ChurnConfig, server, client: MlflowClient, versions: list[str],
                 seed: int) -> None:
        self.cfg, self.server, self.client = cfg, server, client
        self.name = cfg.training.model_name
        self.versions, self.ungated = versions[:-1], versions[-1]
        self.rng = random.Random(seed)
        self.ledger = Ledger()
        self.state: dict[str, str] = {}
        self.digests = {v: version_files_digest(client, self.name, v) for v in self.versions}
        self.ops: Counter[str] = Counter()
        self.cli_actor = f"{getpass.getuser()} (claimed)"

    # --- helpers
    def snapshot(self) -> dict[str, str]:
        return aliases(self.client, self.name)

    def check_state(self) -> None:
        assert self.snapshot() == self.state, "the test's model of the registry is wrong"

    def rest(self, alias: str, version: str | None, ui: bool = True, expect: int = 200):
        payload = {"name": self.name, "alias": alias}
        if version is None:
            res = call(self.server, "DELETE", "registered-models/alias", payload, ui=ui)
        else:
            res = call(self.server, "POST", "registered-models/alias", {**payload, "version": version}, ui=ui)
        assert res.status_code == expect, res.text
        return res

    def _mv(self, version: str | None):
        return self.client.get_model_version(self.name, version) if version else None

    # --- moves of free (unprotected) aliases
    def rest_free(self, alias: str, group: int | None = None) -> None:
        before = self.state.get(alias)
        version = None if before is not None and self.rng.random() < 0.25 else self.rng.choice(self.versions)
        self.rest(alias, version, ui=self.rng.random() < 0.5)
        if before != version:
            self.ledger.add(alias, before, version, "unknown", group)
        self._set(alias, version)
        self.ops["rest_free"] += 1

    def project_free(self, alias: str, actor: str, group: int | None = None) -> None:
        before = self.state.get(alias)
        if before is not None and self.rng.random() < 0.2:
            remove_alias(self.client, self.name, alias, actor=actor, reason="tidy up")
            version = None
        else:
            version = self.rng.choice(self.versions)
            move_alias(self.client, self.name, alias, version, actor=actor, reason=f"{alias} for a test")
        if before != version:
            self.ledger.add(alias, before, version, f"{actor} (claimed)", group)
        self._set(alias, version)
        self.ops["project_free"] += 1

    def _set(self, alias: str, version: str | None) -> None:
        if version is None:
            self.state.pop(alias, None)
        else:
            self.state[alias] = version

    # --- the lifecycle
    def gate_canary(self) -> None:
        """What the gate does on a pass: a signed gate decision, then move_alias(canary)."""
        choices = [v for v in self.versions if v not in (self.state.get(CHAMPION), self.state.get(CANARY))]
        version = self.rng.choice(choices)
        record_signed(self.client, self.cfg, self.name, version, "gate", "passed",
                      champion=self._mv(self.state.get(CHAMPION)), run_id=f"gate-{uuid.uuid4().hex[:6]}",
                      files_sha256=self.digests[version])
        before = self.state.get(CANARY)
        move_alias(self.client, self.name, CANARY, version, actor="gate-bot", reason="gate passed")
        self.ledger.add(CANARY, before, version, "gate-bot (claimed)")
        self._set(CANARY, version)
        self.ops["gate_canary"] += 1

    def transition(self, kind: str, group: int | None = None) -> None:
        """The project's promote (--force) / rollback in this process; the moves it made are the
        difference of the protected aliases around it (only it moves them meanwhile)."""
        before = {a: v for a, v in self.snapshot().items() if a in PROTECTED}
        actor = f"{kind}-bot"
        try:
            if kind == "promote":
                transitions.promote(self.cfg, "promoted by the history test", force=True, actor=actor)
            else:
                transitions.rollback(self.cfg, "rolled back by the history test", actor=actor)
        except ChurnError:  # nothing to do in this state: no move
            pass
        after = {a: v for a, v in self.snapshot().items() if a in PROTECTED}
        self.ledger.diff(before, after, f"{actor} (claimed)", group=group)
        for alias in PROTECTED:
            self._set(alias, after.get(alias))
        self.ops[kind] += 1

    def ui_champion(self) -> None:
        """A person promotes the canary in the UI on its signed canary verdict (no receiver here:
        previous-champion and canary stay until the next promote completes it)."""
        canary, champion = self.state[CANARY], self.state.get(CHAMPION)
        record_signed(self.client, self.cfg, self.name, canary, "canary", "promote",
                      champion=self._mv(champion), run_id=f"canary-{uuid.uuid4().hex[:6]}",
                      files_sha256=self.digests[canary])
        self.rest(CHAMPION, canary, ui=True)
        self.ledger.add(CHAMPION, champion, canary, "unknown")
        self._set(CHAMPION, canary)
        self.ops["ui_champion"] += 1

    def refused(self) -> None:
        """Moves the guard refuses: nothing happens, nothing may be recorded."""
        alias = self.rng.choice(PROTECTED)  # onto a version that was never gated
        self.rest(alias, self.ungated, ui=self.rng.random() < 0.5, expect=403)
        self.ops["refused"] += 1

    def cli(self, kind: str) -> None:
        args = ["canary", kind, "--reason", f"{kind} from the CLI", "--json"] + (
            ["--force"] if kind == "promote" else [])
        res = run_cli(self.cfg, args, timeout=300, **self._cli_env())
        if res.returncode == 0:
            out = json.loads(res.stdout)
            self.ledger.diff(out["before"], out["after"], self.cli_actor)
        else:
            assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
        self.state = self.snapshot()
        self.ops[f"cli_{kind}"] += 1

    def cli_pair(self) -> None:
        """Two `churn canary rollback` at once (a canary and a previous-champion to go back
        from): one removes the canary, the other puts the champion back, in the order of the lock."""
        group = self.ledger.group()
        args = ["canary", "rollback", "--reason", "two at once", "--json"]
        from serving_support import CHURN, cli_env

        env = cli_env(self.cfg, **self._cli_env())
        procs = [subprocess.Popen(CHURN + args, env=env, cwd=self.cfg.workspace, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
        for proc in procs:
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err[-3000:]
            res = json.loads(out)
            self.ledger.diff(res["before"], res["after"], self.cli_actor, group=group)
        self.state = self.snapshot()
        self.ops["cli_pair"] += 1

    def _cli_env(self) -> dict[str, str]:
        return {"MLFLOW_TRACKING_URI": self.server.url, "CHURN_TRAINING__MODEL_NAME": self.name,
                "CHURN_REGISTRY__SIGNING_KEY_FILE": str(self.cfg.registry.signing_key_file),
                "CHURN_REGISTRY__VERIFY_KEY_FILE": str(self.cfg.registry.verify_key_file)}

    def burst(self) -> None:
        """Concurrent calls from threads: REST and project moves of distinct free aliases (each
        thread its own alias, so each alias's order is its thread's), four and three REST sets of
        one alias at once (to distinct versions: each is a move, in the order the server chose),
        and a transition."""
        free = list(self.FREE)
        self.rng.shuffle(free)
        rest_alias, project_alias = free[0], free[1]
        plans: list[Callable[[], None]] = [
            lambda: [self.rest_free(rest_alias) for _ in range(3)],
            lambda: [self.project_free(project_alias, "burst-bot") for _ in range(3)],
        ]
        for contended, n in ((free[2], 4), (free[3], 3)):
            targets = [v for v in self.versions if v != self.state.get(contended)]
            group = self.ledger.group()
            plans += [lambda a=contended, v=v, g=group: self._contend(a, v, g)
                      for v in self.rng.sample(targets, n)]
        kinds = [k for k, ok in (("promote", CANARY in self.state),
                                 ("rollback", CANARY in self.state or PREVIOUS_CHAMPION in self.state)) if ok]
        if kinds:
            kind = self.rng.choice(kinds)
            plans.append(lambda: self.transition(kind))
        rngs = [random.Random(self.rng.random()) for _ in plans]
        errors: list[BaseException] = []
        start = threading.Barrier(len(plans))

        def run(plan: Callable[[], None], rng: random.Random) -> None:
            try:
                self._local.rng = rng
                start.wait(timeout=120)
                plan()
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(p, r)) for p, r in zip(plans, rngs, strict=True)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        assert not errors, errors
        now = self.snapshot()
        for contended in free[2:]:
            self._set(contended, now.get(contended))  # whichever the server applied last
        self.ops["burst"] += 1

    def _contend(self, alias: str, version: str, group: int) -> None:
        self.rest(alias, version, ui=False)
        self.ledger.add(alias, ANY, version, "unknown", group)

    _local = threading.local()

    @property
    def rng(self) -> random.Random:  # each burst thread draws from its own generator
        return getattr(self._local, "rng", None) or self._rng

    @rng.setter
    def rng(self, value: random.Random) -> None:
        self._rng = value

    # --- the schedule
    def step(self) -> None:
        s = self.state
        options: list[tuple[float, Callable[[], None]]] = [
            (3.0, lambda: self.rest_free(self.rng.choice(self.FREE))),
            (2.0, lambda: self.project_free(self.rng.choice(self.FREE), "alice")),
            (1.5, self.gate_canary),
            (0.6, self.refused),
            (1.0, self.burst),
        ]
        if CANARY in s:
            options.append((1.5, lambda: self.transition("promote")))
            if s[CANARY] != s.get(CHAMPION):
                options.append((0.8, self.ui_champion))
        if CANARY in s or PREVIOUS_CHAMPION in s:
            options.append((1.5, lambda: self.transition("rollback")))
        weights, ops = zip(*options, strict=True)
        self.rng.choices(ops, weights)[0]()
        self.check_state()


@pytest.mark.slow
@pytest.mark.postgres
def test_200_random_moves_through_the_guard_are_recorded_exactly_once_in_server_order(tmp_path) -> None:
    _pg_or_skip()
    keys = make_keys(tmp_path / "keys")
    with pg_database("history") as db:
        server = start_guard(tmp_path / "srv", db, keys, workers=2)
        try:
            cfg = guard_config(tmp_path / "ws", server, keys)
            cfg.workspace.mkdir(parents=True, exist_ok=True)
            client = MlflowClient(server.url, server.url)
            name = cfg.training.model_name
            exp_id = client.create_experiment(f"history-{uuid.uuid4().hex[:8]}")
            versions = [new_version(client, name, exp_id, f"weights {i} ".encode() * (20 + i))
                        for i in range(7)]
            assert writer_of(client, name) == "guard"
            d = Driver(cfg, server, client, versions, seed=22)
            d.gate_canary()
            d.transition("promote")  # the first champion
            cli_steps = {12: lambda: d.cli("promote"), 25: lambda: d.cli("rollback")}
            step = 0
            while d.ledger.count < 200:
                step += 1
                if step in cli_steps and CANARY in d.state:
                    cli_steps.pop(step)()
                elif step > 30 and not d.ops["cli_pair"] and {CANARY, PREVIOUS_CHAMPION} <= set(d.state):
                    d.cli_pair()
                else:
                    d.step()
                d.check_state()
            if CANARY in d.state and not d.ops["cli_promote"]:
                d.cli("promote")
            registry = d.snapshot()
            moves = read_moves(client, name)
            assert_exact(moves, d.ledger, registry, source="guard")
            assert len(moves) >= 200 and d.ops["burst"] >= 3, d.ops
            assert d.ops["promote"] + d.ops["cli_promote"] >= 3 and d.ops["rollback"] >= 3, d.ops
            # version identities recorded with each move (no version was deleted: all still match)
            refs = {v: version_ref(client.get_model_version(name, v)) for v in versions}
            assert all(m.to_ref == refs[m.to_version] for m in moves if m.to_version)
            assert all(m.from_ref == refs[m.from_version] for m in moves if m.from_version)
            # project moves carry their claim: actor marked claimed, reason, via mlflow-churn
            claimed = [m for m in moves if m.actor.endswith("(claimed)")]
            assert claimed and all(m.claimed and m.via == "mlflow-churn" and m.reason for m in claimed)
            assert all(not m.claimed and not m.via for m in moves if m.actor == "unknown")
            bots = ("promote-bot (claimed)", "rollback-bot (claimed)")
            transition_moves = [m for m in moves if m.actor in bots]
            assert transition_moves and all(m.evidence_run_id for m in transition_moves)
        finally:
            server.stop()


# --------------------------------------------------------------------------- (b) the reported bug
def _alias_deliveries(workspace: Path) -> list[str]:
    """Statuses of the alias deliveries the receiver of ``workspace`` logged."""
    path = workspace / "hooks.db"
    if not path.exists():
        return []
    con = sqlite3.connect(path, timeout=30)
    try:
        rows = con.execute("SELECT status FROM deliveries WHERE event LIKE 'model_version_alias.%'")
        rows = rows.fetchall()
    except sqlite3.OperationalError:  # the receiver has not made its table yet
        return []
    finally:
        con.close()
    return [r[0] for r in rows]


def _wait(what: str, ok: Callable[[], object], timeout: float = 240, log: Callable[[], str] | None = None):
    return wait_until(ok, timeout, what, interval=0.5, detail=(lambda: f"log: {log()}") if log else None)


@pytest.mark.slow
@pytest.mark.postgres
def test_force_promote_then_rollback_with_the_receiver_running_records_no_phantom(tmp_path) -> None:
    _pg_or_skip()
    keys = make_keys(tmp_path / "keys")
    with pg_database("history") as db:
        server = start_guard(tmp_path / "srv", db, keys, workers=2, **_webhook_env())
        try:
            cfg = guard_config(tmp_path / "ws", server, keys)
            cfg.workspace.mkdir(parents=True, exist_ok=True)
            client = MlflowClient(server.url, server.url)
            name = cfg.training.model_name
            exp_id = client.create_experiment(f"history-{uuid.uuid4().hex[:8]}")
            v1, v4 = (new_version(client, name, exp_id, f"weights {i}".encode() * 30) for i in (1, 4))
            for v in (v1, v4):  # gated
                record_signed(client, cfg, name, v, "gate", "passed", champion=None, run_id="gate")
            move_alias(client, name, CHAMPION, v1, actor="setup")  # first champion
            move_alias(client, name, CANARY, v4, actor="setup")
            receiver = Receiver(cfg, server.url, tmp_path / "hooks.log",
                                CHURN_REGISTRY__SIGNING_KEY_FILE=str(keys.signing_file),
                                CHURN_REGISTRY__VERIFY_KEY_FILE=str(keys.verify_file))
            hook_id = register_webhook(client, f"{receiver.url}/webhook")
            try:
                with receiver:
                    time.sleep(2)  # the server's webhook cache (1 s) sees the new webhook
                    env = {"MLFLOW_TRACKING_URI": server.url, "CHURN_TRAINING__MODEL_NAME": name,
                           "CHURN_REGISTRY__SIGNING_KEY_FILE": str(keys.signing_file),
                           "CHURN_REGISTRY__VERIFY_KEY_FILE": str(keys.verify_file)}
                    forced = run_cli(cfg, ["canary", "promote", "--force", "--reason", "hotfix"], **env)
                    assert forced.returncode == 0, forced.stderr[-3000:]
                    back = run_cli(cfg, ["canary", "rollback", "--reason", "conversion dropped"], **env)
                    assert back.returncode == 0, back.stderr[-3000:]
                    # champion, previous-champion, canary (promote); previous-champion, champion (rollback)
                    _wait("the receiver handling the 5 alias deliveries",
                          lambda: Counter(_alias_deliveries(cfg.workspace))["done"] >= 5, log=receiver.log)
                    assert "failed" not in _alias_deliveries(cfg.workspace), receiver.log()
            finally:
                client.delete_webhook(hook_id)
            moves = read_moves(client, name)
            user = f"{getpass.getuser()} (claimed)"
            assert [(m.alias, m.from_version, m.to_version, m.actor) for m in moves] == [
                (CHAMPION, None, v1, "setup (claimed)"),
                (CANARY, None, v4, "setup (claimed)"),
                (CHAMPION, v1, v4, user),
                (PREVIOUS_CHAMPION, None, v1, user),
                (CANARY, v4, None, user),
                (PREVIOUS_CHAMPION, v1, None, user),
                (CHAMPION, v4, v1, user),
            ], [(m.alias, m.from_version, m.to_version, m.actor, m.source) for m in moves]
            assert {m.source for m in moves} == {"guard"} and [m.seq for m in moves] == list(range(1, 8))
            assert aliases(client, name) == {CHAMPION: v1}
            # MLflow drops the aliases of a deleted version: the guard records that move too
            v5 = new_version(client, name, exp_id, b"weights 5" * 30)
            assert call(server, "POST", "registered-models/alias",
                        {"name": name, "alias": "shadow", "version": v5}).status_code == 200
            client.delete_model_version(name, v5)
            last = read_moves(client, name)[7:]
            assert [(m.alias, m.from_version, m.to_version, m.seq) for m in last] == [
                ("shadow", None, v5, 8), ("shadow", v5, None, 9)]
            assert "model-versions delete" in last[1].reason and "shadow" not in aliases(client, name)
        finally:
            server.stop()


# --------------------------------------------------------------------------- (c) receiver, no guard
@pytest.mark.slow
def test_without_guard_the_receiver_records_each_delivered_move_once_in_order(
        config, mlflow_server, tmp_path, monkeypatch) -> None:
    url = mlflow_server.url
    cfg = config.model_copy(deep=True)
    cfg.training.model_name = f"churn-{uuid.uuid4().hex[:8]}"
    name = cfg.training.model_name
    cfg.workspace.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(url, url)
    exp_id = client.create_experiment(f"history-{uuid.uuid4().hex[:8]}")
    versions = [new_version(client, name, exp_id, f"weights {i}".encode()) for i in range(4)]
    receiver = Receiver(cfg, url, tmp_path / "hooks.log")
    hook_id = register_webhook(client, f"{receiver.url}/webhook")
    ledger, state, calls = Ledger(), {}, 0
    rng = random.Random(40)
    try:
        with receiver:
            _wait("the receiver's claim on the model",
                  lambda: client.get_registered_model(name).tags.get("churn.history_writer") == "receiver")
            time.sleep(2)  # the server's webhook cache (1 s) sees the new webhook
            assert writer_of(client, name) == "receiver"
            for _ in range(40):
                alias = rng.choice(("shadow", "blue", "green"))  # challenger would start gates
                before = state.get(alias)
                delete = before is not None and rng.random() < 0.2
                version = None if delete else rng.choice(versions)
                if rng.random() < 0.4:  # the project: its claim goes in the model tag
                    if delete:
                        remove_alias(client, name, alias, actor="carol", reason="done")
                    else:
                        move_alias(client, name, alias, version, actor="carol", reason="try it")
                    actor = "carol (claimed)"
                elif delete:
                    client.delete_registered_model_alias(name, alias)
                    actor = "unknown"
                else:
                    client.set_registered_model_alias(name, alias, version)
                    actor = "unknown"
                calls += 1
                if before != version:
                    ledger.add(alias, before, version, actor)
                state = {a: v for a, v in state.items() if a != alias}
                if version:
                    state[alias] = version
                # MLflow stamps a delivery when its delivery thread sends it: moves closer together
                # than that thread's scheduling can swap (the guard gives the server's own order)
                time.sleep(0.3)
            _wait(f"the receiver handling the {calls} alias deliveries",
                  lambda: Counter(_alias_deliveries(cfg.workspace))["done"] >= calls, log=receiver.log)
            assert "failed" not in _alias_deliveries(cfg.workspace), receiver.log()
    finally:
        client.delete_webhook(hook_id)
    moves = read_moves(client, name)
    assert_exact(moves, ledger, aliases(client, name), source="webhook")
    assert all(m.delivery_id for m in moves)


# --------------------------------------------------------------------------- (d) embedded SQLite
_PROCESS = """
import sys
from mlflow.tracking import MlflowClient
from mlflow_churn.registry.aliases import move_alias
uri, name, who, versions = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split(",")
client = MlflowClient(uri, uri)
for i in range(int(sys.argv[5])):
    alias = ("shadow", "challenger")[i % 2]
    move_alias(client, name, alias, versions[(i // 2) % len(versions)], actor=who, reason=f"step {i}")
"""


@pytest.mark.slow  # among the slowest of make test-fast (several processes)
def test_embedded_store_project_moves_from_several_processes_recorded_once_in_order(workspace) -> None:
    cfg = load_config(workspace=workspace, environ={})
    uri = cfg.mlflow_tracking_uri
    client = MlflowClient(uri, uri)
    name = cfg.training.model_name
    client.create_registered_model(name)
    versions = [str(client.create_model_version(name, (workspace / "m").as_uri()).version) for _ in range(6)]
    assert writer_of(client, name) == "project"
    move_alias(client, name, "shadow", versions[0], actor="setup")
    # disjoint versions per process: no set of one is ever a no-op
    own = {"p0": versions[1:3], "p1": versions[3:5], "p2": [versions[5], versions[0]]}
    steps = 12
    procs = [subprocess.Popen([sys.executable, "-c", _PROCESS, uri, name, who, ",".join(vs), str(steps)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=workspace)
             for who, vs in own.items()]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    remove_alias(client, name, "shadow", actor="teardown")
    moves = read_moves(client, name)
    registry = aliases(client, name)
    assert [m.seq for m in moves] == list(range(1, len(moves) + 1))
    assert {m.source for m in moves} == {"project"}
    for alias in ("shadow", "challenger"):
        hist = [m for m in moves if m.alias == alias]
        assert [m.position for m in hist] == list(range(1, len(hist) + 1))
        assert all(m.from_version == (hist[i - 1].to_version if i else None) for i, m in enumerate(hist))
        assert (hist[-1].to_version if hist else None) == registry.get(alias)
        for who, vs in own.items():  # every move of each process, once, in its order
            mine = [m.to_version for m in hist if m.actor == who]
            made = [vs[(i // 2) % len(vs)] for i in range(steps) if ("shadow", "challenger")[i % 2] == alias]
            assert mine == made, (alias, who, mine, made)
    assert [m.actor for m in moves if m.alias == "shadow"][0] == "setup"
    assert moves[-1].actor == "teardown" and moves[-1].to_version is None
