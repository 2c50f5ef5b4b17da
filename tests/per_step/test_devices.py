"""Device, weight dtype and memory knobs of finetune, evaluate_checkpoint and the served model, on the
CPU: what each step decides from the machine's facts (`device.Hardware`, mocked where CUDA is
needed), that bad requests are one line and exit 2 before anything is downloaded or trained, and that
the CPU paths (forced cpu, gradient checkpointing) train and serve."""

from __future__ import annotations

import re

import pytest
import torch
from test_finetune import Probe, fast_args, small_csv  # noqa: F401 (fixture)

from lora_pipeline.errors import InputError, StepError
from lora_pipeline.model import device, serving
from steps import download_snapshot, evaluate_checkpoint, finetune

from conftest import runs_with_status

NO_CUDA = device.Hardware(cuda=False, torch_cuda=None)  # a CPU-only build of torch
GPU_NO_BNB = device.Hardware(cuda=True, cuda_count=1, cuda_name="Test GPU", cuda_capability=(8, 0),
                             cuda_bf16=True, torch_cuda="12.4", bitsandbytes=False)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as in test_finetune: tiny matmuls, shared cores
    yield
    torch.set_num_threads(before)


@pytest.fixture
def manifest_uri(tracking, tiny_model_dir) -> str:
    return download_snapshot.run(download_snapshot.Args(model=str(tiny_model_dir))).manifest_uri


@pytest.fixture
def machine(monkeypatch):
    """Set the hardware facts every resolver sees (device.detect), e.g. `machine(NO_CUDA)`."""
    def use(hw: device.Hardware) -> None:
        monkeypatch.setattr(device, "detect", lambda: hw)
    return use


@pytest.fixture
def no_downloads(monkeypatch):
    """Any dataset load or base resolution fails the test: validation must refuse first."""
    from lora_pipeline.task import data

    def forbidden(*args, **kwargs):
        raise AssertionError("downloaded or loaded data before validating the device")

    monkeypatch.setattr(data, "load_examples_report", forbidden)
    monkeypatch.setattr(serving, "resolve_base", forbidden)


def _error_lines(capsys) -> list[str]:
    return [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]


# --- finetune: refused up front ------------------------------------------------------------------
def test_cuda_without_cuda_is_one_line_exit_2(tracking, machine, capsys):
    machine(NO_CUDA)
    assert finetune.main(["--manifest_uri", "runs:/0123456789abcdef0123456789abcdef/snapshot/manifest.json",
                          "--device", "cuda"]) == 2
    lines = _error_lines(capsys)
    assert lines == ["error: device='cuda': CUDA is not available: this torch is a CPU-only build; fix: pass "
                     "device=auto or device=cpu, or run on a machine with an NVIDIA GPU and a CUDA build "
                     "of torch"], lines
    assert not runs_with_status(tracking, "RUNNING") and not runs_with_status(tracking, "FINISHED")


def test_cuda_without_cuda_raises_before_the_data_loads(tracking, machine, manifest_uri, small_csv,  # noqa: F811
                                                        no_downloads):
    machine(device.Hardware(cuda=False, torch_cuda="12.4"))  # a CUDA build that sees no GPU
    with pytest.raises(InputError, match=r"^device='cuda': CUDA is not available: torch \(CUDA 12\.4\) sees "
                                         r"no GPU: no driver, or CUDA_VISIBLE_DEVICES hides them; fix: pass "
                                         r"device=auto or device=cpu"):
        finetune.run(fast_args(manifest_uri, small_csv, device="cuda"))


def test_load_in_4bit_without_cuda_is_one_line_exit_2(tracking, machine, capsys):
    machine(NO_CUDA)
    assert finetune.main(["--manifest_uri", "runs:/0123456789abcdef0123456789abcdef/snapshot/manifest.json",
                          "--load_in_4bit", "true"]) == 2
    lines = _error_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith(
        "error: load_in_4bit=True: 4-bit QLoRA loading runs on CUDA GPUs only (bitsandbytes), and the device "
        "is cpu; fix: pass load_in_4bit=false, or device=cuda on a GPU machine"), lines


def test_load_in_4bit_without_bitsandbytes_names_the_install(tracking, machine, manifest_uri, small_csv):  # noqa: F811
    machine(GPU_NO_BNB)
    with pytest.raises(InputError, match=r"^load_in_4bit=True: needs the bitsandbytes package, which is not "
                                         r"installed; fix: pip install bitsandbytes \(on a CUDA machine\), or "
                                         r"pass load_in_4bit=false$"):
        finetune.run(fast_args(manifest_uri, small_csv, load_in_4bit=True))


def test_bad_names_are_reported_with_the_other_problems(tracking):
    with pytest.raises(InputError) as info:
        finetune.run(finetune.Args(manifest_uri="", device="tpu", dtype="fp8"))
    lines = info.value.lines()
    assert any(ln.startswith("device='tpu': is not a device this pipeline runs on; fix: use one of: auto, "
                             "cpu, cuda") for ln in lines), lines
    assert any(ln.startswith("dtype='fp8': is not supported; fix: use one of: auto, fp32, bf16") for ln in lines)
    assert any(ln.startswith("manifest_uri=''") for ln in lines)


# --- finetune: decisions ---------------------------------------------------------------------------
def test_auto_decides_per_device(machine):
    args = finetune.Args(manifest_uri="x", precision="auto")
    problems = finetune.Problems()
    machine(device.Hardware(cuda=True, cuda_count=1, cuda_bf16=True, cuda_capability=(8, 0)))
    assert finetune.plan.check_hardware(args, problems)["device"] == "cuda"
    assert finetune.plan.check_hardware(args, problems)["precision"] == "bf16"
    machine(device.Hardware(cuda=True, cuda_count=1, cuda_capability=(7, 5)))  # a T4: fp16 only
    assert finetune.plan.check_hardware(args, problems)["precision"] == "fp16"
    cpu = finetune.Args(manifest_uri="x", device="cpu")
    assert finetune.plan.check_hardware(cpu, problems)["device"] == "cpu"
    assert finetune.plan.check_hardware(cpu, problems)["precision"] == "fp32"  # no bf16 flags
    assert not problems


class CheckpointingProbe(Probe):
    """Probe, plus whether the base recomputes its activations during training."""

    checkpointing = None

    def on_step_end(self, args, state, control, model=None, **kw):
        self.checkpointing = model.get_base_model().is_activation_checkpointing


def test_forced_cpu_with_gradient_checkpointing_trains_lora(tracking, manifest_uri, small_csv):  # noqa: F811
    probe = CheckpointingProbe()
    result = finetune.run(fast_args(manifest_uri, small_csv, max_steps=2, device="cpu", precision="fp32",
                                    gradient_checkpointing=True), callbacks=[probe])
    run = tracking.get_run(result.run_id)
    assert run.data.params["trainer.device"] == "cpu" and run.data.params["gradient_checkpointing"] == "true"
    assert run.data.params["trainer.dtype"] == "fp32"  # the tiny model is stored in fp32
    assert probe.checkpointing is True
    lora_b = [k for k in probe.start if "lora_B" in k]
    assert lora_b and all(not torch.equal(probe.start[k], probe.end[k]) for k in lora_b)
    assert all(torch.equal(probe.start[k], probe.end[k]) for k in probe.start if "lora_" not in k)


def test_training_arguments_follow_the_plan():
    from lora_pipeline.training.session import training_arguments

    a = finetune.Args(manifest_uri="x", gradient_checkpointing=True)
    targs = training_arguments(a, "out", 1, {"device": "cpu", "precision": "fp32", "dtype": "fp32"})
    assert targs.use_cpu and not targs.bf16 and not targs.fp16 and targs.activation_checkpointing
    assert targs.activation_checkpointing_kwargs == {"use_reentrant": False}


# --- dtype -----------------------------------------------------------------------------------------
def test_auto_dtype_keeps_a_bf16_checkpoint_where_bf16_is_fast(tmp_path):
    (tmp_path / "config.json").write_text('{"dtype": "bfloat16"}')
    fast = device.Hardware(cpu_flags=frozenset({"amx_bf16"}))
    assert device.resolve_dtype("auto", tmp_path, device="cpu", hw=fast) == "bf16"
    assert device.resolve_dtype("auto", tmp_path, device="cpu", hw=NO_CUDA) == "fp32"  # bf16 slow here
    assert device.resolve_dtype("fp32", tmp_path, device="cpu", hw=fast) == "fp32"


# --- the served model and evaluate_checkpoint ------------------------------------------------------
def test_served_model_reads_device_and_dtype_at_load(monkeypatch, machine):
    machine(NO_CUDA)
    monkeypatch.delenv(device.DEVICE_ENV, raising=False)
    monkeypatch.delenv(device.DTYPE_ENV, raising=False)
    assert serving.LoadOptions.from_env() == serving.LoadOptions(device="cpu", dtype="auto")
    monkeypatch.setenv(device.DEVICE_ENV, "auto")
    monkeypatch.setenv(device.DTYPE_ENV, "bf16")
    assert serving.LoadOptions.from_env() == serving.LoadOptions(device="cpu", dtype="bf16")
    monkeypatch.setenv(device.DEVICE_ENV, "cuda")
    with pytest.raises(StepError, match=r"^E2E_LORA_DEVICE='cuda': CUDA is not available"):
        serving.LoadOptions.from_env()
    machine(GPU_NO_BNB)  # the same model, loaded on a GPU machine, goes to the GPU
    assert serving.LoadOptions.from_env().device == "cuda"
    monkeypatch.setenv(device.DTYPE_ENV, "fp8")
    with pytest.raises(StepError, match=r"^E2E_LORA_DTYPE='fp8' is not supported; use one of: auto, fp32, bf16"):
        serving.LoadOptions.from_env()


def test_served_model_loads_in_the_dtype_asked(tiny_model_dir):
    model = serving.load_placed(tiny_model_dir, serving.LoadOptions(device="cpu", dtype="bf16"))
    assert next(model.parameters()).dtype == torch.bfloat16 and model.device.type == "cpu"
    model = serving.load_placed(tiny_model_dir, serving.LoadOptions(device="cpu", dtype="auto"))
    assert next(model.parameters()).dtype == torch.float32


def test_evaluate_refuses_cuda_and_bad_memory_knobs_at_once(tracking, machine, capsys):
    machine(NO_CUDA)
    assert evaluate_checkpoint.main(["--model_uri", "models:/m-0123456789abcdef0123456789abcdef",
                                     "--device", "cuda", "--device_map", "cuda:1",
                                     "--max_memory", "0:20GiB"]) == 2
    lines = _error_lines(capsys)
    assert [ln.split("=")[0] for ln in lines] == ["error: device", "error: device_map", "error: max_memory",
                                                  "error: max_memory"], lines
    assert lines[0].startswith("error: device='cuda': CUDA is not available")
    assert re.match(r"error: device_map='cuda:1': places weights on a GPU, but the device is cpu", lines[1])
    assert not runs_with_status(tracking, "FINISHED") and not runs_with_status(tracking, "FAILED")


def test_evaluate_load_options_with_a_device_map(machine):
    machine(device.Hardware(cuda=True, cuda_count=2, cuda_bf16=True, cuda_capability=(9, 0)))
    opts = evaluate_checkpoint.load_options(evaluate_checkpoint.Args(device_map="auto",
                                                                     max_memory="0:20GiB,1:20GiB,cpu:64GiB"))
    assert opts.device == "cuda" and opts.memory.device_map == "auto"
    assert opts.memory.max_memory == {0: 20 * 2**30, 1: 20 * 2**30, "cpu": 64 * 2**30}
    assert opts.memory.from_pretrained_kwargs()["device_map"] == "auto"
