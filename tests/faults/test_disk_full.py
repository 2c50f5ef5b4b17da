"""Disk full while finetune logs a checkpoint: a clear error, and what was saved before stays intact.

The experiment's artifact store is a small tmpfs mounted by the test (root only; skipped with the
reason otherwise, a failure under CI=true). Training runs in this process on the tiny model; once the
first checkpoint is READY, a callback fills the tmpfs, so the next checkpoint's upload hits ENOSPC.
"""

from __future__ import annotations

import csv
import errno
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import mlflow
import pytest
import torch
from transformers import TrainerCallback

from lora_pipeline import artifacts
from lora_pipeline.errors import StepError
from steps import download_snapshot, finetune

from conftest import ROOT, skip_or_fail_in_ci

pytestmark = pytest.mark.faults


@pytest.fixture
def small_fs(tmp_path):
    """A 16 MiB tmpfs (the tiny model's checkpoints are ~0.3 MB each), unmounted after the test."""
    mount = tmp_path / "small-fs"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        skip_or_fail_in_ci("mounting a size-limited tmpfs needs root and mount(8)")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        skip_or_fail_in_ci(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill(path: Path, leave: int = 4096) -> Path:
    """Fill the file system holding `path`, leaving about `leave` bytes."""
    filler = path / f"filler-{uuid.uuid4().hex[:8]}"
    free = shutil.disk_usage(path).free
    with open(filler, "wb") as fh:
        chunk = b"\0" * (1 << 20)
        todo = max(0, free - leave)
        try:
            while todo > 0:
                todo -= fh.write(chunk[: min(len(chunk), todo)])
        except OSError as err:
            assert err.errno == errno.ENOSPC
    return filler


class FillAfterFirstCheckpoint(TrainerCallback):
    """Waits (in the training loop) until checkpoint-`step` is READY, then fills the disk."""

    def __init__(self, client, run_id_of, step: int, where: Path):
        self.client, self.run_id_of, self.step, self.where = client, run_id_of, step, where
        self.filled_at: int | None = None

    def on_step_end(self, args, state, control, **kw):
        if self.filled_at is not None or state.global_step <= self.step:
            return
        run_id = self.run_id_of()
        exp = self.client.get_run(run_id).info.experiment_id
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            models = self.client.search_logged_models([exp], filter_string=f"source_run_id = '{run_id}'")
            if any(m.name == f"checkpoint-{self.step}" and str(m.status).endswith("READY") for m in models):
                break
            time.sleep(0.2)
        fill(self.where)
        self.filled_at = state.global_step


def test_disk_full_while_logging_a_checkpoint(tracking, tiny_model_dir, tmp_path, small_fs, monkeypatch):
    torch.set_num_threads(1)  # restored by the next test's own setting; tiny matmuls only
    manifest = download_snapshot.run(download_snapshot.Args(model=str(tiny_model_dir))).manifest_uri
    exp = tracking.create_experiment("small-disk", artifact_location=(small_fs / "artifacts").as_uri())
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", exp)
    mlflow.set_experiment(experiment_id=exp)

    rows = sorted(csv.DictReader(open(ROOT / "data" / "sample.csv", encoding="utf-8")),
                  key=lambda r: len(r["ref"]))[:40]
    data = tmp_path / "small.csv"
    with open(data, "w", encoding="utf-8", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["mr", "ref"], lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    args = finetune.Args(manifest_uri=manifest, dataset=str(data), max_steps=8, batch_size=4, eval_steps=2,
                         save_steps=2, logging_steps=1, warmup_steps=0, max_seq_length=1024,
                         validation_fraction=0.25, learning_rate=5e-3, lr_scheduler="constant")

    def current_run() -> str:
        runs = tracking.search_runs([exp], filter_string="attributes.status = 'RUNNING'")
        return runs[0].info.run_id

    filler_cb = FillAfterFirstCheckpoint(tracking, current_run, 2, small_fs)
    with pytest.raises(StepError) as err:
        finetune.run(args, callbacks=[filler_cb])
    message = " ".join(str(err.value).split())
    assert filler_cb.filled_at is not None
    assert "No space left on device" in message, message
    assert "checkpoint-4" in message and "resume_from" in message, message

    run = tracking.search_runs([exp])[0]
    assert run.info.status == "FAILED"
    models = {m.name: m for m in tracking.search_logged_models([exp])}
    assert str(models["checkpoint-2"].status).endswith("READY")
    assert "checkpoint-4" not in models or not str(models["checkpoint-4"].status).endswith("READY")

    # Recovery: free the space; what was logged before the disk filled is intact (checkpoint-2 loads,
    # base digests checked), and finetune resumes from it.
    for f in small_fs.glob("filler-*"):
        f.unlink()
    assert mlflow.pyfunc.load_model(artifacts.model_uri(models["checkpoint-2"].model_id)) is not None
    import dataclasses

    resumed = finetune.run(dataclasses.replace(args, resume_from=run.info.run_id))
    assert int(tracking.get_run(resumed.run_id).data.tags["finetune.resumed_step"]) == 2
    assert resumed.global_step == 8
