"""`kill -9` of finetune mid-training: the rerun resumes from the last logged checkpoint, losing at most
one save interval plus the checkpoint whose upload was in flight (two intervals); the killed run is
closed as KILLED by the next start, not left RUNNING.

The step runs as its own process (`python -m steps.finetune`, as `mlflow run -e finetune` starts it) on
the tiny model; SIGKILL arrives at an arbitrary point after the second checkpoint is READY.
"""

from __future__ import annotations

import csv
import signal
import subprocess
import sys
import time

import mlflow
import pytest

from lora_pipeline import artifacts
from steps import download_snapshot, finetune

from conftest import ROOT

pytestmark = [pytest.mark.faults, pytest.mark.slow]

SAVE_STEPS = 4


def small_csv(path):
    """The 40 shortest sentences of the project's sample (tiny-model sequences are ~300 tokens)."""
    rows = sorted(csv.DictReader(open(ROOT / "data" / "sample.csv", encoding="utf-8")),
                  key=lambda r: len(r["ref"]))[:40]
    with open(path, "w", encoding="utf-8", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["mr", "ref"], lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    return path


def checkpoints(client, run_id: str) -> dict[int, object]:
    exp = client.get_run(run_id).info.experiment_id
    models = client.search_logged_models([exp], filter_string=f"source_run_id = '{run_id}'")
    return {int(m.name.split("-")[1]): m for m in models if m.name.startswith("checkpoint-")}


def last_logged_step(client, run_id: str) -> int:
    return max((m.step for m in client.get_metric_history(run_id, "loss")), default=0)


def test_killed_finetune_resumes_from_its_last_checkpoint(tracking, tiny_model_dir, tmp_path, venv_env):
    manifest = download_snapshot.run(download_snapshot.Args(model=str(tiny_model_dir))).manifest_uri
    data = small_csv(tmp_path / "small.csv")
    common = ["--manifest_uri", manifest, "--dataset", str(data), "--max_steps", "200", "--batch_size", "4",
              "--eval_steps", "2", "--save_steps", str(SAVE_STEPS), "--logging_steps", "1",
              "--warmup_steps", "0", "--max_seq_length", "1024", "--validation_fraction", "0.25",
              "--learning_rate", "5e-3", "--lr_scheduler", "constant"]
    env = dict(venv_env, OMP_NUM_THREADS="1")  # tiny matmuls: a second thread only spins
    proc = subprocess.Popen([sys.executable, "-m", "steps.finetune", *common], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    run_id = None
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
            running = [r for r in tracking.search_runs([tracking.get_experiment_by_name("tests").experiment_id])
                       if r.data.tags.get(artifacts.STEP_TAG) == "finetune" and r.info.status == "RUNNING"]
            if not running:
                continue
            run_id = running[0].info.run_id
            ready = [s for s, m in checkpoints(tracking, run_id).items() if str(m.status).endswith("READY")]
            if len(ready) >= 2:
                break
        assert proc.poll() is None, f"finetune ended before the kill: {proc.stderr.read()[-3000:]}"
        assert run_id is not None, "no finetune run appeared"
        time.sleep(1.3)  # an arbitrary point of the next save interval
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    assert tracking.get_run(run_id).info.status == "RUNNING"  # what MLflow leaves behind
    killed_at = last_logged_step(tracking, run_id)  # every step logs its loss: the step it died in
    ready = sorted(s for s, m in checkpoints(tracking, run_id).items() if str(m.status).endswith("READY"))
    unfinished = sorted(s for s, m in checkpoints(tracking, run_id).items() if not str(m.status).endswith("READY"))

    resumed = finetune.run(finetune.Args(
        manifest_uri=manifest, dataset=str(data), max_steps=ready[-1] + 2, batch_size=4, eval_steps=2,
        save_steps=2, logging_steps=1, warmup_steps=0, max_seq_length=1024, validation_fraction=0.25,
        learning_rate=5e-3, lr_scheduler="constant", resume_from="last"))

    run = tracking.get_run(resumed.run_id)
    assert run.data.tags[artifacts.RESUMED_FROM_TAG] == run_id
    assert int(run.data.tags["finetune.resumed_step"]) == ready[-1]  # the newest READY checkpoint
    assert min(m.step for m in tracking.get_metric_history(resumed.run_id, "loss")) == ready[-1] + 1
    lost = killed_at - ready[-1]
    # One save interval, plus the checkpoint whose upload was in flight when the kill came (logging is
    # asynchronous, at most one checkpoint in flight): at most two intervals.
    assert 0 <= lost <= 2 * SAVE_STEPS, (killed_at, ready, unfinished)
    assert len(unfinished) <= 1  # a PENDING/FAILED checkpoint is never resumed from (checked above)
    killed = tracking.get_run(run_id)
    assert killed.info.status == "KILLED", killed.info.status
    assert killed.data.tags[artifacts.STALE_REASON_TAG].startswith(f"process {proc.pid} ")
    # The checkpoints the killed run logged stay loadable (the rerun started from one of them).
    assert mlflow.pyfunc.load_model(artifacts.model_uri(checkpoints(tracking, run_id)[ready[-1]].model_id))
