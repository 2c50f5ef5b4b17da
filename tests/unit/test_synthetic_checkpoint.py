"""bench/synthetic_checkpoint.py: Llama-shaped checkpoints of a chosen size, written one shard at a time,
that transformers loads with no missing or unexpected weights."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import synthetic_checkpoint as sc  # noqa: E402

SMOLLM2_VOCAB = 49152


@pytest.mark.parametrize("target", [1.5e9, 5e9 / 4, 2.5e8])
def test_shapes_land_near_their_target_and_look_like_llamas(target):
    shape = sc.shape_for_params(target, SMOLLM2_VOCAB)
    assert abs(shape.num_parameters() - target) / target < 0.05
    assert shape.num_attention_heads * sc.HEAD_DIM == shape.hidden_size
    assert shape.num_attention_heads % shape.num_key_value_heads == 0
    assert shape.num_hidden_layers >= shape.hidden_size // 128
    assert SMOLLM2_VOCAB * shape.hidden_size <= target / 4


def test_the_gpu_checks_synthetic_model_has_about_one_and_a_half_billion_parameters():
    shape = sc.shape_for_params(1.5e9, SMOLLM2_VOCAB)
    assert 1.4e9 < shape.num_parameters() < 1.6e9


def test_a_small_target_with_a_large_vocabulary_still_gets_layers():
    shape = sc.shape_for_params(0.05e9 / 4, SMOLLM2_VOCAB)  # bench_scale --size_gb 0.05 (fp32)
    assert shape.num_hidden_layers >= 2 and abs(shape.num_parameters() - 0.05e9 / 4) / (0.05e9 / 4) < 0.05


def test_written_shard_by_shard_and_loaded_by_transformers(tmp_path, tiny_model_dir):
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaForCausalLM

    shards = []

    def recording_save(tensors, path, metadata=None):
        shards.append(sum(t.numel() * t.element_size() for t in tensors.values()))
        save_file(tensors, path, metadata=metadata)

    out = tmp_path / "synthetic"
    summary = sc.write_checkpoint(out, tokenizer_dir=tiny_model_dir, params=3e5, shard_bytes=200_000,
                                  save_file=recording_save)
    weights = sum(shards)
    assert len(shards) >= 4 and max(shards) <= 200_000  # never more than one shard in memory
    assert len(summary["files"]) == len(shards) and summary["weight_bytes"] >= weights
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == weights
    model, info = LlamaForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert sum(p.numel() for p in model.parameters()) == summary["parameters"]
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and len(tok) == summary["shape"]["vocab_size"]
    with torch.no_grad():
        logits = model(**tok(["a restaurant"], return_tensors="pt")).logits
    assert torch.isfinite(logits).all()


def test_one_shard_is_model_safetensors_in_bf16(tmp_path, tiny_model_dir):
    from safetensors import safe_open

    out = tmp_path / "one"
    summary = sc.write_checkpoint(out, tokenizer_dir=tiny_model_dir, params=2e5, dtype="bfloat16")
    assert summary["files"] == ["model.safetensors"] and not (out / "model.safetensors.index.json").exists()
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"torch.bfloat16"}


def test_exactly_one_size_is_required(tmp_path, tiny_model_dir):
    with pytest.raises(ValueError, match="exactly one of params / size_bytes"):
        sc.write_checkpoint(tmp_path, tokenizer_dir=tiny_model_dir)
