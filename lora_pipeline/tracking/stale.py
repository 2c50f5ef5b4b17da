"""Close the RUNNING runs of this pipeline whose process is gone.

MLflow ends a run only when the process that started it ends it: after `kill -9`, an OOM kill, a
power cut or a closed laptop, the run stays RUNNING forever. That is wrong in the UI, and it also
hides the run from `main`, which resumes only FAILED/KILLED finetune runs (lora_pipeline.orchestration.stepcache).

So every step run records who runs it (`process_tags`, at step start):
  * `pipeline.host` (hostname), `pipeline.pid`, `pipeline.pid_started` (the process's start time,
    so a pid the kernel reused for another process is not mistaken for ours),
  * `pipeline.heartbeat` (unix seconds; refreshed by `Heartbeat` while the step runs, if started).
On the next start, `close_stale_runs` marks KILLED, with tag `pipeline.stale_reason`, every RUNNING
run of this pipeline (tag `pipeline.step` set) that is
  * on this host, and its process no longer exists (or the pid now belongs to another process);
  * on another host, and its heartbeat is older than `heartbeat_timeout_s` (off unless given: a host
    we cannot see is never judged by default);
  * without process tags (a child run `main` created before the step started) whose parent run is no
    longer RUNNING or was just closed here.
Runs of the current process, and the run `mlflow run` handed to it (MLFLOW_RUN_ID), are never touched.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterable, Sequence

from lora_pipeline import artifacts

log = logging.getLogger(__name__)

# psutil reports create_time with 1/100 s resolution (Linux clock ticks); a float round-trip through a
# tag string keeps 6 decimals. 1 s of tolerance is far above both and far below any pid reuse interval.
_START_TOLERANCE_S = 1.0
# How many RUNNING runs one start looks at: bounded so a huge team store never makes a step start slow.
_MAX_RUNS = 500


def _process_started(pid: int) -> float | None:
    """Start time (unix seconds) of a live process, or None if it does not exist or is a zombie."""
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:  # killed, not yet reaped by its parent: gone
            return None
        return proc.create_time()
    except (psutil.NoSuchProcess, ValueError):
        return None
    except psutil.AccessDenied:  # it exists, but we may not read its start time: -1 = "alive, unknown"
        return -1.0


def process_tags(pid: int | None = None) -> dict[str, str]:
    """Tags naming the process that runs a step (this one by default)."""
    pid = os.getpid() if pid is None else pid
    started = _process_started(pid)
    return {
        artifacts.HOST_TAG: socket.gethostname(),
        artifacts.PID_TAG: str(pid),
        artifacts.PID_STARTED_TAG: f"{started:.3f}" if started is not None else "",
        artifacts.HEARTBEAT_TAG: f"{time.time():.0f}",
    }


def why_stale(tags: dict[str, str], *, host: str | None = None, now: float | None = None,
              heartbeat_timeout_s: float | None = None) -> str | None:
    """Why the run with these tags is stale, or None if it may still be running (or we cannot tell)."""
    host = host or socket.gethostname()
    run_host, pid_text = tags.get(artifacts.HOST_TAG), tags.get(artifacts.PID_TAG, "")
    if not run_host or not pid_text.isdigit():
        return None  # not ours to judge by process (see close_stale_runs for parent-based closing)
    if run_host == host:
        pid = int(pid_text)
        started = _process_started(pid)
        if started is None:
            return f"process {pid} on {host} is gone (killed or crashed without ending the run)"
        recorded = tags.get(artifacts.PID_STARTED_TAG, "")
        if started >= 0 and recorded:
            try:
                if abs(started - float(recorded)) > _START_TOLERANCE_S:
                    return (f"process {pid} on {host} is gone (the pid now belongs to another process, "
                            f"started {started - float(recorded):+.0f}s later)")
            except ValueError:
                pass
        return None
    if heartbeat_timeout_s is None:
        return None
    beat = tags.get(artifacts.HEARTBEAT_TAG, "")
    try:
        age = (now or time.time()) - float(beat)
    except ValueError:
        return None
    if age > heartbeat_timeout_s:
        return (f"no heartbeat from {run_host} for {age:.0f}s (> {heartbeat_timeout_s:.0f}s): its "
                "process is presumed dead")
    return None


def _current_experiment_ids(client) -> list[str]:
    import mlflow

    run_id = os.environ.get("MLFLOW_RUN_ID")
    if run_id:
        try:
            return [client.get_run(run_id).info.experiment_id]
        except Exception:  # a bad MLFLOW_RUN_ID is reported by mlflow.start_run, not here
            pass
    if os.environ.get("MLFLOW_EXPERIMENT_ID"):
        return [os.environ["MLFLOW_EXPERIMENT_ID"]]
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME")
    if name:
        exp = mlflow.get_experiment_by_name(name)
        return [exp.experiment_id] if exp is not None else []
    return ["0"]  # MLflow's Default experiment


def close_stale_runs(client=None, experiment_ids: Sequence[str] | None = None, *,
                     heartbeat_timeout_s: float | None = None,
                     exclude: Iterable[str] = ()) -> list[tuple[str, str]]:
    """Mark the stale RUNNING runs of this pipeline KILLED; return [(run id, reason)].

    Never raises for a tracking problem: closing stale runs is housekeeping, and the step that calls
    it must still report its own (clearer) error if the store is down.
    """
    import mlflow

    try:
        client = client or mlflow.MlflowClient()
        exps = list(experiment_ids) if experiment_ids is not None else _current_experiment_ids(client)
        if not exps:
            return []
        runs = client.search_runs(exps, filter_string="attributes.status = 'RUNNING'",
                                  max_results=_MAX_RUNS)
    except Exception as err:  # store down / no such experiment: the caller's own call will say so
        log.debug("stale-run check skipped: %s", err)
        return []
    skip = set(exclude) | {os.environ.get("MLFLOW_RUN_ID", "")}
    active = mlflow.active_run()
    if active is not None:
        skip.add(active.info.run_id)
    mine = str(os.getpid())
    host = socket.gethostname()
    ours = [r for r in runs if artifacts.STEP_TAG in r.data.tags and r.info.run_id not in skip
            and not (r.data.tags.get(artifacts.HOST_TAG) == host and r.data.tags.get(artifacts.PID_TAG) == mine)]

    closed: dict[str, str] = {}
    for r in ours:  # runs that name their process
        reason = why_stale(r.data.tags, host=host, heartbeat_timeout_s=heartbeat_timeout_s)
        if reason:
            closed[r.info.run_id] = reason
    # Runs without process tags: `main` creates each child run before the step's process starts. Such a
    # run is stale when its parent is (closed just now, or already ended).
    status_of = {r.info.run_id: r.info.status for r in runs}
    for r in ours:
        if artifacts.PID_TAG in r.data.tags or r.info.run_id in closed:
            continue
        parent = r.data.tags.get(artifacts.PARENT_TAG)
        if not parent:
            continue
        if parent in closed:
            closed[r.info.run_id] = f"its parent run {parent} was closed ({closed[parent]})"
            continue
        if parent not in status_of:  # not RUNNING (or not in this search): look it up
            try:
                pstatus = client.get_run(parent).info.status
            except Exception:
                continue
            if pstatus != "RUNNING":
                closed[r.info.run_id] = (f"its parent run {parent} ended {pstatus} and the step's "
                                         "process never started or is gone")

    done = []
    for run_id, reason in closed.items():
        try:
            client.set_tag(run_id, artifacts.STALE_REASON_TAG, reason)
            client.set_terminated(run_id, "KILLED")
        except Exception as err:
            log.warning("could not close stale run %s: %s", run_id, err)
            continue
        log.warning("closed stale run %s as KILLED: %s", run_id, reason)
        done.append((run_id, reason))
    return done


class Heartbeat:
    """Refresh `pipeline.heartbeat` on a run every `interval_s` from a daemon thread.

    Only needed for stores shared by several hosts (team mode with `heartbeat_timeout_s`); a failed
    refresh is logged at debug level and retried at the next interval, never raised.
    """

    def __init__(self, run_id: str, interval_s: float = 60.0, client=None):
        self.run_id, self.interval_s, self._client = run_id, interval_s, client
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="pipeline-heartbeat", daemon=True)

    def _loop(self) -> None:
        import mlflow

        client = self._client or mlflow.MlflowClient()
        while not self._stop.wait(self.interval_s):
            try:
                client.set_tag(self.run_id, artifacts.HEARTBEAT_TAG, f"{time.time():.0f}")
            except Exception as err:
                log.debug("heartbeat of run %s failed: %s", self.run_id, err)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
