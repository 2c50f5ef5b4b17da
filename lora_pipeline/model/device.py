"""Where a model runs and in which number formats: device, compute precision, weight dtype, memory knobs.

Every choice is a pure function of the user's request and the machine's `Hardware` facts, so the
selection logic is tested with the facts mocked (tests/unit/test_device.py) and `detect()` is the
only place that asks torch and /proc/cpuinfo. Nothing heavy happens at import (`--help` stays
instant): torch is imported inside `detect()` and `MemoryPlan.from_pretrained_kwargs()` only.

Bad requests are `InputError`s naming the field, the value and the fix (the CLI prints one line each
and exits 2). Each resolver takes an optional `Problems` to report into, so a step can check every
knob and report all problems at once; without one it raises on the first.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from lora_pipeline.errors import InputError, Problem, Problems, one_line

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "fp32", "bf16")
# CPU flags with which bf16 matmuls are faster than fp32: AMX tiles. `avx512_bf16` alone is not
# enough: on an Intel Xeon (Emerald Rapids, family 6 model 207) whose hypervisor hides AMX, oneDNN's
# avx512_core_bf16 kernels ran a 1024x576 @ 576x1536 matmul in 12.7 ms against 7.4 ms in fp32 (bf16
# dot products issue on one port, fp32 FMAs on two), and `bench/bench_precision.py` measured
# training and generation there (bench/results/precision.json). Without AMX `auto` is fp32.
CPU_BF16_FLAGS = frozenset({"amx_bf16"})
# config.json `dtype` / `torch_dtype` values -> our names.
_STORED_DTYPES = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16",
                  "half": "fp16"}
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
_CUDA_INDEX = re.compile(r"^(?:cuda:)?(\d+)$")
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
BNB_FIX = "pip install bitsandbytes (on a CUDA machine), or pass load_in_4bit=false"
# The device reaches a model loaded somewhere else (a Spark executor's Python worker, `mlflow models
# serve`) through this variable, read when the model loads (`serving.E2EExtractor.load_context`). Unset
# means `cpu`, what every model served before the variable existed.
DEVICE_ENV = "E2E_LORA_DEVICE"
DEFAULT_SERVING_DEVICE = "cpu"
# The weight dtype of a model loaded somewhere else (auto | fp32 | bf16), read at load time like the
# device. Unset means auto: the checkpoint's stored dtype, fp32 where that format is slow.
DTYPE_ENV = "E2E_LORA_DTYPE"


@dataclass(frozen=True)
class Hardware:
    """What the machine offers, as far as these choices go (`detect()` fills it; tests build it)."""

    cuda: bool = False  # torch sees at least one usable CUDA device
    cuda_count: int = 0
    cuda_name: str = ""
    cuda_capability: tuple[int, int] = (0, 0)
    cuda_bf16: bool = False  # native bf16 (Ampere and later), not torch's emulation
    torch_cuda: str | None = None  # torch.version.cuda: None for a CPU-only build of torch
    cpu_flags: frozenset[str] = field(default_factory=frozenset)
    bitsandbytes: bool = False  # the package is installed (not imported: it is heavy)

    @property
    def cpu_bf16(self) -> bool:
        return bool(self.cpu_flags & CPU_BF16_FLAGS)

    @property
    def cuda_fast_fp16(self) -> bool:
        """fp16 matmuls faster than fp32: tensor cores from Volta (7.0); the P100 (6.0) runs fp16 at
        twice its fp32 rate, the other Pascal chips (6.1, 6.2) at 1/64 of it."""
        return self.cuda and (self.cuda_capability >= (7, 0) or self.cuda_capability == (6, 0))

    def gpu(self) -> str:
        major, minor = self.cuda_capability
        return f"{self.cuda_name or 'the GPU'} (compute capability {major}.{minor})"


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (x86 `flags`, Arm `Features`); empty elsewhere
    (not Linux: no cheap way to tell, and fp32 is never slow by surprise)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return frozenset()
    match = re.search(r"^(?:flags|Features)\s*:(.*)$", cpuinfo, re.MULTILINE)
    return frozenset(match.group(1).split()) if match else frozenset()


def detect() -> Hardware:
    """The facts of this machine. Not cached: cheap (one /proc read, a few torch queries)."""
    import torch

    hw = dict(torch_cuda=torch.version.cuda, cpu_flags=cpu_flags(),
              bitsandbytes=importlib.util.find_spec("bitsandbytes") is not None)
    if torch.cuda.is_available():
        try:  # native only: emulated bf16 (pre-Ampere) is slower than fp32
            bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # older torch without the switch
            bf16 = torch.cuda.is_bf16_supported()
        hw.update(cuda=True, cuda_count=torch.cuda.device_count(), cuda_name=torch.cuda.get_device_name(0),
                  cuda_capability=tuple(torch.cuda.get_device_capability(0)), cuda_bf16=bool(bf16))
    return Hardware(**hw)


def _report(problems: Problems | None, problem: Problem) -> None:
    if problems is None:
        raise InputError(problem)
    problems.items.append(problem)


# --- device ----------------------------------------------------------------------------------------
def resolve_device(requested: str, *, field: str = "device", hw: Hardware | None = None,
                   problems: Problems | None = None) -> str:
    """`auto` -> cuda where torch sees a GPU, else cpu; `cuda` without one is an error."""
    if requested not in DEVICES:
        _report(problems, Problem(field, requested, "is not a device this pipeline runs on",
                                  f"use one of: {', '.join(DEVICES)}"))
        return "cpu"
    hw = hw or detect()
    if requested == "cpu" or (requested == "auto" and not hw.cuda):
        return "cpu"
    if hw.cuda:
        return "cuda"
    why = ("this torch is a CPU-only build" if hw.torch_cuda is None
           else f"torch (CUDA {hw.torch_cuda}) sees no GPU: no driver, or CUDA_VISIBLE_DEVICES hides them")
    _report(problems, Problem(field, requested, f"CUDA is not available: {why}",
                              f"pass {field}=auto or {field}=cpu, or run on a machine with an NVIDIA "
                              "GPU and a CUDA build of torch"))
    return "cpu"


# --- compute precision -----------------------------------------------------------------------------
def auto_precision(device: str, hw: Hardware) -> str:
    """The fastest compute precision that keeps training stable on `device` (cpu | cuda):
    bf16 on CUDA with native bf16; fp16 on GPUs where only fp16 is fast (needs loss scaling in
    training); bf16 autocast on CPUs with AMX (`CPU_BF16_FLAGS`); else fp32.

    On a 2-core CPU with AMX (amx_bf16) a SmolLM2-135M training step (batch 8 x 130 tokens) took
    2.7-3.1 s in bf16 autocast against 4.7-4.9 s in fp32, and generating 32 answers (batch 32, 64 new
    tokens) 11.5 s against 16.3 s (both measured side by side in one process). Without AMX, bf16 on
    `avx512_bf16` alone is no faster than fp32 (see `CPU_BF16_FLAGS`), so `auto` is fp32 there."""
    if device == "cuda":
        if hw.cuda_bf16:
            return "bf16"
        return "fp16" if hw.cuda_fast_fp16 else "fp32"
    return "bf16" if hw.cpu_bf16 else "fp32"


# --- weight dtype ----------------------------------------------------------------------------------
def stored_dtype(checkpoint_dir: Path | str) -> str | None:
    """The dtype a checkpoint's weights were saved in (config.json `dtype`, or the older
    `torch_dtype`): fp32 | bf16 | fp16, or None when the config does not say (or says something
    this pipeline does not load, e.g. fp8). Raises OSError / ValueError for a missing or bad file."""
    config = json.loads((Path(checkpoint_dir) / "config.json").read_text())
    value = config.get("dtype") or config.get("torch_dtype")
    name = _STORED_DTYPES.get(str(value).removeprefix("torch.")) if value else None
    if value and name is None:
        log.warning("config.json dtype %r is not one of %s: loading fp32", value, sorted(_STORED_DTYPES))
    return name


def resolve_dtype(requested: str, checkpoint_dir: Path | str, *, device: str = "cpu",
                  field: str = "dtype", hw: Hardware | None = None,
                  problems: Problems | None = None) -> str:
    """The dtype to hold the (frozen) base weights in: fp32 | bf16 | fp16.

    `auto` keeps the checkpoint's stored dtype (half the memory of fp32 for bf16/fp16 checkpoints),
    except where that format is slow on `device`: fp32 on CPUs without AMX (`CPU_BF16_FLAGS`; and for fp16 on
    any CPU), and on GPUs without native bf16 (bf16 -> fp16 could overflow; fp32 is exact)."""
    if requested not in DTYPES:
        _report(problems, Problem(field, requested, "is not supported", f"use one of: {', '.join(DTYPES)}"))
        return "fp32"
    hw = hw or detect()
    if requested == "bf16" and device == "cuda" and not hw.cuda_bf16:
        _report(problems, Problem(field, requested, f"{hw.gpu()} has no native bf16",
                                  f"pass {field}=fp32 or {field}=auto"))
        return "fp32"
    if requested != "auto":
        return requested
    try:
        stored = stored_dtype(checkpoint_dir)
    except (OSError, ValueError) as err:
        _report(problems, Problem(field, requested, "cannot read the checkpoint's stored dtype "
                                  f"({type(err).__name__}: {one_line(err, 120)})",
                                  f"pass {field}=fp32 or {field}=bf16, or repair the checkpoint's config.json"))
        return "fp32"
    if device == "cuda":
        fast = {"bf16": hw.cuda_bf16, "fp16": hw.cuda_fast_fp16, "fp32": True}
    else:
        fast = {"bf16": hw.cpu_bf16, "fp16": False, "fp32": True}
    return stored if stored and fast[stored] else "fp32"


def torch_dtype(name: str):
    """fp32 | bf16 | fp16 -> the torch dtype."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


# --- memory knobs ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryPlan:
    """Validated memory knobs, ready for `from_pretrained`."""

    gradient_checkpointing: bool = False
    load_in_4bit: bool = False  # QLoRA: the frozen base in NF4 through bitsandbytes (CUDA only)
    device_map: str | int | None = None  # None: the whole model on the step's device
    max_memory: dict[int | str, int] | None = None  # bytes per device (GPU index, 'cpu', 'disk')

    def from_pretrained_kwargs(self, compute_dtype: str = "bf16") -> dict:
        kwargs: dict = {}
        if self.device_map is not None:
            kwargs["device_map"] = self.device_map
        if self.max_memory:
            kwargs["max_memory"] = dict(self.max_memory)
        if self.load_in_4bit:
            from transformers import BitsAndBytesConfig

            # NF4 with double quantisation and the compute in `compute_dtype`: the QLoRA recipe.
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch_dtype(compute_dtype))
        return kwargs


def parse_size(text: str) -> int:
    """'20GiB', '64GB', '1.5GiB', '512MiB' or a plain byte count -> bytes. Units are bytes, in any
    case (accelerate reads a lower-case 'b' as bits; this parser never does). ValueError otherwise."""
    match = _SIZE.match(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a size")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "b").lower()])


def parse_device_map(text: str) -> str | int | None:
    """'' / 'none' -> None; a strategy (auto, balanced, ...), 'cpu', 'cuda', 'cuda:N' or 'N' -> the
    value `from_pretrained(device_map=...)` takes. ValueError when none of those."""
    value = text.strip()
    if value.lower() in ("", "none"):
        return None
    if value in DEVICE_MAP_STRATEGIES or value in ("cpu", "cuda"):
        return value
    match = _CUDA_INDEX.match(value)
    if match:
        return int(match.group(1))
    raise ValueError(f"{text!r} is not a device map")


def parse_max_memory(text: str) -> dict[int | str, int]:
    """'0:20GiB,cpu:64GiB' -> {0: 21474836480, 'cpu': 68719476736}. Keys: a GPU index (or cuda:N),
    'cpu' or 'disk'. ValueError naming the first bad item."""
    out: dict[int | str, int] = {}
    for item in text.split(","):
        key, sep, size = item.strip().partition(":")
        if key == "cuda" and sep:  # cuda:0:20GiB
            index, sep, size = size.partition(":")
            key = index
        if not sep or not key or not size:
            raise ValueError(f"{item.strip()!r} is not <device>:<size>")
        key = key.strip()
        dev: int | str = int(key) if key.isdigit() else key
        if isinstance(dev, str) and dev not in ("cpu", "disk"):
            raise ValueError(f"{key!r} is not a device (a GPU index, cpu or disk)")
        if dev in out:
            raise ValueError(f"{key!r} is given twice")
        bytes_ = parse_size(size)
        if bytes_ <= 0:
            raise ValueError(f"the size of {key!r} is 0")
        out[dev] = bytes_
    return out


def _gpu_indices(value) -> list[int]:
    if value == "cuda":
        return [0]
    return [value] if isinstance(value, int) else []


def resolve_memory(device: str, *, gradient_checkpointing: bool = False, load_in_4bit: bool = False,
                   device_map: str = "", max_memory: str = "", num_processes: int = 1,
                   hw: Hardware | None = None, problems: Problems | None = None) -> MemoryPlan:
    """Check the memory knobs against the (resolved) `device` and the machine; all problems at once
    when `problems` is given. `num_processes`: DDP workers, which each hold a whole model."""
    own = Problems()
    hw = hw or detect()
    if not isinstance(gradient_checkpointing, bool):
        own.add("gradient_checkpointing", gradient_checkpointing, "is not true or false",
                "pass gradient_checkpointing=true to recompute activations in the backward pass "
                "(less memory, ~30% more compute), or false")
    if not isinstance(load_in_4bit, bool):
        own.add("load_in_4bit", load_in_4bit, "is not true or false", "pass true or false")
    elif load_in_4bit:
        if device != "cuda":
            own.add("load_in_4bit", True, f"4-bit QLoRA loading runs on CUDA GPUs only (bitsandbytes), "
                    f"and the device is {device}", "pass load_in_4bit=false, or device=cuda on a GPU machine")
        elif not hw.bitsandbytes:
            own.add("load_in_4bit", True, "needs the bitsandbytes package, which is not installed", BNB_FIX)
    placement = None
    try:
        placement = parse_device_map(device_map)
    except ValueError:
        own.add("device_map", device_map, "is not a device map",
                f"use {', '.join(DEVICE_MAP_STRATEGIES)}, cpu, cuda, cuda:<index>, or '' for the "
                "step's device")
    gpus = _gpu_indices(placement)
    if gpus and device != "cuda":
        own.add("device_map", device_map, f"places weights on a GPU, but the device is {device}",
                "pass device_map=cpu or '', or device=cuda on a GPU machine")
    elif gpus and max(gpus) >= hw.cuda_count:
        own.add("device_map", device_map, f"names GPU {max(gpus)}, but this machine has {hw.cuda_count}",
                f"use an index below {hw.cuda_count}, or device_map=auto")
    if placement in DEVICE_MAP_STRATEGIES and num_processes > 1:
        own.add("device_map", device_map, f"splits one model over the devices, which cannot be "
                f"combined with num_processes={num_processes} (each process holds a whole model)",
                "pass device_map='' with num_processes > 1, or num_processes=1")
    budget = None
    if max_memory.strip():
        try:
            budget = parse_max_memory(max_memory)
        except ValueError as err:
            own.add("max_memory", max_memory, str(err), "pass e.g. 0:20GiB,cpu:64GiB (a GPU index, cpu "
                    "or disk, a colon and a size with a unit: B, KB, MB, GB, KiB, MiB, GiB, ...)")
        else:
            gpu_keys = sorted(k for k in budget if isinstance(k, int))
            if gpu_keys and device != "cuda":
                own.add("max_memory", max_memory, f"budgets GPU {gpu_keys[-1]}, but the device is {device}",
                        "budget only cpu (and disk), or pass device=cuda on a GPU machine")
            elif gpu_keys and gpu_keys[-1] >= hw.cuda_count:
                own.add("max_memory", max_memory, f"budgets GPU {gpu_keys[-1]}, but this machine has "
                        f"{hw.cuda_count}", f"use GPU indices below {hw.cuda_count}")
            if placement is None or placement not in DEVICE_MAP_STRATEGIES:
                own.add("max_memory", max_memory, "only limits what a device_map strategy places "
                        f"(device_map is {device_map!r})", "also pass device_map=auto, or drop max_memory")
    if problems is None:
        own.raise_if_any()
    else:
        problems.items.extend(own.items)
    return MemoryPlan(gradient_checkpointing=gradient_checkpointing is True, load_in_4bit=load_in_4bit is True,
                      device_map=placement, max_memory=budget)


# --- everything at once ------------------------------------------------------------------------------
@dataclass(frozen=True)
class DevicePlan:
    device: str  # cpu | cuda
    precision: str  # compute: fp32 | bf16 | fp16
    dtype: str  # the frozen base weights: fp32 | bf16 | fp16
    memory: MemoryPlan


def plan(checkpoint_dir: Path | str, *, device: str = "auto", precision: str = "auto",
         dtype: str = "auto", gradient_checkpointing: bool = False, load_in_4bit: bool = False,
         device_map: str = "", max_memory: str = "", num_processes: int = 1,
         hw: Hardware | None = None) -> DevicePlan:
    """Resolve every knob of a step for the base in `checkpoint_dir` against this machine;
    InputError with all problems at once."""
    from lora_pipeline.model.precision import PRECISIONS, resolve_precision

    hw = hw or detect()
    problems = Problems()
    dev = resolve_device(device, hw=hw, problems=problems)
    compute = "fp32"
    if precision not in PRECISIONS:
        problems.add("precision", precision, "is not supported", f"use one of: {', '.join(PRECISIONS)}")
    else:
        compute = resolve_precision(precision, dev, hw=hw)
    weights = resolve_dtype(dtype, checkpoint_dir, device=dev, hw=hw, problems=problems)
    memory = resolve_memory(dev, gradient_checkpointing=gradient_checkpointing, load_in_4bit=load_in_4bit,
                            device_map=device_map, max_memory=max_memory, num_processes=num_processes,
                            hw=hw, problems=problems)
    problems.raise_if_any()
    return DevicePlan(dev, compute, weights, memory)


# --- the served model's device ----------------------------------------------------------------------
def cuda_available() -> bool:
    return detect().cuda


def serving_device(hw: Hardware | None = None) -> str:
    """The device a model being loaded now should use (`E2E_LORA_DEVICE`, default cpu)."""
    return resolve_device(os.environ.get(DEVICE_ENV, "").strip() or DEFAULT_SERVING_DEVICE,
                          field=DEVICE_ENV, hw=hw)
