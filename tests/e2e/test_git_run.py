"""`mlflow run <git URL> --version <sha>`: the pipeline runs from a Git server, not only from a checkout.

The repository is served by `git daemon` on 127.0.0.1 (a `file://` URL would make MLflow use the
folder in place and record a local path as the source). The served commit is this working tree as
it is now (committed into a clone), so the test checks the code under test, not the last commit.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from lora_pipeline import artifacts

from conftest import ROOT, VENV_BIN

pytestmark = pytest.mark.slow

_GIT_ID = ["-c", "user.email=tests@example.com", "-c", "user.name=tests"]


def _git(cwd: Path, *argv: str) -> str:
    return subprocess.run(["git", *_GIT_ID, *argv], cwd=cwd, check=True, capture_output=True,
                          text=True).stdout.strip()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(git URL, full sha) of this working tree committed and served by `git daemon`."""
    work = tmp_path_factory.mktemp("git")
    src = work / "src"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(src)], check=True, capture_output=True)
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, check=True, capture_output=True).stdout.split(b"\0")
    for rel in filter(None, (r.decode() for r in listed)):
        here, there = ROOT / rel, src / rel
        if here.is_file():
            there.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(here, there)
        elif there.exists():  # deleted in the working tree
            there.unlink()
    _git(src, "add", "-A")
    _git(src, "commit", "-q", "--allow-empty", "-m", "working tree under test")
    sha = _git(src, "rev-parse", "HEAD")
    base = work / "served"
    subprocess.run(["git", "clone", "-q", "--bare", str(src), str(base / "pipeline.git")], check=True,
                   capture_output=True)
    port = _free_port()
    daemon = subprocess.Popen(["git", "daemon", "--reuseaddr", "--export-all", f"--base-path={base}",
                               "--listen=127.0.0.1", f"--port={port}", str(base)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or daemon.poll() is not None:
                    raise RuntimeError("git daemon did not start") from None
                time.sleep(0.2)
        yield f"git://127.0.0.1:{port}/pipeline.git", sha
    finally:
        daemon.terminate()
        daemon.wait(timeout=10)


def _mlflow_run(url: str, *argv: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.pop("PYTHONPATH", None)  # the code must come from the clone, not from this checkout
    env.pop("MLFLOW_GIT_COMMIT", None)
    return subprocess.run([str(VENV_BIN / "mlflow"), "run", url, *argv], env=env, capture_output=True,
                          text=True, timeout=timeout)


def _all_runs(client) -> list:
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_step_runs_from_a_git_url_at_a_full_sha(served, tracking, tiny_model_dir):
    url, sha = served
    proc = _mlflow_run(url, "--version", sha, "-e", "download_snapshot", "--env-manager", "local",
                       "-P", f"model={tiny_model_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = _all_runs(tracking)
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert tags["mlflow.source.git.commit"] == sha
    assert tags["mlflow.source.name"] == url  # the Git URL, not a temp checkout path
    assert tags[artifacts.GIT_COMMIT_TAG] == sha  # a clean checkout of exactly that commit
    manifest = artifacts.get_outputs(run)["manifest"]
    assert manifest == artifacts.manifest_uri(run.info.run_id)


def test_unknown_version_is_a_clear_error(served, tracking):
    url, _ = served
    missing = "0123456789abcdef0123456789abcdef01234567"
    proc = _mlflow_run(url, "--version", missing, "-e", "download_snapshot", "--env-manager", "local",
                       timeout=120)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert f"Unable to checkout version '{missing}'" in out
    assert _all_runs(tracking) == []


def test_scheduled_main_from_git_retrains_only_when_inputs_change(served, tracking, tiny_model_dir,
                                                                  tmp_path):
    """What a scheduled job does: `mlflow run <git URL> --version <sha> -e main`, again and again."""
    from test_main import _require_all_steps, runs_of, tiny_params, write_dataset

    _require_all_steps()
    url, sha = served
    data = write_dataset(tmp_path / "train.csv", 0)
    flags = ["--version", sha, "-e", "main", "--env-manager", "local", "-P", f"model={tiny_model_dir}",
             "-P", f"dataset={data}"]
    for k, v in tiny_params().items():
        flags += ["-P", f"{k}={v}"]

    first = _mlflow_run(url, *flags)
    assert first.returncode == 0, first.stderr[-3000:]
    (main_run,) = runs_of(tracking, "main")
    assert main_run.info.status == "FINISHED"
    children = {r.data.tags[artifacts.STEP_TAG]: r for r in _all_runs(tracking)
                if r.data.tags.get("mlflow.parentRunId") == main_run.info.run_id}
    assert set(children) == {"download_snapshot", "finetune", "log_reference", "evaluate_checkpoint",
                             "persist_and_register"}
    for child in children.values():
        assert child.info.status == "FINISHED"
        assert child.data.tags["mlflow.source.name"] == url
        assert child.data.tags[artifacts.GIT_COMMIT_TAG] == sha
    registered = artifacts.get_outputs(main_run)["registered"]
    assert registered.startswith("models:/")

    # Nothing changed: the next scheduled run trains nothing and reports the same model.
    second = _mlflow_run(url, *flags)
    assert second.returncode == 0, second.stderr[-3000:]
    assert len(runs_of(tracking, "finetune")) == 1
    last_main = runs_of(tracking, "main")[-1]
    assert last_main.data.metrics["steps_cached"] == 5
    assert artifacts.get_outputs(last_main)["registered"] == registered

    # New data in the same file: fine-tuning (and what follows it) reruns; the base is reused.
    write_dataset(data, 40)
    third = _mlflow_run(url, *flags)
    assert third.returncode == 0, third.stderr[-3000:]
    assert len(runs_of(tracking, "finetune")) == 2
    assert len(runs_of(tracking, "download_snapshot")) == 1
