"""Config files (lora_pipeline/config.py), the example configs/ and the task samples they read."""

from __future__ import annotations

import dataclasses
import importlib
import subprocess
import sys

import pytest
import yaml

from lora_pipeline.cli import build_parser, fields_of, param
from lora_pipeline.config import CONFIG_PARAM, args_with_config, load_config, merge
from lora_pipeline.errors import InputError
from lora_pipeline.task import formats
from lora_pipeline.task.tasks import get_task

from conftest import ROOT


@dataclasses.dataclass
class Args:
    dataset: str = param("data/sample.csv", "data")
    learning_rate: float = param(2e-3, "lr")
    max_steps: int = param(40, "steps")
    use_cache: bool = param(True, "cache")
    target_modules: str = param("q_proj", "modules")
    config: str = CONFIG_PARAM


def write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def parse(argv):
    return vars(build_parser(Args, "test").parse_args(argv))


# --- loading -------------------------------------------------------------------------------------
def test_values_are_typed_like_the_command_line_s(tmp_path):
    path = write(tmp_path, "learning_rate: 1e-3\nmax_steps: '60'\nuse_cache: 'no'\n"
                           "target_modules: [q_proj, v_proj]\ndataset: 2024\n")
    assert load_config(path, Args) == {"learning_rate": 0.001, "max_steps": 60, "use_cache": False,
                                       "target_modules": "q_proj,v_proj", "dataset": "2024"}
    assert load_config(write(tmp_path, "# nothing yet\n", "empty.yaml"), Args) == {}


def test_every_problem_at_once_with_the_nearest_name(tmp_path):
    path = write(tmp_path, "learnin_rate: 0.1\nmax_steps: 1.5\nuse_cache: maybe\nzzz: 1\nconfig: other.yaml\n"
                           "dataset:\n")
    with pytest.raises(InputError) as err:
        load_config(path, Args)
    assert err.value.lines() == [
        f"learnin_rate=0.1: is not a parameter of test_config (in {path}); fix: did you mean learning_rate?",
        f"max_steps=1.5: must be a whole number (in {path}); fix: write a whole number, or remove the line for "
        "the default",
        f"use_cache='maybe': must be true or false (in {path}); fix: write true or false, or remove the line "
        "for the default",
        f"zzz=1: is not a parameter of test_config (in {path}); fix: use one of: dataset, learning_rate, "
        "max_steps, target_modules, use_cache",
        f"config='other.yaml': cannot be set in a config file ({path}); fix: remove it: a config file does not "
        "name another",
        f"dataset='None': has no value (in {path}); fix: write text, or remove the line for the default",
    ]


def test_unreadable_files(tmp_path):
    with pytest.raises(InputError, match=r"^config='nope\.yaml': no such file \(.*\); fix: check the path, e\.g\. "
                                         r"configs/finetune_json_messages\.yaml$"):
        load_config("nope.yaml", Args)
    with pytest.raises(InputError, match=r"^config='.*bad\.yaml': is not valid YAML \(.*\); fix: fix the file"):
        load_config(write(tmp_path, "a: [1,\n", "bad.yaml"), Args)
    with pytest.raises(InputError, match=r"^config='.*list\.yaml': holds a list, not parameter: value lines"):
        load_config(write(tmp_path, "- a\n- b\n", "list.yaml"), Args)


# --- merging -------------------------------------------------------------------------------------
def test_defaults_then_file_then_command_line_values_other_than_the_default(tmp_path):
    path = write(tmp_path, "learning_rate: 1e-3\nmax_steps: 60\nuse_cache: false\n")
    # As `mlflow run` calls a step: every parameter on the command line, most at their defaults.
    argv = ["--config", path, "--learning_rate", "0.002", "--max_steps", "100", "--use_cache", "true",
            "--dataset", "data/sample.csv"]
    args = args_with_config(Args, parse(argv))
    assert args == Args(dataset="data/sample.csv", learning_rate=1e-3, max_steps=100, use_cache=False,
                        config=path)
    assert merge(Args, {"max_steps": 60}, {}) == Args(max_steps=60)


def test_without_a_config_the_command_line_alone(tmp_path):
    assert args_with_config(Args, parse(["--max_steps", "7"])) == Args(max_steps=7)

    @dataclasses.dataclass
    class NoConfig:
        max_steps: int = param(40, "steps")

    assert args_with_config(NoConfig, {"max_steps": 3}) == NoConfig(3)


# --- the example configs and the data they read --------------------------------------------------
def _entry_args(entry: str):
    """The step's Args plus the data parameters (formats.DataArgs) and `config`, as a later change
    gives every step that reads examples."""
    step = importlib.import_module(f"steps.{entry}").Args
    fields, seen = [], set()
    for cls in (step, formats.DataArgs):
        for f, typ in fields_of(cls):
            if f.name not in seen:
                seen.add(f.name)
                fields.append((f.name, typ, dataclasses.field(default=f.default)))
    fields.append(("config", str, dataclasses.field(default="")))
    return dataclasses.make_dataclass("Args", fields, namespace={"__module__": f"steps.{entry}"})


CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
ENTRIES = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]


def test_there_is_a_config_for_each_task():
    tasks = {yaml.safe_load(p.read_text())["task"] for p in CONFIGS}
    assert tasks == {"e2e", "json", "text"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_each_config_is_valid_and_its_data_loads(path):
    entry = next(e for e in sorted(ENTRIES, key=len, reverse=True) if path.stem.startswith(e + "_"))
    args_cls = _entry_args(entry)
    args = args_with_config(args_cls, {"config": str(path.relative_to(ROOT))})
    data_args = formats.DataArgs(**{f.name: getattr(args, f.name) for f in dataclasses.fields(formats.DataArgs)})
    source = args.dataset if entry == "finetune" else args.eval_data
    loaded = formats.load(source, task=get_task(args.task), args=data_args)
    assert len(loaded.examples) >= 50
    if entry == "finetune":
        train, val = formats.split(loaded.examples, args.validation_fraction, args.seed, unit=loaded.unit)
        assert train and val
        assert args.augment_fraction == 0 or get_task(args.task).supports_augmentation


# --- the task samples ----------------------------------------------------------------------------
SAMPLES = ("json_messages.jsonl", "json_columns.csv", "text_prompt_completion.csv",
           "e2e_prompt_completion.parquet")


def test_task_samples_are_what_the_generator_writes(tmp_path):
    gen = [sys.executable, str(ROOT / "data" / "make_task_samples.py")]
    proc = subprocess.run(gen + ["--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = subprocess.run(gen + ["--out-dir", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in SAMPLES:
        committed = (ROOT / "data" / name).read_bytes()
        assert (tmp_path / name).read_bytes() == committed, name
        assert 5_000 < len(committed) < 200_000, name
    (tmp_path / SAMPLES[0]).write_text("changed\n")
    proc = subprocess.run(gen + ["--check", "--out-dir", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 1 and "DIFFER from the generator: json_messages.jsonl" in proc.stdout


def test_json_sample_has_lists_follow_ups_and_faithful_values():
    loaded = formats.load(str(ROOT / "data" / "json_messages.jsonl"), task=get_task("json"),
                          args=formats.DataArgs(task="json", group_column="venue"))
    import json

    multi = [ex for ex in loaded.examples if len(ex.messages) == 4]
    assert 10 <= len(multi) <= 40 and all(ex.targets == [False, True, False, True] for ex in multi)
    two_near = 0
    for ex in loaded.examples:
        rec = json.loads(ex.messages[1]["content"])
        sentence = ex.messages[0]["content"]
        assert rec["name"] in sentence and all(n in sentence for n in rec.get("near", []))
        two_near += len(rec.get("near", [])) == 2
    assert two_near >= 5
