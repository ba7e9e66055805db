"""Ctrl-C under :class:`SafeInterrupt` never cuts a run's creation or end in two: a run the
tracking store made is always ended (CI once found a trial run left RUNNING after Ctrl-C hit
``churn train`` between the store's insert and ``create_run`` returning its id)."""

from __future__ import annotations

import os
import signal
import threading
import time

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from mlflow_churn.config import ChurnConfig
from mlflow_churn.interrupt import SafeInterrupt, uninterruptible
from mlflow_churn.tracking import client_run, step_run

pytestmark = pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                                reason="signals reach the main thread only")


def _sigint_now() -> None:
    os.kill(os.getpid(), signal.SIGINT)


def _wait_for_interrupt(seconds: float = 30.0) -> None:
    """Sleep in small steps until the (retried) KeyboardInterrupt arrives."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.01)
    raise AssertionError(f"no KeyboardInterrupt within {seconds:.0f} s")


def test_the_interrupt_lands_after_an_uninterruptible_block() -> None:
    events: list[str] = []
    with pytest.raises(KeyboardInterrupt), SafeInterrupt():
        with uninterruptible():
            _sigint_now()
            time.sleep(0.3)  # several retries find the block still running
            with uninterruptible():  # nested blocks: the outer one decides
                time.sleep(0.05)
            events.append("block ended")
        _wait_for_interrupt()
    assert events == ["block ended"]


def test_outside_a_block_the_interrupt_is_immediate() -> None:
    events: list[str] = []
    with pytest.raises(KeyboardInterrupt), SafeInterrupt():
        _sigint_now()
        _wait_for_interrupt()
        events.append("not reached")
    assert events == []


@pytest.fixture
def store(config: ChurnConfig) -> tuple[MlflowClient, ChurnConfig, str]:
    client = MlflowClient(config.mlflow_tracking_uri)
    return client, config, client.create_experiment("interrupt")


def test_ctrl_c_as_the_store_makes_a_child_run_leaves_it_failed_not_running(store, monkeypatch) -> None:
    """The signal arrives after the store inserted the run and before ``create_run`` returned:
    the interrupt lands once the id is known, and the run is ended FAILED."""
    client, cfg, exp = store
    real = MlflowClient.create_run

    def create_then_signal(self, *args, **kwargs):
        run = real(self, *args, **kwargs)
        _sigint_now()
        time.sleep(0.2)  # the retries find the main thread still inside the creation
        return run

    monkeypatch.setattr(MlflowClient, "create_run", create_then_signal)
    with pytest.raises(KeyboardInterrupt), SafeInterrupt():
        with client_run(client, cfg, "trial-0", experiment_id=exp, tags={"optuna.state": "PRUNED"}):
            _wait_for_interrupt()
    runs = client.search_runs([exp])
    assert [(r.info.run_name, r.info.status) for r in runs] == [("trial-0", "FAILED")]


def test_ctrl_c_as_a_run_is_ended_still_ends_it(store, monkeypatch) -> None:
    client, cfg, exp = store
    real = MlflowClient.set_terminated

    def signal_then_end(self, run_id, *args, **kwargs):
        _sigint_now()
        time.sleep(0.2)
        return real(self, run_id, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "set_terminated", signal_then_end)
    with pytest.raises(KeyboardInterrupt), SafeInterrupt():
        with client_run(client, cfg, "trial-1", experiment_id=exp):
            pass
        _wait_for_interrupt()
    assert [r.info.status for r in client.search_runs([exp])] == ["FINISHED"]


def test_ctrl_c_as_a_fluent_step_run_starts_ends_it_failed(store, monkeypatch) -> None:
    client, cfg, exp = store
    mlflow.set_tracking_uri(cfg.mlflow_tracking_uri)
    real = mlflow.start_run

    def start_then_signal(*args, **kwargs):
        run = real(*args, **kwargs)
        _sigint_now()
        time.sleep(0.2)
        return run

    monkeypatch.setattr(mlflow, "start_run", start_then_signal)
    try:
        with pytest.raises(KeyboardInterrupt), SafeInterrupt():
            with step_run("train", experiment_id=exp):
                _wait_for_interrupt()
        assert mlflow.active_run() is None
        assert [r.info.status for r in client.search_runs([exp])] == ["FAILED"]
    finally:
        while mlflow.active_run() is not None:  # never leave a run on this worker's stack
            mlflow.end_run("FAILED")
