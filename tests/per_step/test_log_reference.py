"""log_reference: a served model that refers to its base; full models logged without loading them."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import mlflow
import pytest
from test_serving import log_checkpoint, make_adapter, snapshot

from lora_pipeline import artifacts
from lora_pipeline.base.manifest import load_manifest, sha256_file
from lora_pipeline.errors import InputError, StepError
from lora_pipeline.model import serving
from steps import log_reference as lr

from conftest import runs_with_status


def _logged_files(model_id: str) -> dict[str, Path]:
    root = Path(mlflow.MlflowClient().get_logged_model(model_id).artifact_location
                .removeprefix("file://"))
    return {p.relative_to(root).as_posix(): p for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory) -> Path:
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("lr-adapter") / "adapter")


@pytest.fixture
def checkpoint(tracking, tiny_model_dir, adapter, tmp_path) -> tuple[str, str]:
    """(manifest URI, checkpoint URI) as finetune leaves them: adapter + trainer state."""
    manifest_uri = snapshot(str(tiny_model_dir))
    state = tmp_path / "trainer_state"
    state.mkdir()
    (state / "optimizer.pt").write_bytes(b"\x80optimizer state" * 100)
    return manifest_uri, log_checkpoint(manifest_uri, adapter, trainer_state=state, step=3)


def test_reference_model_refers_to_base_and_serves(tracking, checkpoint, tiny_model_dir, adapter):
    manifest_uri, ckpt = checkpoint
    res = lr.run(lr.Args(manifest_uri=manifest_uri, checkpoint_uri=ckpt))

    run = tracking.get_run(res.run_id)
    assert run.info.status == "FINISHED"
    assert artifacts.get_outputs(run) == {"model": res.model_uri}
    lm = mlflow.MlflowClient().get_logged_model(res.model_id)
    assert lm.name == artifacts.REFERENCE_MODEL_NAME and lm.source_run_id == res.run_id
    assert lm.tags[artifacts.SOURCE_MODEL_TAG] == ckpt and lm.tags[artifacts.MODEL_KIND_TAG] == "adapter"

    files = _logged_files(res.model_id)
    # The adapter is there byte for byte; the trainer state and the base weights are not.
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert sha256_file(files[f"artifacts/{artifacts.ADAPTER_ARTIFACT}/{name}"]) == \
            sha256_file(adapter / name)
    assert not any(artifacts.TRAINER_STATE_ARTIFACT in f for f in files)
    base_digests = {f.sha256 for f in load_manifest(manifest_uri).files if f.path.endswith(".safetensors")}
    assert base_digests and not base_digests & {sha256_file(p) for p in files.values()}
    assert res.logged_bytes == sum(p.stat().st_size for p in files.values())
    assert run.data.metrics["logged_model_bytes"] == res.logged_bytes

    # Signature and input example as served: column `prompt`, the generation params.
    info = mlflow.models.get_model_info(res.model_uri)
    assert info.signature.inputs.input_names() == ["prompt"]
    assert {"temperature", "max_new_tokens", "do_sample"} <= {p.name for p in info.signature.params.params}
    local = str(files["MLmodel"].parent)
    example = mlflow.models.Model.load(local).load_input_example(local)
    assert list(example["prompt"]) == [serving.INPUT_EXAMPLE_SENTENCE]
    out = mlflow.pyfunc.load_model(res.model_uri).predict(example, params={"max_new_tokens": 4})
    assert list(out.columns) == ["mr", "attributes", "valid", "error"] and len(out) == 1


def test_default_checkpoint_is_the_latest_finetune_best(tracking, tiny_model_dir, adapter):
    manifest_uri = snapshot(str(tiny_model_dir))
    ckpts = []
    for _ in range(2):  # two finetune runs: the later one wins
        ckpt = log_checkpoint(manifest_uri, adapter)
        run_id = mlflow.MlflowClient().get_logged_model(artifacts.parse_model_id_uri(ckpt)).source_run_id
        tracking.set_tag(run_id, artifacts.STEP_TAG, "finetune")
        artifacts.set_outputs(tracking, run_id, {"checkpoint": ckpt})
        ckpts.append(ckpt)
    res = lr.run(lr.Args())
    lm = mlflow.MlflowClient().get_logged_model(res.model_id)
    assert lm.tags[artifacts.SOURCE_MODEL_TAG] == ckpts[-1]
    assert res.base_reference == load_manifest(manifest_uri).reference()


def test_runs_uri_of_a_checkpoint_is_accepted(tracking, checkpoint):
    _, ckpt = checkpoint
    lm = mlflow.MlflowClient().get_logged_model(artifacts.parse_model_id_uri(ckpt))
    res = lr.run(lr.Args(checkpoint_uri=f"runs:/{lm.source_run_id}/{lm.name}"))
    assert mlflow.MlflowClient().get_logged_model(res.model_id).tags[artifacts.SOURCE_MODEL_TAG] == ckpt


def test_manifest_of_another_base_is_refused(tracking, checkpoint, tmp_path):
    from hubserver import make_tiny_llama

    _, ckpt = checkpoint
    other = snapshot(str(make_tiny_llama(tmp_path / "other", seed=3)))
    with pytest.raises(InputError, match=r"^manifest_uri='runs:/.*': pins base runs:/.*, but the "
                                         r"checkpoint was trained on runs:/"):
        lr.run(lr.Args(manifest_uri=other, checkpoint_uri=ckpt))
    assert not runs_with_status(tracking, "FAILED")


def test_adapter_that_does_not_fit_the_base_is_an_error(tracking, tiny_model_dir, tmp_path):
    """MLflow's own serving check only warns; log_reference loads the logged model and fails."""
    from transformers import AutoConfig, LlamaForCausalLM

    cfg = AutoConfig.from_pretrained(tiny_model_dir)
    cfg.hidden_size, cfg.intermediate_size = 64, 128  # the same layers, other shapes
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "wider")
    adapter = make_adapter(tmp_path / "wider", tmp_path / "wider-adapter")
    ckpt = log_checkpoint(snapshot(str(tiny_model_dir)), adapter)
    with pytest.raises(StepError, match=r"the logged model models:/m-\w+ does not serve: .*size"):
        lr.run(lr.Args(checkpoint_uri=ckpt))
    failed = runs_with_status(tracking, "FAILED")
    assert len(failed) == 1 and "model" not in artifacts.get_outputs(failed[0])


# --- full models: the memory-efficient path ----------------------------------------------------
@pytest.fixture
def no_weight_loading(monkeypatch):
    """Any attempt to read weights during logging fails the test."""
    import safetensors
    import safetensors.torch
    import torch
    import transformers

    def refuse(*a, **k):
        raise AssertionError("weights were loaded while logging")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    monkeypatch.setattr(safetensors.torch, "load", refuse)
    monkeypatch.setattr(safetensors, "safe_open", refuse)
    monkeypatch.setattr(torch, "load", refuse)


def test_full_model_is_logged_file_by_file_without_loading(tracking, tiny_model_dir, tmp_path,
                                                          no_weight_loading):
    manifest_uri = snapshot(str(tiny_model_dir))
    ckpt = shutil.copytree(tiny_model_dir, tmp_path / "checkpoint-500")
    (ckpt / "optimizer.pt").write_bytes(b"\x80optimizer")  # Trainer leftovers: not served, not logged
    (ckpt / "training_args.bin").write_bytes(b"\x80args")
    res = lr.run(lr.Args(manifest_uri=manifest_uri, full_model_dir=str(ckpt)))

    assert res.kind == "full"
    files = _logged_files(res.model_id)
    logged = {k.split("/", 2)[2]: sha256_file(p) for k, p in files.items()
              if k.startswith(f"artifacts/{artifacts.FULL_MODEL_ARTIFACT}/")}
    expected = {p.name: sha256_file(p) for p in tiny_model_dir.iterdir() if p.is_file()}
    assert logged == expected
    assert mlflow.MlflowClient().get_logged_model(res.model_id).tags[artifacts.MODEL_KIND_TAG] == "full"
    assert mlflow.models.get_model_info(res.model_uri).saved_input_example_info is not None
    # The spy is live: loading the model (what MLflow's serving check would do) trips it.
    with pytest.raises(AssertionError, match="weights were loaded"):
        serving.load_causal_lm(ckpt)


def test_full_model_files_are_read_once_and_their_digests_catch_a_flipped_byte(
        tracking, tiny_model_dir, tmp_path, monkeypatch, no_weight_loading):
    """Each checkpoint byte is read once (copied into the store and hashed on the way: no hashing
    pass, no copy by MLflow); the digests recorded are those of the stored bytes, so the load-time
    check passes on them and names a file whose byte was flipped afterwards."""
    import hashlib
    import io

    from lora_pipeline.base import transfer

    manifest_uri = snapshot(str(tiny_model_dir))
    ckpt = shutil.copytree(tiny_model_dir, tmp_path / "checkpoint-7")
    read: dict[str, int] = {}
    real_open = open

    class Counting(io.RawIOBase):
        def __init__(self, f, name):
            self._f, self._name = f, name

        def readinto(self, b):
            n = self._f.readinto(b)
            read[self._name] = read.get(self._name, 0) + (n or 0)
            return n

        def fileno(self):
            return self._f.fileno()

        def close(self):
            self._f.close()
            super().close()

    def counting_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return Counting(f, Path(path).name) if "r" in mode else f

    def no_second_read(*a, **k):
        raise AssertionError("a full-model file was read apart from its copy")

    real_describe = serving.describe_artifacts

    def describe_without_full_model(dirs):
        assert artifacts.FULL_MODEL_ARTIFACT not in dirs, "the full model was hashed in a second pass"
        return real_describe(dirs)

    monkeypatch.setattr(transfer, "open", counting_open, raising=False)
    monkeypatch.setattr(serving, "describe_artifacts", describe_without_full_model)
    monkeypatch.setattr(serving, "sha256_file", no_second_read)
    res = lr.run(lr.Args(manifest_uri=manifest_uri, full_model_dir=str(ckpt)))
    monkeypatch.undo()

    sizes = {p.name: p.stat().st_size for p in ckpt.iterdir() if p.is_file()}
    assert read == sizes  # every byte once, through the hashing copy
    files = _logged_files(res.model_id)
    prefix = f"{artifacts.MODEL_ARTIFACTS_DIR}/{artifacts.FULL_MODEL_ARTIFACT}/"
    stored = {k.removeprefix(prefix): p for k, p in files.items() if k.startswith(prefix)}
    assert set(stored) == set(sizes) and not [k for k in files if k.endswith(".partial")]
    recorded = json.loads(files[f"{artifacts.MODEL_ARTIFACTS_DIR}/{artifacts.ARTIFACT_DIGESTS}"].read_text())
    assert recorded[artifacts.FULL_MODEL_ARTIFACT] == {
        n: {"size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
        for n, p in stored.items()}
    # MLflow lists the placed folder as the model's artifact: the loader finds it there.
    info = mlflow.models.get_model_info(res.model_uri)
    pyfunc_arts = info.flavors["python_function"]["artifacts"]
    assert pyfunc_arts[artifacts.FULL_MODEL_ARTIFACT]["path"] == prefix.rstrip("/")
    assert str(mlflow.MlflowClient().get_logged_model(res.model_id).status).endswith("READY")

    root = files[f"{artifacts.MODEL_ARTIFACTS_DIR}/{artifacts.ARTIFACT_DIGESTS}"].parent
    paths = {name: root / spec["path"].removeprefix(f"{artifacts.MODEL_ARTIFACTS_DIR}/")
             for name, spec in pyfunc_arts.items()}
    serving.verify_artifacts(paths, res.model_uri)  # the recorded digests are the stored bytes'
    weights = stored["model.safetensors"]
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(StepError, match=r"digest mismatch for full_model file model\.safetensors"):
        serving.verify_artifacts(paths, res.model_uri)


def test_a_full_model_copy_that_fails_leaves_a_failed_model_without_files(
        tracking, tiny_model_dir, tmp_path, monkeypatch):
    from lora_pipeline.base import transfer

    manifest_uri = snapshot(str(tiny_model_dir))
    ckpt = shutil.copytree(tiny_model_dir, tmp_path / "checkpoint-8")
    real = transfer.copy_file_hashed

    def fail_on_weights(src, dst, **kw):
        if src.name == "model.safetensors":
            raise OSError(28, "No space left on device")
        return real(src, dst, **kw)

    monkeypatch.setattr(transfer, "copy_file_hashed", fail_on_weights)
    with pytest.raises(OSError, match="No space left"):
        lr.run(lr.Args(manifest_uri=manifest_uri, full_model_dir=str(ckpt)))
    client = mlflow.MlflowClient()
    exp = tracking.get_experiment_by_name("tests").experiment_id
    models = [m for m in client.search_logged_models([exp]) if m.name == artifacts.REFERENCE_MODEL_NAME]
    assert len(models) == 1 and str(models[0].status).endswith("FAILED")
    root = Path(models[0].artifact_location.removeprefix("file://"))
    assert not (root / artifacts.MODEL_ARTIFACTS_DIR / artifacts.FULL_MODEL_ARTIFACT).exists()
    assert not (root / artifacts.MLMODEL_FILE).exists()


def test_a_full_json_model_carries_its_task_and_serves_as_json(tracking, tiny_model_dir, tmp_path):
    """A merged checkpoint has no task.json of its own: `task`/`system_prompt` give it one, the same
    file finetune writes for an adapter, so serving (and evaluate_checkpoint, the gate) read it."""
    import pandas as pd

    from lora_pipeline.task.tasks import task_spec

    manifest_uri = snapshot(str(tiny_model_dir))
    res = lr.run(lr.Args(manifest_uri=manifest_uri, full_model_dir=str(tiny_model_dir), task="json",
                         system_prompt="JSON."))
    spec = json.loads(_logged_files(res.model_id)[f"artifacts/{artifacts.TASK_ARTIFACT}"].read_text())
    assert spec == task_spec("json", "JSON.") == {"version": 1, "task": "json", "system_prompt": "JSON."}
    model = mlflow.pyfunc.load_model(res.model_uri)
    out = model.predict(pd.DataFrame({"messages": [[{"role": "user", "content": "Kobo is a pub."}]]}),
                        params={"max_new_tokens": 4})
    assert list(out.columns) == ["text", "parsed", "valid", "error"] and out["error"][0] is None


def test_a_task_that_disagrees_with_the_checkpoint_is_refused(tracking, checkpoint):
    manifest_uri, ckpt = checkpoint  # an e2e checkpoint
    with pytest.raises(InputError, match=r"^task='json': the checkpoint .* was trained for task=e2e; fix: pass "
                                         r"task=e2e, or leave the default$"):
        lr.run(lr.Args(manifest_uri=manifest_uri, checkpoint_uri=ckpt, task="json"))
    runs = tracking.search_runs([e.experiment_id for e in tracking.search_experiments()])
    assert not [r for r in runs if r.data.tags.get(artifacts.STEP_TAG) == "log_reference"]  # refused first


def _broken_full_dir(tmp_path: Path, tiny: Path, kind: str) -> Path:
    d = shutil.copytree(tiny, tmp_path / kind)
    if kind == "adapter":
        shutil.rmtree(d)
        d.mkdir()
        (d / "adapter_config.json").write_text("{}")
        (d / "adapter_model.safetensors").write_bytes(b"x")
    elif kind == "truncated":
        w = d / "model.safetensors"
        w.write_bytes(w.read_bytes()[:-100])
    elif kind == "pickle":
        (d / "model.safetensors").rename(d / "pytorch_model.bin")
    elif kind == "no_tokenizer":
        for p in d.glob("tokenizer*"):
            p.unlink()
    elif kind == "not_causal":
        cfg = json.loads((d / "config.json").read_text())
        cfg["architectures"] = ["BertForMaskedLM"]
        (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("kind, pattern", [
    ("adapter", r"holds a PEFT adapter, not a complete model; fix: log adapters through finetune"),
    ("truncated", r"model\.safetensors is truncated \(\d+ bytes, its header lists \d+\)"),
    ("pickle", r"has no \*\.safetensors weights \(only pickle files: pytorch_model\.bin\)"),
    ("no_tokenizer", r"has no tokenizer"),
    ("not_causal", r"architecture BertForMaskedLM is not a causal language model"),
])
def test_broken_full_model_dir_is_refused_before_any_run(tracking, tiny_model_dir, tmp_path, kind,
                                                         pattern):
    d = _broken_full_dir(tmp_path, tiny_model_dir, kind)
    with pytest.raises(InputError, match=rf"^full_model_dir='.*{kind}': {pattern}"):
        lr.run(lr.Args(manifest_uri="runs:/0123456789abcdef0123456789abcdef/snapshot/manifest.json",
                       full_model_dir=str(d)))
    assert not tracking.search_runs([e.experiment_id for e in tracking.search_experiments()])


def test_all_input_problems_are_reported_at_once(tracking, tmp_path):
    with pytest.raises(InputError) as err:
        lr.run(lr.Args(checkpoint_uri="m-123", full_model_dir=str(tmp_path / "nope")))
    lines = err.value.lines()
    assert len(lines) == 4, lines
    assert lines[0].startswith("full_model_dir=") and "given together with checkpoint_uri" in lines[0]
    assert lines[1].startswith("checkpoint_uri='m-123': is not a model URI; fix: pass models:/")
    assert lines[2].startswith("manifest_uri='': is required with full_model_dir")
    assert lines[3].startswith("full_model_dir=") and "no such directory" in lines[3]


@pytest.mark.parametrize("uri, pattern", [
    ("models:/m-0123456789abcdef0123456789abcdef", r"no such model \(.*not found"),
    ("runs:/0123456789abcdef0123456789abcdef/checkpoint-1", r"no such model \(.*not found"),
])
def test_unknown_checkpoint_is_one_line_exit_2(tracking, capsys, uri, pattern):
    assert lr.main(["--checkpoint_uri", uri]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: checkpoint_uri='{uri}': ")
    assert re.search(pattern, err[0])


def test_model_that_is_not_from_this_pipeline_is_refused(tracking):
    class Echo(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return model_input

    with mlflow.start_run():
        uri = mlflow.pyfunc.log_model(name="echo", python_model=Echo(),
                                      pip_requirements=["mlflow"]).model_uri
    with pytest.raises(InputError, match=r"is not a model of this pipeline \(no base_reference\.json"):
        lr.run(lr.Args(checkpoint_uri=uri))


def test_no_finetune_run_and_no_checkpoint(tracking):
    with pytest.raises(InputError, match=r"^checkpoint_uri='': is empty and no finished finetune run "
                                         r"in experiment \d+ has an output 'checkpoint'"):
        lr.run(lr.Args())
