"""Alerts that reach a person (issue 23, item 4), with real parts only.

- A real HTTP receiver (``http.server`` on a loopback socket) that fails the first two attempts
  of every message: every condition is delivered, none twice, and each cleared one gets its
  ``resolved`` message; the receiver down and started again on its port: still delivered; a
  process that exits with undelivered rows: the next process (``churn alerts flush``) delivers
  them; a process that raised an alert delivers it before it exits.
- ``promtool`` checks ``deploy/prometheus/rules.yml`` and runs its unit tests; ``amtool``
  checks ``deploy/alertmanager/alertmanager.yml``.
- A real Alertmanager takes the project's alert on ``/api/v2/alerts`` and passes it, then its
  resolve, to a test receiver; our webhook outlet's payload has the keys Alertmanager's has.
- A real Prometheus scrapes a real feature API (uvicorn) whose batch is past its SLA, evaluates
  the rules and ``FeatureFreshnessBreach`` fires.

Prometheus and Alertmanager come from Debian's packages (``.ci/run`` installs them): without
them these tests skip, except under ``CI=true``, where that is a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from ports import ServerThread, start_on_free_port
from wait_support import wait_until

from mlflow_churn.alerts import (
    Outbox,
    Sender,
    fire,
    flush,
    outbox_path,
    outlets,
    resolve,
    stop_sender,
    timing,
)
from mlflow_churn.config import ChurnConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
IN_CI = os.environ.get("CI", "").lower() == "true"


# --------------------------------------------------------------------------- helpers
def _binary(*names: str) -> str:
    """The first of ``names`` on PATH; skip (fail under CI=true) when none is installed."""
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    msg = (f"{' / '.join(names)} is not installed (Debian packages prometheus and "
           "prometheus-alertmanager; .ci/run installs them)")
    if IN_CI:
        pytest.fail(f"{msg}; CI=true: a missing binary is a failure, not a skip")
    pytest.skip(msg)


def _wait(what: str, check: Callable[[], Any], timeout: float = 90.0) -> Any:
    return wait_until(check, timeout, what)


class Receiver:
    """A real HTTP receiver on 127.0.0.1 recording every POST. The first ``fail_first`` attempts
    of each message (its path and ``Idempotency-Key``, else its body) answer 500, later ones 200.
    :meth:`stop` closes the port; :meth:`start` opens it again (the same port)."""

    def __init__(self, fail_first: int = 0, port: int = 0, delay: float = 0.0) -> None:
        self.fail_first, self.port, self.delay = fail_first, port, delay
        self.tries: Counter[tuple[str, str]] = Counter()  # (path, message id) -> attempts
        self.accepted: list[tuple[str, str, Any]] = []  # (path, message id, body), in arrival order
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None
        self.start()

    def start(self) -> None:
        rx = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                time.sleep(rx.delay)
                ident = self.headers.get("Idempotency-Key") or json.dumps(body)
                with rx.lock:
                    rx.tries[(self.path, ident)] += 1
                    ok = rx.tries[(self.path, ident)] > rx.fail_first
                    if ok:
                        rx.accepted.append((self.path, ident, body))
                self.send_response(200 if ok else 500)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = int(self.server.server_address[1])
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def messages(self, path_prefix: str) -> list[tuple[str, Any]]:
        with self.lock:
            return [(ident, body) for path, ident, body in self.accepted if path.startswith(path_prefix)]


def _cfg(workspace: Path, **alerts: Any) -> ChurnConfig:
    """Config of ``workspace`` with short back-offs (``alerts.<key>`` overrides)."""
    over = {"alerts.retry_initial_seconds": 0.2, "alerts.retry_max_seconds": 1.0, "alerts.poll_seconds": 0.5,
            "alerts.flush_wait_seconds": 5.0}
    over.update({f"alerts.{k}": v for k, v in alerts.items()})
    return load_config(workspace=workspace, environ={}, overrides=over)


def _labels(i: int) -> dict[str, str]:
    return {"alertname": "ChurnMonitorDecision", "severity": "warning", "model": f"model-{i}",
            "decision": "retrain"}


# --------------------------------------------------------------------------- delivery
def test_every_condition_delivered_through_two_failures_once_and_resolved(workspace: Path) -> None:
    """Target of issue 23: 100% of conditions delivered to a receiver that fails the first two
    attempts of each, no duplicates, a resolved message for each cleared condition; every
    attempt recorded."""
    rx = Receiver(fail_first=2)
    cfg = _cfg(workspace, webhook_url=rx.url("/hook"), alertmanager_url=rx.url("/am"))
    try:
        keys = [fire(cfg, None, _labels(i), {"summary": f"window 1 of model-{i}"}).key for i in range(6)]
        assert len(set(keys)) == 6
        for i in range(6):  # the same conditions again: deduplicated, nothing new to send
            again = fire(cfg, None, _labels(i), {"summary": f"window 2 of model-{i}"})
            assert (again.key, again.change) == (keys[i], "same")
        cleared_early, cleared_late = keys[:2], keys[2:4]
        for key in cleared_early:  # cleared before their firing message got through
            assert resolve(cfg, key) == 1
        assert flush(cfg, 90) == 0
        for key in cleared_late:  # cleared after it
            assert resolve(cfg, key) == 1
        assert resolve(cfg, cleared_late[0]) is None  # not firing any more: nothing to do
        assert flush(cfg, 90) == 0

        cleared = cleared_early + cleared_late
        hook = rx.messages("/hook")
        hook_ids = Counter(ident for ident, _ in hook)
        assert set(hook_ids.values()) == {1}, hook_ids  # no duplicates
        assert set(hook_ids) == {f"{k}/1/firing" for k in keys} | {f"{k}/1/resolved" for k in cleared}
        for ident, body in hook:
            key, _, status = ident.split("/")
            (alert,) = body["alerts"]
            assert body["version"] == "4" and body["status"] == status == alert["status"]
            assert alert["labels"] == _labels(keys.index(key)) and alert["fingerprint"] == key
            assert alert["annotations"]["summary"].startswith("window ")
            assert (alert["endsAt"] == "0001-01-01T00:00:00Z") == (status == "firing")
        for key in cleared:  # resolved after firing
            assert hook.index(next(m for m in hook if m[0] == f"{key}/1/firing")) < hook.index(
                next(m for m in hook if m[0] == f"{key}/1/resolved"))

        am = rx.messages("/am/api/v2/alerts")
        am_ids = Counter(ident for ident, _ in am)
        assert set(am_ids.values()) == {1}, am_ids
        assert {f"{k}/1/resolved" for k in cleared} <= set(am_ids)
        assert {f"{k}/1/firing" for k in keys[2:]} <= set(am_ids)
        now = datetime.now(UTC)
        for ident, body in am:
            (alert,) = body  # Alertmanager API v2: a list of alerts
            assert alert["labels"] == _labels(keys.index(ident.split("/")[0]))
            # firing: held for alerts.hold_hours; resolved: ended when it cleared
            assert (datetime.fromisoformat(alert["endsAt"]) > now) == ident.endswith("/firing")
        # two failures, then accepted; Alertmanager is told a condition cleared before it heard of
        # it with the resolved post alone: the firing attempts it failed are not repeated
        for (path, ident), n in rx.tries.items():
            accepted = ident in (hook_ids if path == "/hook" else am_ids)
            abandoned = path != "/hook" and ident.endswith("/firing") and n <= 2
            assert n == 3 if accepted else abandoned, (path, ident, n)

        box = Outbox(outbox_path(cfg))
        attempts = box.attempts()
        assert len(attempts) == sum(rx.tries.values())  # every attempt recorded
        assert sum(not a.ok for a in attempts) == sum(min(n, 2) for n in rx.tries.values())
        assert all(a.http_status == 500 and "HTTP 500" in a.error for a in attempts if not a.ok)
        states = {c.key: c for c in box.conditions()}
        assert {k for k, c in states.items() if c.status == "resolved"} == set(cleared)
        assert all(c.delivered and c.fired == 2 for c in states.values())
    finally:
        stop_sender(cfg, wait=0)
        rx.stop()


def test_new_labels_start_a_new_episode_and_events_clear_themselves(workspace: Path) -> None:
    """A condition fired again with other labels: the old episode is resolved before the new one
    fires, in that order; an event fired with a ttl resolves by itself."""
    rx = Receiver(fail_first=1)
    cfg = _cfg(workspace, webhook_url=rx.url("/hook"))
    try:
        hold = {"alertname": "ChurnCanaryVerdict", "model": "churn-model", "verdict": "hold"}
        first = fire(cfg, "canary:churn-model", hold, {"summary": "too few requests"})
        second = fire(cfg, "canary:churn-model", {**hold, "verdict": "rollback"}, {"summary": "AUC drop"})
        assert (first.episode, second.episode, second.change) == (1, 2, "relabelled")
        event = fire(cfg, None, {"alertname": "PromotionRefused", "model": "churn-model", "version": "7"},
                     {"summary": "no gate decision"}, ttl_seconds=1.0)
        _wait("the event to clear itself", lambda: Outbox(outbox_path(cfg)).conditions(
            now=time.time(), key=event.key)[0].status == "resolved")
        assert flush(cfg, 90) == 0
        order = [ident for ident, _ in rx.messages("/hook")]
        assert sorted(order) == sorted(["canary:churn-model/1/firing", "canary:churn-model/1/resolved",
                                        "canary:churn-model/2/firing", f"{event.key}/1/firing",
                                        f"{event.key}/1/resolved"])
        assert order.index("canary:churn-model/1/resolved") < order.index("canary:churn-model/2/firing")
        verdicts = [b["alerts"][0]["labels"]["verdict"] for i, b in rx.messages("/hook")
                    if i.startswith("canary")]
        assert sorted(verdicts) == ["hold", "hold", "rollback"]
    finally:
        stop_sender(cfg, wait=0)
        rx.stop()


def test_deprecated_hooks_alert_url_is_the_alertmanager_outlet(workspace: Path) -> None:
    """hooks.alert_url keeps getting what it always got (Alertmanager's API v2 list, at the URL as
    given), now through the outbox: retried, and resolved."""
    rx = Receiver(fail_first=1)
    cfg = load_config(workspace=workspace, environ={}, overrides={
        "hooks.alert_url": rx.url("/api/v2/alerts"), "alerts.retry_initial_seconds": 0.2})
    try:
        assert outlets(cfg) == {"alertmanager": rx.url("/api/v2/alerts")}
        labels = {"alertname": "UnguardedPromotion", "severity": "critical", "model": "m",
                  "alias": "champion", "version": "3"}
        key = fire(cfg, None, labels, {"audit_run_id": "abc"}).key
        assert flush(cfg, 60) == 0
        resolve(cfg, key)
        assert flush(cfg, 60) == 0
        bodies = [body for _, body in rx.messages("/api/v2/alerts")]
        assert [b[0]["labels"] for b in bodies] == [labels, labels]
        assert all(b[0]["annotations"] == {"audit_run_id": "abc"} for b in bodies)
        ends = [datetime.fromisoformat(b[0]["endsAt"]) for b in bodies]
        assert ends[0] > datetime.now(UTC) > ends[1]  # held while firing; ended when resolved
    finally:
        stop_sender(cfg, wait=0)
        rx.stop()


def test_receiver_down_then_restarted_still_delivered(workspace: Path) -> None:
    rx = Receiver()
    port = rx.port
    rx.stop()  # down: connections refused
    cfg = _cfg(workspace, webhook_url=f"http://127.0.0.1:{port}/hook")
    try:
        keys = [fire(cfg, None, _labels(i), {"summary": "s"}).key for i in range(3)]
        resolve(cfg, keys[0])
        box = Outbox(outbox_path(cfg))

        def failed_twice() -> bool:
            failed = Counter(a.key for a in box.attempts() if not a.ok)
            return all(failed[k] >= 2 for k in keys)

        _wait("two refused attempts of each condition", failed_twice)
        refused = [a for a in box.attempts() if not a.ok]
        assert all(a.http_status is None and a.error for a in refused)
        assert flush(cfg, 0.5) > 0  # still owed while the receiver is down
        rx = Receiver(port=port)  # back on the same port
        assert flush(cfg, 90) == 0
        ids = Counter(ident for ident, _ in rx.messages("/hook"))
        assert ids == Counter({f"{k}/1/firing": 1 for k in keys} | {f"{keys[0]}/1/resolved": 1})
    finally:
        stop_sender(cfg, wait=0)
        rx.stop()


def test_senders_sharing_an_outbox_never_send_a_message_twice(workspace: Path) -> None:
    """Three senders on one outbox file (as three processes on one workspace), a slow receiver:
    every message delivered exactly once (steps are leased in the outbox)."""
    rx = Receiver(fail_first=1, delay=0.05)
    cfg = _cfg(workspace, webhook_url=rx.url("/hook"))
    box = Outbox(outbox_path(cfg))
    now = time.time()
    keys = [box.fire(None, _labels(i), {}, outlets(cfg), now).key for i in range(12)]
    for key in keys[:6]:
        box.resolve(key, now)
    senders = [Sender(Outbox(box.path), timing(cfg), poll_seconds=0.2).start() for _ in range(3)]
    try:
        for s in senders:
            assert s.drain(90, mine_only=False) == 0
        ids = Counter(ident for ident, _ in rx.messages("/hook"))
        assert ids == Counter({f"{k}/1/firing": 1 for k in keys} | {f"{k}/1/resolved": 1 for k in keys[:6]})
        assert set(rx.tries.values()) == {2}
    finally:
        for s in senders:
            s.stop()
        rx.stop()


def test_a_step_failing_past_give_up_is_given_up_and_recorded(workspace: Path) -> None:
    rx = Receiver(fail_first=10**6)
    cfg = _cfg(workspace, webhook_url=rx.url("/hook"), give_up_hours=0.0002)  # 0.72 s
    try:
        key = fire(cfg, None, _labels(0)).key
        assert flush(cfg, 90) == 0  # nothing owed any more: given up
        ((delivery,),) = [c.deliveries for c in Outbox(outbox_path(cfg)).conditions()]
        assert delivery.gave_up and delivery.told == "" and "HTTP 500" in delivery.last_error
        attempts = Outbox(outbox_path(cfg)).attempts(key)
        assert len(attempts) == rx.tries[("/hook", f"{key}/1/firing")] >= 2
        assert not rx.accepted
    finally:
        stop_sender(cfg, wait=0)
        rx.stop()


def _churn_env(**alerts: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHURN_", "MLFLOW_"))}
    env.update({"CHURN_ALERTS__RETRY_INITIAL_SECONDS": "0.2", "CHURN_ALERTS__RETRY_MAX_SECONDS": "1",
                "CHURN_ALERTS__POLL_SECONDS": "0.5", "CHURN_ALERTS__FLUSH_WAIT_SECONDS": "30"})
    env.update({f"CHURN_ALERTS__{k.upper()}": v for k, v in alerts.items()})
    return env


def _churn(workspace: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlflow_churn.cli", "--workspace", str(workspace), *args],
                          env=env, capture_output=True, text=True, timeout=180)


#: a producer process: fires one condition and exits (its sender flushes at exit)
PRODUCER = """
import sys
from mlflow_churn.alerts import fire
from mlflow_churn.config import load_config
cfg = load_config(workspace=sys.argv[1])
fire(cfg, "freshness:online", {"alertname": "FeatureFreshnessBreach", "store": "online"},
     {"summary": "stale"})
"""


def test_undelivered_rows_are_delivered_by_the_next_process(workspace: Path) -> None:
    """A process exits with its alert undelivered (receiver down): the row stays in the outbox
    and the next process delivers it; a process that raised an alert delivers it before it exits."""
    rx = Receiver(fail_first=2)
    port = rx.port
    rx.stop()
    env = _churn_env(webhook_url=f"http://127.0.0.1:{port}/hook")
    res = _churn(workspace, env, "alerts", "test", "--wait", "1")
    assert res.returncode == 1, res.stderr
    assert "not delivered within 1 s" in res.stdout and "churn alerts list" in res.stdout
    listed = json.loads(_churn(workspace, env, "alerts", "list", "--json").stdout)
    (cond,) = listed["conditions"]
    assert (cond["key"], cond["status"]) == ("churn-alerts-test", "firing")
    (delivery,) = cond["deliveries"]
    assert delivery["told"] is None and delivery["failures"] >= 1 and delivery["last_error"]
    assert cond["attempts"] and not any(a["ok"] for a in cond["attempts"])

    rx = Receiver(fail_first=2, port=port)
    try:
        res = _churn(workspace, env, "alerts", "flush", "--wait", "90")
        assert res.returncode == 0, res.stdout + res.stderr
        assert [i for i, _ in rx.messages("/hook")] == ["churn-alerts-test/1/firing"]
        res = _churn(workspace, env, "alerts", "resolve", "churn-alerts-test")
        assert res.returncode == 0 and "delivered" in res.stdout, res.stdout + res.stderr
        assert [i for i, _ in rx.messages("/hook")][1:] == ["churn-alerts-test/1/resolved"]

        producer = subprocess.run([sys.executable, "-c", PRODUCER, str(workspace)], env=env,
                                  capture_output=True, text=True, timeout=120)
        assert producer.returncode == 0, producer.stderr
        # delivered by the producer's flush at exit, through two failures: before it exited
        assert [i for i, _ in rx.messages("/hook")][2:] == ["freshness:online/1/firing"]

        res = _churn(workspace, env, "alerts", "test", "--wait", "90", "--json")
        assert res.returncode == 0, res.stdout + res.stderr
        assert json.loads(res.stdout)["delivered"] is True
        assert [i for i, _ in rx.messages("/hook")][3:] == ["churn-alerts-test/2/firing",
                                                             "churn-alerts-test/2/resolved"]
        table = _churn(workspace, env, "alerts", "list", "--key", "churn-alerts-test")
        assert table.returncode == 0 and "webhook: resolved delivered (6 attempt(s))" in table.stdout
        assert table.stdout.count("HTTP 500") == 8  # each of the 4 messages failed twice: listed
    finally:
        rx.stop()


# --------------------------------------------------------------------------- the real tools
def test_promtool_checks_the_rules_and_their_unit_tests_and_amtool_the_config() -> None:
    promtool = _binary("promtool")
    for args in (["check", "rules", "rules.yml"], ["test", "rules", "rules.test.yml"],
                 ["check", "config", "prometheus.yml"]):
        res = subprocess.run([promtool, *args], cwd=DEPLOY / "prometheus", capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr
        assert "SUCCESS" in res.stdout + res.stderr
    amtool = _binary("amtool")
    res = subprocess.run([amtool, "check-config", str(DEPLOY / "alertmanager" / "alertmanager.yml")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "SUCCESS" in res.stdout, res.stdout + res.stderr


def _start(argv_of: Callable[[int], list[str]], log: Path, ready_path: str) -> tuple[int, subprocess.Popen]:
    def start(port: int) -> tuple[subprocess.Popen, Path]:
        out = log.open("w")
        return subprocess.Popen(argv_of(port), stdout=out, stderr=subprocess.STDOUT), log

    port, proc, _ = start_on_free_port(start)

    def ready() -> bool:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{ready_path}", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    _wait(f"{argv_of(port)[0]} to be ready", ready)
    return port, proc


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=20)


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


def test_real_alertmanager_routes_the_alert_and_its_resolve(workspace: Path, tmp_path: Path) -> None:
    binary = _binary("prometheus-alertmanager", "alertmanager")
    rx = Receiver()
    config = tmp_path / "alertmanager.yml"
    config.write_text(yaml.safe_dump({
        "route": {"receiver": "test", "group_by": ["alertname", "model"], "group_wait": "1s",
                  "group_interval": "1s", "repeat_interval": "1h"},
        "receivers": [{"name": "test", "webhook_configs": [{"url": rx.url("/from-alertmanager"),
                                                            "send_resolved": True}]}],
    }))
    port, proc = _start(lambda p: [binary, f"--config.file={config}", f"--storage.path={tmp_path / 'am'}",
                                   f"--web.listen-address=127.0.0.1:{p}", "--cluster.listen-address="],
                        tmp_path / "alertmanager.log", "/-/ready")
    cfg = _cfg(workspace, alertmanager_url=f"http://127.0.0.1:{port}", webhook_url=rx.url("/direct"))
    try:
        labels = {"alertname": "ChurnMonitorDecision", "severity": "warning", "model": "churn-model",
                  "decision": "retrain"}
        fired = fire(cfg, "monitor:churn-model", labels, {"summary": "retrain: AUC dropped 0.06"})
        assert flush(cfg, 60) == 0

        def notified(status: str) -> Any:
            return [b for _, b in rx.messages("/from-alertmanager") if b["status"] == status]

        (firing,) = _wait("Alertmanager's firing notification", lambda: notified("firing"))
        (alert,) = firing["alerts"]
        assert alert["labels"] == labels and alert["annotations"]["summary"] == "retrain: AUC dropped 0.06"
        active = _get_json(f"http://127.0.0.1:{port}/api/v2/alerts")
        assert [a["labels"] for a in active] == [labels] and active[0]["status"]["state"] == "active"

        # our webhook outlet speaks Alertmanager's webhook payload: the same keys
        ((_, ours),) = rx.messages("/direct")
        assert set(ours) == set(firing) and set(ours["alerts"][0]) == set(alert)
        assert ours["version"] == firing["version"] == "4" and ours["status"] == "firing"

        assert resolve(cfg, fired.key) == 1
        assert flush(cfg, 60) == 0
        (resolved,) = _wait("Alertmanager's resolved notification", lambda: notified("resolved"))
        assert resolved["alerts"][0]["labels"] == labels and resolved["alerts"][0]["status"] == "resolved"
        assert [b["status"] for _, b in rx.messages("/direct")] == ["firing", "resolved"]
    finally:
        stop_sender(cfg, wait=0)
        _stop(proc)
        rx.stop()


def _stale_store(cfg: ChurnConfig):
    """A SQLite online store whose serving batch's watermark is years old."""
    from mlflow_churn.features.online import BatchInfo, new_batch_id, open_store

    old = datetime(2020, 1, 1, tzinfo=UTC)
    store = open_store(cfg, must_exist=False)
    frame = pd.DataFrame({"customer_id": [1, 2], "event_time": pd.to_datetime([old, old], utc=True),
                          "plan": ["basic", "pro"]})
    store.write_batch(frame, BatchInfo(new_batch_id(old), old, old, 2, ("plan",), old))
    return store


def test_real_prometheus_scrapes_the_feature_api_and_fires_the_freshness_rule(workspace: Path,
                                                                              tmp_path: Path) -> None:
    """The rules of deploy/prometheus/rules.yml (their `for:` shortened to 0s) loaded in a real
    Prometheus scraping a real feature API every second: its batch is past the SLA, so
    FeatureFreshnessBreach fires; the rules about an empty store or a target down do not."""
    from mlflow_churn.features.api import create_app

    binary = _binary("prometheus")
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule["for"] = "0s"
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
    cfg = load_config(workspace=workspace, environ={})
    store = _stale_store(cfg)
    with ServerThread(create_app(cfg, store=store)) as api:
        metrics = urllib.request.urlopen(f"{api.url}/metrics", timeout=10).read().decode()
        assert f"feature_freshness_sla_seconds {cfg.features.freshness_sla_hours * 3600.0}" in metrics
        config = tmp_path / "prometheus.yml"
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(tmp_path / "rules.yml")],
            "scrape_configs": [{"job_name": "churn-features",
                                "static_configs": [{"targets": [f"127.0.0.1:{api.port}"]}]}],
        }))
        port, proc = _start(lambda p: [binary, f"--config.file={config}",
                                       f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                       f"--web.listen-address=127.0.0.1:{p}"],
                            tmp_path / "prometheus.log", "/-/ready")
        try:
            def firing() -> list[dict]:
                alerts = _get_json(f"http://127.0.0.1:{port}/api/v1/alerts")["data"]["alerts"]
                return [a for a in alerts if a["state"] == "firing"]

            got = _wait("FeatureFreshnessBreach firing", lambda: [
                a for a in firing() if a["labels"]["alertname"] == "FeatureFreshnessBreach"])
            assert got[0]["labels"]["job"] == "churn-features"
            assert float(got[0]["value"]) > cfg.features.freshness_sla_hours * 3600
            assert "past its SLA" in got[0]["annotations"]["summary"]
            names = {a["labels"]["alertname"] for a in firing()}
            assert not names & {"FeatureStoreEmpty", "ChurnTargetDown", "FeatureStoreCircuitOpen"}, names
        finally:
            _stop(proc)
    store.close()
