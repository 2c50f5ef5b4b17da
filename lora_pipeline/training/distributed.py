"""Sharded multi-GPU training: which shipped accelerate config a `distributed` value selects.

`none` keeps what `num_processes` does today (one process, or DDP through torchrun: a whole model
per process). `fsdp` and `deepspeed_zero3` shard the model over the GPUs of one machine with the
YAML files under `configs/accelerate/` (launched with `accelerate launch --config_file <file>
--num_processes <n>`). The files are checked against the pinned accelerate by
tests/unit/test_distributed.py; this module only reads them, so it imports nothing heavy.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from lora_pipeline.errors import InputError, Problem, Problems
from lora_pipeline.paths import PROJECT_ROOT

CONFIG_DIR = PROJECT_ROOT / "configs" / "accelerate"
# value -> (file, the accelerate distributed_type the file must declare)
STRATEGIES = {"none": None, "fsdp": ("fsdp.yaml", "FSDP"),
              "deepspeed_zero3": ("deepspeed_zero3.yaml", "DEEPSPEED")}
DEEPSPEED_FIX = "pip install deepspeed (on a CUDA machine), or pass {field}=fsdp or {field}=none"


def accelerate_config(value: str, *, device: str = "cuda", field: str = "distributed",
                      problems: Problems | None = None) -> Path | None:
    """The accelerate config file for `value` (None for `none`), checked: a known value, a GPU
    device (resolved: cpu | cuda), the file present and declaring the expected strategy, and the
    deepspeed package installed for deepspeed_zero3. Problems go into `problems` when given (the
    return value is then None), else the first one raises InputError."""
    own = Problems()
    path = _check(value, device, field, own)
    if problems is None:
        own.raise_if_any()
    else:
        problems.items.extend(own.items)
    return None if own else path


def _check(value: str, device: str, field: str, problems: Problems) -> Path | None:
    if value not in STRATEGIES:
        problems.add(field, value, "is not a distributed strategy", f"use one of: {', '.join(STRATEGIES)}")
        return None
    if STRATEGIES[value] is None:
        return None
    name, kind = STRATEGIES[value]
    if device != "cuda":
        problems.add(field, value, f"shards the model over GPUs, and the device is {device}",
                     f"pass {field}=none (num_processes > 1 then runs DDP, gloo on CPU), or device=cuda "
                     "on a GPU machine")
    path = CONFIG_DIR / name
    declared = _distributed_type(path)
    if declared is None:
        problems.add(field, value, f"its accelerate config {path.relative_to(PROJECT_ROOT)} is missing or "
                     "unreadable", f"restore configs/accelerate/{name} from the repository")
    elif declared != kind:
        problems.add(field, value, f"its accelerate config {path.relative_to(PROJECT_ROOT)} declares "
                     f"distributed_type {declared}, not {kind}",
                     f"restore configs/accelerate/{name} from the repository")
    if value == "deepspeed_zero3" and importlib.util.find_spec("deepspeed") is None:
        problems.add(field, value, "needs the deepspeed package, which is not installed",
                     DEEPSPEED_FIX.format(field=field))
    return path


def _distributed_type(path: Path) -> str | None:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return str(data.get("distributed_type")) if isinstance(data, dict) else None


def launch_args(config: Path, num_processes: int) -> list[str]:
    """`accelerate launch` options for a config file (the launcher's own arguments, before the script)."""
    if num_processes < 1:
        raise InputError(Problem("num_processes", num_processes, "must be > 0", "pass a number > 0"))
    return ["--config_file", str(config), "--num_processes", str(num_processes)]
