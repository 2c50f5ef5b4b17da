"""Device, precision, dtype and memory-knob selection (lora_pipeline/model/device.py, precision.py), with the
hardware facts mocked: no test here needs a GPU, and each runs the same on any machine."""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from dataclasses import dataclass

import pytest

from lora_pipeline.cli import param, run_cli
from lora_pipeline.errors import InputError, Problems
from lora_pipeline.model import device as dv
from lora_pipeline.model import precision as pr

from conftest import ROOT

CPU = dv.Hardware(torch_cuda=None, cpu_flags=frozenset({"avx2", "fma"}))
# avx512_bf16 without AMX: bf16 matmuls there are no faster than fp32 (device.CPU_BF16_FLAGS).
CPU_BF16 = dv.Hardware(torch_cuda=None, cpu_flags=frozenset({"avx2", "avx512f", "avx512_bf16"}))
CPU_AMX = dv.Hardware(torch_cuda=None, cpu_flags=frozenset({"avx2", "amx_tile", "amx_bf16"}))
CUDA_BUILD_NO_GPU = dv.Hardware(torch_cuda="12.8", cpu_flags=frozenset({"avx2"}))
H200 = dv.Hardware(cuda=True, cuda_count=1, cuda_name="NVIDIA H200", cuda_capability=(9, 0),
                   cuda_bf16=True, torch_cuda="12.8", bitsandbytes=True)
A100X2_NO_BNB = dv.Hardware(cuda=True, cuda_count=2, cuda_name="NVIDIA A100", cuda_capability=(8, 0),
                            cuda_bf16=True, torch_cuda="12.8")
V100 = dv.Hardware(cuda=True, cuda_count=1, cuda_name="Tesla V100", cuda_capability=(7, 0),
                   cuda_bf16=False, torch_cuda="12.8")
P100 = dataclasses.replace(V100, cuda_name="Tesla P100", cuda_capability=(6, 0))
P40 = dataclasses.replace(V100, cuda_name="Tesla P40", cuda_capability=(6, 1))


def _lines(err: InputError) -> list[str]:
    return err.value.lines()


# --- hardware facts ------------------------------------------------------------------------------------
def test_cpu_flags_are_read_from_the_flags_line_of_x86_and_the_features_line_of_arm():
    x86 = "processor\t: 0\nmodel name\t: Xeon\nflags\t\t: fpu avx2 avx512_bf16 amx_bf16\nbugs\t: x\n"
    arm = "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n"
    assert dv.cpu_flags(x86) == {"fpu", "avx2", "avx512_bf16", "amx_bf16"}
    assert dv.cpu_flags(arm) == {"fp", "asimd", "bf16", "i8mm"}
    assert dv.cpu_flags("") == frozenset()
    # A word elsewhere in the text (a model name, the bugs line) is not a flag.
    assert dv.cpu_flags("model name\t: amx_bf16 edition\nflags\t: avx2\n") == {"avx2"}


def test_detect_reports_this_machine_without_failing():
    hw = dv.detect()
    assert isinstance(hw.cpu_flags, frozenset)
    assert hw.cuda == (hw.cuda_count > 0)


# --- device ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hw, requested, expected", [
    (H200, "auto", "cuda"), (CPU, "auto", "cpu"), (CUDA_BUILD_NO_GPU, "auto", "cpu"),
    (H200, "cpu", "cpu"), (CPU, "cpu", "cpu"), (H200, "cuda", "cuda"),
])
def test_resolve_device(hw, requested, expected):
    assert dv.resolve_device(requested, hw=hw) == expected


def test_cuda_on_a_cpu_only_torch_names_the_field_the_value_and_the_fix():
    with pytest.raises(InputError, match=re.escape(
            "device='cuda': CUDA is not available: this torch is a CPU-only build; fix: pass "
            "device=auto or device=cpu, or run on a machine with an NVIDIA GPU and a CUDA build of torch")):
        dv.resolve_device("cuda", hw=CPU)


def test_cuda_on_a_cuda_torch_without_a_gpu_says_torch_sees_none():
    with pytest.raises(InputError, match=re.escape(
            "device='cuda': CUDA is not available: torch (CUDA 12.8) sees no GPU: no driver, or "
            "CUDA_VISIBLE_DEVICES hides them; fix: pass device=auto")):
        dv.resolve_device("cuda", hw=CUDA_BUILD_NO_GPU)


def test_an_unknown_device_lists_the_accepted_ones():
    with pytest.raises(InputError, match=re.escape("device='gpu': is not a device this pipeline runs on; "
                                                   "fix: use one of: auto, cpu, cuda")):
        dv.resolve_device("gpu", hw=H200)


@dataclass
class _DeviceArgs:
    device: str = param("auto", "device")


def test_the_cli_prints_one_line_and_exits_2_for_cuda_without_a_gpu(monkeypatch, capsys):
    monkeypatch.setattr(dv, "detect", lambda: CPU)
    rc = run_cli(_DeviceArgs, lambda a: dv.resolve_device(a.device), ["--device", "cuda"], "test")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("error: device='cuda': CUDA is not available")


# --- compute precision ------------------------------------------------------------------------------------
@pytest.mark.parametrize("hw, device, expected", [
    (H200, "cuda", "bf16"), (A100X2_NO_BNB, "cuda", "bf16"),
    (V100, "cuda", "fp16"),  # tensor cores, no bf16
    (P100, "cuda", "fp16"),  # fp16 at twice the fp32 rate
    (P40, "cuda", "fp32"),  # fp16 at 1/64 of the fp32 rate
    (CPU, "cpu", "fp32"), (CPU_BF16, "cpu", "fp32"), (CPU_AMX, "cpu", "bf16"),
    (H200, "cpu", "fp32"),  # the device asked for, not the best one present
])
def test_auto_precision_per_device(hw, device, expected):
    assert dv.auto_precision(device, hw) == expected


@pytest.mark.parametrize("hw, expected", [(H200, "bf16"), (V100, "fp32"), (P40, "fp32"), (CPU, "fp32"),
                                          (CPU_BF16, "fp32"), (CPU_AMX, "bf16")])
def test_resolve_precision_without_a_device_keeps_todays_answers(monkeypatch, hw, expected):
    """Today's callers: CUDA when present, bf16 or fp32 only (they set up no fp16 loss scaling)."""
    monkeypatch.setattr(dv, "detect", lambda: hw)
    assert pr.resolve_precision("auto") == expected


def test_resolve_precision_with_a_device_may_pick_fp16_and_follows_the_device(monkeypatch):
    monkeypatch.setattr(dv, "detect", lambda: V100)
    assert pr.resolve_precision("auto", "cuda") == "fp16"
    assert pr.resolve_precision("auto", "cpu") == "fp32"
    assert pr.resolve_precision("auto", "auto") == "fp16"
    assert pr.resolve_precision("auto", "cpu", hw=CPU_AMX) == "bf16"


def test_resolve_precision_keeps_an_explicit_choice_and_rejects_unknown_names(monkeypatch):
    monkeypatch.setattr(dv, "detect", lambda: pytest.fail("an explicit precision needs no hardware facts"))
    assert pr.resolve_precision("fp32") == "fp32"
    assert pr.resolve_precision("bf16", "cuda") == "bf16"
    with pytest.raises(ValueError, match=re.escape("precision 'fp16' is not supported; use one of: "
                                                   "auto, bf16, fp32")):
        pr.resolve_precision("fp16")


def test_resolve_precision_with_cuda_on_a_cpu_machine_is_the_device_error(monkeypatch):
    monkeypatch.setattr(dv, "detect", lambda: CPU)
    with pytest.raises(InputError, match=r"^device='cuda': CUDA is not available"):
        pr.resolve_precision("auto", "cuda")


def test_autocast_runs_matmuls_in_the_resolved_precision(monkeypatch):
    import torch

    model = torch.nn.Linear(4, 4)
    x = torch.ones(2, 4)
    monkeypatch.setattr(dv, "detect", lambda: CPU)
    with pr.autocast(model, "auto"):
        assert model(x).dtype == torch.float32
    monkeypatch.setattr(dv, "detect", lambda: CPU_BF16)
    with pr.autocast(model, "auto"):
        assert model(x).dtype == torch.float32
    monkeypatch.setattr(dv, "detect", lambda: CPU_AMX)
    with pr.autocast(model, "auto"):
        assert model(x).dtype == torch.bfloat16
    with pr.autocast(model, "fp32"):
        assert model(x).dtype == torch.float32
    # fp16 only when the caller names the device (the model here is on the CPU, where autocast
    # takes fp16 too, so the choice shows without a GPU).
    monkeypatch.setattr(dv, "detect", lambda: V100)
    with pr.autocast(model, "auto"):
        assert model(x).dtype == torch.float32
    with pr.autocast(model, "auto", device="cuda"):
        assert model(x).dtype == torch.float16
    assert model.weight.dtype == torch.float32


# --- weight dtype -------------------------------------------------------------------------------------------
def _checkpoint(tmp_path, **config) -> str:
    d = tmp_path / "ckpt"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], **config}))
    return str(d)


@pytest.mark.parametrize("config, device, hw, expected", [
    ({"dtype": "bfloat16"}, "cpu", CPU, "fp32"),  # bf16 is emulated, slow: fp32
    ({"dtype": "bfloat16"}, "cpu", CPU_BF16, "fp32"),  # avx512_bf16 alone: no faster than fp32
    ({"dtype": "bfloat16"}, "cpu", CPU_AMX, "bf16"),
    ({"dtype": "bfloat16"}, "cuda", H200, "bf16"),
    ({"dtype": "bfloat16"}, "cuda", V100, "fp32"),  # no native bf16, and bf16 -> fp16 may overflow
    ({"dtype": "float16"}, "cuda", V100, "fp16"),
    ({"dtype": "float16"}, "cuda", P40, "fp32"),
    ({"dtype": "float16"}, "cpu", CPU_AMX, "fp32"),  # fp16 is slow on CPUs
    ({"torch_dtype": "bfloat16"}, "cuda", H200, "bf16"),  # the key before transformers 4.56
    ({"torch_dtype": "torch.float16"}, "cuda", H200, "fp16"),
    ({"dtype": "float32"}, "cuda", H200, "fp32"),
    ({}, "cuda", H200, "fp32"),  # not stated: what transformers loads by default
    ({"dtype": "float8_e4m3fn"}, "cuda", H200, "fp32"),  # not a format this pipeline loads
])
def test_auto_dtype_keeps_the_stored_dtype_unless_it_is_slow_on_the_device(tmp_path, config, device, hw,
                                                                        expected):
    assert dv.resolve_dtype("auto", _checkpoint(tmp_path, **config), device=device, hw=hw) == expected


def test_an_explicit_dtype_is_kept(tmp_path):
    ckpt = _checkpoint(tmp_path, dtype="bfloat16")
    assert dv.resolve_dtype("fp32", ckpt, device="cuda", hw=H200) == "fp32"
    assert dv.resolve_dtype("bf16", ckpt, device="cpu", hw=CPU) == "bf16"  # slow, but asked for


def test_dtype_errors_name_the_field_the_value_and_the_fix(tmp_path):
    ckpt = _checkpoint(tmp_path, dtype="bfloat16")
    with pytest.raises(InputError, match=re.escape("dtype='fp16': is not supported; fix: use one of: "
                                                   "auto, fp32, bf16")):
        dv.resolve_dtype("fp16", ckpt, hw=CPU)
    with pytest.raises(InputError, match=re.escape(
            "dtype='bf16': Tesla V100 (compute capability 7.0) has no native bf16; fix: pass dtype=fp32 "
            "or dtype=auto")):
        dv.resolve_dtype("bf16", ckpt, device="cuda", hw=V100)
    with pytest.raises(InputError, match=re.escape(
            "dtype='auto': cannot read the checkpoint's stored dtype (FileNotFoundError: ")
            + r".*" + re.escape("; fix: pass dtype=fp32 or dtype=bf16, or repair the checkpoint's config.json")):
        dv.resolve_dtype("auto", tmp_path / "missing", hw=CPU)
    (tmp_path / "ckpt" / "config.json").write_text("{not json")
    with pytest.raises(InputError, match=r"dtype='auto': cannot read the checkpoint's stored dtype "
                                         r"\(JSONDecodeError: "):
        dv.resolve_dtype("auto", ckpt, hw=CPU)


def test_torch_dtype_names():
    import torch

    assert [dv.torch_dtype(n) for n in ("fp32", "bf16", "fp16")] == [torch.float32, torch.bfloat16,
                                                                      torch.float16]


# --- memory knobs -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("20GiB", 20 * 2**30), ("64GB", 64 * 10**9), ("1.5GiB", int(1.5 * 2**30)), ("512MiB", 512 * 2**20),
    ("512", 512), ("20gib", 20 * 2**30), ("100 MB", 100 * 10**6), ("2TiB", 2 * 2**40), ("8kb", 8000),
])
def test_parse_size(text, expected):
    assert dv.parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "-1GB", "20 parsecs", "1e9", "20Gb/s"])
def test_parse_size_rejects_what_is_not_a_size(text):
    with pytest.raises(ValueError, match="is not a size"):
        dv.parse_size(text)


@pytest.mark.parametrize("text, expected", [
    ("", None), ("none", None), ("auto", "auto"), ("balanced", "balanced"),
    ("balanced_low_0", "balanced_low_0"), ("sequential", "sequential"), ("cpu", "cpu"),
    ("cuda", "cuda"), ("cuda:1", 1), ("0", 0),
])
def test_parse_device_map(text, expected):
    assert dv.parse_device_map(text) == expected


def test_parse_max_memory():
    assert dv.parse_max_memory("0:20GiB,cpu:64GiB") == {0: 20 * 2**30, "cpu": 64 * 2**30}
    assert dv.parse_max_memory(" cuda:1:10GB , 0:5GB, disk:1TB") == {1: 10**10, 0: 5 * 10**9, "disk": 10**12}


@pytest.mark.parametrize("text, why", [
    ("0=20GiB", "'0=20GiB' is not <device>:<size>"),
    ("0:20GiB,", "'' is not <device>:<size>"),
    ("gpu0:20GiB", "'gpu0' is not a device (a GPU index, cpu or disk)"),
    ("0:20GiB,0:10GiB", "'0' is given twice"),
    ("cpu:0GiB", "the size of 'cpu' is 0"),
    ("cpu:lots", "'lots' is not a size"),
])
def test_parse_max_memory_names_the_bad_item(text, why):
    with pytest.raises(ValueError, match=re.escape(why)):
        dv.parse_max_memory(text)


def test_memory_plan_defaults_and_a_full_qlora_plan():
    assert dv.resolve_memory("cpu", hw=CPU) == dv.MemoryPlan()
    plan = dv.resolve_memory("cuda", gradient_checkpointing=True, load_in_4bit=True, device_map="auto",
                             max_memory="0:20GiB,cpu:64GiB", hw=H200)
    assert plan == dv.MemoryPlan(gradient_checkpointing=True, load_in_4bit=True, device_map="auto",
                                 max_memory={0: 20 * 2**30, "cpu": 64 * 2**30})
    kwargs = plan.from_pretrained_kwargs("bf16")
    assert kwargs["device_map"] == "auto" and kwargs["max_memory"] == {0: 20 * 2**30, "cpu": 64 * 2**30}
    q = kwargs["quantization_config"]
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant
    assert str(q.bnb_4bit_compute_dtype) == "torch.bfloat16"
    assert dv.MemoryPlan(device_map=1).from_pretrained_kwargs() == {"device_map": 1}


def test_load_in_4bit_off_cuda_is_one_line_naming_the_fix():
    with pytest.raises(InputError, match=re.escape(
            "load_in_4bit=True: 4-bit QLoRA loading runs on CUDA GPUs only (bitsandbytes), and the device "
            "is cpu; fix: pass load_in_4bit=false, or device=cuda on a GPU machine")) as err:
        dv.resolve_memory("cpu", load_in_4bit=True, hw=CPU)
    assert len(_lines(err)) == 1


def test_load_in_4bit_without_bitsandbytes_names_the_install_command():
    with pytest.raises(InputError, match=re.escape(
            "load_in_4bit=True: needs the bitsandbytes package, which is not installed; fix: pip install "
            "bitsandbytes (on a CUDA machine), or pass load_in_4bit=false")):
        dv.resolve_memory("cuda", load_in_4bit=True, hw=A100X2_NO_BNB)


@pytest.mark.parametrize("kwargs, device, hw, message", [
    (dict(gradient_checkpointing="yes"), "cpu", CPU,
     "gradient_checkpointing='yes': is not true or false; fix: pass gradient_checkpointing=true"),
    (dict(load_in_4bit="1"), "cuda", H200, "load_in_4bit='1': is not true or false; fix: pass true or false"),
    (dict(device_map="gpu"), "cuda", H200,
     "device_map='gpu': is not a device map; fix: use auto, balanced, balanced_low_0, sequential, cpu, "
     "cuda, cuda:<index>, or '' for the step's device"),
    (dict(device_map="cuda:0"), "cpu", CPU,
     "device_map='cuda:0': places weights on a GPU, but the device is cpu; fix: pass device_map=cpu or "
     "'', or device=cuda on a GPU machine"),
    (dict(device_map="cuda:2"), "cuda", A100X2_NO_BNB,
     "device_map='cuda:2': names GPU 2, but this machine has 2; fix: use an index below 2, or "
     "device_map=auto"),
    (dict(device_map="auto", num_processes=2), "cuda", A100X2_NO_BNB,
     "device_map='auto': splits one model over the devices, which cannot be combined with "
     "num_processes=2 (each process holds a whole model); fix: pass device_map='' with "
     "num_processes > 1, or num_processes=1"),
    (dict(device_map="auto", max_memory="0:20GiB"), "cpu", CPU,
     "max_memory='0:20GiB': budgets GPU 0, but the device is cpu; fix: budget only cpu (and disk), or "
     "pass device=cuda on a GPU machine"),
    (dict(device_map="auto", max_memory="1:20GiB"), "cuda", H200,
     "max_memory='1:20GiB': budgets GPU 1, but this machine has 1; fix: use GPU indices below 1"),
    (dict(max_memory="cpu:64GiB"), "cpu", CPU,
     "max_memory='cpu:64GiB': only limits what a device_map strategy places (device_map is ''); fix: "
     "also pass device_map=auto, or drop max_memory"),
    (dict(device_map="auto", max_memory="0-20GiB"), "cuda", H200,
     "max_memory='0-20GiB': '0-20GiB' is not <device>:<size>; fix: pass e.g. 0:20GiB,cpu:64GiB"),
])
def test_memory_knob_errors(kwargs, device, hw, message):
    with pytest.raises(InputError, match=re.escape(message)):
        dv.resolve_memory(device, hw=hw, **kwargs)


def test_memory_knobs_report_every_problem_at_once_into_a_collector():
    problems = Problems()
    plan = dv.resolve_memory("cpu", gradient_checkpointing=True, load_in_4bit=True, device_map="gpu",
                             max_memory="cpu:64GiB,0:1GiB", hw=CPU, problems=problems)
    fields = [p.field for p in problems.items]
    assert fields == ["load_in_4bit", "device_map", "max_memory", "max_memory"]
    assert plan.gradient_checkpointing  # what was valid is still returned


# --- everything at once -------------------------------------------------------------------------------------
def test_plan_on_an_h200_with_a_bf16_checkpoint(tmp_path):
    ckpt = _checkpoint(tmp_path, dtype="bfloat16")
    got = dv.plan(ckpt, load_in_4bit=True, gradient_checkpointing=True, hw=H200)
    assert (got.device, got.precision, got.dtype) == ("cuda", "bf16", "bf16")
    assert got.memory.load_in_4bit and got.memory.gradient_checkpointing
    cpu = dv.plan(ckpt, hw=CPU)
    assert (cpu.device, cpu.precision, cpu.dtype) == ("cpu", "fp32", "fp32")


def test_plan_reports_every_bad_knob_in_one_error(tmp_path, monkeypatch):
    monkeypatch.setattr(dv, "detect", lambda: CPU)
    ckpt = _checkpoint(tmp_path, dtype="bfloat16")
    with pytest.raises(InputError) as err:
        dv.plan(ckpt, device="cuda", precision="fp8", dtype="int4", load_in_4bit=True, max_memory="x")
    lines = _lines(err)
    assert [line.split("=", 1)[0] for line in lines] == ["device", "precision", "dtype", "load_in_4bit",
                                                         "max_memory"]
    assert lines[1] == "precision='fp8': is not supported; fix: use one of: auto, bf16, fp32"


def test_the_module_imports_nothing_heavy():
    import subprocess

    code = ("import sys, lora_pipeline.model.device, lora_pipeline.model.precision; "
            "print(sorted(m for m in ('torch', 'transformers', 'accelerate') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


# --- the served model's device (E2E_LORA_DEVICE) ----------------------------------------------------
def test_a_model_loads_on_the_cpu_unless_the_environment_says_otherwise(monkeypatch):
    """Unset: cpu, what every model served before E2E_LORA_DEVICE existed (even where CUDA is)."""
    from lora_pipeline.model import device

    gpu = device.Hardware(cuda=True, cuda_count=1)
    monkeypatch.delenv(device.DEVICE_ENV, raising=False)
    assert device.serving_device(gpu) == "cpu"
    monkeypatch.setenv(device.DEVICE_ENV, "auto")
    assert device.serving_device(gpu) == "cuda"
    assert device.serving_device(device.Hardware()) == "cpu"
    monkeypatch.setenv(device.DEVICE_ENV, "cuda")
    with pytest.raises(ValueError, match=r"^E2E_LORA_DEVICE='cuda': CUDA is not available"):
        device.serving_device(device.Hardware())
