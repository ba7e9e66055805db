"""Outages fail, never decide (issue 26 item 2): a loopback proxy answering 503 to the read
a command's decision depends on, put in front of a real `mlflow server` (PostgreSQL), during
`churn monitor`, `churn retrain`, the gate (`churn evaluate`) and `churn compress` as real
processes. Each must fail in one line, exit 3 naming the tracking server, create no run
(counted through the server directly, not the proxy) and leave the policy history (the
model's monitoring windows) and the aliases as they were.

The failing reads are the ones the old handlers took for "absent": an earlier window's
``window_stats.json`` (dropped from the history), the monitoring decision's ``decision.json``
(retrain read ``{}``), the training run of a version (the gate's baseline treated it as
deleted), the version itself (compress said "the model has no version").
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from proxy_support import ForwardingProxy

from mlflow_churn.config import load_config
from mlflow_churn.registry.aliases import CHAMPION, aliases_of, move_alias

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

CHURN = [sys.executable, "-m", "mlflow_churn.cli"]
TRAINED_AS_OF = datetime(2026, 4, 24, tzinfo=UTC)
FIRST_WINDOW = datetime(2026, 4, 27, tzinfo=UTC)
AS_OF = "2026-05-01T00:00:00+00:00"
#: small training settings (as tests/test_server_registry.py)
FAST = {"training.window_days": 21, "training.max_estimators": 40, "training.early_stopping_rounds": 10,
        "training.nthread": 1, "training.n_trials": 1}


class OutageProxy(ForwardingProxy):
    """Forwards to the server, except the requests ``failing(method, path)`` selects, which
    get 503 (counted in ``failed``)."""

    def __init__(self, target: str) -> None:
        self.failing: Callable[[str, str], bool] | None = None
        self.failed = 0
        super().__init__(target)

    def intercept(self, method: str, path: str, body: bytes) -> int | None:
        if self.failing is not None and self.failing(method, path):
            self.failed += 1
            return 503
        return None


def _env(url: str, model: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHURN_", "MLFLOW_"))}
    env.update({"MLFLOW_TRACKING_URI": url, "CHURN_TRAINING__MODEL_NAME": model,
                "CHURN_MLFLOW__HTTP_MAX_RETRIES": "0", "CHURN_MLFLOW__HTTP_BACKOFF_FACTOR": "0",
                "CHURN_TRAINING__N_TRIALS": "1", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"})
    return env


def _runs(client: MlflowClient) -> dict[str, str]:
    """Every run on the server: id -> status."""
    exps = [e.experiment_id for e in client.search_experiments()]
    return {r.info.run_id: r.info.status for r in client.search_runs(exps, max_results=5000)}


def _history(client: MlflowClient, model: str) -> list[tuple[str, str, str]]:
    """The model's monitoring windows (the policy history): (as_of, run id, action)."""
    exps = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(exps, f"tags.`monitor.model_name` = '{model}'", max_results=5000)
    return sorted((r.data.tags.get("monitor.as_of", ""), r.info.run_id, r.data.tags.get("monitor.action", ""))
                  for r in runs)


#: command -> (its arguments, the requests the proxy fails while it runs)
CASES: dict[str, tuple[list[str], Callable[[str, str], bool]]] = {
    "monitor": (["monitor", "--as-of", AS_OF, "--no-report", "--no-progress"],
                lambda m, p: m == "GET" and p.endswith("/window_stats.json")),
    "retrain": (["retrain", "--as-of", AS_OF, "--no-progress"],
                lambda m, p: m == "GET" and p.endswith("/decision.json")),
    "gate": (["evaluate", "--as-of", AS_OF, "--no-progress"],
             lambda m, p: m == "GET" and p.endswith("/runs/get")),
    "compress": (["compress", "--version", "{champion}", "--as-of", AS_OF],
                 lambda m, p: m == "GET" and p.endswith("/model-versions/get")),
}


def test_a_5xx_tracking_server_fails_each_command_in_one_line_and_decides_nothing(
        mlflow_server, workspace: Path, register_version) -> None:
    from mlflow_churn.monitoring.monitor import monitor
    from mlflow_churn.training.train import train

    model = f"churn-outage-{uuid.uuid4().hex[:8]}"
    client = MlflowClient(mlflow_server.url, mlflow_server.url)
    proxy = OutageProxy(mlflow_server.url)
    try:
        cfg = load_config(workspace=workspace, environ={}, overrides={
            "tracking_uri": proxy.url, "training.model_name": model, **FAST})
        register_version(cfg, "good", alias=None)  # links the shared data into the workspace
        # the champion as training makes it (its reference profile and baselines logged)
        champion = train(cfg, TRAINED_AS_OF, n_trials=1, progress=False)
        move_alias(client, model, CHAMPION, champion.version)
        register_version(cfg, "good", alias="challenger", seed=1)
        monitor(cfg, FIRST_WINDOW, report=False)  # one earlier window: the history the next reads
        history, aliases = _history(client, model), aliases_of(client, model)
        assert len(history) == 1
        env = _env(proxy.url, model)
        for name, (args, failing) in CASES.items():
            before = _runs(client)
            proxy.failing, proxy.failed = failing, 0
            argv = [a.format(champion=champion.version) for a in args]
            res = subprocess.run([*CHURN, "--workspace", str(workspace), *argv], env=env, cwd=workspace,
                                 capture_output=True, text=True, timeout=600)
            proxy.failing = None
            assert proxy.failed >= 1, (name, res.stderr[-2000:])  # the outage was met
            assert res.returncode == 3, (name, res.returncode, res.stderr[-3000:])
            lines = res.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: "), (name, res.stderr[-3000:])
            assert "tracking server" in lines[0] and "503" in lines[0], (name, lines[0])
            assert "Traceback" not in res.stderr
            after = _runs(client)
            new = {run_id: status for run_id, status in after.items() if run_id not in before}
            assert not new, (name, new)  # no decision run (nor any other run) was created
            assert _history(client, model) == history, name
            assert aliases_of(client, model) == aliases, name
    finally:
        proxy.close()
