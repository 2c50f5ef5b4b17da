"""Synthetic Llama-shaped checkpoints of a chosen size, written shard by shard (never whole in memory).

Used by bench/bench_scale.py (a ~5 GB fp32 checkpoint beside a smaller one) and bench/gpu_check.py (a
~1.5B-parameter bf16 base). The weights are random (normal, std 0.02; norms 1), so the model trains
and generates at the speed of a real one of its shape, with meaningless answers. The tokenizer is
copied from a real checkpoint directory (the default base's, or a test's tiny one).

    .venv/bin/python bench/synthetic_checkpoint.py OUT_DIR --params 1.5e9 --tokenizer_dir DIR [--dtype bf16]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

HEAD_DIM = 64
# Hidden sizes tried, largest first: the shape is the widest one that keeps the embedding at most
# a quarter of the model and at least hidden/128 layers (SmolLM2-135M: 576 wide, 30 deep; a 1.5B
# model: 2048-2560 wide, 20-30 deep).
HIDDEN_LADDER = (4096, 3072, 2560, 2048, 1536, 1024, 768, 512, 256, 128, 64)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")


@dataclass(frozen=True)
class Shape:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    tie_word_embeddings: bool = True

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """Names and shapes of LlamaForCausalLM's state dict, in file order."""
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_attention_heads * HEAD_DIM, self.num_key_value_heads * HEAD_DIM
        out = [("model.embed_tokens.weight", (self.vocab_size, h))]
        for n in range(self.num_hidden_layers):
            p = f"model.layers.{n}."
            out += [(p + "self_attn.q_proj.weight", (q, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                    (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, q)),
                    (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                    (p + "mlp.down_proj.weight", (h, i)),
                    (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
        out.append(("model.norm.weight", (h,)))
        if not self.tie_word_embeddings:
            out.append(("lm_head.weight", (self.vocab_size, h)))
        return out

    def num_parameters(self) -> int:
        return sum(math.prod(s) for _, s in self.tensors())

    def layer_linear_parameters(self) -> int:
        """Weights of the decoder layers' Linear modules (what LoRA-training FLOPs scale with)."""
        return sum(math.prod(s) for name, s in self.tensors()
                   if name.startswith("model.layers.") and len(s) == 2)


def _layer_params(h: int) -> tuple[int, int, int, int]:
    heads = max(1, h // HEAD_DIM)
    kv = max(1, heads // 4)  # grouped-query attention, 4 query heads per key/value head
    while heads % kv:
        kv -= 1
    inter = math.ceil(h * 8 / 3 / 64) * 64  # Llama's SwiGLU width, rounded to 64
    per_layer = 2 * h * heads * HEAD_DIM + 2 * h * kv * HEAD_DIM + 3 * h * inter + 2 * h
    return heads, kv, inter, per_layer


def shape_for_params(target: float, vocab_size: int) -> Shape:
    """A Llama shape with about `target` parameters (tied embeddings)."""
    # A small model with a large vocabulary cannot keep the embedding at a quarter: then the widest
    # shape that still has its layers.
    for embedding_share in (0.25, 1.0):
        for h in HIDDEN_LADDER:
            heads, kv, inter, per_layer = _layer_params(h)
            layers = round((target - vocab_size * h - h) / per_layer)
            if vocab_size * h <= target * embedding_share and layers >= max(2, h // 128):
                return Shape(vocab_size, h, inter, layers, heads, kv)
    h = HIDDEN_LADDER[-1]
    heads, kv, inter, _ = _layer_params(h)
    return Shape(vocab_size, h, inter, 2, heads, kv)


def shape_for_bytes(size_bytes: float, vocab_size: int, dtype: str = "float32") -> Shape:
    return shape_for_params(size_bytes / DTYPE_BYTES[dtype], vocab_size)


def _tokenizer_facts(tokenizer_dir: Path) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    return {"vocab_size": len(tok), "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id}


def config_for(shape: Shape, dtype: str, tokens: dict) -> dict:
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=shape.vocab_size, hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size, num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads, num_key_value_heads=shape.num_key_value_heads,
        head_dim=HEAD_DIM, max_position_embeddings=2048, rms_norm_eps=1e-5,
        tie_word_embeddings=shape.tie_word_embeddings, bos_token_id=tokens["bos_token_id"],
        eos_token_id=tokens["eos_token_id"], pad_token_id=tokens["pad_token_id"])
    data = config.to_dict()
    data["architectures"] = ["LlamaForCausalLM"]
    data["dtype"] = dtype
    data.pop("torch_dtype", None)
    return data


def write_checkpoint(out: Path, *, tokenizer_dir: Path, params: float | None = None,
                     size_bytes: float | None = None, dtype: str = "float32", shard_bytes: int = 1 << 30,
                     seed: int = 0, save_file=None) -> dict:
    """Write config.json, the weights (one shard in memory at a time, never the whole model) and the
    tokenizer of `tokenizer_dir` into `out`. Exactly one of `params` / `size_bytes`. Returns a summary
    (shape, parameters, bytes, shard files). `save_file`: safetensors' save_file (tests wrap it)."""
    import torch
    from safetensors.torch import save_file as st_save

    save_file = save_file or st_save
    if (params is None) == (size_bytes is None):
        raise ValueError("pass exactly one of params / size_bytes")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokens = _tokenizer_facts(Path(tokenizer_dir))
    shape = (shape_for_params(params, tokens["vocab_size"]) if params is not None
             else shape_for_bytes(size_bytes, tokens["vocab_size"], dtype))
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    gen = torch.Generator().manual_seed(seed)
    shard: dict = {}
    shard_size, written, weight_map = 0, [], {}

    def flush() -> None:
        nonlocal shard, shard_size
        if shard:
            name = f"model-{len(written) + 1:05d}.partial.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            written.append((name, list(shard)))
            shard, shard_size = {}, 0

    for name, dims in shape.tensors():
        if len(dims) == 1:
            t = torch.ones(dims, dtype=torch_dtype)
        else:
            t = torch.empty(dims, dtype=torch.float32).normal_(0.0, 0.02, generator=gen).to(torch_dtype)
        nbytes = t.numel() * t.element_size()
        if shard and shard_size + nbytes > shard_bytes:
            flush()
        shard[name] = t
        shard_size += nbytes
    flush()
    total = 0
    files = []
    for k, (tmp_name, keys) in enumerate(written, start=1):
        final = ("model.safetensors" if len(written) == 1
                 else f"model-{k:05d}-of-{len(written):05d}.safetensors")
        os.replace(out / tmp_name, out / final)
        total += (out / final).stat().st_size
        files.append(final)
        weight_map.update({key: final for key in keys})
    if len(written) > 1:
        index = {"metadata": {"total_size": sum(math.prod(s) for _, s in shape.tensors())
                              * DTYPE_BYTES[dtype]},
                 "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(config_for(shape, dtype, tokens), indent=2, sort_keys=True))
    for fname in TOKENIZER_FILES:
        if (Path(tokenizer_dir) / fname).is_file():
            shutil.copyfile(Path(tokenizer_dir) / fname, out / fname)
    return {"shape": shape.__dict__, "parameters": shape.num_parameters(),
            "layer_linear_parameters": shape.layer_linear_parameters(), "dtype": dtype,
            "weight_bytes": total, "total_bytes": sum(p.stat().st_size for p in out.iterdir() if p.is_file()),
            "files": files}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    size = ap.add_mutually_exclusive_group(required=True)
    size.add_argument("--params", type=float, help="about this many parameters")
    size.add_argument("--size_gb", type=float, help="about this many GB of weights")
    ap.add_argument("--tokenizer_dir", type=Path, required=True)
    ap.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default="fp32")
    ap.add_argument("--shard_gb", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    summary = write_checkpoint(a.out, tokenizer_dir=a.tokenizer_dir, params=a.params,
                               size_bytes=a.size_gb * 1e9 if a.size_gb else None,
                               dtype=DTYPE_NAMES[a.dtype], shard_bytes=int(a.shard_gb * 1e9), seed=a.seed)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
