"""`kill -9` of batch_score while Spark writes: nothing appears at `output`, and a rerun completes.

The job runs in its own process (driver, JVM and Python workers); every process of it gets SIGKILL once
Spark has started writing the hidden temporary folder beside `output` (the tasks are loading the model
or scoring). What must hold: no `output` (the table is published by one rename, after it is complete);
the rerun writes every row, removes the killed job's temporary folder, and closes its run as KILLED.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import mlflow
import pandas as pd
import psutil
import pytest
from test_batch_score import BATCH_SIZE, MAX_NEW_TOKENS, NAME, batch_score_runs, make_table
from test_serving import log_checkpoint, make_adapter, snapshot

from lora_pipeline import artifacts

pytestmark = [pytest.mark.faults, pytest.mark.slow]

START_TIMEOUT_S = 240  # a fresh JVM, the model download and Spark's job setup, on a busy machine


def _kill_tree(proc: subprocess.Popen) -> int:
    """SIGKILL the job and everything it started (PySpark's worker daemon has its own process group);
    returns the job's exit status."""
    children = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGKILL)
    for p in children:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(children, timeout=30)
    return proc.wait()  # Popen reaps its own child (psutil would take its exit status)


def test_kill_9_while_writing_leaves_no_output_and_rerun_completes(tracking, tiny_model_dir, tmp_path,
                                                                    venv_env):
    uri = log_checkpoint(snapshot(str(tiny_model_dir)), make_adapter(tiny_model_dir, tmp_path / "a"))
    version = mlflow.register_model(uri, NAME).version
    tracking.set_registered_model_alias(NAME, artifacts.CHAMPION_ALIAS, version)
    src = make_table(200)
    src.to_parquet(tmp_path / "in.parquet")
    output = tmp_path / "scored"
    argv = [sys.executable, "-m", "steps.batch_score", "--input", str(tmp_path / "in.parquet"),
            "--output", str(output), "--max_new_tokens", str(MAX_NEW_TOKENS),
            "--batch_size", str(BATCH_SIZE)]

    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(argv, env=venv_env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not list(tmp_path.glob(".scored.batch_score-*/table/_temporary")):
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "Spark never started writing"
            time.sleep(0.1)
    finally:
        status = _kill_tree(proc)
    assert status == -signal.SIGKILL  # killed mid-job, not finished
    assert not output.exists()
    assert list(tmp_path.glob(".scored.batch_score-*"))  # the half-written table is hidden beside it

    rerun = subprocess.run(argv, env=venv_env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert len(pd.read_parquet(output)) == len(src)
    assert not list(tmp_path.glob(".scored.batch_score-*"))  # the killed job's leftovers are gone
    statuses = sorted(r.info.status for r in batch_score_runs(tracking))
    assert statuses == ["FINISHED", "KILLED"]
