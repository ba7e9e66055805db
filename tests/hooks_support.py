"""`churn hooks serve` as a real subprocess on a free port, and its webhook on a real `mlflow server`."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import httpx

from mlflow_churn.config import ChurnConfig
from mlflow_churn.tracking_server import free_port, stop_process, wait_http

SECRET = "s3cret-for-tests"


class Receiver:
    """``churn hooks serve`` for ``config``'s workspace and model, talking to ``tracking_url``;
    ``extra`` env (e.g. ``CHURN_REGISTRY__REVERT_UNGUARDED=true``). Context manager."""

    def __init__(self, config: ChurnConfig, tracking_url: str, log_path: Path, **extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CHURN_", "MLFLOW_"))}
        env.update(
            {
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
                "PYTHONUNBUFFERED": "1",
                "MLFLOW_TRACKING_URI": tracking_url,
                "CHURN_HOOKS__SECRET": SECRET,
                "CHURN_TRAINING__MODEL_NAME": config.training.model_name,
                **extra,
            }
        )
        self.env = env
        self.workspace = config.workspace
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180) -> Receiver:
        with self.log_path.open("a") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "mlflow_churn.cli",
                    "--workspace",
                    str(self.workspace),
                    "hooks",
                    "serve",
                    "--port",
                    str(self.port),
                ],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.workspace,
                start_new_session=True,
            )
        wait_http(f"{self.url}/health", self.proc, timeout, self.log_path)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=10).text

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def __enter__(self) -> Receiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def register_webhook(client, url: str, events: tuple[str, ...] | None = None) -> str:
    """Create a webhook (unique name) calling ``url``; returns its id (delete it after)."""
    from mlflow_churn.registry.events import EVENTS

    hook = client.create_webhook(
        name=f"test-{uuid.uuid4().hex[:8]}", url=url, events=list(events or EVENTS), secret=SECRET
    )
    return hook.webhook_id


