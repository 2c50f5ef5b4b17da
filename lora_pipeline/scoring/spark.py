"""The Spark session of a scoring job: the process's active one if there is one, else a new one.

`spark_master=''` leaves the master to `spark-submit --master` (or `spark-defaults.conf`); a local master
gets a quiet session bound to loopback whose Python workers run this interpreter (the venv that has
torch and MLflow). Spark needs a Java runtime (17 or newer for Spark 4); `make setup` checks for one.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
from pathlib import Path

from lora_pipeline.errors import StepError, one_line

log = logging.getLogger(__name__)

_MASTER = re.compile(r"^(local(\[(\*|[1-9]\d*)(,[1-9]\d*)?\])?|local-cluster\[[^\]]+\]|yarn|"
                     r"(spark|k8s|mesos)://\S+)$")
# Every local session: no progress bars over the step's log, no UI port, loopback only (a host name
# that resolves to a LAN address would otherwise be used and warned about).
LOCAL_CONF = {
    "spark.ui.showConsoleProgress": "false",
    "spark.ui.enabled": "false",
    "spark.driver.host": "127.0.0.1",
    "spark.driver.bindAddress": "127.0.0.1",
    "spark.log.level": "WARN",
}
JAVA_FIX = ("run `make setup` (it installs the distribution's headless JRE when run as root), or install "
            "Java 17+ yourself (Debian/Ubuntu: `sudo apt-get install -y openjdk-17-jre-headless`) or set "
            "JAVA_HOME to one")


def valid_master(master: str) -> bool:
    return master == "" or bool(_MASTER.match(master))


def is_local(master: str) -> bool:
    return master.startswith("local")


def java_binary() -> str | None:
    home = os.environ.get("JAVA_HOME")
    if home and (Path(home) / "bin" / "java").is_file():
        return str(Path(home) / "bin" / "java")
    return shutil.which("java")


def session(master: str, conf: dict[str, str] | None = None):
    """(session, started_here): the active session (a test's, a notebook's), else a new one."""
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        now = active.conf.get("spark.master")
        if master and now != master:
            log.warning("a Spark session on %s is already running in this process: scoring on it, "
                        "not on spark_master=%s", now, master)
        return active, False
    if java_binary() is None:
        raise StepError(f"Spark needs a Java runtime and none was found (no JAVA_HOME, no java on PATH); "
                        f"fix: {JAVA_FIX}")
    builder = SparkSession.builder.appName("batch_score")
    if master:
        builder = builder.master(master)
    settings = dict(LOCAL_CONF) if is_local(master) else {}
    if is_local(master):
        # PySpark takes the workers' interpreter from PYSPARK_PYTHON only (default: `python3` on PATH,
        # which lacks this venv's packages), and the JVM its address from SPARK_LOCAL_IP; both are read
        # from the environment when the session starts.
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    settings.update(conf or {})
    for key, value in settings.items():
        builder = builder.config(key, value)
    try:
        spark = builder.getOrCreate()
    except Exception as err:  # the JVM did not start (bad master, no memory, Java too old): many types
        raise StepError(f"cannot start Spark on {master or 'the spark-submit master'} "
                        f"({type(err).__name__}: {one_line(err, 200)}); fix: check spark_master, "
                        f"and Java 17+ ({JAVA_FIX})") from err
    log.info("Spark %s on %s (parallelism %d)", spark.version, spark.conf.get("spark.master"),
             spark.sparkContext.defaultParallelism)
    return spark, True


_LOCAL_SLOTS = re.compile(r"^local(\[(?P<n>\*|\d+)(,\d+)?\])?$")
_LOCAL_CLUSTER = re.compile(r"^local-cluster\[(?P<workers>\d+),\s*(?P<cores>\d+),")


def tasks_per_machine(spark) -> int | None:
    """How many tasks (each a Python worker that loads the model) may run at once on one machine, or
    None where the session does not say. local[N]: N (local[*]: the CPUs; local: 1); local-cluster[w,c,m]:
    w x c, all on this machine; a cluster: spark.executor.cores when set, per executor (several
    executors on one host are not counted); each divided by spark.task.cpus."""
    master = spark.conf.get("spark.master", "")
    per_task = int(spark.conf.get("spark.task.cpus", "1") or 1)
    if m := _LOCAL_SLOTS.match(master):
        cores = (os.cpu_count() or 1) if m["n"] == "*" else int(m["n"] or 1)
    elif m := _LOCAL_CLUSTER.match(master):
        cores = int(m["workers"]) * int(m["cores"])
    elif executor := spark.conf.get("spark.executor.cores", None):
        cores = int(executor)
    else:
        return None
    return max(1, cores // max(1, per_task))
