"""A step process killed with SIGKILL leaves its run RUNNING; the next start closes it as KILLED."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import mlflow
import psutil
import pytest

from lora_pipeline import artifacts
from lora_pipeline.tracking import stale
from lora_pipeline.tracking.runs import step_run
from steps import download_snapshot as ds

pytestmark = pytest.mark.faults

# A step process: starts a step run exactly as the steps do (lora_pipeline.tracking.runs.step_run records the process),
# prints the run id, then waits for stdin to close or dies by SIGKILL as told.
_STEP = textwrap.dedent("""
    import os, sys
    from steps import download_snapshot as ds
    from lora_pipeline.tracking.runs import step_run

    with step_run("finetune", ds.Args()) as run:
        print(run.info.run_id, flush=True)
        if sys.argv[1] == "die":
            os.kill(os.getpid(), 9)
        sys.stdin.read()
""")


def start_step(venv_env, fate: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-c", _STEP, fate], env=venv_env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    line = proc.stdout.readline().strip()
    if not line:
        proc.wait(30)
        raise AssertionError(f"step process printed no run id: {proc.stderr.read()[-3000:]}")
    return proc, line


def killed(proc: subprocess.Popen) -> None:
    assert proc.wait(60) == -signal.SIGKILL


def test_killed_step_is_closed_as_killed_by_the_next_step_start(tracking, venv_env):
    """Through lora_pipeline.tracking.runs.step_run only: it records the process and closes stale runs at start."""
    proc, run_id = start_step(venv_env, "die")
    killed(proc)
    assert tracking.get_run(run_id).info.status == "RUNNING"  # what MLflow leaves behind
    tags = tracking.get_run(run_id).data.tags
    assert artifacts.PID_TAG in tags  # lora_pipeline.tracking.runs.step_run records the process

    with step_run("download_snapshot", ds.Args()):  # the next start of any step
        pass
    run = tracking.get_run(run_id)
    assert run.info.status == "KILLED"
    assert run.data.tags[artifacts.STALE_REASON_TAG].startswith(f"process {proc.pid} on {socket.gethostname()} is gone")
    assert run.info.end_time is not None


def test_close_stale_runs_closes_only_dead_processes(tracking, venv_env):
    alive, alive_id = start_step(venv_env, "wait")
    dead, dead_id = start_step(venv_env, "die")  # (its own start checks the alive one)
    try:
        killed(dead)
        closed = stale.close_stale_runs()
        assert [r for r, _ in closed] == [dead_id]
        assert tracking.get_run(dead_id).info.status == "KILLED"
        assert tracking.get_run(alive_id).info.status == "RUNNING"  # its process is alive: untouched
    finally:
        alive.stdin.close()  # the step ends normally
        assert alive.wait(60) == 0
    assert tracking.get_run(alive_id).info.status == "FINISHED"
    assert stale.close_stale_runs() == []  # nothing left to close, and a second pass changes nothing


def test_a_reused_pid_is_not_mistaken_for_the_step(tracking):
    """The pid is alive, but it is another process (started later): the run is still stale."""
    me = psutil.Process(os.getpid())
    tags = {artifacts.HOST_TAG: socket.gethostname(), artifacts.PID_TAG: str(me.pid),
            artifacts.PID_STARTED_TAG: f"{me.create_time() - 3600:.3f}"}  # "our" process started an hour earlier
    assert "now belongs to another process" in stale.why_stale(tags)
    tags[artifacts.PID_STARTED_TAG] = f"{me.create_time():.3f}"
    assert stale.why_stale(tags) is None


def test_other_hosts_are_judged_by_heartbeat_only_when_asked(tracking):
    tags = {artifacts.HOST_TAG: "another-host", artifacts.PID_TAG: "1", artifacts.HEARTBEAT_TAG: f"{time.time() - 600:.0f}"}
    assert stale.why_stale(tags) is None  # a host we cannot see is never judged by default
    assert stale.why_stale(tags, heartbeat_timeout_s=900) is None
    assert "no heartbeat from another-host for 600s" in stale.why_stale(tags, heartbeat_timeout_s=300)


def test_children_without_a_process_follow_their_dead_parent(tracking, venv_env):
    """`main` creates each child run before the step's process starts; if main dies then, the child run
    has no process of its own and is closed with its parent."""
    parent_proc, parent_id = start_step(venv_env, "die")
    killed(parent_proc)
    exp = tracking.get_run(parent_id).info.experiment_id
    child = tracking.create_run(exp, tags={"mlflow.parentRunId": parent_id, artifacts.STEP_TAG: "finetune"})
    closed = dict(stale.close_stale_runs())
    assert set(closed) == {parent_id, child.info.run_id}
    assert closed[child.info.run_id].startswith(f"its parent run {parent_id} was closed")
    assert tracking.get_run(child.info.run_id).info.status == "KILLED"


def test_the_current_run_and_runs_of_other_tools_are_never_touched(tracking, monkeypatch):
    exp = mlflow.get_experiment_by_name("tests").experiment_id
    dead = {artifacts.HOST_TAG: socket.gethostname(), artifacts.PID_TAG: "999999999"}  # no such pid
    foreign = tracking.create_run(exp, tags=dict(dead))  # no pipeline.step tag: not this pipeline's
    handed = tracking.create_run(exp, tags={**dead, artifacts.STEP_TAG: "finetune"})
    monkeypatch.setenv("MLFLOW_RUN_ID", handed.info.run_id)  # what `mlflow run` hands to the step
    assert stale.close_stale_runs() == []
    assert tracking.get_run(foreign.info.run_id).info.status == "RUNNING"
    assert tracking.get_run(handed.info.run_id).info.status == "RUNNING"


def test_a_tracking_store_that_is_down_is_not_an_error_here(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    client = mlflow.MlflowClient(tracking_uri="http://127.0.0.1:9")
    assert stale.close_stale_runs(client, ["0"]) == []  # the step's own call reports the store

