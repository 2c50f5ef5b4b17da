"""Secrets in the environment never reach the tracking store or the logs.

`HF_TOKEN` and MLflow's basic-auth credentials are set to sentinels; the step (or the whole pipeline)
runs against the local Hub, which must see the token (else the test proves nothing); then every
param, tag, metric name, dataset input, logged and registered model, every artifact file, the raw
store files and every captured log line are searched for the sentinels (tests/faults/secscan.py).
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from faults.conftest import REPO
from faults.secscan import scan_paths, scan_store
from lora_pipeline.tracking import version
from steps import download_snapshot as ds

pytestmark = pytest.mark.faults

HF_SENTINEL = "hf_SENTINELfaults0123456789abcdef"
PASSWORD_SENTINEL = "pw-SENTINEL-faults-7d1c"
SENTINELS = (HF_SENTINEL, PASSWORD_SENTINEL)


@pytest.fixture
def secrets_env(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", HF_SENTINEL)
    # Read by MLflow's HTTP client only; a SQLite store ignores them, which is exactly the case where
    # nothing would notice them being copied somewhere (an environment dump, a logged config).
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD_SENTINEL)
    # The user name is not a secret: MLflow records it as the `mlflow.user` tag of every run, by design.
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "faults-tester")


def assert_nowhere(client, tmp_path: Path, texts: dict[str, str]) -> dict[str, int]:
    found, seen = [], {}
    for s in SENTINELS:
        where, seen = scan_store(client, s)
        found += [f"{s}: {w}" for w in where]
        files, n = scan_paths([tmp_path / "mlflow.db", tmp_path / "mlartifacts"], s)
        found += [f"{s}: file {f}" for f in files]
        found += [f"{s}: {name}" for name, text in texts.items() if s in text]
    seen["store_files"] = n
    assert found == [], "\n".join(found)
    return seen


def test_download_snapshot_never_stores_the_token(tracking, faulty_hub, secrets_env, tmp_path, capsys,
                                                  caplog):
    caplog.set_level(logging.DEBUG)
    assert ds.main(["--model", REPO, "--revision", "main", "--copy_hub_weights", "true"]) == 0
    out = capsys.readouterr()
    assert f"Bearer {HF_SENTINEL}" in faulty_hub.authorizations  # the token was really in use
    seen = assert_nowhere(tracking, tmp_path, {"stdout": out.out, "stderr": out.err,
                                               "log records": "\n".join(r.getMessage() for r in caplog.records)})
    # The scan looked at something: one run with params and tags, the copied weights as artifacts.
    assert seen["runs"] == 1 and seen["params"] >= 5 and seen["tags"] >= 5 and seen["artifact_files"] >= 5
    assert seen["store_files"] >= 5


def test_the_scan_finds_a_planted_secret(tracking, tmp_path):
    """The scanner itself: a sentinel put in a param, a tag, a metric name and an artifact is found."""
    import mlflow

    with mlflow.start_run() as run:
        mlflow.log_param("p", f"x{HF_SENTINEL}x")
        mlflow.set_tag("t", HF_SENTINEL)
        mlflow.log_metric(f"m_{PASSWORD_SENTINEL}", 1.0)
        mlflow.log_text(f"line\n{PASSWORD_SENTINEL}\n", "logs/out.txt")
    where = {s: scan_store(tracking, s)[0] for s in SENTINELS}
    rid = run.info.run_id
    assert f"run {rid} param p" in where[HF_SENTINEL] and f"run {rid} tag t" in where[HF_SENTINEL]
    assert f"run {rid} metric name m_{PASSWORD_SENTINEL}" in where[PASSWORD_SENTINEL]
    assert f"run {rid} artifact logs/out.txt" in where[PASSWORD_SENTINEL]
    assert scan_paths([tmp_path / "mlflow.db"], HF_SENTINEL)[0]  # the raw database too


@pytest.mark.slow
def test_the_whole_pipeline_never_stores_the_token(tracking, faulty_hub, secrets_env, tmp_path, venv_env):
    """`main` with every step as its own process (mlflow.projects.run), base from the Hub with a token."""
    import test_main  # the tiny-model settings and data of the main tests


    test_main._require_all_steps()
    data = test_main.write_dataset(tmp_path / "train.csv", 0, rows=40)
    argv = [sys.executable, "-m", "steps.main", "--model", REPO, "--revision", faulty_hub.sha,
            "--dataset", str(data), "--copy_hub_weights", "true"]
    for k, v in test_main.tiny_params().items():
        argv += [f"--{k}", v]
    env = {**venv_env, version.CODE_VERSION_ENV: "test-code", "E2E_LORA_LOG_LEVEL": "DEBUG"}
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"Bearer {HF_SENTINEL}" in faulty_hub.authorizations
    seen = assert_nowhere(tracking, tmp_path, {"stdout": proc.stdout, "stderr": proc.stderr})
    assert seen["runs"] >= 6 and seen["logged_models"] >= 2 and seen["registered_versions"] >= 1
