"""The shipped accelerate configs (configs/accelerate/) and the `distributed` value that selects one.

The YAML files are read by accelerate 1.15 the way `accelerate launch --config_file` reads them: its
config class refuses unknown top-level keys, every nested key must be a launcher option, and the
FSDP file must build accelerate's FSDP plugin. `accelerate.commands.launch._validate_launch_command`
is private: if upstream renames it, the test below fails loudly and names it.
"""

from __future__ import annotations

import re

import pytest
import yaml

from lora_pipeline.errors import InputError, Problems
from lora_pipeline.training import distributed as dist

FSDP = dist.CONFIG_DIR / "fsdp.yaml"
ZERO3 = dist.CONFIG_DIR / "deepspeed_zero3.yaml"


@pytest.fixture
def deepspeed_installed(monkeypatch):
    real = dist.importlib.util.find_spec
    monkeypatch.setattr(dist.importlib.util, "find_spec",
                        lambda name, *a: object() if name == "deepspeed" else real(name, *a))


# --- selecting a file ---------------------------------------------------------------------------------
def test_none_selects_no_file_on_any_device():
    assert dist.accelerate_config("none", device="cpu") is None
    assert dist.accelerate_config("none", device="cuda") is None


def test_fsdp_and_zero3_select_their_files_on_cuda(deepspeed_installed):
    assert dist.accelerate_config("fsdp") == FSDP
    assert dist.accelerate_config("deepspeed_zero3") == ZERO3


def test_an_unknown_value_lists_the_accepted_ones():
    with pytest.raises(InputError, match=re.escape(
            "distributed='zero2': is not a distributed strategy; fix: use one of: none, fsdp, "
            "deepspeed_zero3")):
        dist.accelerate_config("zero2")


def test_sharding_on_cpu_is_an_error_naming_ddp_as_the_fix():
    with pytest.raises(InputError, match=re.escape(
            "distributed='fsdp': shards the model over GPUs, and the device is cpu; fix: pass "
            "distributed=none (num_processes > 1 then runs DDP, gloo on CPU), or device=cuda on a GPU "
            "machine")):
        dist.accelerate_config("fsdp", device="cpu")


def test_zero3_without_deepspeed_names_the_install_command(monkeypatch):
    real = dist.importlib.util.find_spec
    monkeypatch.setattr(dist.importlib.util, "find_spec",
                        lambda name, *a: None if name == "deepspeed" else real(name, *a))
    with pytest.raises(InputError, match=re.escape(
            "distributed='deepspeed_zero3': needs the deepspeed package, which is not installed; fix: "
            "pip install deepspeed (on a CUDA machine), or pass distributed=fsdp or distributed=none")):
        dist.accelerate_config("deepspeed_zero3")


def test_a_missing_or_altered_file_is_named(monkeypatch):
    monkeypatch.setattr(dist, "CONFIG_DIR", dist.PROJECT_ROOT / "no-such-dir")
    with pytest.raises(InputError, match=re.escape(
            "distributed='fsdp': its accelerate config no-such-dir/fsdp.yaml is missing or unreadable; "
            "fix: restore configs/accelerate/fsdp.yaml from the repository")):
        dist.accelerate_config("fsdp")
    altered = dist.PROJECT_ROOT / "configs" / "accelerate"
    monkeypatch.setattr(dist, "STRATEGIES", {**dist.STRATEGIES, "fsdp": ("deepspeed_zero3.yaml", "FSDP")})
    monkeypatch.setattr(dist, "CONFIG_DIR", altered)
    with pytest.raises(InputError, match=re.escape(
            "its accelerate config configs/accelerate/deepspeed_zero3.yaml declares distributed_type "
            "DEEPSPEED, not FSDP")):
        dist.accelerate_config("fsdp")


def test_every_problem_goes_into_a_collector(monkeypatch):
    monkeypatch.setattr(dist.importlib.util, "find_spec", lambda name, *a: None)
    problems = Problems()
    assert dist.accelerate_config("deepspeed_zero3", device="cpu", problems=problems) is None
    assert [p.message.split(",")[0] for p in problems.items] == [
        "shards the model over GPUs", "needs the deepspeed package"]


def test_launch_args():
    assert dist.launch_args(FSDP, 4) == ["--config_file", str(FSDP), "--num_processes", "4"]
    with pytest.raises(InputError, match=re.escape("num_processes=0: must be > 0")):
        dist.launch_args(FSDP, 0)


# --- the files, as accelerate 1.15 reads them --------------------------------------------------------
@pytest.mark.parametrize("path", [FSDP, ZERO3], ids=lambda p: p.name)
def test_the_config_has_only_keys_accelerate_knows(path):
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import launch_command_parser

    config = ClusterConfig.from_yaml_file(str(path))  # raises on an unknown top-level key
    assert config.mixed_precision == "no"  # the step's precision decides
    options = {a.dest for a in launch_command_parser()._actions}
    raw = yaml.safe_load(path.read_text())
    nested = {**raw.get("fsdp_config", {}), **raw.get("deepspeed_config", {})}
    assert nested
    unknown = [k for k in nested if k not in options]
    assert not unknown, f"{path.name}: keys accelerate launch ignores: {unknown}"


def _launch_env(path):
    from accelerate.commands.launch import launch_command_parser

    try:
        from accelerate.commands.launch import _validate_launch_command
    except ImportError as err:  # upstream moved it: the check below needs another way in
        pytest.fail(f"accelerate.commands.launch._validate_launch_command is gone ({err}); update this test")
    args = launch_command_parser().parse_args(["--config_file", str(path), "--num_processes", "2", "train.py"])
    _validate_launch_command(args)
    return args


def test_the_fsdp_file_builds_accelerates_fsdp2_plugin(monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = _launch_env(FSDP)
    assert args.use_fsdp and args.num_processes == 2
    env = prepare_multi_gpu_env(args)
    for key, value in env.items():
        if key.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is True
    assert plugin.cpu_ram_efficient_loading is True
    assert str(plugin.state_dict_type).endswith("FULL_STATE_DICT")
    assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"
    assert env["ACCELERATE_MIXED_PRECISION"] == "no"


def test_the_zero3_file_sets_stage_3(monkeypatch):
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    args = _launch_env(ZERO3)
    assert args.use_deepspeed
    # What `accelerate launch` sets before it hands over to the DeepSpeed launcher.
    args.deepspeed_fields_from_accelerate_config = ",".join(yaml.safe_load(ZERO3.read_text())["deepspeed_config"])
    _, env = prepare_deepspeed_cmd_env(args)
    assert env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "3"
    assert env["ACCELERATE_DEEPSPEED_ZERO3_INIT"] == "true"
    assert env["ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE"] == "none"
    # Left "auto", so the Trainer fills them from the step's arguments.
    assert "ACCELERATE_GRADIENT_ACCUMULATION_STEPS" not in env
