"""persist_and_register, the persisting half: streamed verified copy, offline reload with equal logits,
an interrupted persist, a corrupt base, serving the registered model.

Helpers here (`make_candidate`, `logits_of`, ...) are shared with tests/test_registry_gate.py.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from lora_pipeline import artifacts
from lora_pipeline.base import transfer
from lora_pipeline.base.manifest import FileEntry, Manifest
from lora_pipeline.errors import StepError
from lora_pipeline.registry import persist
from steps import persist_and_register as par

from conftest import ROOT, runs_with_status

SENTENCES = ["The Punter is a coffee shop near Café Sicilia.", "Blue Spice serves cheap food."]

# Run in a fresh interpreter: load a pyfunc model, compute the logits of SENTENCES, save them.
LOGITS_SCRIPT = r"""
import sys
import mlflow, numpy as np, torch
from lora_pipeline.task.e2e import format_prompt
uri, out = sys.argv[1], sys.argv[2]
sentences = sys.argv[3:]
ext = mlflow.pyfunc.load_model(uri).unwrap_python_model()
tok = ext.tokenizer
enc = tok([format_prompt(tok, s) for s in sentences], return_tensors="pt", padding=True,
          add_special_tokens=False)
with torch.inference_mode():
    np.save(out, ext.model(**enc).logits.float().numpy())
"""


# --- helpers (also used by test_registry_gate.py) ------------------------------------------------------
def snapshot(tiny_model_dir: Path):
    from lora_pipeline.base.manifest import load_manifest
    from steps import download_snapshot

    res = download_snapshot.run(download_snapshot.Args(model=str(tiny_model_dir)))
    return SimpleNamespace(run_id=res.run_id, manifest=load_manifest(res.manifest_uri))


def make_adapter(tiny_model_dir: Path, out: Path, seed: int) -> Path:
    """A random LoRA adapter (B != 0, so it changes the logits) for the tiny base."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                init_lora_weights=False))
        peft.save_pretrained(out)
    return out


def make_candidate(tmp_path: Path, tiny_model_dir: Path, snap, *, seed: int = 1,
                   metrics: dict[str, float] | None = None, dataset_digest: str = "d" * 64,
                   task_spec: dict | None = None):
    """What the pipeline leaves before persist_and_register: a finetune run with a checkpoint model,
    a reference model logged by a log_reference run (tag pipeline.source_model), and an evaluation
    run that logged metrics on the reference model."""
    import mlflow

    from lora_pipeline.model import serving

    adapter = make_adapter(tiny_model_dir, tmp_path / f"adapter-{seed}", seed)
    with mlflow.start_run() as ft:
        mlflow.set_tags({artifacts.STEP_TAG: "finetune", artifacts.DATASET_DIGEST_TAG: dataset_digest})
        ckpt = serving.log_e2e_model(artifacts.checkpoint_model_name(1), snap.manifest,
                                     adapter_dir=adapter, step=1, with_input_example=False,
                                     task_spec=task_spec)
    with mlflow.start_run():
        mlflow.set_tags({artifacts.STEP_TAG: "log_reference"})
        ref = serving.log_e2e_model(artifacts.REFERENCE_MODEL_NAME, snap.manifest, adapter_dir=adapter,
                                    tags={artifacts.SOURCE_MODEL_TAG: artifacts.model_uri(ckpt.model_id)},
                                    with_input_example=False, task_spec=task_spec)
    eval_run = None
    if metrics:
        with mlflow.start_run() as eval_run:
            mlflow.set_tags({artifacts.STEP_TAG: "evaluate_checkpoint"})
            mlflow.log_metrics(metrics, model_id=ref.model_id)
            mlflow.MlflowClient().set_logged_model_tags(ref.model_id,
                                                        {artifacts.EVAL_RUN_TAG: eval_run.info.run_id})
    return SimpleNamespace(model_id=ref.model_id, uri=artifacts.model_uri(ref.model_id),
                           finetune_run_id=ft.info.run_id,
                           eval_run_id=eval_run.info.run_id if eval_run else "", adapter=adapter)


GOOD = {"slot_f1": 0.80, "base_slot_f1": 0.30, "exact_match": 0.5, "base_exact_match": 0.1}


def logits_of(uri: str, out: Path, env: dict[str, str]):
    """Logits of SENTENCES from `uri` loaded in a fresh process with `env`."""
    import numpy as np

    proc = subprocess.run([sys.executable, "-c", LOGITS_SCRIPT, uri, str(out), *SENTENCES], env=env,
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise AssertionError(f"loading {uri} failed:\n{proc.stderr[-3000:]}")
    return np.load(out)


def logits_here(uri: str):
    """The same logits, computed in this process (where a fresh process is not the point)."""
    import mlflow
    import torch

    from lora_pipeline.task.e2e import format_prompt

    ext = mlflow.pyfunc.load_model(uri).unwrap_python_model()
    tok = ext.tokenizer
    enc = tok([format_prompt(tok, s) for s in SENTENCES], return_tensors="pt", padding=True,
              add_special_tokens=False)
    with torch.inference_mode():
        return ext.model(**enc).logits.float().numpy()


def offline_env(venv_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """No Hub (offline + a closed endpoint) and an empty pipeline cache: only what is in the model."""
    env = dict(venv_env)
    env.update(HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9",
               E2E_LORA_CACHE=str(tmp_path / "empty-cache"), HF_HOME=str(tmp_path / "empty-hf"))
    return env


def remove_snapshot_run(client, run_id: str) -> None:
    import shutil

    from lora_pipeline.registry.persist import local_path_of

    root = local_path_of(client.get_run(run_id).info.artifact_uri)
    assert root is not None and (root / artifacts.SNAPSHOT_FILES_DIR).is_dir()
    shutil.rmtree(root)
    client.delete_run(run_id)


def versions(client, name: str) -> list:
    return client.search_model_versions(f"name = '{name}'")


# --- the streaming copy --------------------------------------------------------------------------------
def _entry_for(path: Path) -> FileEntry:
    return FileEntry(path.name, path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest())


def _manifest(entry: FileEntry) -> Manifest:
    return Manifest(source="local", task="text-generation", architecture="x", files=[entry],
                    has_chat_template=False, artifact_uri="runs:/0/snapshot/files")


def _copy(src: Path, dst: Path, entry: FileEntry, on_progress=None) -> None:
    persist.copy_verified_tree(src.parent, dst.parent, _manifest(entry), on_progress)


def test_verified_copy_streams_in_chunks_and_renames_only_when_verified(tmp_path):
    src = tmp_path / "src" / "model.safetensors"
    src.parent.mkdir()
    src.write_bytes(os.urandom(2 * transfer.COPY_CHUNK + 123))
    entry = _entry_for(src)
    chunks = []
    dst = tmp_path / "dst" / "model.safetensors"
    _copy(src, dst, entry, chunks.append)
    assert dst.read_bytes() == src.read_bytes()
    assert chunks == [transfer.COPY_CHUNK] * 2 + [123]
    assert not list(dst.parent.glob("*.partial"))


def test_verified_copy_refuses_a_file_that_differs_from_the_manifest(tmp_path):
    src = tmp_path / "model.safetensors"
    src.write_bytes(b"x" * 10_000)
    entry = _entry_for(src)
    src.write_bytes(b"y" * 10_000)  # same size, other bytes
    dst = tmp_path / "out" / "model.safetensors"
    with pytest.raises(StepError, match=r"digest mismatch for base file model.safetensors .* sha256 "
                                        r"\w+… != \w+… in the manifest"):
        _copy(src, dst, entry)
    assert not dst.exists() and not list(dst.parent.glob("*"))
    src.write_bytes(b"y" * 9_999)
    with pytest.raises(StepError, match=r"size 9999 != 10000 in the manifest"):
        _copy(src, dst, entry)
    assert not list(dst.parent.glob("*"))  # refused before a byte was written


class _CorruptingReader(io.RawIOBase):
    """A source file whose reads lose or change bytes on the way: the copy must notice."""

    def __init__(self, f, how: str):
        self._f, self._how = f, how

    def readinto(self, b):
        n = self._f.readinto(b)
        if n and self._how == "flip":
            b[n // 2] ^= 0x01  # one bit of the chunk, as a bad read would
        elif n and self._how == "short":
            return 0  # the file ends early
        return n

    def fileno(self):
        return self._f.fileno()

    def close(self):
        self._f.close()
        super().close()


@pytest.mark.parametrize("how, pattern", [("flip", r"sha256 \w+… != \w+… in the manifest"),
                                          ("short", r"changed while it was copied")])
def test_a_byte_corrupted_or_lost_during_the_copy_is_caught(tmp_path, monkeypatch, how, pattern):
    """The digest is of the bytes read for the copy (one read): a changed or missing byte on the way
    is a mismatch, and the file never gets its name."""
    src = tmp_path / "src" / "model.safetensors"
    src.parent.mkdir()
    src.write_bytes(os.urandom(transfer.COPY_CHUNK + 999))
    entry = _entry_for(src)
    real_open = open

    def corrupting_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return _CorruptingReader(f, how) if "r" in mode else f

    monkeypatch.setattr(transfer, "open", corrupting_open, raising=False)
    dst = tmp_path / "dst" / "model.safetensors"
    with pytest.raises(StepError, match=pattern):
        _copy(src, dst, entry)
    assert not list(dst.parent.glob("*"))


def test_persisting_reads_each_base_byte_once(tracking, tiny_model_dir, snap, tmp_path, monkeypatch):
    """No hashing pass and no read-back: the base's bytes are read once, by the verified copy."""
    import lora_pipeline.base.manifest as manifest_mod

    cand = make_candidate(tmp_path, tiny_model_dir, snap, metrics=GOOD)
    src = persist.local_path_of(tracking.get_run(snap.run_id).info.artifact_uri) / artifacts.SNAPSHOT_FILES_DIR
    read: dict[str, int] = {}
    real_open = open

    class Counting(io.RawIOBase):
        def __init__(self, f, name):
            self._f, self._name = f, name

        def readinto(self, b):
            n = self._f.readinto(b)
            read[self._name] = read.get(self._name, 0) + (n or 0)
            return n

        def fileno(self):
            return self._f.fileno()

        def close(self):
            self._f.close()
            super().close()

    def counting_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return Counting(f, Path(path).name) if "r" in mode and Path(path).is_relative_to(src) else f

    def no_hashing_pass(*a, **k):
        raise AssertionError("a base file was hashed apart from its copy")

    monkeypatch.setattr(transfer, "open", counting_open, raising=False)
    monkeypatch.setattr(persist, "sha256_file", no_hashing_pass)
    monkeypatch.setattr(manifest_mod, "sha256_file", no_hashing_pass)
    res = par.run(par.Args(model_uri=cand.uri, registered_name="e2e-once"))
    assert res.persisted_bytes == snap.manifest.total_bytes
    assert read == {Path(e.path).name: e.size for e in snap.manifest.files}


# --- the step ------------------------------------------------------------------------------------------
@pytest.fixture
def snap(tracking, tiny_model_dir):
    return snapshot(tiny_model_dir)


def test_registered_model_loads_offline_without_snapshot_with_equal_logits(
        tracking, tiny_model_dir, snap, tmp_path, venv_env, monkeypatch):
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from lora_pipeline.model.serving import load_tokenizer
    from lora_pipeline.task.e2e import format_prompt

    cand = make_candidate(tmp_path, tiny_model_dir, snap, metrics=GOOD)
    before = logits_here(cand.uri)

    res = par.run(par.Args(model_uri=cand.uri, registered_name="e2e-tiny"))
    assert (res.version, res.alias, res.decision) == ("1", "champion", "promote")

    # The persisted model holds every base file, byte-identical to the manifest.
    persisted = tracking.get_logged_model(artifacts.parse_model_id_uri(res.persisted_model_uri))
    assert str(persisted.status) == "READY"
    base_dir = persist.local_path_of(persisted.artifact_location) / "artifacts" / "base"
    assert sorted(p.name for p in base_dir.iterdir()) == sorted(f.path for f in snap.manifest.files)
    for f in snap.manifest.files:
        assert hashlib.sha256((base_dir / f.path).read_bytes()).hexdigest() == f.sha256
    assert not (persist.local_path_of(persisted.artifact_location) / "artifacts" / "trainer_state").exists()

    remove_snapshot_run(tracking, snap.run_id)
    env = offline_env(venv_env, tmp_path)
    after = logits_of("models:/e2e-tiny@champion", tmp_path / "after.npy", env)
    assert after.shape == before.shape
    assert float(np.abs(after - before).max()) <= 1e-4

    # Controls: without the snapshot run and the cache, the reference-only source cannot load (the
    # base really is gone), and the adapter matters (equal logits are not just the base's).
    monkeypatch.setenv("E2E_LORA_CACHE", str(tmp_path / "empty-cache-here"))
    with pytest.raises(StepError, match="snapshot run's artifacts are gone"):
        logits_here(cand.uri)
    tok = load_tokenizer(tiny_model_dir)
    enc = tok([format_prompt(tok, s) for s in SENTENCES], return_tensors="pt", padding=True,
              add_special_tokens=False)
    with torch.inference_mode():
        base_logits = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)(**enc).logits
    assert float(np.abs(base_logits.numpy() - before).max()) > 1e-3

    # Lineage on the version.
    tags = tracking.get_model_version("e2e-tiny", "1").tags
    assert tags["lineage.base_reference"] == snap.manifest.reference()
    assert tags["lineage.base_manifest_digest"] == snap.manifest.digest()
    assert tags["lineage.finetune_run_id"] == cand.finetune_run_id
    assert tags["lineage.dataset_digest"] == "d" * 64
    assert tags["lineage.eval_run_id"] == cand.eval_run_id
    assert tags["lineage.pipeline_git_commit"] not in ("", "unknown")
    assert tags["lineage.source_model"] == cand.uri
    assert float(tags["eval.slot_f1"]) == GOOD["slot_f1"]
    run_tags = tracking.get_run(res.run_id).data.tags
    assert run_tags["pipeline.output.registered"] == "models:/e2e-tiny/1"
    assert run_tags["pipeline.output.alias"] == "champion"


def _wait_for(predicate, timeout: float, what: str, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended (rc {proc.returncode}) before {what}:\n"
                                 f"{proc.stderr.read()[-3000:] if proc.stderr else ''}")
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_killed_persist_leaves_no_version_and_rerun_completes(tracking, tiny_model_dir, snap, tmp_path,
                                                              venv_env):
    import numpy as np

    cand = make_candidate(tmp_path, tiny_model_dir, snap, metrics=GOOD)
    before = logits_here(cand.uri)
    env = dict(venv_env, **{persist.THROTTLE_ENV: "1.5"})  # 1.5 s after each chunk: ~9 s of copying
    proc = subprocess.Popen([sys.executable, "-m", "steps.persist_and_register", "--model_uri", cand.uri,
                             "--registered_name", "e2e-kill"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    models_dir = tmp_path / "mlartifacts"
    try:
        # Kill as soon as the first base file has landed: the copy is under way, far from done.
        _wait_for(lambda: any(not p.name.endswith(persist.PARTIAL_SUFFIX)
                              for p in models_dir.glob("**/models/*/artifacts/artifacts/base/*")),
                  180, "the first base file", proc)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL

    assert versions(tracking, "e2e-kill") == []
    pending = [m for m in tracking.search_logged_models([tracking.get_experiment_by_name("tests").experiment_id])
               if m.name == artifacts.PERSISTED_MODEL_NAME]
    assert len(pending) == 1 and str(pending[0].status) == "PENDING"
    half = persist.local_path_of(pending[0].artifact_location)
    landed = [p for p in (half / "artifacts" / "base").iterdir() if not p.name.endswith(".partial")]
    assert 0 < len(landed) < len(snap.manifest.files), "the kill was not in the middle of the copy"
    assert not (half / "MLmodel").exists()  # never loadable half-written

    res = par.run(par.Args(model_uri=cand.uri, registered_name="e2e-kill"))
    assert [v.version for v in versions(tracking, "e2e-kill")] == [1]
    assert res.registered_uri == "models:/e2e-kill/1" and res.persisted_bytes == snap.manifest.total_bytes
    assert not half.exists()  # the unfinished copy was discarded
    leftover = tracking.get_logged_model(pending[0].model_id)
    assert str(leftover.status) == "FAILED"
    assert tracking.get_run(leftover.source_run_id).info.status == "KILLED"
    after = logits_here("models:/e2e-kill@champion")
    assert float(np.abs(after - before).max()) <= 1e-4


def test_corrupt_base_fails_with_one_line_and_registers_nothing(tracking, tiny_model_dir, snap, tmp_path,
                                                                capsys):
    cand = make_candidate(tmp_path, tiny_model_dir, snap, metrics=GOOD)
    files = persist.local_path_of(tracking.get_run(snap.run_id).info.artifact_uri) / artifacts.SNAPSHOT_FILES_DIR
    weights = files / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, one bit pattern changed
    weights.write_bytes(bytes(data))

    rc = par.main(["--model_uri", cand.uri, "--registered_name", "e2e-bad"])
    # Log lines go to stderr too; the error itself is exactly one line.
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert rc == 1
    assert len(err) == 1, err
    assert err[0].startswith("error: digest mismatch for base file model.safetensors")
    assert "while persisting" in err[0]  # found by the verified copy itself
    assert tracking.search_registered_models() == []
    persisted = [m for m in tracking.search_logged_models([tracking.get_experiment_by_name("tests").experiment_id])
                 if m.name == artifacts.PERSISTED_MODEL_NAME]
    assert len(persisted) == 1 and str(persisted[0].status) == "FAILED"
    assert not persist.local_path_of(persisted[0].artifact_location).exists()
    assert runs_with_status(tracking, "FAILED")[0].data.tags[artifacts.STEP_TAG] == par.ENTRY_POINT


def test_corrupt_adapter_fails_before_copying_and_registers_nothing(tracking, tiny_model_dir, snap,
                                                                    tmp_path, capsys):
    cand = make_candidate(tmp_path, tiny_model_dir, snap, metrics=GOOD)
    stored = persist.local_path_of(tracking.get_logged_model(cand.model_id).artifact_location)
    found = list(stored.rglob("adapter_model.safetensors"))
    assert len(found) == 1, found
    data = bytearray(found[0].read_bytes())
    data[len(data) // 2] ^= 0xFF  # tensor data, not the header: the file still parses
    found[0].write_bytes(bytes(data))

    rc = par.main(["--model_uri", cand.uri, "--registered_name", "e2e-bad-adapter"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert rc == 1
    assert len(err) == 1, err
    assert err[0].startswith(f"error: digest mismatch for adapter file adapter_model.safetensors of "
                             f"{cand.uri}: sha256 ")
    assert tracking.search_registered_models() == []
    persisted = [m for m in tracking.search_logged_models([tracking.get_experiment_by_name("tests").experiment_id])
                 if m.name == artifacts.PERSISTED_MODEL_NAME]
    # Refused before a single base byte was copied.
    assert all(not (persist.local_path_of(m.artifact_location) / "artifacts" / "base").exists()
               for m in persisted)


def test_mlflow_models_serve_answers_a_batch(tracking, tiny_model_dir, snap, tmp_path, venv_env):
    from hubserver import free_port

    cand = make_candidate(tmp_path, tiny_model_dir, snap, metrics=GOOD)
    par.run(par.Args(model_uri=cand.uri, registered_name="e2e-serve"))
    port = free_port()
    env = offline_env(venv_env, tmp_path)
    log_file = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen(
        [str(ROOT / ".venv" / "bin" / "mlflow"), "models", "serve", "-m", "models:/e2e-serve@champion",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
        cwd=tmp_path, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def ready() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                    return r.status == 200
            except (urllib.error.URLError, OSError):
                return False

        try:
            _wait_for(ready, 180, "the server's /ping", server)
        except AssertionError as err:
            raise AssertionError(f"{err}\n{(tmp_path / 'serve.log').read_text()[-3000:]}") from None
        body = json.dumps({"dataframe_split": {"columns": ["prompt"], "data": [[s] for s in SENTENCES]},
                           "params": {"max_new_tokens": 8}}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            answer = json.loads(r.read())
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log_file.close()
    rows = answer["predictions"]
    assert len(rows) == len(SENTENCES)
    assert all(set(r) == {"mr", "attributes", "valid", "error"} for r in rows)
    assert all(isinstance(r["valid"], bool) and isinstance(json.loads(r["attributes"]), dict) for r in rows)
    # The served answers are the registered model's own, predicted in this process on the same rows.
    import mlflow
    import pandas as pd

    expected = mlflow.pyfunc.load_model("models:/e2e-serve@champion").predict(
        pd.DataFrame({"prompt": SENTENCES}), params={"max_new_tokens": 8})
    assert rows == expected.to_dict(orient="records")
