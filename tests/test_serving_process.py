"""Real processes: two promotions racing, `churn serve` restarted (SIGTERM) and killed
(SIGKILL) with its prediction log, and the PostgreSQL advisory lock."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import threading
import time

import httpx
import mlflow
import pytest
from mlflow.tracking import MlflowClient
from serving_support import ServeProcess, cli_env, log_rows, two_versions, wait_ready

from mlflow_churn.config import load_config
from mlflow_churn.features.online import open_store
from mlflow_churn.registry.lock import registry_lock
from mlflow_churn.serving.prediction_log import PredictionLog

_PROMOTER = textwrap.dedent("""
    import json, sys, time
    from mlflow_churn.config import load_config
    from mlflow_churn.serving.transitions import promote
    cfg = load_config()
    version, who = sys.argv[1], sys.argv[2]
    print("ready", flush=True)  # imported: a barrier, not a head start, lines the two up
    sys.stdin.readline()
    began = time.time()
    res = promote(cfg, f"race {who}", version=version, force=True)
    print(json.dumps({"noop": res.noop, "message": res.message, "run_id": res.run_id,
                      "began": began, "ended": time.time()}), flush=True)
""")


def _line(proc: subprocess.Popen, timeout: float) -> str:
    """The next stdout line of ``proc`` within ``timeout`` seconds (else fail with its stderr)."""
    import selectors

    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            proc.kill()
            raise AssertionError(f"no line within {timeout} s: {proc.communicate()[1][-3000:]}")
    return proc.stdout.readline()


@pytest.mark.slow
def test_two_processes_promoting_at_once_end_with_one_champion(config, register_version) -> None:
    champ, canary = two_versions(config, register_version)
    procs = [subprocess.Popen([sys.executable, "-c", _PROMOTER, canary, who], env=cli_env(config),
                              cwd=config.workspace, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for who in ("a", "b")]
    for p in procs:  # both interpreters have imported everything ...
        assert _line(p, 180).strip() == "ready"
    for p in procs:  # ... then both are released together
        p.stdin.write("go\n")
        p.stdin.flush()
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    # the calls overlapped in time: each began before the other ended, so the lock decided
    a, b = outs
    assert a["began"] < b["ended"] and b["began"] < a["ended"], outs
    assert sorted(o["noop"] for o in outs) == [False, True]
    (noop,) = [o for o in outs if o["noop"]]
    assert f"already promoted: version {canary}" in noop["message"]
    client = MlflowClient(config.mlflow_tracking_uri)
    aliases = {a: str(v) for a, v in client.get_registered_model(config.training.model_name).aliases.items()}
    assert aliases == {"champion": canary, "previous-champion": champ}
    mlflow.set_tracking_uri(config.mlflow_tracking_uri)
    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.kind = 'canary-promote'",
                              output_format="list")
    assert sorted(r.data.tags["decision"] for r in runs) == ["noop", "promoted"]
    (acted,) = [r for r in runs if r.data.tags["decision"] == "promoted"]
    assert acted.data.params["champion_before"] == champ and acted.data.params["canary_before"] == canary
    tags = client.get_model_version(config.training.model_name, canary).tags
    assert tags["promote_run_id"] == acted.info.run_id  # the audit trail names the run that acted


def _score_all(url: str, ids: list[int]) -> int:
    """Score ``ids`` 200 at a time; the number of predictions answered (all of them)."""
    answered = 0
    with httpx.Client(base_url=url, timeout=30) as client:
        wait_ready(client, timeout=120)
        for start in range(0, len(ids), 200):
            res = client.post("/predict", json={"customer_ids": ids[start:start + 200]})
            assert res.status_code == 200, res.text
            answered += len(res.json()["predictions"])
    return answered


@pytest.mark.slow
def test_prediction_log_survives_a_restart_and_a_kill_9(config, register_version) -> None:
    two_versions(config, register_version)
    store = open_store(config)
    ids = store.customer_ids()[:600]
    store.close()
    # async writer: rows are batched in the background; SIGTERM (graceful) commits them all
    with ServeProcess(config, CHURN_SERVING__PREDICTION_LOG_MODE="async") as srv:
        answered = _score_all(srv.url, ids)
        code, err = srv.stop()
    # uvicorn re-raises the captured SIGTERM after its graceful shutdown
    assert code in (0, -signal.SIGTERM) and "Traceback" not in err, err[-2000:]
    assert log_rows(config) == answered == len(ids)
    # sync writer (the default): every answered row was committed before its response, so a
    # SIGKILL right after the last answer, with no shutdown code running, loses none of them
    with ServeProcess(config) as srv:
        answered += _score_all(srv.url, ids)
        assert srv.kill() == -signal.SIGKILL
    log = PredictionLog(config.prediction_log_url)
    frame = log.read()
    log.close()
    assert len(frame) == answered == 2 * len(ids) and frame["request_id"].nunique() == 6
    assert (frame.groupby("customer_id")["route"].nunique() == 1).all()  # sticky across restarts
    assert frame.groupby("customer_id")["score"].nunique().max() == 1


@pytest.mark.postgres
def test_postgres_advisory_lock_serialises_holders(workspace, postgres_url) -> None:
    cfg = load_config(workspace=workspace, environ={}, overrides={"tracking_uri": postgres_url})
    events: list[str] = []
    held = threading.Event()

    def first() -> None:
        with registry_lock(cfg) as how:
            assert how.startswith("pg_advisory_lock")
            events.append("a-in")
            held.set()
            time.sleep(0.5)
            events.append("a-out")

    t = threading.Thread(target=first)
    t.start()
    held.wait(30)
    with registry_lock(cfg):  # another session: must wait for the first holder
        events.append("b-in")
    t.join()
    assert events == ["a-in", "a-out", "b-in"]


@pytest.mark.slow  # among the slowest of make test-fast (a churn serve process and a trained pair)
def test_canary_status_reports_the_running_services_fraction(config) -> None:
    """`churn canary status` shows the fraction the running `churn serve` routes with (0.3 from
    its own environment, not the config default 0.1); with no service, the config's, said so."""
    from serving_support import run_cli

    assert config.serving.canary_fraction == 0.1
    with ServeProcess(config, CHURN_SERVING__CANARY_FRACTION="0.3") as srv:
        res = run_cli(config, ["canary", "status", "--json", "--service-url", srv.url])
        assert res.returncode == 0, res.stderr[-2000:]
        data = json.loads(res.stdout)
        assert (data["canary_fraction"], data["canary_fraction_source"]) == (0.3, "service"), data
        assert data["service_url"] == srv.url and "note" not in data
        # default address: 127.0.0.1 and serving.port
        res = run_cli(config, ["canary", "status"], CHURN_SERVING__PORT=str(srv.port))
        assert res.returncode == 0, res.stderr[-2000:]
        assert f"canary fraction 0.3 (from the scoring service at {srv.url})" in res.stdout, res.stdout
    res = run_cli(config, ["canary", "status", "--json", "--service-url", srv.url])
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(res.stdout)
    assert (data["canary_fraction"], data["canary_fraction_source"]) == (0.1, "config"), data
    assert f"no scoring service answered at {srv.url}" in data["note"]
    res = run_cli(config, ["canary", "status", "--service-url", srv.url])
    assert "canary fraction 0.1 (from the config)" in res.stdout and "note: no scoring service" in res.stdout


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_group_commit_under_concurrent_load_survives_a_kill_9(config, register_version, backend,
                                                               request) -> None:
    """Six clients send one-customer requests at once (so their rows share group commits);
    SIGKILL lands while requests are in flight: every request that got its answer is in the
    log, whatever group it was committed in."""
    two_versions(config, register_version)
    store = open_store(config)
    ids = store.customer_ids()[:300]
    store.close()
    extra = {}
    if backend == "postgres":
        extra["CHURN_SERVING__PREDICTION_LOG"] = request.getfixturevalue("postgres_url")
    answered: list[str] = []
    stop = threading.Event()
    with ServeProcess(config, **extra) as srv:
        with httpx.Client(base_url=srv.url, timeout=30) as client:
            wait_ready(client, timeout=120)

        def work(k: int) -> None:
            with httpx.Client(base_url=srv.url, timeout=30) as client:
                i = k
                while not stop.is_set():
                    try:
                        res = client.post("/predict", json={"customer_ids": [ids[i % len(ids)]]})
                    except httpx.TransportError:  # the server is gone: no answer, nothing promised
                        return
                    if res.status_code == 200:
                        answered.append(res.json()["request_id"])
                    i += 6

        threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 120
        while len(answered) < 400 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.kill() == -signal.SIGKILL  # mid-load: requests in flight, groups open
        stop.set()
        for t in threads:
            t.join(60)
    assert len(answered) >= 400
    log = PredictionLog(extra.get("CHURN_SERVING__PREDICTION_LOG") or config.prediction_log_url)
    logged = set(log.read()["request_id"])
    log.close()
    missing = set(answered) - logged
    assert not missing, f"{len(missing)} answered requests not in the log"
