"""Security defaults: no remote code, no pickle unless asked, and a pickle never runs code when loaded.

Covered elsewhere and referenced here:
  * a model that needs remote code is refused with the opt-in named: tests/test_bad_inputs.py
    (ds-remote-code-refused); pickle-only checkpoints refused: ds-pickle-refused and
    tests/test_download_hub.py::test_pickle_only_repo_is_refused;
  * secrets never stored: tests/faults/test_secrets.py;
  * basic auth refuses an anonymous client: tests/test_team_server.py::
    test_basic_auth_refuses_anonymous_and_accepts_the_admin.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import shutil
from pathlib import Path

import pytest

from lora_pipeline.base.manifest import load_manifest
from steps import download_snapshot as ds

from conftest import ROOT

pytestmark = pytest.mark.faults

STEP_MODULES = ("download_snapshot", "finetune", "log_reference", "evaluate_checkpoint", "persist_and_register",
                "main")


def test_no_code_turns_trust_remote_code_on():
    """Every `trust_remote_code=` in the pipeline is False or passed through from a parameter."""
    found = []
    # The entry points and the core package they stand on (the loaders live in lora_pipeline/).
    for path in sorted([*(ROOT / "steps").glob("*.py"), *(ROOT / "lora_pipeline").rglob("*.py")]):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
                found.append(path.name)
                assert not (isinstance(node.value, ast.Constant) and node.value.value is not False), \
                    f"{path.name}:{node.value.lineno} sets trust_remote_code={ast.unparse(node.value)}"
    assert "serving.py" in found and "download_snapshot.py" in found  # the scan saw the loaders
    for name in STEP_MODULES:
        for f in dataclasses.fields(importlib.import_module(f"steps.{name}").Args):
            if f.name in ("trust_remote_code", "allow_pickle"):
                assert f.default is False, (name, f.name)


class _RunsCode:
    """Unpickling this runs `touch <marker>` (what a malicious checkpoint would do, more harmfully)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_pickle_is_pinned_only_when_allowed_and_never_runs_code(tracking, tiny_model_dir, tmp_path):
    import torch

    from lora_pipeline.model import serving

    marker = tmp_path / "code-ran"
    d = tmp_path / "evil"
    shutil.copytree(tiny_model_dir, d)
    (d / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": _RunsCode(marker)}, d / "pytorch_model.bin")

    with pytest.raises(Exception, match=r"allow_pickle=False: .* has only pickle weights"):
        ds.run(ds.Args(model=str(d)))
    res = ds.run(ds.Args(model=str(d), allow_pickle=True))  # explicitly allowed: pinned
    assert "pytorch_model.bin" in {f.path for f in load_manifest(res.manifest_uri).files}
    # Loading it (as every step does, through serving) must refuse the code, not run it.
    with pytest.raises(Exception, match=r"(?s)Weights only load failed.*unsupported GLOBAL posix\.system"):
        serving.load_causal_lm(serving.resolve_base(load_manifest(res.manifest_uri)))
    assert not marker.exists(), "unpickling the checkpoint ran code"


def test_pickle_is_ignored_when_safetensors_exist(tracking, tiny_model_dir, tmp_path):
    d = tmp_path / "both"
    shutil.copytree(tiny_model_dir, d)
    (d / "pytorch_model.bin").write_bytes(b"not needed")
    files = {f.path for f in load_manifest(ds.run(ds.Args(model=str(d), allow_pickle=True)).manifest_uri).files}
    assert "model.safetensors" in files and "pytorch_model.bin" not in files
