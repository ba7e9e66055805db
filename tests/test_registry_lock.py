"""The registry lock honours its timeout in every branch: while a real second process holds it,
taking it gives up after the timeout with one clear line (filelock on a file, a PostgreSQL
advisory lock on a PostgreSQL store), and succeeds once that process lets go."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from mlflow_churn.errors import ChurnError
from mlflow_churn.registry.lock import model_lock

_HOLDER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from mlflow_churn.registry.lock import model_lock
    with model_lock(sys.argv[1], "churn-model", Path(sys.argv[2])) as how:
        print(how, flush=True)
        sys.stdin.readline()
""")


@contextmanager
def _held_elsewhere(store_uri: str, lock_dir: Path) -> Iterator[str]:
    """Another process holding the lock of model ``churn-model`` until the block ends."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, store_uri, str(lock_dir)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        how = proc.stdout.readline().strip()
        assert how, "the holder process did not take the lock"
        yield how
    finally:
        proc.stdin.close()  # readline() returns: the holder leaves its block
        proc.wait(timeout=60)


def _times_out_then_succeeds(store_uri: str, lock_dir: Path, kind: str) -> None:
    with _held_elsewhere(store_uri, lock_dir) as how:
        assert how.startswith(kind)
        with pytest.raises(ChurnError) as err, model_lock(store_uri, "churn-model", lock_dir, timeout_s=0.5):
            pytest.fail("took a lock another process holds")
        message = str(err.value)
        assert "held by another" in message and "0.5 s" in message and "\n" not in message
        with model_lock(store_uri, "other-model", lock_dir, timeout_s=0.5) as other:
            assert other.startswith(kind)  # another model's lock is free
    with model_lock(store_uri, "churn-model", lock_dir, timeout_s=30) as again:
        assert again == how


def test_file_lock_times_out_while_another_process_holds_it(tmp_path: Path) -> None:
    _times_out_then_succeeds(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "locks", "flock(")


@pytest.mark.postgres
def test_advisory_lock_times_out_while_another_process_holds_it(postgres_url: str, tmp_path: Path) -> None:
    _times_out_then_succeeds(postgres_url.replace("postgresql://", "postgresql+psycopg://"),
                             tmp_path / "locks", "pg_advisory_lock(")
