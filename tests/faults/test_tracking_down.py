"""The tracking server stops mid-pipeline: the step fails with one clear line, and once the server is
back the pipeline resumes (finished steps reused, finetune from its last checkpoint).

The server is a real `mlflow server` (SQLite backend, proxied artifacts) on 127.0.0.1, started and
stopped by the test. MLflow's HTTP client retries 7 times with exponential backoff by default
(minutes); the pipeline here runs with MLFLOW_HTTP_REQUEST_MAX_RETRIES=1 / _TIMEOUT=5 so a stopped
server is noticed in seconds (the README says how to set them).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pytest

from lora_pipeline import artifacts
from lora_pipeline.tracking import version

from conftest import ROOT
from hubserver import free_port

pytestmark = pytest.mark.faults

QUICK_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}


class TrackingServer:
    """`mlflow server` on 127.0.0.1 over a SQLite file and an artifact folder that survive restarts."""

    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        self.log = open(self.root / "server.log", "a")
        self.proc = subprocess.Popen(
            [str(ROOT / ".venv" / "bin" / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
             "--artifacts-destination", str(self.root / "artifacts"), "--workers", "1"],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.root)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.root / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        raise AssertionError(f"mlflow server not up after {timeout}s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None


@pytest.fixture
def tracking_server(tmp_path, monkeypatch):
    root = tmp_path / "server"
    root.mkdir()
    server = TrackingServer(root)
    server.start()
    for k, v in QUICK_HTTP.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    mlflow.set_tracking_uri(server.uri)
    client = mlflow.MlflowClient(server.uri)
    exp = client.create_experiment("faults")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", exp)
    server.client, server.experiment_id = client, exp
    try:
        yield server
    finally:
        server.stop()


def _error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("error: ")]


def test_step_against_a_stopped_server_fails_with_one_line(tracking_server, tiny_model_dir, venv_env):
    tracking_server.stop()
    env = dict(venv_env, **QUICK_HTTP, MLFLOW_TRACKING_URI=tracking_server.uri)
    proc = subprocess.run([sys.executable, "-m", "steps.download_snapshot", "--model", str(tiny_model_dir)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = _error_lines(proc.stderr)
    assert len(errors) == 1 and f"tracking server {tracking_server.uri}" in errors[0], proc.stderr[-2000:]


def _runs(server, step: str) -> list:
    return server.client.search_runs([server.experiment_id], filter_string=f"tags.`{artifacts.STEP_TAG}` = '{step}'",
                                     order_by=["attributes.start_time ASC"])


@pytest.mark.slow
def test_server_stopped_mid_pipeline_then_resumed(tracking_server, tiny_model_dir, tmp_path, venv_env):
    import test_main  # the tiny-model settings and data of the main tests

    test_main._require_all_steps()
    data = test_main.write_dataset(tmp_path / "train.csv", 0, rows=80)
    argv = [sys.executable, "-m", "steps.main", "--model", str(tiny_model_dir), "--dataset", str(data)]
    for k, v in test_main.tiny_params(max_steps="40").items():
        argv += [f"--{k}", v]
    env = dict(venv_env, **QUICK_HTTP, MLFLOW_TRACKING_URI=tracking_server.uri, OMP_NUM_THREADS="1",
               MLFLOW_EXPERIMENT_ID=tracking_server.experiment_id, **{version.CODE_VERSION_ENV: "test-code"})
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 600
        stopped = False
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
            running = [r for r in _runs(tracking_server, "finetune") if r.info.status == "RUNNING"]
            if not running:
                continue
            models = tracking_server.client.search_logged_models(
                [tracking_server.experiment_id], filter_string=f"source_run_id = '{running[0].info.run_id}'")
            if any(m.name.startswith("checkpoint-") and str(m.status).endswith("READY") for m in models):
                tracking_server.stop()  # mid-training, after a checkpoint was logged
                stopped = True
                break
        assert stopped, "finetune never logged a checkpoint"
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    (tmp_path / "first-main.stderr").write_text(err)
    assert proc.returncode != 0
    errors = _error_lines(err)
    assert errors and "Traceback" not in err.split(errors[-1])[-1], err[-4000:]
    assert f"tracking server {tracking_server.uri}" in errors[-1], errors

    tracking_server.start()
    rerun = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    finetunes = _runs(tracking_server, "finetune")
    assert len(finetunes) == 2 and finetunes[1].data.params["resume_from"] == finetunes[0].info.run_id
    assert len(_runs(tracking_server, "download_snapshot")) == 1  # reused
    # Nothing is left RUNNING: the runs of the first attempt were closed (FAILED, or KILLED by the
    # next start when their process died with the server down).
    left = [r.info.run_id for r in tracking_server.client.search_runs([tracking_server.experiment_id])
            if r.info.status == "RUNNING"]
    assert left == []
