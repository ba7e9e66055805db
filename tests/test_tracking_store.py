"""The workspace's SQLite tracking store opened by several processes at once."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

CHILD = r"""
import sys, time
from pathlib import Path
from mlflow_churn.config import load_config
from mlflow_churn.tracking import setup_mlflow
go = Path(sys.argv[2])
deadline = time.time() + 120
while not go.exists() and time.time() < deadline:
    time.sleep(0.002)
cfg = load_config(workspace=Path(sys.argv[1]), environ={})
print(setup_mlflow(cfg))
"""


@pytest.mark.slow  # among the slowest of make test-fast (several processes opening one store)
def test_processes_opening_a_new_workspace_store_at_once_all_succeed(tmp_path: Path) -> None:
    """Eight processes released together on a workspace with no ``mlflow.db`` yet (what
    ``churn serve`` and ``churn canary status`` beside it do on a first start) all get the
    same experiment: the store's tables are made once, not raced ("table ... already
    exists")."""
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "ws"), str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(8)]
    time.sleep(3.0)  # let them import and wait on the go file
    go.touch()
    outs = [p.communicate(timeout=300) for p in procs]
    failures = [err[-800:] for p, (_, err) in zip(procs, outs, strict=True) if p.returncode != 0]
    assert not failures, failures
    assert len({out.strip() for out, _ in outs}) == 1, outs
    assert (tmp_path / "ws" / "mlflow.db").is_file()
