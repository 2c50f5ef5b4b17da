"""Where the served model computes (lora_pipeline/model/device.py): the names, `auto`, and the default."""

from __future__ import annotations

import pytest

from lora_pipeline.model import device


@pytest.mark.parametrize("has_cuda, want", [(False, "cpu"), (True, "cuda")])
def test_auto_is_cuda_when_there_is_one(monkeypatch, has_cuda, want):
    monkeypatch.setattr(device, "cuda_available", lambda: has_cuda)
    assert device.resolve_device("auto") == want
    assert device.resolve_device("cpu") == "cpu"


def test_cuda_without_cuda_and_unknown_names_are_refused(monkeypatch):
    monkeypatch.setattr(device, "cuda_available", lambda: False)
    with pytest.raises(ValueError, match=r"^device 'cuda' was asked for, but torch sees no CUDA device"):
        device.resolve_device("cuda")
    with pytest.raises(ValueError, match=r"^device 'gpu' is not supported; use one of: auto, cpu, cuda$"):
        device.resolve_device("gpu")


def test_a_model_loads_on_the_cpu_unless_the_environment_says_otherwise(monkeypatch):
    """Unset: cpu, what every model served before E2E_LORA_DEVICE existed (even where CUDA is)."""
    monkeypatch.setattr(device, "cuda_available", lambda: True)
    monkeypatch.delenv(device.DEVICE_ENV, raising=False)
    assert device.serving_device() == "cpu"
    monkeypatch.setenv(device.DEVICE_ENV, "auto")
    assert device.serving_device() == "cuda"
