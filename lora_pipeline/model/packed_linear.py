"""Linear layers whose weights are packed ahead (fp32: for MKL's sgemm; bf16: for oneDNN): generation
on a CPU.

Why: `torch.nn.functional.linear` on a CPU calls MKL's sgemm, which re-packs the weight matrix into
its kernel's blocked layout at every call. A decoder step is a few dozen rows against every weight
of the model, so at batch sizes like 8-32 that packing is a large part of each matmul. MKL can pack a
weight once (`cblas_sgemm_pack`) and compute against the packed copy at every later call; PyTorch
exposes that as `torch.ops.mkl._mkl_reorder_linear_weight` / `torch.ops.mkl._mkl_linear`, the ops
Inductor's weight freezing emits for fp32 Linear layers on a CPU.

Measured (Intel Xeon without AMX, 2 threads, scratch script; the 211 Linear shapes of the default
base, 30 layers x 7 + the 49,152 x 576 LM head, one decoder step, weights cycling through memory as
in the model; median of 5, two passes): 32 rows 79-93 ms with `F.linear` against 67-70 ms packed,
16 rows 69-70 ms against 51-54 ms, 8 rows 59-62 ms against 39 ms, 4 rows 44-49 ms against 31-32 ms.
`greedy_decode` on the evaluation benchmark's 32 prompts (fp32, 7 runs alternating, medians of runs
2-7): 7.71 s with the model as loaded, 7.19 s packed, the same tokens for all 32 rows.
The evaluation benchmark (bench/bench_eval_throughput.py) has the end-to-end figures.

bf16 (the served model's bf16 copy, `serving.bf16_linear_copy`, under bf16 autocast): `F.linear` on
bf16 CPU tensors calls oneDNN, which likewise reorders the weight into its blocked layout at every call;
`torch.ops.mkldnn._reorder_linear_weight` / `torch.ops.mkldnn._linear_pointwise` (what Inductor emits
for bf16 Linear layers) reorder once. Measured the same way (scratch script, same machine: no AMX, so
oneDNN's avx512_core_bf16 kernels; 3 passes of 3): one decoder step over the 211 shapes, 32 rows
113-128 ms with `F.linear` against 97-104 ms packed, 8 rows 57-63 against 40-43 ms, 1 row 37-40
against 26-27 ms. The packed product equals `F.linear`'s bit for bit at 1-300 rows for every shape
of the default base (one pack, hint 32); `supported_bf16()` checks that equality before anything is
packed. Not measured on a CPU with AMX.

Same numbers: at 16 rows or more the packed product equals `F.linear`'s bit for bit (the same MKL
kernel; checked for every shape of the default base at 16-32 rows); below 16 MKL picks another
kernel and a value can differ in its last bits, as it can between two batch widths of `F.linear`.
The tests compare generated tokens with plain `model.generate`.

A pack is made once per weight with a batch-size hint of 32 and used at every row count: its size
does not depend on the hint, and at 2-40 rows its products equal those of a pack made for the call's
own row count, bit for bit (at 1 row they differ in the last bits; both agree with a float64 product
to fp32 rounding). That is MKL behaviour PyTorch does not promise, so `supported()` checks it on this
machine (1-33 rows against a float64 product) before anything is packed, and
tests/unit/test_packed_linear.py fails if the ops change. Where the check fails, MKL is missing, the
model is not fp32 on a CPU, or memory is short, the model is used as it is.

Memory: the packed weights are a second copy of the Linear weights (538 MB on the default base in
fp32, 269 MB in bf16: the LM head is tied to the embeddings, packed separately); `packed_linear_copy` packs only when
that fits in half of the memory the system has available, and not at all with
`E2E_LORA_PACK_LINEAR=0`. Processes that load the model side by side (batch_score's Spark Python
workers: one per task slot) each see the memory available before the others have packed, so their
launcher sets `E2E_LORA_PACK_PROCESSES` to how many there are on a machine and each takes its share
of that half: with 8 GB available and 4 workers, a worker packs only if its packs fit in
8 GB / 2 / 4 = 1 GB.
"""

from __future__ import annotations

import functools
import logging
import os

log = logging.getLogger(__name__)

# Set to 0 to generate on the weights as loaded (memory, or a comparison: bench/load_test.py).
ENV_OFF = "E2E_LORA_PACK_LINEAR"

# How many processes on this machine may pack at once (set by whoever starts them side by side:
# lora_pipeline/scoring/model.py for Spark workers); each packs within its share of the budget.
ENV_PROCESSES = "E2E_LORA_PACK_PROCESSES"

# Batch-size hint given to MKL when packing (see the module docstring: any hint gives the same pack).
PACK_HINT_ROWS = 32


def _one_pack_works(what: str, dtype_name: str, ops, agrees) -> bool:
    """Whether packing works on this build: `ops()` gives (pack, compute(x, packed, weight, rows)),
    and one pack (hint PACK_HINT_ROWS) gives at 1-33 rows a product that `agrees(got, x, weight)`;
    False, with a warning naming `what`, where the ops are gone (renamed upstream) or disagree."""
    import torch

    dtype = getattr(torch, dtype_name)
    try:
        pack, compute = ops()
        gen = torch.Generator().manual_seed(0)
        weight = torch.randn(96, 80, generator=gen).to(dtype)
        packed = pack(weight, PACK_HINT_ROWS)
        for rows in (1, 5, 16, 33):
            x = torch.randn(rows, 80, generator=gen).to(dtype)
            if not agrees(compute(x, packed, weight, rows), x, weight):
                log.warning("%s gives another product at %d rows: %s Linear weights are not packed", what,
                            rows, dtype_name)
                return False
    except (AttributeError, RuntimeError) as e:  # ops removed or renamed upstream
        log.warning("%s is unavailable (%s): %s Linear weights are not packed", what, e, dtype_name)
        return False
    return True


@functools.cache
def supported() -> bool:
    """Whether this PyTorch build and CPU can pack fp32 Linear weights for MKL and compute with one
    pack at any row count: the ops exist, and a packed product matches a float64 product at 1-33 rows."""
    import torch

    if not torch.backends.mkl.is_available():
        return False
    return _one_pack_works(
        "MKL weight packing", "float32",
        lambda: (torch.ops.mkl._mkl_reorder_linear_weight,
                 lambda x, packed, w, rows: torch.ops.mkl._mkl_linear(x, packed, w, None, rows)),
        lambda got, x, w: torch.allclose(got, (x.double() @ w.double().T).float(), rtol=1e-4, atol=1e-4))


@functools.cache
def supported_bf16() -> bool:
    """Whether this PyTorch build can pack bf16 Linear weights for oneDNN and compute with one pack at
    any row count: the ops exist, and the packed product equals `F.linear`'s at 1-33 rows."""
    import torch

    if not (torch.backends.mkldnn.enabled and torch.backends.mkldnn.is_available()):
        return False
    return _one_pack_works(
        "oneDNN bf16 weight packing", "bfloat16",
        lambda: (torch.ops.mkldnn._reorder_linear_weight,
                 lambda x, packed, w, rows: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")),
        lambda got, x, w: torch.equal(got, torch.nn.functional.linear(x, w)))


def _available_bytes() -> int | None:
    """Memory the system has available (Linux), or None where it cannot tell."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _processes() -> int:
    """`E2E_LORA_PACK_PROCESSES` as a count of at least 1 (1 when unset or not a positive integer)."""
    raw = os.environ.get(ENV_PROCESSES, "")
    try:
        return max(1, int(raw)) if raw else 1
    except ValueError:
        log.warning("%s=%r is not a positive integer: counting this process alone", ENV_PROCESSES, raw)
        return 1


def _linear_class():
    """`torch.nn.Linear` computing with a packed weight (made on first use: torch imports lazily)."""
    global _PACKED_LINEAR
    if _PACKED_LINEAR is not None:
        return _PACKED_LINEAR
    import torch

    class PackedLinear(torch.nn.Linear):
        """A Linear layer with `packed`, its weight in MKL's layout; the fp32 weight stays (shared
        with the model it came from) for anything but a plain fp32 forward pass."""

        packed = None

        def forward(self, x):
            rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
            if self.packed is None or rows == 0 or torch.is_grad_enabled():
                return super().forward(x)
            if self.weight.dtype == torch.float32:
                if x.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):
                    return super().forward(x)
                return torch.ops.mkl._mkl_linear(x, self.packed, self.weight, self.bias, rows)
            # bf16 weight: what F.linear computes for a bf16 input, or for an fp32 one under bf16
            # autocast (which casts the input, the weight and the bias to bf16 first).
            if x.dtype != torch.bfloat16 and not (
                    x.dtype == torch.float32 and torch.is_autocast_enabled("cpu")
                    and torch.get_autocast_dtype("cpu") == torch.bfloat16):
                return super().forward(x)
            bias = None if self.bias is None else self.bias.to(torch.bfloat16)
            return torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), self.packed, bias, "none", [], "")

    _PACKED_LINEAR = PackedLinear
    return PackedLinear


_PACKED_LINEAR = None


def _pack_op(module):
    """The op that packs this layer's weight (MKL for fp32, oneDNN for bf16), or None: not a Linear
    layer on a CPU, another dtype, or packing unsupported on this build."""
    import torch

    if not isinstance(module, torch.nn.Linear) or module.weight.device.type != "cpu":
        return None
    if module.weight.dtype == torch.float32 and supported():
        return torch.ops.mkl._mkl_reorder_linear_weight
    if module.weight.dtype == torch.bfloat16 and supported_bf16():
        return torch.ops.mkldnn._reorder_linear_weight
    return None


def packed_linear_copy(model):
    """`model` with every CPU Linear layer computing with a packed weight (fp32: MKL's sgemm layout;
    bf16: oneDNN's), sharing all tensors with `model`; or `model` itself where packing is not
    supported or memory is short (see the module docstring). For inference: with grad enabled, and
    for inputs the packed op does not take (fp32 layers: under autocast or with a non-fp32 input), a
    layer computes as `torch.nn.Linear` does."""
    import copy

    import torch

    if os.environ.get(ENV_OFF, "1") == "0":
        log.info("not packing Linear weights for MKL: %s=0", ENV_OFF)
        return model
    linears = [m for m in model.modules() if _pack_op(m) is not None]
    if not linears:
        return model
    extra = sum(m.weight.numel() * m.weight.element_size() for m in linears)
    available, processes = _available_bytes(), _processes()
    if available is not None and extra > available // (2 * processes):
        log.info("not packing Linear weights for MKL: %.0f MB more than half of the %.0f MB available"
                 "%s", extra / 1e6, available / 1e6,
                 f", shared by {processes} processes ({ENV_PROCESSES})" if processes > 1 else "")
        return model
    # Share every existing tensor: the copy gets new modules, not new weights.
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    fast = copy.deepcopy(model, memo)
    cls = _linear_class()
    with torch.no_grad():
        for module in fast.modules():
            if (pack := _pack_op(module)) is not None:
                module.__class__ = cls
                module.packed = pack(module.weight.detach(), PACK_HINT_ROWS)
    log.info("packed %d Linear weights (%s) for %s (%.0f MB)", len(linears), linears[0].weight.dtype,
             "MKL" if linears[0].weight.dtype == torch.float32 else "oneDNN", extra / 1e6)
    return fast.eval()
