"""Compute precision shared by training (`finetune`) and generation (serving, `evaluate_checkpoint`).

`bf16` is autocast: weights stay fp32 in memory and on disk, matmuls run in bf16 and their results
accumulate in fp32, the residual stream and norms stay fp32. Training and generation use the same
autocast, so a model is evaluated with the numerics it was trained with (generation runs it on a copy
whose Linear weights are already bf16, which autocast would cast them to anyway:
`serving.bf16_linear_copy`).

What `auto` picks is decided in one place, `lora_pipeline.model.device.auto_precision` (the hardware
facts, CPU bf16 flags included, come from `device.detect`).
"""

from __future__ import annotations

import contextlib

from lora_pipeline.model import device as device_mod

PRECISIONS = ("auto", "bf16", "fp32")


def resolve_precision(precision: str, device: str | None = None, *,
                      hw: device_mod.Hardware | None = None) -> str:
    """`auto` -> what `device.auto_precision` picks for the device; an explicit name is kept.

    `device` (auto | cpu | cuda) is the device the model runs on. Without it (today's callers) the
    model runs where torch puts it, CUDA when present, and the answer is bf16 or fp32 only: fp16
    needs loss scaling, which those callers do not set up, so a GPU without native bf16 gets fp32
    there. With a device, fp16 is chosen on GPUs where only fp16 is fast."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not supported; use one of: {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    hw = hw or device_mod.detect()
    if device is None:
        choice = device_mod.auto_precision("cuda" if hw.cuda else "cpu", hw)
        return "fp32" if choice == "fp16" else choice
    return device_mod.auto_precision(device_mod.resolve_device(device, hw=hw), hw)


def autocast(model, precision: str, device: str | None = None):
    """A context running `model`'s forward passes in `precision` (resolved for `device`, as
    `resolve_precision`); fp32 is a no-op."""
    resolved = resolve_precision(precision, device)
    if resolved == "fp32":
        return contextlib.nullcontext()
    import torch

    dtype = torch.bfloat16 if resolved == "bf16" else torch.float16
    return torch.autocast(device_type=next(model.parameters()).device.type, dtype=dtype)
