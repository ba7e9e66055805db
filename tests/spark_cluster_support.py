"""A real Spark standalone cluster from the pyspark wheel: one master, one worker (1 core).

The wheel has no ``sbin/start-master.sh``; ``bin/spark-class`` runs the daemons' main classes
in the foreground (``exec java``), so each is a child process we own and stop, even when the
test fails. Everything binds 127.0.0.1 (``SPARK_LOCAL_IP``); the web UIs take any free port.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ports import start_on_free_port
from wait_support import wait_until

#: The JVM options of every JVM the suite starts: the test sessions' drivers (``SPARK_SUBMIT_OPTS``,
#: set by conftest.py and inherited by the CLI subprocesses), the standalone daemons
#: (``SPARK_DAEMON_JAVA_OPTS``) and their executors (``spark.executor.extraJavaOptions``). The
#: suite's data is small and its JVMs short-lived: the C2 compiler's threads and the parallel
#: collector's cost more CPU than they save. C1 only and the serial collector took about a third
#: less CPU on tests/test_features_spark.py and on the Spark training and scoring tests (cgroup
#: CPU accounting, 2026-12-07); the numbers Spark computes do not depend on the JIT tier.
TEST_JVM_OPTIONS = "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC"


def spark_env(tmp: Path) -> dict[str, str]:
    """The environment of the daemons and of a driver talking to them (SPARK_HOME, loopback)."""
    import pyspark

    # spark-defaults.conf as a cluster's operator would tune it: a handful of shuffle partitions
    # for test-sized data (Spark's 200 cost one task each on the 1-core worker: minutes)
    conf = tmp / "spark-conf"
    conf.mkdir(exist_ok=True)
    (conf / "spark-defaults.conf").write_text("spark.sql.shuffle.partitions 4\n"
                                              f"spark.executor.extraJavaOptions {TEST_JVM_OPTIONS}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHURN_")}
    env.update(SPARK_HOME=str(Path(pyspark.__file__).parent), SPARK_LOCAL_IP="127.0.0.1",
               SPARK_LOG_DIR=str(tmp / "logs"), SPARK_DAEMON_MEMORY="256m", SPARK_CONF_DIR=str(conf),
               SPARK_DAEMON_JAVA_OPTS=TEST_JVM_OPTIONS)
    return env


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)


@contextmanager
def standalone_cluster(tmp: Path, worker_memory: str = "1g") -> Iterator[str]:
    """Start a master and one worker (1 core, ``worker_memory``); yield ``spark://127.0.0.1:PORT``
    once the worker has registered; stop both (their process groups) on the way out."""
    env = spark_env(tmp)
    spark_class = str(Path(env["SPARK_HOME"]) / "bin" / "spark-class")
    procs: list[subprocess.Popen] = []

    def start_master(port: int) -> tuple[subprocess.Popen, Path]:
        log = tmp / f"master-{port}.log"
        proc = subprocess.Popen(
            [spark_class, "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1", "--port", str(port),
             "--webui-port", "0"], env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
            start_new_session=True)
        procs.append(proc)
        return proc, log

    try:
        port, master, master_log = start_on_free_port(start_master)
        assert master.poll() is None, master_log.read_text()[-3000:]
        url = f"spark://127.0.0.1:{port}"
        worker_log = tmp / "worker.log"
        (tmp / "work").mkdir(exist_ok=True)
        procs.append(subprocess.Popen(
            [spark_class, "org.apache.spark.deploy.worker.Worker", "--host", "127.0.0.1", "--cores", "1",
             "--memory", worker_memory, "--webui-port", "0", "--work-dir", str(tmp / "work"), url],
            env=env, stdout=worker_log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True))
        registered = "Successfully registered with master"
        wait_until(lambda: registered in worker_log.read_text(errors="replace"), 120,
                   "the Spark worker to register with the master")
        yield url
    finally:
        for proc in reversed(procs):
            _stop(proc)
