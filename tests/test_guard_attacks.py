"""Attacks on a real ``mlflow server --app-name churn-guard`` (two uvicorn workers) on PostgreSQL.

The attacker is a keyless user with plain REST access: no signing key, write access to the
registry. The project's processes sign their decisions with the test's Ed25519 key
(``signing.record_signed``); the server holds only the verify key file. A legitimate module
setup leaves model A with

- v1: gate passed, first champion, now ``previous-champion``;
- v2: gate passed, canary ``promote`` against v1, promoted: ``champion``;
- v3: gate rejected; v4: never gated; v5: gate passed, ``canary``;

and every test checks that no keyless call changes that protected state or the registered
files (the invariant of :func:`assert_protected`).
"""

from __future__ import annotations

import json
import secrets
import socket
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from guard_pg_support import (
    AUDIT_EXPERIMENT,
    ENCODINGS,
    Legit,
    aliases,
    artifact_call,
    basic_auth_env,
    call,
    config,
    files_location,
    make_keys,
    new_version,
    pg_database,
    sign,
    signed_kinds,
    start_guard,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mlflow_churn.registry import signing
from mlflow_churn.registry.promotion import OVERRIDE_TAG, read_evidence

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

CHAMPION, PREVIOUS, CANARY = "champion", "previous-champion", "canary"


def _pg_or_skip() -> None:
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=1.0):
            return
    except OSError:
        pytest.skip("PostgreSQL is not reachable at 127.0.0.1:5432")


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return make_keys(tmp_path_factory.mktemp("attack-keys"))


@pytest.fixture(scope="module")
def server(tmp_path_factory, keys):
    """The keyless attacker's server: no auth, two workers, its own PostgreSQL database."""
    _pg_or_skip()
    with pg_database("guard") as db:
        srv = start_guard(tmp_path_factory.mktemp("attack-server"), db, keys, workers=2)
        try:
            srv.db_url = db  # type: ignore[attr-defined]
            yield srv
        finally:
            srv.stop()


@pytest.fixture(scope="module")
def verifier(keys) -> signing.Verifier:
    return signing.Verifier.load([keys.verify_file])


def _ok(res) -> None:
    assert res.status_code == 200, res.text


def set_alias(server, name, alias, version, **kw):
    return call(server, "POST", "registered-models/alias", {"name": name, "alias": alias, "version": version},
                **kw)


def delete_alias(server, name, alias, **kw):
    return call(server, "DELETE", "registered-models/alias", {"name": name, "alias": alias}, **kw)


@pytest.fixture(scope="module")
def legit(server, keys, tmp_path_factory):
    """The legitimate lifecycle of model A, made the way the project makes it: signed decision
    tags first, then the alias moves, all through the guarded REST API."""
    cfg = config(tmp_path_factory.mktemp("attack-ws"), server, keys)
    client = MlflowClient(server.url, server.url)
    name = cfg.training.model_name
    exp_id = client.create_experiment(f"attacks-{uuid.uuid4().hex[:8]}")
    v = {i: new_version(client, name, exp_id, f"weights of v{i} ".encode() * (50 + i)) for i in range(1, 6)}
    sign(client, cfg, v[1], "gate", "passed")
    _ok(set_alias(server, name, CHAMPION, v[1]))  # first_champion
    sign(client, cfg, v[2], "gate", "passed", champion=v[1])
    _ok(set_alias(server, name, CANARY, v[2]))  # gate_passed
    sign(client, cfg, v[2], "canary", "promote", champion=v[1])
    _ok(set_alias(server, name, CHAMPION, v[2]))  # gate_and_canary
    _ok(set_alias(server, name, PREVIOUS, v[1]))  # promotion_left_behind
    _ok(delete_alias(server, name, CANARY))  # canary_removed
    sign(client, cfg, v[3], "gate", "rejected", champion=v[2])
    sign(client, cfg, v[5], "gate", "passed", champion=v[2])
    _ok(set_alias(server, name, CANARY, v[5]))

    state = Legit(name=name, versions=v, aliases=aliases(client, name), digests={}, locations={},
                  experiment_id=exp_id)
    assert state.aliases == {CHAMPION: v[2], PREVIOUS: v[1], CANARY: v[5]}
    ver = signing.Verifier.load([keys.verify_file])
    for i, version in v.items():
        state.digests[version] = signing.version_files_digest(client, name, version)
        state.locations[version] = files_location(client, name, version)
        tags = client.get_model_version(name, version).tags
        state.sig_tags[version] = {k: val for k, val in tags.items() if k.startswith(signing.SIG_PREFIX)}
        ev = read_evidence(client, name, version, ver)
        if i != 4:
            assert ev.decisions["gate"].files_sha256 == state.digests[version]
    assert signed_kinds(client, name, v[2], ver) == {"gate": "passed", "canary": "promote"}
    return cfg, client, state


def assert_protected(server, client: MlflowClient, verifier: signing.Verifier, legit: Legit,
                     canary_may_move: bool = False) -> None:
    """The invariant: the protected aliases are where the legitimate setup left them, on
    versions whose signed evidence allows them; the versions, their signed decisions and their
    served files are unchanged."""
    name, v = legit.name, legit.versions
    now = aliases(client, name)  # the model exists under its name (no rename)
    assert now.get(CHAMPION) == legit.aliases[CHAMPION] and now.get(PREVIOUS) == legit.aliases[PREVIOUS], now
    assert now[CHAMPION] != now[PREVIOUS]
    champ = read_evidence(client, name, now[CHAMPION], verifier)
    prev = client.get_model_version(name, now[PREVIOUS])
    assert champ.get("gate", "passed") is not None and champ.promotion is not None
    assert champ.promotion.champion == signing.version_ref(prev)  # the promotion replaced previous-champion
    if canary_may_move:
        if CANARY in now:
            assert now[CANARY] != now[CHAMPION]
            assert read_evidence(client, name, now[CANARY], verifier).get("gate", "passed") is not None
    else:
        assert now.get(CANARY) == legit.aliases[CANARY]
    found = {str(mv.version) for mv in client.search_model_versions(f"name = '{name}'")}
    assert found == set(v.values())
    for version in v.values():
        tags = client.get_model_version(name, version).tags
        sig = {k: val for k, val in tags.items() if k.startswith(signing.SIG_PREFIX)}
        assert sig == legit.sig_tags[version]
        # the served files (the proxied artifact root of the server) are the registered ones
        assert signing.files_digest(server.artifacts_dir / legit.locations[version]) == legit.digests[version]


def _refused(res, *rules: str) -> None:
    assert res.status_code == 403, res.text
    body = res.json()
    assert body["error_code"] == "PERMISSION_DENIED"
    if rules:
        assert any(f"rule {r}" in body["message"] or r in body["message"] for r in rules), body["message"]


# --------------------------------------------------------------------------- 1. the numbered attacks
def test_a_json_string_bodies_and_non_object_bodies(server, legit, verifier) -> None:
    cfg, client, st_ = legit
    name, v = st_.name, st_.versions
    moves = [
        ("POST", "registered-models/alias", {"name": name, "alias": CHAMPION, "version": v[3]}),
        ("DELETE", "registered-models/alias", {"name": name, "alias": CHAMPION}),
        ("POST", "model-versions/transition-stage",
         {"name": name, "version": v[3], "stage": "Production", "archive_existing_versions": True}),
        ("DELETE", "model-versions/delete", {"name": name, "version": v[2]}),
        ("DELETE", "registered-models/delete", {"name": name}),
    ]
    for ui in (False, True):
        for method, path, payload in moves:
            _refused(call(server, method, path, payload, encoding="string", ui=ui))
            _refused(call(server, method, path, payload, encoding="object", ui=ui))
        for body in ("[1, 2]", "5", json.dumps(json.dumps([name, CHAMPION, v[3]])), "{", json.dumps("{"),
                     json.dumps(json.dumps(json.dumps({"name": name, "alias": CHAMPION, "version": v[3]})))):
            res = call(server, "POST", "registered-models/alias", body, encoding="raw", ui=ui)
            assert res.status_code == 400, (body, res.text)
            res = call(server, "DELETE", "registered-models/delete", body, encoding="raw", ui=ui)
            assert res.status_code == 400, (body, res.text)
        # the version as a JSON number / list, unknown or doubly spelled fields: never a pass
        for payload in ({"name": name, "alias": CHAMPION, "version": int(v[3])},
                        {"name": name, "alias": CHAMPION, "version": [v[3]]},
                        {"name": name, "alias": CHAMPION, "version": v[3], "zzz": 1},
                        {"zzz": 1, "name": name, "alias": CHAMPION, "version": v[3]},
                        {"name": name, "alias": CHAMPION, "version": f"{v[3]}.0"}):
            for encoding in ("object", "string"):
                res = call(server, "POST", "registered-models/alias", payload, encoding=encoding, ui=ui)
                assert res.status_code in (400, 403), (payload, res.text)
    for route in ("2.0/preview", "3.0"):  # other API versions: the same route, or none
        for method, path, payload in moves:
            res = call(server, method, path, payload, version=route)
            assert res.status_code in (403, 404, 405), (route, path, res.text)
    res = call(server, "POST", "registered-models/alias/", moves[0][2])  # trailing slash
    assert res.status_code in (403, 404, 405, 308), res.text
    assert client.get_model_version(name, v[3]).current_stage == "None"
    assert_protected(server, client, verifier, st_)


def test_b_previous_champion_then_champion(server, legit, verifier) -> None:
    cfg, client, st_ = legit
    name, v = st_.name, st_.versions
    for version in (v[4], v[3], v[5]):
        _refused(set_alias(server, name, PREVIOUS, version), "lifecycle")
    _refused(set_alias(server, name, CHAMPION, v[4]), "not_gated")
    _refused(delete_alias(server, name, PREVIOUS), "lifecycle")
    assert_protected(server, client, verifier, st_)


def test_c_forged_evidence_does_not_count(server, legit, verifier) -> None:
    cfg, client, st_ = legit
    name, v = st_.name, st_.versions
    run = call(server, "POST", "runs/create", {
        "experiment_id": st_.experiment_id, "run_name": "gate v4 (forged)",
        "tags": [{"key": k, "value": val} for k, val in {
            "churn.decision": "gate", "gate": "passed", "decision": "promote", "challenger_version": v[4],
            "canary_version": v[4], "champion_version": v[2]}.items()]})
    _ok(run)
    run_id = run.json()["run"]["info"]["run_id"]
    typed = {"gate": "passed", "gate_run_id": run_id, "canary_run_id": run_id, "canary_decision": "promote"}
    for key, value in typed.items():  # plain tags: evidence for people, allowed
        _ok(call(server, "POST", "model-versions/set-tag", {"name": name, "version": v[4], "key": key,
                                                           "value": value}))
    _refused(set_alias(server, name, CHAMPION, v[4]), "not_gated")
    _refused(set_alias(server, name, CHAMPION, v[4], ui=True, encoding="string"), "not_gated")

    # signed-decision tags: a copy of v2's envelope, and one with an edited payload
    gate_v2 = st_.sig_tags[v[2]]["churn.sig.gate"]
    v4 = client.get_model_version(name, v[4])
    edited = json.loads(gate_v2)
    edited["payload"].update(version=v[4], identity=signing.version_identity(v4))
    rejected = json.loads(st_.sig_tags[v[3]]["churn.sig.gate"])
    rejected["payload"]["decision"] = "passed"
    canary_v2 = st_.sig_tags[v[2]]["churn.sig.canary"]
    forged = [(v[4], "churn.sig.gate", gate_v2), (v[4], "churn.sig.gate", json.dumps(edited)),
              (v[3], "churn.sig.gate", json.dumps(rejected)), (v[5], "churn.sig.canary", canary_v2),
              (v[4], "churn.sig.canary", canary_v2), (v[4], "churn.sig.gate", "not json"),
              (v[4], "churn.sig.override", gate_v2)]
    for ui in (False, True):
        for version, key, value in forged:
            res = call(server, "POST", "model-versions/set-tag",
                       {"name": name, "version": version, "key": key, "value": value}, ui=ui)
            _refused(res, "signature", "signed for another", "malformed")
    _refused(call(server, "DELETE", "model-versions/delete-tag", {"name": name, "version": v[2],
                                                                  "key": "churn.sig.canary"}))
    for version, model in (("99", name), (v[2], f"{name}-nope")):  # no such version / model: never a 5xx
        res = call(server, "POST", "model-versions/set-tag",
                   {"name": model, "version": version, "key": "churn.sig.gate", "value": gate_v2})
        assert res.status_code in (403, 404), res.text
    _refused(set_alias(server, name, CHAMPION, v[4]), "not_gated")

    # would not count either: written straight into the store (no guard), they are not evidence
    direct = MlflowClient(server.db_url, server.db_url)
    try:
        direct.set_model_version_tag(name, v[4], "churn.sig.gate", json.dumps(edited))
        direct.set_model_version_tag(name, v[4], "churn.sig.canary", canary_v2)
        ev = read_evidence(client, name, v[4], verifier)
        assert ev.decisions == {} and set(ev.problems) == {"gate", "canary"}, ev.problems
        _refused(set_alias(server, name, CHAMPION, v[4]), "bad_signature")
    finally:
        for key in ("churn.sig.gate", "churn.sig.canary"):
            direct.delete_model_version_tag(name, v[4], key)
    for key in typed:
        _ok(call(server, "DELETE", "model-versions/delete-tag", {"name": name, "version": v[4], "key": key}))
    assert_protected(server, client, verifier, st_)


def test_d_rename_and_copy(server, legit, verifier) -> None:
    cfg, client, st_ = legit
    name, v = st_.name, st_.versions
    for ui in (False, True):
        for encoding in ("object", "string"):
            _refused(call(server, "POST", "registered-models/rename", {"name": name, "new_name": f"{name}-x"},
                          encoding=encoding, ui=ui), "cannot be renamed")
    with pytest.raises(MlflowException, match="PERMISSION_DENIED|churn-guard"):
        client.copy_model_version(f"models:/{name}/{v[3]}", name)
    for source in (f"models:/{name}/{v[3]}", f"models:/{name}@{CHAMPION}"):
        _refused(call(server, "POST", "model-versions/create", {"name": name, "source": source}))
    assert_protected(server, client, verifier, st_)


def test_e_registered_files_are_immutable(server, legit, verifier) -> None:
    cfg, client, st_ = legit
    name, v = st_.name, st_.versions
    loc = st_.locations[v[2]]
    parent = loc.rsplit("/", 1)[0]
    run_id = client.get_model_version(name, v[2]).run_id
    for ui in (False, True):
        for path in (f"{loc}/weights.bin", f"{loc}/MLmodel", f"{loc}/extra.bin"):
            _refused(artifact_call(server, "PUT", path, b"other bytes", ui=ui), "immutable")
        for path in (f"{loc}/weights.bin", loc, parent, parent.split("/")[0]):
            _refused(artifact_call(server, "DELETE", path, ui=ui), "immutable")
    res = artifact_call(server, "PUT", f"{parent}/../artifacts/model/weights.bin", b"other bytes")
    assert res.status_code in (400, 403, 404), res.text
    res = artifact_call(server, "PUT", f"{parent}/%2e%2e/artifacts/model/weights.bin", b"other bytes")
    assert res.status_code in (400, 403, 404), res.text
    res = call(server, "POST", "upload-artifact", None, ui=True, encoding="query")  # no run: MLflow's 400
    assert res.status_code >= 400
    res = requests.post(f"{server.url}/ajax-api/2.0/mlflow/upload-artifact",
                        params={"run_uuid": run_id, "path": "model/weights.bin"}, data=b"other", timeout=60)
    _refused(res, "immutable")
    res = requests.post(f"{server.url}/api/2.0/mlflow-artifacts/mpu/create/{loc}", timeout=60,
                        json={"path": "weights.bin", "num_parts": 1})
    assert res.status_code == 403, res.text
    assert signing.version_files_digest(client, name, v[2]) == \
        signing.Verifier.load([cfg.registry.verify_key_file]).verify(st_.sig_tags[v[2]]["churn.sig.gate"]).files_sha256
    assert_protected(server, client, verifier, st_)


def test_f_typed_override_does_not_promote(server, legit, verifier) -> None:
    cfg, client, st_ = legit
    name, v = st_.name, st_.versions
    _ok(call(server, "POST", "model-versions/set-tag",
             {"name": name, "version": v[4], "key": OVERRIDE_TAG, "value": "incident 42: trust me"}))
    for key in ("promotion_override_by", "promotion_override_against"):
        _refused(call(server, "POST", "model-versions/set-tag",
                      {"name": name, "version": v[4], "key": key, "value": "admin"}), "churn-guard only")
    _refused(set_alias(server, name, CHAMPION, v[4]), "not_gated")
    _refused(set_alias(server, name, CHAMPION, v[4], ui=True), "not_gated")
    _ok(call(server, "DELETE", "model-versions/delete-tag",
             {"name": name, "version": v[4], "key": OVERRIDE_TAG}))
    # nor can a new version be born with the tags only the guard writes
    mv4 = client.get_model_version(name, v[4])
    champ_ref = signing.version_ref(client.get_model_version(name, v[2]))
    res = call(server, "POST", "model-versions/create", {
        "name": name, "source": mv4.source, "run_id": mv4.run_id,
        "tags": [{"key": OVERRIDE_TAG, "value": "x"}, {"key": "promotion_override_by", "value": "admin"},
                 {"key": "promotion_override_against", "value": champ_ref}]})
    _refused(res, "may not be created with tag")
    assert_protected(server, client, verifier, st_)


def test_g_champion_alias_and_version_cannot_be_deleted(server, legit, verifier) -> None:
    cfg, client, st_ = legit
    name, v = st_.name, st_.versions
    for ui in (False, True):
        _refused(delete_alias(server, name, CHAMPION, ui=ui), "lifecycle")
        _refused(delete_alias(server, name, PREVIOUS, ui=ui), "lifecycle")
        for version in (v[2], v[1], v[5]):  # champion, previous-champion, canary
            for text in (version, f"0{version}", f" {version}", f"+{version}", f"{version} "):
                res = call(server, "DELETE", "model-versions/delete", {"name": name, "version": text}, ui=ui)
                _refused(res, "protected alias")
    assert_protected(server, client, verifier, st_)


# --------------------------------------------------------------------------- 2. random keyless sequences
ALIASES = (CHAMPION, PREVIOUS, CANARY, "challenger")
TAG_KEYS = ("churn.sig.gate", "churn.sig.canary", "churn.sig.rollback", "churn.sig.override",
            "churn.sig.approval", OVERRIDE_TAG, "promotion_override_by", "promotion_override_against",
            "gate", "gate_run_id", "canary_run_id", "canary_decision", "approved_by")
KINDS = ("gate", "canary")
RUN_TAGS = ("churn.decision", "gate", "decision", "challenger_version", "canary_version", "champion_version")

versions = st.integers(1, 5)
version_text = st.sampled_from(("{}", "0{}", " {}", "+{}"))
tag_values = st.one_of(
    st.tuples(st.just("copy"), versions, st.sampled_from(KINDS)),  # another version's signed envelope
    st.tuples(st.just("edit"), versions, st.sampled_from(KINDS)),  # ... with an edited payload
    st.tuples(st.just("last_run")),  # the forged run made earlier in the sequence
    st.tuples(st.just("text"), st.sampled_from(("passed", "promote", "admin", "incident", ""))),
)
actions = st.one_of(
    st.tuples(st.just("set_alias"), st.sampled_from(ALIASES), versions, version_text),
    st.tuples(st.just("delete_alias"), st.sampled_from(ALIASES)),
    st.tuples(st.just("set_tag"), versions, st.sampled_from(TAG_KEYS), tag_values),
    st.tuples(st.just("delete_tag"), versions, st.sampled_from(TAG_KEYS)),
    st.tuples(st.just("create_run"),
              st.dictionaries(st.sampled_from(RUN_TAGS), st.sampled_from(("passed", "promote", "2", "4")))),
    st.tuples(st.just("rename"), st.sampled_from(("x", "-renamed", " "))),
    st.tuples(st.just("copy"), versions),
    st.tuples(st.just("stage"), versions,
              st.sampled_from(("Production", "production", "Staging", "Archived"))),
    st.tuples(st.just("delete_version"), st.sampled_from((1, 2)), version_text),
    st.tuples(st.just("artifact"), st.sampled_from(("PUT", "DELETE")), versions,
              st.sampled_from(("weights.bin", "MLmodel", "new.bin", "", ".."))),
)
calls = st.lists(st.tuples(actions, st.sampled_from(ENCODINGS), st.booleans()), min_size=1, max_size=8)


def _tag_value(spec: tuple, legit: Legit, client: MlflowClient, last_run: str) -> str:
    if spec[0] == "text":
        return spec[1]
    if spec[0] == "last_run":
        return last_run or "0" * 32
    src = legit.versions[spec[1]]
    value = legit.sig_tags[src].get(f"churn.sig.{spec[2]}") or \
        legit.sig_tags[legit.versions[2]]["churn.sig.gate"]
    if spec[0] == "copy":
        return value
    env = json.loads(value)
    env["payload"]["decision"] = "promote" if spec[2] == "canary" else "passed"
    env["payload"]["issued_at"] = "2099-01-01T00:00:00+00:00"
    return json.dumps(env)


def _run_sequence(server, client: MlflowClient, legit: Legit, seq) -> list[tuple]:
    name, v = legit.name, legit.versions
    last_run = ""
    seen = []
    for action, encoding, ui in seq:
        kind = action[0]
        if kind == "set_alias":
            res = set_alias(server, name, action[1], action[3].format(v[action[2]]), encoding=encoding, ui=ui)
        elif kind == "delete_alias":
            res = delete_alias(server, name, action[1], encoding=encoding, ui=ui)
        elif kind == "set_tag":
            res = call(server, "POST", "model-versions/set-tag",
                       {"name": name, "version": v[action[1]], "key": action[2],
                        "value": _tag_value(action[3], legit, client, last_run)}, encoding=encoding, ui=ui)
        elif kind == "delete_tag":
            res = call(server, "DELETE", "model-versions/delete-tag",
                       {"name": name, "version": v[action[1]], "key": action[2]}, encoding=encoding, ui=ui)
        elif kind == "create_run":
            res = call(server, "POST", "runs/create", {
                "experiment_id": legit.experiment_id,
                "tags": [{"key": k, "value": val} for k, val in action[1].items()]}, encoding=encoding, ui=ui)
            if res.status_code == 200:
                last_run = res.json()["run"]["info"]["run_id"]
        elif kind == "rename":
            res = call(server, "POST", "registered-models/rename",
                       {"name": name, "new_name": name + action[1]}, encoding=encoding, ui=ui)
        elif kind == "copy":
            res = call(server, "POST", "model-versions/create",
                       {"name": name, "source": f"models:/{name}/{v[action[1]]}"}, encoding=encoding, ui=ui)
        elif kind == "stage":
            res = call(server, "POST", "model-versions/transition-stage",
                       {"name": name, "version": v[action[1]], "stage": action[2],
                        "archive_existing_versions": False}, encoding=encoding, ui=ui)
        elif kind == "delete_version":
            res = call(server, "DELETE", "model-versions/delete",
                       {"name": name, "version": action[2].format(v[action[1]])}, encoding=encoding, ui=ui)
        else:  # artifact write on a registered version's files
            loc = legit.locations[v[action[2]]]
            path = f"{loc}/{action[3]}" if action[3] else loc
            res = artifact_call(server, action[1], path, b"attack" if action[1] == "PUT" else None, ui=ui)
        assert res.status_code < 500, (action, encoding, ui, res.status_code, res.text)
        seen.append((action, encoding, ui, res.status_code))
    return seen


def _restore_unprotected(server, client: MlflowClient, legit: Legit) -> None:
    """Put back what a keyless user may change (canary: any gate-passed version; challenger)."""
    now = aliases(client, legit.name)
    if now.get(CANARY) != legit.aliases[CANARY]:
        _ok(set_alias(server, legit.name, CANARY, legit.aliases[CANARY]))
    if "challenger" in now:
        _ok(delete_alias(server, legit.name, "challenger"))


@settings(max_examples=25, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(seq=calls)
def test_random_keyless_sequences_keep_the_protected_state(server, legit, verifier, seq) -> None:
    cfg, client, st_ = legit
    try:
        seen = _run_sequence(server, client, st_, seq)
        try:
            assert_protected(server, client, verifier, st_, canary_may_move=True)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; calls: {seen}") from None
    finally:
        _restore_unprotected(server, client, st_)


# --------------------------------------------------------------------------- 3. concurrent promotions
def test_concurrent_promotions_only_one_wins(server, keys, tmp_path, verifier) -> None:
    cfg = config(tmp_path / "ws", server, keys)
    client = MlflowClient(server.url, server.url)
    name = cfg.training.model_name
    exp_id = client.create_experiment(f"race-{uuid.uuid4().hex[:8]}")
    v1, va, vb = (new_version(client, name, exp_id, f"race {i}".encode() * 40) for i in range(3))
    sign(client, cfg, v1, "gate", "passed")
    _ok(set_alias(server, name, CHAMPION, v1))
    for cand in (va, vb):  # both: gate passed, canary promote against the current champion v1
        sign(client, cfg, cand, "gate", "passed", champion=v1)
        sign(client, cfg, cand, "canary", "promote", champion=v1)
    targets = [va if i % 2 == 0 else vb for i in range(20)]
    barrier = threading.Barrier(len(targets))

    def fire(target: str):
        barrier.wait(timeout=60)
        return target, set_alias(server, name, CHAMPION, target)

    with ThreadPoolExecutor(len(targets)) as pool:
        results = [(t, r.status_code, r.text) for t, r in pool.map(fire, targets)]
    assert len(results) == 20
    assert all(code in (200, 403) for _, code, _ in results), results
    final = aliases(client, name)[CHAMPION]
    loser = vb if final == va else va
    assert final in (va, vb)
    assert all(code == 200 for t, code, _ in results if t == final), results  # the winner, then "unchanged"
    lost = [(code, text) for t, code, text in results if t == loser]
    assert all(code == 403 and "rule canary_pending" in text for code, text in lost), results
    allowed = client.search_runs(
        [client.get_experiment_by_name(AUDIT_EXPERIMENT).experiment_id],
        f"tags.model_name = '{name}' and tags.decision = 'allowed' and tags.action = 'set_alias'")
    promotions = [r for r in allowed if r.data.tags["version"] in (va, vb)]
    assert [(r.data.tags["version"], r.data.tags["rule"]) for r in promotions] == [(final, "gate_and_canary")]
    assert client.get_model_version(name, final).tags["promotion_rule"] == "gate_and_canary"
    assert "promotion_rule" not in client.get_model_version(name, loser).tags


# --------------------------------------------------------------------------- 4. basic-auth
ADMIN = ("admin", secrets.token_urlsafe(18))
USERS = {user: secrets.token_urlsafe(12) for user in ("alice", "bob", "carol")}


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory, keys):
    """A second guard server wrapping MLflow's basic-auth: approval required, approver alice,
    override user carol; bob is a plain user with EDIT on everything."""
    _pg_or_skip()
    root = tmp_path_factory.mktemp("attack-auth")
    env = basic_auth_env(root, ADMIN[1])
    env.update({"CHURN_REGISTRY__REQUIRE_APPROVAL": "true", "CHURN_REGISTRY__APPROVERS": '["alice"]',
                "CHURN_REGISTRY__OVERRIDE_USERS": '["carol"]'})
    with pg_database("guardauth") as db:
        srv = start_guard(root, db, keys, workers=1, **env)
        try:
            for user, password in USERS.items():
                _ok(call(srv, "POST", "users/create", {"username": user, "password": password}, auth=ADMIN))
            yield srv
        finally:
            srv.stop()


def test_basic_auth_four_eyes_and_override_users(auth_server, keys, tmp_path, monkeypatch, verifier) -> None:
    server = auth_server
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN[1])
    cfg = config(tmp_path / "ws", server, keys, **{"registry.require_approval": True,
                                                     "registry.guard_auth": "basic-auth"})
    client = MlflowClient(server.url, server.url)  # the admin: the project's processes
    name = cfg.training.model_name
    exp_id = client.create_experiment(f"auth-{uuid.uuid4().hex[:8]}")
    v1, v2, v3 = (new_version(client, name, exp_id, f"auth {i}".encode() * 40) for i in range(3))
    alice, bob = ("alice", USERS["alice"]), ("bob", USERS["bob"])

    def tag(who, version, key, value):
        return call(server, "POST", "model-versions/set-tag",
                    {"name": name, "version": version, "key": key, "value": value}, auth=who)

    sign(client, cfg, v1, "gate", "passed")
    _ok(tag(alice, v1, "approved_by", "alice"))
    _ok(set_alias(server, name, CHAMPION, v1, auth=ADMIN))  # approved by alice, promoted by admin
    sign(client, cfg, v2, "gate", "passed", champion=v1)
    sign(client, cfg, v2, "canary", "promote", champion=v1)
    _ok(tag(alice, v2, "approved_by", "alice"))

    refusals = []
    res = set_alias(server, name, CHAMPION, v2, auth=alice)  # the approver promotes her own approval
    _refused(res, "self_approval")
    refusals.append(("alice", "self_approval"))
    _refused(tag(bob, v3, OVERRIDE_TAG, "incident 7: ship v3 now"), "override_users")
    refusals.append(("bob", "override_not_allowed"))
    _refused(tag(bob, v3, "approved_by", "bob"), "registry.approvers")
    refusals.append(("bob", "approval_not_allowed"))
    _refused(tag(alice, v2, "approved_by", "dana"), "approved_by")  # an approval names the approver
    refusals.append(("alice", "approval_not_allowed"))
    # the guard-written override tags cannot be smuggled in when a version is created either
    champ_ref = signing.version_ref(client.get_model_version(name, v1))
    mv3 = client.get_model_version(name, v3)
    res = call(server, "POST", "model-versions/create", {
        "name": name, "source": mv3.source, "run_id": mv3.run_id, "tags": [
            {"key": OVERRIDE_TAG, "value": "incident 7"},
            {"key": "promotion_override_by", "value": "carol"},
            {"key": "promotion_override_against", "value": champ_ref},
            {"key": "approved_by", "value": "alice"}]},
        auth=bob)
    _refused(res, "may not be created with tag")
    refusals.append(("bob", "protected_tag"))
    assert aliases(client, name) == {CHAMPION: v1}
    assert {str(mv.version) for mv in client.search_model_versions(f"name = '{name}'")} == {v1, v2, v3}

    audit = client.search_runs([client.get_experiment_by_name(AUDIT_EXPERIMENT).experiment_id],
                               f"tags.model_name = '{name}' and tags.decision = 'refused'")
    got = sorted((r.data.tags["actor"], r.data.tags["rule"]) for r in audit)
    for user, rule in refusals:
        assert (user, rule) in got, (user, rule, got)
    assert len(got) == len(refusals), got

    # the same promotion by someone other than the approver passes (four eyes)
    _ok(set_alias(server, name, CHAMPION, v2, auth=bob))
    tags = client.get_model_version(name, v2).tags
    assert (tags["promotion_rule"], tags["promoted_by"]) == ("gate_and_canary", "bob")
