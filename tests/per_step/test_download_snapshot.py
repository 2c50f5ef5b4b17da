"""download_snapshot on local sources, and every bad input it must refuse (Hub tests: test_download_hub.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lora_pipeline import artifacts
from lora_pipeline.base.manifest import load_manifest, sha256_file
from lora_pipeline.errors import InputError
from steps import download_snapshot as ds

from conftest import runs_with_status


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_local_directory_is_logged_once_with_digests(tracking, tiny_model_dir):
    res = ds.run(ds.Args(model=str(tiny_model_dir)))
    assert res.source == "local"
    run = tracking.get_run(res.run_id)
    assert run.info.status == "FINISHED"
    assert artifacts.get_outputs(run) == {"manifest": res.manifest_uri}

    m = load_manifest(res.manifest_uri)
    files = {f.path: f for f in m.files}
    on_disk = sorted(p.name for p in tiny_model_dir.iterdir() if p.is_file())
    assert sorted(files) == on_disk and len(files) >= 4
    for name, entry in files.items():
        assert entry.sha256 == sha256_file(tiny_model_dir / name)
        assert entry.size == (tiny_model_dir / name).stat().st_size
    assert m.total_bytes == sum(f.size for f in m.files)
    assert m.has_chat_template and m.architecture == "LlamaForCausalLM" and m.task == "text-generation"
    assert m.artifact_uri == artifacts.snapshot_files_uri(res.run_id)
    # The logged copy is byte-identical to the source.
    logged = Path(tracking.download_artifacts(res.run_id, artifacts.SNAPSHOT_FILES_DIR, str(Path.cwd())))
    assert {p.name: sha256_file(p) for p in logged.iterdir()} == {k: v.sha256 for k, v in files.items()}


def test_local_directory_is_hashed_while_copied_each_file_read_once(tracking, tiny_model_dir, monkeypatch):
    """On a local store the files are copied into the run with copy_tree_hashed: no separate hashing
    pass (describe_dir / sha256_file are not called), each file opened for reading once, and the
    manifest holds the digests describe_dir gives."""
    from lora_pipeline.base import manifest as manifest_mod
    from lora_pipeline.base import snapshot, transfer

    expected = manifest_mod.describe_dir(tiny_model_dir)
    opened: list[str] = []
    real_open = open

    def counting_open(path, mode="r", *args, **kwargs):
        if "r" in mode and Path(path).parent == tiny_model_dir:
            opened.append(Path(path).name)
        return real_open(path, mode, *args, **kwargs)

    def no_second_pass(*args, **kwargs):
        raise AssertionError("the files were hashed in a pass of their own")

    with monkeypatch.context() as m:  # undone at the end of the block, the fixtures' settings kept
        m.setattr(transfer, "open", counting_open, raising=False)
        m.setattr(snapshot, "describe_dir", no_second_pass)
        m.setattr(manifest_mod, "sha256_file", no_second_pass)
        res = ds.run(ds.Args(model=str(tiny_model_dir)))
    m = load_manifest(res.manifest_uri)
    assert m.files == expected  # same paths, sizes, digests and order as before
    assert sorted(opened) == sorted(e.path for e in expected)  # each file read once, by the copy
    logged = Path(tracking.download_artifacts(res.run_id, artifacts.SNAPSHOT_FILES_DIR, str(Path.cwd())))
    assert {p.name: sha256_file(p) for p in logged.iterdir()} == {e.path: e.sha256 for e in expected}


def test_local_directory_skips_non_checkpoint_files(tracking, tiny_model_dir, tmp_path):
    d = _copy(tiny_model_dir, tmp_path / "ckpt")
    (d / "optimizer.pt").write_bytes(b"\x80\x04not-a-checkpoint-file")
    (d / "notes.md").write_text("scratch")
    m = load_manifest(ds.run(ds.Args(model=str(d))).manifest_uri)
    names = {f.path for f in m.files}
    assert "optimizer.pt" not in names and "notes.md" not in names and "model.safetensors" in names


def _bad(tmp_path: Path, tiny: Path, kind: str) -> Path:
    d = _copy(tiny, tmp_path / kind)
    if kind == "no_config":
        (d / "config.json").unlink()
    elif kind == "no_weights":
        (d / "model.safetensors").unlink()
    elif kind == "pickle_only":
        (d / "model.safetensors").rename(d / "pytorch_model.bin")
    elif kind == "no_tokenizer":
        for p in d.glob("tokenizer*"):
            p.unlink()
    elif kind == "not_causal":
        cfg = json.loads((d / "config.json").read_text())
        cfg["architectures"] = ["BertForMaskedLM"]
        (d / "config.json").write_text(json.dumps(cfg))
    elif kind == "remote_code":
        cfg = json.loads((d / "config.json").read_text())
        cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}
        (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize(
    "kind, pattern",
    [
        ("no_config", r"^model='.*no_config': directory .* has no config\.json; fix: point at a transformers checkpoint"),
        ("no_weights", r"^model='.*no_weights': directory .* has no weights \(\*\.safetensors\); fix: save the checkpoint"),
        ("pickle_only", r"^allow_pickle=False: directory .* has only pickle weights .*; fix: convert them to safetensors, or pass allow_pickle=true"),
        ("no_tokenizer", r"^model='.*no_tokenizer': directory .* has no tokenizer .*; fix: save the tokenizer"),
        ("not_causal", r"^pipeline_task='text-generation': architecture BertForMaskedLM cannot do text-generation .*; fix: choose a causal LM base"),
        ("remote_code", r"^trust_remote_code=False: LlamaForCausalLM needs custom code .*; fix: pass trust_remote_code=true only if you trust"),
    ],
)
def test_bad_local_checkpoints_are_refused_before_any_run(tracking, tiny_model_dir, tmp_path, kind, pattern):
    d = _bad(tmp_path, tiny_model_dir, kind)
    with pytest.raises(InputError, match=pattern):
        ds.run(ds.Args(model=str(d)))
    assert runs_with_status(tracking, "FINISHED") == []
    assert tracking.search_runs([e.experiment_id for e in tracking.search_experiments()]) == []


def test_pickle_weights_accepted_only_when_allowed(tracking, tiny_model_dir, tmp_path):
    d = _bad(tmp_path, tiny_model_dir, "pickle_only")
    m = load_manifest(ds.run(ds.Args(model=str(d), allow_pickle=True)).manifest_uri)
    assert "pytorch_model.bin" in {f.path for f in m.files}


@pytest.mark.parametrize(
    "args, pattern",
    [
        (ds.Args(model="./does-not-exist"), r"^model='\./does-not-exist': no such directory; fix: pass an existing checkpoint directory"),
        (ds.Args(model="missing.gguf"), r"^model='missing\.gguf': no such \.gguf file; fix: check the path"),
        (ds.Args(model="not a repo id!"), r"^model='not a repo id!': is neither a Hub repo id .*; fix: pass one of those"),
        (ds.Args(pipeline_task="summarization"), r"^pipeline_task='summarization': is not supported; fix: use one of: text-generation"),
        (ds.Args(model="org/name", revision="g" * 40), r"^revision='g{40}': looks like a commit SHA but is not 40 hex digits"),
        (ds.Args(hub_retries=-1), r"^hub_retries=-1: must be >= 0; fix: pass a number >= 0"),
    ],
)
def test_bad_arguments(tracking, args, pattern):
    with pytest.raises(InputError, match=pattern):
        ds.run(args)
    assert runs_with_status(tracking, "FINISHED") == []


def test_all_problems_reported_at_once(tracking):
    with pytest.raises(InputError) as info:
        ds.run(ds.Args(model="missing.gguf", pipeline_task="summarization", hub_retries=-2, hub_backoff_s=-1.0))
    fields = [p.field for p in info.value.problems]
    assert fields == ["pipeline_task", "hub_retries", "hub_backoff_s", "model"]


def test_unreadable_gguf_is_refused(tracking, tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"this is not a gguf file at all")
    with pytest.raises(InputError, match=r"^model='.*broken\.gguf': .*broken\.gguf.*; fix: pass a readable \.gguf file"):
        ds.run(ds.Args(model=str(bad)))
    assert runs_with_status(tracking, "FINISHED") == []


def test_cli_prints_one_line_per_problem_and_exits_2(tracking, capsys):
    code = ds.main(["--model", "missing.gguf", "--pipeline_task", "summarization"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == [
        "error: pipeline_task='summarization': is not supported; fix: use one of: text-generation",
        "error: model='missing.gguf': no such .gguf file; fix: check the path",
    ]
