"""Where the served model computes: `cpu`, `cuda`, or `auto` (cuda when there is one).

The device reaches a model loaded somewhere else (a Spark executor's Python worker, `mlflow models
serve`) through the environment variable `E2E_LORA_DEVICE`, read when the model loads
(`serving.E2EExtractor.load_context`). Unset means `cpu`, what every model served before the variable
existed; models logged before it existed carry their own copy of the code and always run on the CPU.
"""

from __future__ import annotations

import os

DEVICES = ("auto", "cpu", "cuda")
DEVICE_ENV = "E2E_LORA_DEVICE"
DEFAULT_SERVING_DEVICE = "cpu"


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_device(device: str) -> str:
    """`auto` -> cuda if available, else cpu; an unknown name or cuda without CUDA is a ValueError."""
    if device not in DEVICES:
        raise ValueError(f"device {device!r} is not supported; use one of: {', '.join(DEVICES)}")
    if device == "auto":
        return "cuda" if cuda_available() else "cpu"
    if device == "cuda" and not cuda_available():
        raise ValueError("device 'cuda' was asked for, but torch sees no CUDA device on this machine")
    return device


def serving_device() -> str:
    """The device a model being loaded now should use (`E2E_LORA_DEVICE`, default cpu)."""
    return resolve_device(os.environ.get(DEVICE_ENV, "").strip() or DEFAULT_SERVING_DEVICE)
