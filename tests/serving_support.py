"""Helpers of the serving tests: a real uvicorn server on a free port, workspaces with two
registered versions and a materialized online store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from ports import ServerThread, free_port, start_on_free_port

from mlflow_churn.config import ChurnConfig, load_config

#: business time of the online batch the tests serve (after the test models' window_end
#: 2026-03-20, labels mature 30 days later, before the data ends 2026-05-01)
BATCH_AS_OF = datetime(2026, 3, 25, tzinfo=UTC)
LABELS_AS_OF = datetime(2026, 4, 30, tzinfo=UTC)
CHURN = [sys.executable, "-m", "mlflow_churn.cli"]


__all__ = ["ServerThread", "free_port"]  # from ports: the one way the tests get a port


def wait_ready(client: httpx.Client, timeout: float = 60.0, expect: int = 200) -> httpx.Response:
    """Poll GET /ready until it answers ``expect`` (the models load in the background)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            res = client.get("/ready")
            if res.status_code == expect:
                return res
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"/ready did not answer {expect} within {timeout} s")
        time.sleep(0.1)


def serving_config(config: ChurnConfig, **serving: Any) -> ChurnConfig:
    """``config`` with serving overrides (e.g. canary_fraction=0.3, admin_token='t')."""
    return load_config(workspace=config.workspace, environ={},
                       overrides={f"serving.{k}": v for k, v in serving.items()})


def signed_gate(config: ChurnConfig, version: Any) -> str:
    """Sign a passed gate decision on ``version`` (the project's own signing code over the
    version's files, as the gate does), moving no alias: `churn serve` loads only versions
    with one (registry.require_signed_models). Returns the version as text."""
    from mlflow.tracking import MlflowClient

    from mlflow_churn.registry.signing import record_signed, version_files_digest

    version = str(getattr(version, "version", version))
    client = MlflowClient(config.mlflow_tracking_uri, config.mlflow_tracking_uri)
    name = config.training.model_name
    record_signed(client, config, name, version, "gate", "passed", champion=None, run_id="",
                  files_sha256=version_files_digest(client, name, version))
    return version


def two_versions(config: ChurnConfig, register_version: Any, canary_quality: str = "good") -> tuple[str, str]:
    """Register champion (good) and canary versions, both through the gate's own recording
    (signed gate decisions over their files: `churn serve` loads only such versions); the
    champion is a first champion (signed gate, no promotion). Materialize the online store at
    BATCH_AS_OF."""
    from guard_support import gate
    from mlflow.tracking import MlflowClient

    from mlflow_churn.features.materialize import materialize
    from mlflow_churn.registry.aliases import move_alias

    champ = register_version(config, quality="good", alias=None, seed=0)
    client = MlflowClient(config.mlflow_tracking_uri, config.mlflow_tracking_uri)
    gate(client, config, champ.version, passed=True)
    move_alias(client, config.training.model_name, "champion", champ.version, reason="first champion")
    canary = register_version(config, quality=canary_quality, alias=None, seed=1)
    gate(client, config, canary.version, passed=True)  # alias canary
    materialize(config, BATCH_AS_OF)
    return str(champ.version), str(canary.version)


def cli_env(config: ChurnConfig, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHURN_")
           and k not in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID")}
    env.update({"CHURN_WORKSPACE": str(config.workspace), "COLUMNS": "200", **extra})
    return env


def run_cli(config: ChurnConfig, args: list[str], timeout: float = 180,
            **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(CHURN + args, env=cli_env(config, **extra), capture_output=True, text=True,
                          timeout=timeout, cwd=config.workspace)


class ServeProcess:
    """`churn serve` in a subprocess on a free port (started again on another one if the port
    was taken meanwhile); ``stop()`` = SIGTERM (graceful), ``kill()``. Its stderr goes to a file
    in the workspace, so a chatty server never blocks on a full pipe."""

    def __init__(self, config: ChurnConfig, **extra: str) -> None:
        self.env = cli_env(config, **extra)
        self.cwd = config.workspace
        self.proc: subprocess.Popen | None = None
        self.port, self.url, self.log = 0, "", Path()

    def _start(self, port: int) -> tuple[subprocess.Popen, Path]:
        log = Path(self.cwd) / f"serve-{port}.stderr"
        with log.open("w") as err:
            proc = subprocess.Popen(CHURN + ["serve", "--host", "127.0.0.1", "--port", str(port)],
                                    env=self.env, cwd=self.cwd, stdout=err, stderr=subprocess.STDOUT,
                                    text=True)
        return proc, log

    def __enter__(self) -> ServeProcess:
        self.port, self.proc, self.log = start_on_free_port(self._start)
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def stop(self) -> tuple[int, str]:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return self.proc.returncode, self.log.read_text()

    def kill(self) -> int:
        """SIGKILL: no shutdown code runs (what an OOM kill or a crashed host does)."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=60)
        return self.proc.returncode

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop()


def log_rows(config: ChurnConfig) -> int:
    from mlflow_churn.serving.prediction_log import PredictionLog

    path = Path(config.prediction_log_url)
    if not path.exists():
        return 0
    log = PredictionLog(path)
    try:
        return log.count()
    finally:
        log.close()


@contextmanager
def churn_app(config: ChurnConfig, args: list[str], log: Path, any_answer: bool = False,
              **env: str) -> Iterator[tuple[int, subprocess.Popen]]:
    """``churn <args> --port P`` (e.g. ``["hooks", "serve"]``) for ``config``'s workspace in a
    subprocess, its output in ``log``; yields ``(port, process)`` once ``GET /health`` answers
    200 (``any_answer``: any HTTP answer, e.g. the feature API's 503 without a batch);
    terminated (killed after 20 s) on the way out."""
    port = free_port()
    with log.open("w") as out:
        proc = subprocess.Popen(CHURN + args + ["--port", str(port)], env=cli_env(config, **env), stdout=out,
                                stderr=subprocess.STDOUT, cwd=config.workspace)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200 or any_answer:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.2)
        yield port, proc
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def rss_kb(pid: int) -> int:
    """Resident set size (kB) of process ``pid``, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")
