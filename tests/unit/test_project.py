"""The project's own promises: one declaration per parameter, one source of versions, two commands."""

from __future__ import annotations

import dataclasses
import importlib
import re
import subprocess
import sys

import yaml

from build_tools import envfile, mlproject
from lora_pipeline.cli import args_from_cli, build_parser, fields_of

from conftest import ROOT


def test_mlproject_is_rendered_from_args():
    committed = (ROOT / "MLproject").read_text()
    assert committed == mlproject.render(), "MLproject is stale: run `make mlproject`"


def test_mlproject_parameters_equal_code_defaults():
    spec = yaml.safe_load((ROOT / "MLproject").read_text())
    assert set(spec["entry_points"]) == set(mlproject.ENTRY_POINTS)
    checked = 0
    for ep, body in spec["entry_points"].items():
        args_cls = importlib.import_module(f"steps.{ep}").Args
        params = body["parameters"]
        # the step's Args plus `config`, which every entry point takes (lora_pipeline/cli.py)
        assert set(params) == {f.name for f in dataclasses.fields(args_cls)} | {"config"}, ep
        assert params["config"] == {"type": "string", "default": ""}, ep
        for f, typ in fields_of(args_cls):
            default = params[f.name]["default"]
            expected = str(f.default).lower() if typ is bool else f.default
            assert default == expected, f"{ep}.{f.name}: MLproject {default!r} != code {f.default!r}"
            # Every parameter reaches the CLI under its own name.
            assert f"--{f.name} {{{f.name}}}" in body["command"]
            checked += 1
    assert checked >= 8


def test_cli_parser_accepts_mlproject_defaults():
    """What MLflow substitutes from MLproject defaults parses back to the code defaults."""
    spec = yaml.safe_load((ROOT / "MLproject").read_text())
    for ep, body in spec["entry_points"].items():
        args_cls = importlib.import_module(f"steps.{ep}").Args
        argv = []
        for name, p in body["parameters"].items():
            argv += [f"--{name}", str(p["default"])]
        ns = build_parser(args_cls, ep).parse_args(argv)
        assert args_from_cli(args_cls, vars(ns)) == args_cls(), ep


def test_conda_yaml_is_rendered_from_requirements():
    assert (ROOT / "conda.yaml").read_text() == envfile.render(), "conda.yaml is stale: run `make conda-env`"
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())
    pip = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    assert pip == envfile.requirements() and len(pip) >= 8
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-]+==[0-9][0-9A-Za-z.+\-]*", r) for r in pip), pip


def test_requirements_are_the_installed_versions():
    from importlib import metadata

    for req in envfile.requirements():
        name, version = req.split("==")
        assert metadata.version(name).split("+")[0] == version, f"{name}: installed != pinned"


def test_readme_opens_with_the_two_commands_and_ci_calls_make_test():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", readme, flags=re.S)
    assert blocks, "README has no command block"
    assert blocks[0].split() == ["make", "run", "make", "test"]
    assert re.search(r"^make test$", (ROOT / ".ci" / "run").read_text(), flags=re.M)


def test_help_is_instant_and_imports_nothing_heavy():
    """`--help` must not import torch/transformers/mlflow (heavy imports live inside functions)."""
    for ep in mlproject.ENTRY_POINTS:
        code = (f"import sys\nfrom steps import {ep}\n"
                "try:\n    {0}.main(['--help'])\nexcept SystemExit:\n    pass\n"
                "heavy = [m for m in ('torch', 'transformers', 'mlflow', 'peft', 'datasets') if m in sys.modules]\n"
                "print('HEAVY', heavy)\n").replace("{0}", ep)
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                             timeout=60)
        assert "usage:" in out.stdout, out.stderr
        assert "HEAVY []" in out.stdout, f"{ep}: {out.stdout.splitlines()[-1]}"
