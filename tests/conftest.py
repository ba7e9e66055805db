"""Shared fixtures: workspaces, simulated data, real PostgreSQL / Redis, MLflow stores.

Services: tests that need PostgreSQL or Redis skip with a reason when the service is not
reachable, except when ``CI=true``, where a missing service fails the test.
Every test gets its own database / Redis key prefix and cleans up after itself.
"""

from __future__ import annotations

import os
import socket
import sys
import uuid
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import pytest
from spark_cluster_support import TEST_JVM_OPTIONS

from mlflow_churn.config import ChurnConfig, load_config
from mlflow_churn.data.simulator import SimulationSpec, simulate

# every Spark driver JVM of the suite, in this process and in the CLI subprocesses (see TEST_JVM_OPTIONS)
os.environ.setdefault("SPARK_SUBMIT_OPTS", TEST_JVM_OPTIONS)
# One OpenMP thread per process (XGBoost's training and prediction, here and in every subprocess): the
# suite runs more xdist workers than cores, and OpenMP threads that spin-wait for a busy core burn CPU
# the other workers need (tests/test_retrain.py: 44.9 -> 36.2 CPU-s, cgroup accounting, 2026-12-07).
# Tests that set training.nthread themselves keep their value; every process of a test sees the same count.
os.environ.setdefault("OMP_NUM_THREADS", "1")

#: Where the session's temp dirs go (``tmp_path``): a new directory on this tmpfs when it and the
#: machine have room, else pytest's default (/tmp, on disk). The suite's SQLite, DuckDB and file
#: stores commit thousands of times, and on disk each commit waits for an fsync:
#: tests/test_evaluation_gate.py took 81 s and 89 s on tmpfs against 86 s and 99 s on disk (two
#: alternating pairs, 2026-12-07). ``--basetemp`` given, or PYTEST_TMPFS=0, keeps pytest's choice.
TMPFS, TMPFS_MIN_FREE = Path("/dev/shm"), 8 << 30
_TMPFS_PREFIX = "churn-pytest-"
_TMPFS_KEY = pytest.StashKey[Path]()  # the session's directory there


def _tmpfs_basetemp() -> Path | None:
    """A new directory for this session's temp dirs on :data:`TMPFS`, or None (no room, or no
    tmpfs there). Removes the directories of earlier sessions whose process has ended."""
    import shutil
    import tempfile

    try:
        free = os.statvfs(TMPFS)
        meminfo = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    available = next((int(line.split()[1]) << 10 for line in meminfo.splitlines()
                      if line.startswith("MemAvailable:")), 0)
    if min(free.f_bavail * free.f_frsize, available) < TMPFS_MIN_FREE:
        return None
    for old in TMPFS.glob(f"{_TMPFS_PREFIX}*"):
        pid = old.name[len(_TMPFS_PREFIX):].split("-")[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists() and old.stat().st_uid == os.getuid():
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{_TMPFS_PREFIX}{os.getpid()}-", dir=TMPFS))


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """The session's temp dirs on :data:`TMPFS` when it has room (the xdist workers get
    subdirectories of the controller's choice)."""
    if hasattr(config, "workerinput") or config.option.basetemp or os.environ.get("PYTEST_TMPFS") == "0":
        return
    base = _tmpfs_basetemp()
    if base is not None:
        config.option.basetemp = str(base)
        config.stash[_TMPFS_KEY] = base


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A passing session's temp dirs on the tmpfs are removed (memory); a failing one's are kept
    for the post-mortem (the next session removes them) and named in the summary."""
    base = session.config.stash.get(_TMPFS_KEY, None)
    if base is None:
        return
    if exitstatus == 0:
        import shutil

        shutil.rmtree(base, ignore_errors=True)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    kept = config.stash.get(_TMPFS_KEY, None)
    if kept is not None and exitstatus != 0:
        terminalreporter.write_line(f"temp dirs kept at {kept} (tmpfs, in memory): remove it when done; the "
                                    "next session does")


PG_HOST, PG_PORT = "127.0.0.1", 5432
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
IN_CI = os.environ.get("CI", "").lower() == "true"


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _need(service: str, host: str, port: int) -> None:
    if _reachable(host, port):
        return
    msg = f"{service} is not reachable at {host}:{port}"
    if IN_CI:
        pytest.fail(f"{msg} (CI=true: a missing service is a failure, not a skip)")
    pytest.skip(msg)


#: the marker of the service a test needs, by the fixtures that reach it (the whole fixture
#: closure counts: a fixture built on ``mlflow_server`` needs PostgreSQL too). A test reaching a
#: service another way carries the marker itself; tests/test_markers.py checks both.
SERVICE_FIXTURES = {"postgres_url": "postgres", "mlflow_server": "postgres", "redis_prefix": "redis",
                    "redis_url": "redis", "browser": "chromium", "spark": "spark"}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for fixture in sorted(set(getattr(item, "fixturenames", ())) & SERVICE_FIXTURES.keys()):
            item.add_marker(SERVICE_FIXTURES[fixture])


#: Small SQLAlchemy pools for every MLflow store this session opens on PostgreSQL, in this
#: process and in the servers it starts (they inherit the environment): MLflow's default
#: (5 kept + 10 overflow per engine, two engines per server process) let two suites on one
#: machine exhaust PostgreSQL's 100 connections. Requests beyond a pool wait for a connection.
os.environ.setdefault("MLFLOW_SQLALCHEMYSTORE_POOL_SIZE", "2")
os.environ.setdefault("MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW", "6")

#: MLFLOW_* variables as the session found them (before any fixture ran ``setup_mlflow``)
_BASE_MLFLOW_ENV = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}


@pytest.fixture(autouse=True)
def _restore_mlflow_environ() -> Iterator[None]:
    """After each test, undo what ``setup_mlflow`` left behind (also from module fixtures):
    MLFLOW_* variables (``set_tracking_uri`` / ``set_registry_uri`` export them) and the
    process-wide tracking / registry URIs, which a later ``MlflowClient(uri)`` would
    otherwise silently use as its registry."""
    yield
    if "mlflow" in sys.modules:
        import mlflow

        mlflow.set_registry_uri(None)
        mlflow.set_tracking_uri(None)
    for name in [k for k in os.environ if k.startswith("MLFLOW_")]:
        if name not in _BASE_MLFLOW_ENV:
            del os.environ[name]
    os.environ.update(_BASE_MLFLOW_ENV)
    tracking = sys.modules.get("mlflow_churn.tracking")
    if tracking is not None:  # the HTTP limits are set once per process and stay (tracking.py)
        os.environ.update(tracking.http_limits())


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for this test; dropped afterwards."""
    _need("PostgreSQL", PG_HOST, PG_PORT)
    import psycopg

    name = f"churn_test_{uuid.uuid4().hex[:12]}"
    admin_url = f"postgresql://postgres@{PG_HOST}:{PG_PORT}/test"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield f"postgresql://postgres@{PG_HOST}:{PG_PORT}/{name}"
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A unique Redis key prefix; every key under it is deleted afterwards."""
    _need("Redis", REDIS_HOST, REDIS_PORT)
    import redis

    prefix = f"churn-test-{uuid.uuid4().hex[:12]}"
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT)
    try:
        yield prefix
    finally:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


@pytest.fixture
def redis_url() -> str:
    """URL of the machine's Redis (use with ``redis_prefix``)."""
    return f"redis://{REDIS_HOST}:{REDIS_PORT}/0"


@pytest.fixture
def churn_main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    """``churn_main(args) -> CompletedProcess``: the console script's main() in this process
    (no CHURN_* / MLFLOW_* from the caller's environment, a wide console so tables are whole)."""
    import subprocess

    from mlflow_churn.cli import main
    from mlflow_churn.cli_common import console

    for name in [n for n in os.environ if n.startswith(("CHURN_", "MLFLOW_"))]:
        monkeypatch.delenv(name)
    monkeypatch.setattr(console, "width", 250)

    def invoke(args: list[str]) -> subprocess.CompletedProcess:
        capsys.readouterr()
        monkeypatch.setattr(sys, "argv", ["churn", *args])
        code = 0
        try:
            main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out.out, out.err)

    return invoke


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty workspace; MLFLOW_TRACKING_URI and CHURN_* variables cleared."""
    for name in list(os.environ):
        if name.startswith("CHURN_") or name in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID"):
            monkeypatch.delenv(name, raising=False)
    ws = tmp_path / "ws"
    ws.mkdir()
    return ws


@pytest.fixture
def config(workspace: Path) -> ChurnConfig:
    """The default configuration on the test's own workspace (MLflow store inside it)."""
    return load_config(workspace=workspace, environ={})


@pytest.fixture(scope="session")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only simulated dataset (stable, 3000 customers x 120 days); its data dir.

    Shared by the whole session: copy it before changing anything.
    """
    out = tmp_path_factory.mktemp("small") / "data"
    simulate(SimulationSpec(customers=3000, days=120, start=date(2026, 1, 1), seed=7), out)
    return out


@pytest.fixture(scope="session")
def spark():
    """The session's one Spark session (local[2], UTC; :func:`mlflow_churn.spark.spark_session`):
    every Spark test shares it (starting one costs ~10 s); never stop it in a test, pass it
    to the code under test (``spark=``) so the code does not start and stop its own."""
    pytest.importorskip("pyspark")
    from mlflow_churn.spark import spark_session

    session = spark_session("local[2]", "churn-tests")
    yield session
    session.stop()


# --- registered model versions for gate / serving / monitoring tests ----------------------

#: newest training cutoff of versions made by ``register_version`` unless told otherwise
from datetime import UTC as _UTC  # noqa: E402
from datetime import datetime as _datetime  # noqa: E402

TEST_WINDOW_END = _datetime(2026, 3, 20, tzinfo=_UTC)

#: ``register_version``'s trainings of this session (see ``_fitted``)
_FITTED: dict[tuple, tuple] = {}


@pytest.fixture
def register_version(small_data: Path):
    """Factory: train a small XGBoost model on real features, register it, tag it, alias it.

    ``register_version(cfg, quality="good", window_end=TEST_WINDOW_END, alias="challenger",
    window_days=18, seed=0, bad_segment=("region", "pacific"), feature_set=None,
    mirror_stages=False) -> ModelVersion``

    - ``cfg.data_dir`` is linked to the shared ``small_data`` when it does not exist yet;
    - training cutoffs every ``cfg.training.cutoff_every_days`` in
      ``[window_end - window_days, window_end]``; horizon ``cfg.features.label_horizon_days``;
      holdout and validation customers (``mlflow_churn.data.groups``) are left out, as in training;
    - quality ``good``: 30 rounds, depth 4 (holdout AUC ~0.70 on small_data's holdout customers);
      ``bad``: labels shuffled, depth 1, 2 rounds (~0.5);
      ``bad_segment``: good overall, but inside ``bad_segment`` (column, value) the labels
      are re-assigned to the customers a good model ranks lowest (same churn rate, inverted
      ranking) and the model is deeper (150 rounds, depth 6) to learn it, so that segment's AUC
      collapses;
    - version tags as training sets them (tests/test_training_train.py checks they are a subset of
      what ``train()`` writes): feature_set, feature_set_hash,
      window_start, window_end, as_of (= window_end + horizon + evaluation.holdout_days),
      horizon_days, val_auc (newest cutoff of the validation customers), data_hash, train_run_id,
      source=simulator, plus test_quality;
    - ``alias`` (None = no alias) is moved with ``registry.aliases.move_alias``.
    """
    import os
    from datetime import timedelta

    import mlflow
    import numpy as np
    import xgboost as xgb
    from mlflow.tracking import MlflowClient
    from sklearn.metrics import roc_auc_score

    from mlflow_churn.data.groups import holdout_mask, validation_mask
    from mlflow_churn.features.offline import build_training_frame, daily_cutoffs
    from mlflow_churn.features.registry import registry_for
    from mlflow_churn.registry.versions import register_model_version
    from mlflow_churn.tracking import setup_mlflow
    from mlflow_churn.training.model import log_churn_model, predict_proba

    def _fit(fs, frame, rounds: int, depth: int, seed: int) -> xgb.Booster:
        dm = xgb.DMatrix(fs.coerce(frame), label=frame["label"].to_numpy(), enable_categorical=True)
        params = {"objective": "binary:logistic", "max_depth": depth, "eta": 0.1, "seed": seed,
                  "nthread": 1}
        return xgb.train(params, dm, rounds)

    def _fitted(cfg: ChurnConfig, fs, quality: str, window_end, window_days: int, seed: int,
                bad_segment: tuple[str, str]):
        """(booster, frame, cutoffs, val_auc) of one training, made once per session per input:
        the same inputs give the same model, and frame + fit were a third of a registration."""
        key = (quality, window_end, window_days, seed, bad_segment if quality == "bad_segment" else None,
               fs.name, fs.hash, cfg.features.label_horizon_days, cfg.training.cutoff_every_days,
               cfg.evaluation.model_dump_json(), cfg.training.model_dump_json())
        if key in _FITTED:
            return _FITTED[key]
        horizon = cfg.features.label_horizon_days
        start = window_end - timedelta(days=window_days)
        cutoffs = daily_cutoffs(start, window_end, cfg.training.cutoff_every_days)
        frame = build_training_frame(cfg.data_dir, fs, cutoffs, horizon)
        frame = frame[~holdout_mask(frame["customer_id"], cfg)].reset_index(drop=True)  # as training does
        rng = np.random.default_rng(seed)
        if quality == "bad":  # labels shuffled: the model learns noise (AUC ~0.5)
            frame["label"] = rng.permutation(frame["label"].to_numpy())
        elif quality == "bad_segment":
            col, value = bad_segment
            ref = predict_proba(_fit(fs, frame, 30, 4, seed), fs, frame)
            inside = (frame[col].astype("object") == value).to_numpy()
            idx = np.flatnonzero(inside)
            lowest = idx[np.argsort(ref[idx], kind="stable")[: int(frame["label"].to_numpy()[idx].sum())]]
            label = frame["label"].to_numpy().copy()
            label[idx] = 0
            label[lowest] = 1
            frame["label"] = label.astype("int8")
        newest = (frame["cutoff"] == frame["cutoff"].max()).to_numpy()
        validation = validation_mask(frame["customer_id"], cfg)
        rounds, depth = {"bad": (2, 1), "good": (30, 4), "bad_segment": (150, 6)}[quality]
        booster = _fit(fs, frame[~validation], rounds, depth, seed)
        val = frame[validation & newest]
        val_auc = float(roc_auc_score(val["label"], predict_proba(booster, fs, val)))
        _FITTED[key] = booster, frame, cutoffs, val_auc
        return _FITTED[key]

    def _register(cfg: ChurnConfig, quality: str = "good", window_end=TEST_WINDOW_END,
                  alias: str | None = "challenger", window_days: int = 18, seed: int = 0,
                  bad_segment: tuple[str, str] = ("region", "pacific"), feature_set: str | None = None,
                  mirror_stages: bool = False):
        if quality not in ("good", "bad", "bad_segment"):
            raise ValueError(f"quality must be good, bad or bad_segment, got {quality!r}")
        if not cfg.data_dir.exists():
            cfg.workspace.mkdir(parents=True, exist_ok=True)
            os.symlink(small_data, cfg.data_dir)
        setup_mlflow(cfg)
        fs = registry_for(cfg).feature_set(feature_set or cfg.features.feature_set)
        horizon = cfg.features.label_horizon_days
        booster, frame, cutoffs, val_auc = _fitted(cfg, fs, quality, window_end, window_days, seed,
                                                   tuple(bad_segment))
        as_of = window_end + timedelta(days=horizon + cfg.evaluation.holdout_days)
        tags = {
            "feature_set": fs.name, "feature_set_hash": fs.hash,
            "window_start": cutoffs[0].isoformat(), "window_end": cutoffs[-1].isoformat(),
            "as_of": as_of.isoformat(), "horizon_days": str(horizon), "val_auc": f"{val_auc:.6f}",
            "data_hash": "small_data-seed7", "source": "simulator", "test_quality": quality,
        }
        nested = mlflow.active_run() is not None
        with mlflow.start_run(run_name=f"test-train-{quality}", nested=nested) as run:
            mlflow.log_params({k: tags[k] for k in ("window_start", "window_end", "as_of", "feature_set",
                                                    "feature_set_hash")})
            mlflow.log_metric("val_auc", val_auc)
            info = log_churn_model(booster, fs, frame)
        # as training registers: the version and its tags in one request, then the alias
        return register_model_version(MlflowClient(), cfg.training.model_name, info, run_id=run.info.run_id,
                                      tags={**tags, "train_run_id": run.info.run_id}, alias=alias,
                                      mirror_stages=mirror_stages)

    return _register


# --- a real `mlflow server` on PostgreSQL ---------------------------------------------------------
@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """A real ``mlflow server`` for the session (per xdist worker): its own PostgreSQL
    database (dropped after), artifacts proxied from a temp dir, webhooks enabled for loopback
    receivers. Yields a :class:`mlflow_churn.tracking_server.TrackingServer` (``.url``)."""
    _need("PostgreSQL", PG_HOST, PG_PORT)
    from mlflow_churn.tracking_server import create_database, drop_database, start_tracking_server

    root = tmp_path_factory.mktemp("mlflow-server")
    url = create_database(f"postgresql://postgres@{PG_HOST}:{PG_PORT}/test")
    try:
        server = start_tracking_server(url, root / "mlartifacts", log_path=root / "server.log", cwd=root)
        try:
            yield server
        finally:
            server.stop()
    finally:
        drop_database(url)


# --- headless Chromium (Debian packages chromium + chromium-driver), driven by Selenium ----------
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1400,1000")


@pytest.fixture
def browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A Selenium driver of headless Chromium on a FRESH profile (its own user-data dir: no
    local storage, no cookies). Skipped when Chromium is missing, except in CI."""
    import shutil
    import tempfile

    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        msg = f"{CHROMIUM} / {CHROMEDRIVER} missing: apt-get install chromium chromium-driver"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must never download a driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="chromium-", dir=tmp_path)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(120)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
