"""Packed Linear weights (lora_pipeline/model/packed_linear.py): the PyTorch ops it relies on, the
assumption that one pack serves every row count, and when it leaves a model as it is.

These fail when PyTorch changes or drops `torch.ops.mkl._mkl_reorder_linear_weight` / `_mkl_linear`
(fp32) or `torch.ops.mkldnn._reorder_linear_weight` / `_linear_pointwise` (bf16): internal ops, the
ones Inductor's weight freezing emits, on a build with MKL / oneDNN."""

from __future__ import annotations

import logging

import pytest
import torch

from lora_pipeline.model import packed_linear

needs_mkl = pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="PyTorch built without MKL")


@needs_mkl
@pytest.mark.parametrize("rows", [1, 4, 15, 16, 32, 40])
def test_one_pack_serves_every_row_count(rows):
    """The default base's widest MLP shape (576 -> 1536): a pack made for PACK_HINT_ROWS rows gives,
    at any row count, the product to fp32 rounding: within 1e-5 of a float64 product, for values of
    about 1 (x ~ N(0, 1), w ~ N(0, 0.04^2): 576 terms of variance 0.04^2, std 0.96); measured 1-3e-6,
    against 5e-7-2.5e-6 for F.linear. A pack read in another layout would be off by about 1."""
    assert packed_linear.supported()
    gen = torch.Generator().manual_seed(rows)
    weight, bias = torch.randn(1536, 576, generator=gen) * 0.04, torch.randn(1536, generator=gen)
    x = torch.randn(rows, 576, generator=gen)
    hinted = torch.ops.mkl._mkl_reorder_linear_weight(weight, packed_linear.PACK_HINT_ROWS)
    got = torch.ops.mkl._mkl_linear(x, hinted, weight, bias, rows)
    want = (x.double() @ weight.double().T + bias.double()).float()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 10, bias=False)).eval()


@needs_mkl
def test_copy_shares_every_tensor_and_computes_with_its_packs():
    model = _mlp()
    fast = packed_linear.packed_linear_copy(model)
    assert fast is not model and all(isinstance(m, torch.nn.Linear) for m in (fast[0], fast[2]))
    assert [p.data_ptr() for p in fast.parameters()] == [p.data_ptr() for p in model.parameters()]
    x = torch.randn(3, 7, 64)  # 3-d, as a decoder's hidden states: 21 rows
    with torch.inference_mode(), torch.profiler.profile() as prof:
        got, want = fast(x), model(x)
    calls = {e.key: e.count for e in prof.key_averages()}
    assert calls.get("mkl::_mkl_linear") == 2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # With grad enabled (training) a layer is a plain Linear: gradients flow to the shared weights.
    fast(x).sum().backward()
    assert model[0].weight.grad is not None and model[0].weight.grad.abs().sum() > 0


needs_mkldnn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")


@needs_mkldnn
def test_a_bf16_copy_computes_with_onednn_packs_bit_for_bit():
    """The served model's bf16 copy (bf16 Linear weights, run under bf16 autocast) packed for oneDNN:
    the same numbers as `F.linear`, bit for bit, under autocast (fp32 input) and on bf16 input, at 1 to
    40 rows; oneDNN's packed op runs; with grad enabled a layer is a plain Linear."""
    assert packed_linear.supported_bf16()
    model = _mlp().to(torch.bfloat16)
    fast = packed_linear.packed_linear_copy(model)
    assert fast is not model and fast[0].packed is not None
    assert [p.data_ptr() for p in fast.parameters()] == [p.data_ptr() for p in model.parameters()]
    for rows in (1, 7, 16, 40):
        x = torch.randn(rows, 64)
        with torch.inference_mode(), torch.profiler.profile() as prof:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                got, want = fast(x), model(x)
            got_bf16, want_bf16 = fast(x.to(torch.bfloat16)), model(x.to(torch.bfloat16))
        assert got.dtype == torch.bfloat16 and torch.equal(got, want) and torch.equal(got_bf16, want_bf16)
        assert {e.key: e.count for e in prof.key_averages()}.get("mkldnn::_linear_pointwise") == 4
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    with torch.profiler.profile() as prof:
        fast(x).float().sum().backward()
    assert "mkldnn::_linear_pointwise" not in {e.key for e in prof.key_averages()}
    assert model[0].weight.grad is not None and model[0].weight.grad.abs().sum() > 0


def test_model_left_as_it_is_when_packing_cannot_help_or_fit(monkeypatch, caplog):
    model = _mlp()
    # Neither fp32 nor bf16 on a CPU: nothing to pack.
    assert packed_linear.packed_linear_copy(model.to(torch.float16)) is model
    model = _mlp()
    # Memory: the packs (a second copy of the Linear weights, 4 x (64 x 96 + 96 x 10) = 28,416 bytes)
    # must fit in half of what is available.
    monkeypatch.setattr(packed_linear, "supported", lambda: True)
    monkeypatch.setattr(packed_linear, "_available_bytes", lambda: 2 * 28_416 - 2)
    with caplog.at_level(logging.INFO, logger=packed_linear.__name__):
        assert packed_linear.packed_linear_copy(model) is model
    assert "not packing Linear weights for MKL: 0 MB more than half of the 0 MB available" in caplog.text
    # Turned off by its environment variable.
    monkeypatch.setattr(packed_linear, "_available_bytes", lambda: None)
    monkeypatch.setenv(packed_linear.ENV_OFF, "0")
    with caplog.at_level(logging.INFO, logger=packed_linear.__name__):
        assert packed_linear.packed_linear_copy(model) is model
    assert "not packing Linear weights for MKL: E2E_LORA_PACK_LINEAR=0" in caplog.text
    monkeypatch.setenv(packed_linear.ENV_OFF, "1")
    assert packed_linear.packed_linear_copy(model) is not model
    # Ops missing or wrong on this build.
    monkeypatch.setattr(packed_linear, "supported", lambda: False)
    monkeypatch.setattr(packed_linear, "_available_bytes", lambda: None)
    assert packed_linear.packed_linear_copy(model) is model


def test_processes_side_by_side_each_pack_within_their_share(monkeypatch, caplog):
    """E2E_LORA_PACK_PROCESSES=n: each of n processes packs only within half the available memory / n
    (the packs here: 28,416 bytes; 4 processes need 2 x 4 x 28,416 = 227,328 bytes available)."""
    model = _mlp()
    monkeypatch.setattr(packed_linear, "supported", lambda: True)
    monkeypatch.setattr(packed_linear, "_available_bytes", lambda: 227_328)
    monkeypatch.setenv(packed_linear.ENV_PROCESSES, "4")
    assert packed_linear.packed_linear_copy(model) is not model
    monkeypatch.setattr(packed_linear, "_available_bytes", lambda: 227_328 - 8)
    with caplog.at_level(logging.INFO, logger=packed_linear.__name__):
        assert packed_linear.packed_linear_copy(model) is model
    assert "0 MB available, shared by 4 processes (E2E_LORA_PACK_PROCESSES)" in caplog.text
    # Alone (unset), the same memory is plenty; a value that is not a count is one process, with a warning.
    monkeypatch.delenv(packed_linear.ENV_PROCESSES)
    assert packed_linear.packed_linear_copy(model) is not model
    monkeypatch.setenv(packed_linear.ENV_PROCESSES, "four")
    with caplog.at_level(logging.WARNING, logger=packed_linear.__name__):
        assert packed_linear.packed_linear_copy(model) is not model
    assert "E2E_LORA_PACK_PROCESSES='four' is not a positive integer: counting this process alone" in caplog.text


def test_supported_is_false_when_the_ops_are_gone(monkeypatch, caplog):
    packed_linear.supported.cache_clear()
    monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: True)

    class NoOps:
        def __getattr__(self, name):
            raise AttributeError(f"'_OpNamespace' 'mkl' object has no attribute '{name}'")

    monkeypatch.setattr(torch.ops, "mkl", NoOps())
    try:
        with caplog.at_level(logging.WARNING, logger=packed_linear.__name__):
            assert packed_linear.supported() is False
        assert "MKL weight packing is unavailable" in caplog.text
    finally:
        packed_linear.supported.cache_clear()
