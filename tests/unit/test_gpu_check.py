"""bench/gpu_check.sh / gpu_check.py, the parts that run without a GPU: arguments, the FLOPs and MFU
arithmetic, the peak table, and stopping at once (exit 2, one line) where there is no CUDA."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import gpu_check as gc  # noqa: E402
import synthetic_checkpoint as sc  # noqa: E402

SCRIPT = ROOT / "bench" / "gpu_check.sh"
# SmolLM2-135M-Instruct, the default base.
SMOLLM2 = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
           "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152}


def test_defaults_and_bad_arguments(capsys):
    a = gc.parse_args([])
    assert a.models == ["default", "synthetic"] and a.synthetic_params == 1.5e9 and a.peak_tflops is None
    assert gc.parse_args(["--models", "synthetic"]).models == ["synthetic"]
    with pytest.raises(SystemExit) as exit_:
        gc.parse_args(["--models", "default,llama", "--max_steps", "0"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "use a comma-separated subset of default, synthetic" in err and "--max_steps must be >= 1" in err


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H200", 989.0), ("NVIDIA H200 NVL", 835.0), ("NVIDIA H100 80GB HBM3", 989.0),
    ("NVIDIA H100 PCIe", 756.0), ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L40S", 362.0),
    ("NVIDIA L4", 121.0), ("NVIDIA A10", 125.0), ("NVIDIA A10G", None), ("Tesla V100-SXM2-16GB", None),
])
def test_dense_bf16_peaks_by_device_name(name, peak):
    assert gc.peak_bf16_tflops(name) == peak
    assert gc.peak_bf16_tflops(name, override=100.0) == 100.0


def test_flops_per_trained_token_count_the_decoder_linear_weights_four_times():
    # q/o 576x576, k/v 576x192 (3 kv heads of 64), gate/up/down 576x1536; 30 layers.
    per_layer = 2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536
    assert gc.layer_linear_params(SMOLLM2) == 30 * per_layer == 106_168_320
    assert gc.train_flops_per_token(SMOLLM2) == 4 * 106_168_320


def test_flops_agree_with_the_synthetic_models_shape():
    shape = sc.shape_for_params(1.5e9, 49152)
    config = sc.config_for(shape, "bfloat16", {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2})
    assert gc.layer_linear_params(config) == shape.layer_linear_parameters()


def test_mfu():
    # 100k tokens/s x 4 x 1.38e9 FLOPs = 552 TFLOP/s on a 989 TFLOP/s peak.
    assert gc.mfu(100_000, 4 * 1.38e9, 989.0) == pytest.approx(0.5581, abs=1e-4)
    assert gc.mfu(100_000, 1e9, None) is None and gc.mfu(0.0, 1e9, 989.0) is None


def test_without_cuda_the_check_stops_with_exit_2_and_one_line(monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_:
        gc.cuda_facts()
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith("gpu_check: no CUDA GPU: ")


def test_the_script_parses_and_fails_fast_here():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    help_ = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120)
    assert help_.returncode == 0 and "--models" in help_.stdout
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the no-CUDA path is not reachable")
    got = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert got.returncode == 2
    assert got.stderr.strip().splitlines()[-1].startswith("gpu_check: no CUDA GPU: ")
