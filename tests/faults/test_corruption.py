"""A flipped byte in a logged safetensors file: loading fails with a digest error naming the file.

The byte is flipped in the middle of the file (tensor data, not the header), so the file still parses
and only a digest check can notice: without one the model would load silently different weights.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from lora_pipeline import artifacts
from lora_pipeline.base.manifest import load_manifest
from lora_pipeline.errors import StepError
from lora_pipeline.model import serving
from steps import download_snapshot as ds
from steps import evaluate_checkpoint as ev

from conftest import runs_with_status, sample_rows

pytestmark = pytest.mark.faults


def make_adapter(base_dir: Path, out: Path, seed: int = 1) -> Path:
    """A LoRA adapter with non-zero B (a fresh LoRA is a no-op: B starts at 0)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory) -> Path:
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter") / "adapter")


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch) -> Path:
    """A pipeline cache of this test only: the base must come from the artifact store again."""
    cache = tmp_path / "fresh-cache"
    monkeypatch.setenv("E2E_LORA_CACHE", str(cache))
    return cache


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def logged_model(tracking, tiny_model_dir, adapter_dir) -> tuple[str, str]:
    """(manifest URI, model URI) of an E2EExtractor with an adapter over the tiny base."""
    manifest_uri = ds.run(ds.Args(model=str(tiny_model_dir))).manifest_uri
    with mlflow.start_run():
        info = serving.log_e2e_model("e2e-extractor", load_manifest(manifest_uri), adapter_dir=adapter_dir,
                                     with_input_example=False)
    return manifest_uri, artifacts.model_uri(info.model_id)


def store_file(tracking, run_or_model_id: str, name: str) -> Path:
    """The one file called `name` under a run's or logged model's artifact directory (file store)."""
    root = Path.cwd() / "mlartifacts"
    found = [p for p in root.rglob(name) if run_or_model_id in p.parts]
    assert len(found) == 1, (name, found)
    return found[0]


def eval_set(tmp_path: Path) -> Path:
    import pandas as pd

    df = pd.DataFrame(sample_rows(0, 3), columns=["mr", "ref"])
    path = tmp_path / "eval.jsonl"
    df.to_json(path, orient="records", lines=True)
    return path


def test_flipped_byte_in_the_pinned_base(tracking, tiny_model_dir, adapter_dir, fresh_cache, tmp_path,
                                          capsys):
    manifest_uri, model_uri = logged_model(tracking, tiny_model_dir, adapter_dir)
    snap_run = artifacts.parse_runs_uri(manifest_uri)[0]
    weights = store_file(tracking, snap_run, "model.safetensors")
    flip_byte(weights)
    digest_error = r"digest mismatch for base file model\.safetensors of runs:/\w+/snapshot/files"

    with pytest.raises(StepError, match=digest_error):
        serving.resolve_base(load_manifest(manifest_uri))
    with pytest.raises(StepError, match=digest_error):
        mlflow.pyfunc.load_model(model_uri)
    assert not any((fresh_cache / "bases").iterdir())  # nothing half-verified was kept

    # Through a step's CLI: exit code 1, one line, no run left behind.
    code = ev.main(["--model_uri", model_uri, "--eval_data", str(eval_set(tmp_path))])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert [ln for ln in err if ln.startswith("error:")] == [err[-1]]
    assert "digest mismatch for base file model.safetensors" in err[-1] and "rerun download_snapshot" in err[-1]
    assert [r for r in runs_with_status(tracking, "FINISHED")
            if r.data.tags.get(artifacts.STEP_TAG) == ev.ENTRY_POINT] == []

    # Recovery: the intact bytes back (or a new download_snapshot) and the same model loads.
    flip_byte(weights)
    assert mlflow.pyfunc.load_model(model_uri) is not None


def test_flipped_byte_in_the_cached_base(tracking, tiny_model_dir, adapter_dir, fresh_cache):
    _, model_uri = logged_model(tracking, tiny_model_dir, adapter_dir)
    mlflow.pyfunc.load_model(model_uri)  # fills the local cache of verified bases
    cached = list((fresh_cache / "bases").rglob("model.safetensors"))
    assert len(cached) == 1
    flip_byte(cached[0])
    with pytest.raises(StepError, match=r"digest mismatch for base file model\.safetensors"):
        mlflow.pyfunc.load_model(model_uri)


def test_flipped_byte_in_the_logged_adapter(tracking, tiny_model_dir, adapter_dir, fresh_cache):
    _, model_uri = logged_model(tracking, tiny_model_dir, adapter_dir)
    model_id = artifacts.parse_model_id_uri(model_uri)
    flip_byte(store_file(tracking, model_id, "adapter_model.safetensors"))
    with pytest.raises(StepError, match=r"digest mismatch.*adapter_model\.safetensors"):
        mlflow.pyfunc.load_model(model_uri)

