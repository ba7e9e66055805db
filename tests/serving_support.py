"""Helpers of the serving tests: a real uvicorn server on a free port, workspaces with two
registered versions and a materialized online store."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from mlflow_churn.config import ChurnConfig, load_config

#: business time of the online batch the tests serve (after the test models' window_end
#: 2026-03-20, labels mature 30 days later, before the data ends 2026-05-01)
BATCH_AS_OF = datetime(2026, 3, 25, tzinfo=UTC)
LABELS_AS_OF = datetime(2026, 4, 30, tzinfo=UTC)
CHURN = [sys.executable, "-m", "mlflow_churn.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerThread:
    """uvicorn serving ``app`` in a thread on 127.0.0.1:<free port> (lifespan included)."""

    def __init__(self, app: Any) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


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


def two_versions(config: ChurnConfig, register_version: Any, canary_quality: str = "good") -> tuple[str, str]:
    """Register champion (good) and canary versions; materialize the online store at BATCH_AS_OF."""
    from mlflow_churn.features.materialize import materialize

    champ = register_version(config, quality="good", alias="champion", seed=0)
    canary = register_version(config, quality=canary_quality, alias="canary", seed=1)
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
    """`churn serve` in a subprocess on a free port; ``stop()`` = SIGTERM (graceful), ``kill()``."""

    def __init__(self, config: ChurnConfig, **extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = CHURN + ["serve", "--host", "127.0.0.1", "--port", str(self.port)]
        self.env = cli_env(config, **extra)
        self.cwd = config.workspace
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> ServeProcess:
        self.proc = subprocess.Popen(self.args, env=self.env, cwd=self.cwd, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        return self

    def stop(self) -> tuple[int, str]:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return self.proc.returncode, err

    def kill(self) -> int:
        """SIGKILL: no shutdown code runs (what an OOM kill or a crashed host does)."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.communicate(timeout=60)
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
