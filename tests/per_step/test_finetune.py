"""The finetune step on a tiny random Llama made in the test (tests/hubserver.make_tiny_llama)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import mlflow
import pytest
import torch
from transformers import TrainerCallback

from lora_pipeline import artifacts
from lora_pipeline.errors import InputError
from lora_pipeline.model import precision
from steps import download_snapshot, finetune

from conftest import ROOT

SAMPLE = ROOT / "data" / "sample.csv"
PROBE_SENTENCE = "The Red Fox is a cheap pub by the riverside."
PROBE_MR = "name[The Red Fox], eatType[pub], priceRange[cheap], area[riverside]"


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny-model matmuls are far below what a second thread helps with; on a shared 2-core machine
    OpenMP's spinning second thread makes them ~20x slower (0.3 ms vs 6.7 ms per 1200x32 linear)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def manifest_uri(tracking, tiny_model_dir) -> str:
    return download_snapshot.run(download_snapshot.Args(model=str(tiny_model_dir))).manifest_uri


@pytest.fixture(scope="session")
def small_csv(tmp_path_factory):
    """The shortest 40 sentences of the project's sample (tiny-model sequences are ~300 tokens)."""
    rows = sorted(csv.DictReader(open(SAMPLE, encoding="utf-8")), key=lambda r: len(r["ref"]))[:40]
    path = tmp_path_factory.mktemp("data") / "small.csv"
    with open(path, "w", encoding="utf-8", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["mr", "ref"], lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    return path


def fast_args(manifest_uri: str, dataset, **kw) -> finetune.Args:
    base = dict(manifest_uri=manifest_uri, dataset=str(dataset), max_steps=4, batch_size=4, eval_steps=2,
                save_steps=2, logging_steps=1, warmup_steps=0, max_seq_length=1024,
                validation_fraction=0.25, learning_rate=5e-3, lr_scheduler="linear")
    base.update(kw)
    return finetune.Args(**base)


def probe_batch(tokenizer):
    from lora_pipeline.training.trainer_utils import AnswerCollator, encode_example

    rows = [encode_example(tokenizer, PROBE_SENTENCE, PROBE_MR),
            encode_example(tokenizer, "Kobo is a Japanese restaurant.", "name[Kobo], eatType[restaurant], food[Japanese]")]
    return AnswerCollator(tokenizer.pad_token_id)(rows)


class Probe(TrainerCallback):
    """Records weights at the start and end, and the logits at every save, of the in-memory model."""

    def __init__(self):
        self.start: dict[str, torch.Tensor] = {}
        self.end: dict[str, torch.Tensor] = {}
        self.logits: dict[int, torch.Tensor] = {}

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.start = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def on_save(self, args, state, control, model=None, processing_class=None, **kw):
        batch = probe_batch(processing_class)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            self.logits[state.global_step] = model(input_ids=batch["input_ids"],
                                                   attention_mask=batch["attention_mask"]).logits
        model.train(was_training)

    def on_train_end(self, args, state, control, model=None, **kw):
        self.end = {k: v.detach().clone() for k, v in model.state_dict().items()}


class StopAt(TrainerCallback):
    """Interrupts training after `step` (as a crash after a checkpoint would)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step >= self.step:
            control.should_training_stop = True


def checkpoint_models(run_id: str) -> dict[int, object]:
    run = mlflow.MlflowClient().get_run(run_id)
    models = mlflow.MlflowClient().search_logged_models(
        experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'")
    return {int(m.name.split("-")[1]): m for m in models if m.name.startswith("checkpoint-")}


def loss_history(run_id: str, key: str = "loss") -> dict[int, float]:
    return {m.step: m.value for m in mlflow.MlflowClient().get_metric_history(run_id, key)}


# --- the loss -------------------------------------------------------------------------------------
def test_answer_only_loss_equals_full_logits_masked_loss(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    from lora_pipeline.model.serving import load_causal_lm, load_tokenizer
    from lora_pipeline.training.trainer_utils import HeadSelector, answer_only_loss, output_head

    tok = load_tokenizer(tiny_model_dir)
    torch.manual_seed(0)
    model = get_peft_model(load_causal_lm(tiny_model_dir),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                      task_type="CAUSAL_LM", init_lora_weights=False))
    batch = probe_batch(tok)
    assert (batch["attention_mask"] == 0).any()  # rows of different lengths: padding is exercised
    selector = HeadSelector(output_head(model))
    n_answer = int((batch["labels"][:, 1:] != -100).sum())

    for num_items in (None, torch.tensor(n_answer + 7)):  # per-batch mean; Trainer's global count
        model.zero_grad()
        full = model(**batch, num_items_in_batch=num_items).loss if num_items is not None else model(**batch).loss
        full.backward()
        ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad()
        ours, logits = answer_only_loss(model, batch, selector, num_items)
        ours.backward()
        assert logits.shape == (n_answer, len(tok))  # the head ran at answer positions only
        assert abs(ours.item() - full.item()) <= 1e-5, (ours.item(), full.item())
        for n, p in model.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(p.grad, ref_grads[n], atol=1e-6, rtol=1e-4)
    # Outside the loss the hook is inert: a plain forward returns logits at every position.
    assert model(**batch).logits.shape[:2] == batch["input_ids"].shape


# --- training, checkpoints, outputs --------------------------------------------------------------
def test_training_updates_lora_only_and_every_checkpoint_reloads_with_equal_logits(
        tracking, manifest_uri, small_csv):
    probe = Probe()
    # fp32: under bf16 autocast the in-memory model's own forward runs in bf16 (Accelerate patches
    # it), so its logits differ from any fp32 reload by ~1e-3; bf16 is checked on weights below.
    result = finetune.run(fast_args(manifest_uri, small_csv, precision="fp32"), callbacks=[probe])

    # LoRA weights moved, every base weight is bit-identical.
    lora = [k for k in probe.start if "lora_" in k]
    base = [k for k in probe.start if "lora_" not in k]
    assert lora and base
    assert all(not torch.equal(probe.start[k], probe.end[k]) for k in lora if "lora_B" in k)
    assert all(torch.equal(probe.start[k], probe.end[k]) for k in base)

    # One checkpoint model per save, each reloading through pyfunc with the same function.
    ckpts = checkpoint_models(result.run_id)
    assert sorted(ckpts) == sorted(probe.logits) == [2, 4]
    tok = None
    for step, logged in ckpts.items():
        loaded = mlflow.pyfunc.load_model(artifacts.model_uri(logged.model_id))
        inner = loaded.unwrap_python_model()
        tok = inner.tokenizer
        batch = probe_batch(tok)
        with torch.no_grad():
            logits = inner.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        diff = (logits - probe.logits[step]).abs().max().item()
        assert diff <= 1e-4, f"checkpoint-{step}: max |logit diff| {diff}"
        # It refers to the pinned base instead of copying it, and carries the resume state.
        inner_dir = _model_dir(logged.model_id)
        files = {p.name for p in inner_dir.rglob("*") if p.is_file()}
        assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json",
                "rng_state.pth", "base_reference.json"} <= files, inner_dir
        assert "model.safetensors" not in files
        out = loaded.predict({"prompt": [PROBE_SENTENCE]}, params={"max_new_tokens": 4})
        assert list(out.columns) == ["mr", "attributes", "valid", "error"] and len(out) == 1
        # Eval loss of that step is linked to the checkpoint model.
        assert any(m.key == "eval_loss" and m.step == step for m in logged.metrics or [])

    # Outputs: best by validation loss, last, held-out data.
    run = tracking.get_run(result.run_id)
    evals = loss_history(result.run_id, "eval_loss")
    best_step = min(sorted(evals), key=lambda s: evals[s])
    assert result.checkpoint_uri == artifacts.model_uri(ckpts[best_step].model_id)
    assert result.last_checkpoint_uri == artifacts.model_uri(ckpts[4].model_id)
    outs = artifacts.get_outputs(run)
    assert outs == {"checkpoint": result.checkpoint_uri, "last_checkpoint": result.last_checkpoint_uri,
                    "validation_data": f"runs:/{result.run_id}/{artifacts.VALIDATION_DATA_PATH}"}
    val_rows = [json.loads(x) for x in mlflow.artifacts.load_text(outs["validation_data"]).splitlines()]
    assert val_rows and set(val_rows[0]) == {"mr", "ref"}
    all_mrs = {r["mr"] for r in csv.DictReader(open(small_csv, encoding="utf-8"))}
    val_mrs = {r["mr"] for r in val_rows}
    assert val_mrs < all_mrs
    assert int(run.data.params["data.train_mrs"]) == len(all_mrs) - len(val_mrs)

    # Metrics per step, parameters flattened, dataset input with its digest.
    for key in ("loss", "learning_rate", "grad_norm", "tokens_per_second"):
        assert sorted(loss_history(result.run_id, key)) == [1, 2, 3, 4], key
    assert sorted(evals) == [2, 4]
    assert run.data.params["lora_r"] == "4" and run.data.params["lora.scale"] == "2.0"
    assert run.data.params["trainer.world_size"] == "1"
    inputs = run.inputs.dataset_inputs
    training = [d for d in inputs if any(t.value == "training" for t in d.tags)]
    assert len(training) == 1 and training[0].dataset.digest == run.data.tags["dataset.digest"]
    assert run.info.status == "FINISHED" and run.data.tags[artifacts.STEP_TAG] == "finetune"


def test_bf16_training_logs_the_exact_fp32_weights(tracking, manifest_uri, small_csv):
    from safetensors.torch import load_file

    probe = Probe()
    result = finetune.run(fast_args(manifest_uri, small_csv, max_steps=2, precision="bf16"),
                          callbacks=[probe])
    run = mlflow.MlflowClient().get_run(result.run_id)
    assert run.data.params["precision"] == "bf16" and run.data.params["trainer.precision"] == "bf16"
    # Autocast changes the arithmetic, not the stored weights: still fp32, LoRA moved, base did not.
    lora_b = [k for k in probe.end if "lora_B" in k]
    assert lora_b and all(probe.end[k].dtype == torch.float32 for k in probe.end)
    assert all(not torch.equal(probe.start[k], probe.end[k]) for k in lora_b)
    assert all(torch.equal(probe.start[k], probe.end[k]) for k in probe.start if "lora_" not in k)
    # The last checkpoint's adapter holds exactly the in-memory weights of the end of training.
    ckpts = checkpoint_models(result.run_id)
    files = list(_model_dir(ckpts[max(ckpts)].model_id).rglob("adapter_model.safetensors"))
    assert len(files) == 1
    saved = load_file(str(files[0]))
    assert saved and all(v.dtype == torch.float32 for v in saved.values())
    mem = {k: v for k, v in probe.end.items() if "lora_" in k}
    assert len(saved) == len(mem)
    for key, value in saved.items():
        match = [k for k in mem if k.replace(".default", "") == key]
        assert len(match) == 1, key
        assert torch.equal(value, mem[match[0]]), key


def test_resolve_precision():
    assert precision.resolve_precision("fp32") == "fp32"
    assert precision.resolve_precision("bf16") == "bf16"
    assert precision.resolve_precision("auto") in ("bf16", "fp32")
    with pytest.raises(ValueError, match=r"^precision 'fp16' is not supported; use one of: auto, bf16, fp32$"):
        precision.resolve_precision("fp16")


_NO_BF16_FLAGS = "flags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_vnni avx512_bf16x\n"  # no whole bf16 flag


@pytest.mark.parametrize("cuda, cuda_bf16, cpuinfo, expected", [
    (True, True, "flags\t\t: fpu sse2\n", "bf16"),  # a bf16 GPU; the CPU does not matter
    (True, False, "flags\t\t: avx512_bf16\n", "fp32"),  # CUDA without bf16 decides, not the CPU
    (False, False, "flags\t\t: fpu avx512f avx512_bf16 avx512_vnni\n", "fp32"),  # no AMX: bf16 no faster
    (False, False, "flags\t\t: fpu amx_tile amx_bf16 amx_int8\n", "bf16"),
    (False, False, _NO_BF16_FLAGS, "fp32"),
    (False, False, OSError("no /proc/cpuinfo"), "fp32"),  # not Linux: fp32
])
def test_auto_precision_follows_the_hardware(monkeypatch, cuda, cuda_bf16, cpuinfo, expected):
    """`auto` against mocked hardware facts: CUDA (and its bf16 support), else the CPU's bf16 flags.

    The facts are what `device.detect()` gathers; here they are built from the case's /proc/cpuinfo
    text (or its read failing) through `device.cpu_flags`, the function detect() reads them with."""
    import pathlib

    from lora_pipeline.model import device, precision

    real_read_text = pathlib.Path.read_text

    def read_text(self, *args, **kwargs):
        if str(self) != "/proc/cpuinfo":
            return real_read_text(self, *args, **kwargs)
        if isinstance(cpuinfo, Exception):
            raise cpuinfo
        return cpuinfo or ""

    monkeypatch.setattr(pathlib.Path, "read_text", read_text)
    hw = device.Hardware(cuda=cuda, cuda_count=int(cuda), cuda_bf16=cuda_bf16,
                         cuda_capability=(8, 0) if cuda_bf16 else (7, 5) if cuda else (0, 0),
                         cpu_flags=device.cpu_flags())
    assert precision.resolve_precision("auto", hw=hw) == expected
    # An explicit precision is taken as asked, whatever the hardware.
    assert precision.resolve_precision("bf16", hw=hw) == "bf16"
    assert precision.resolve_precision("fp32", hw=hw) == "fp32"


def _model_dir(model_id: str):
    from pathlib import Path

    return Path(mlflow.artifacts.download_artifacts(artifacts.model_uri(model_id)))


def test_resume_continues_the_same_loss_curve(tracking, manifest_uri, small_csv):
    # lora_dropout > 0: the curve only matches if the RNG state is restored too.
    args = fast_args(manifest_uri, small_csv, max_steps=6, save_steps=3, eval_steps=3, lora_dropout=0.1)
    whole = finetune.run(args)
    first = finetune.run(args, callbacks=[StopAt(3)])
    assert sorted(checkpoint_models(first.run_id)) == [3]
    with pytest.raises(InputError, match=r"^max_steps=3: the checkpoint to resume from is already at step 3"):
        finetune.run(dataclasses_replace(args, resume_from=first.run_id, max_steps=3))
    resumed = finetune.run(dataclasses_replace(args, resume_from="last"))

    run = tracking.get_run(resumed.run_id)
    assert run.data.tags[artifacts.RESUMED_FROM_TAG] == first.run_id
    want, got = loss_history(whole.run_id), loss_history(resumed.run_id)
    assert sorted(got) == [4, 5, 6]  # continues at the step after the checkpoint
    for step in got:
        assert abs(got[step] - want[step]) <= 1e-4, (step, got[step], want[step])
    assert len(set(want.values())) == len(want)  # a real curve: every step's loss differs
    assert abs(loss_history(resumed.run_id, "eval_loss")[6] - loss_history(whole.run_id, "eval_loss")[6]) <= 1e-4
    assert sorted(checkpoint_models(resumed.run_id)) == [6]


def dataclasses_replace(args, **kw):
    import dataclasses

    return dataclasses.replace(args, **kw)


def test_two_processes_train_as_one_run(tracking, manifest_uri, small_csv):
    # This process validates and launches torchrun; the two ranks train with DDP on gloo.
    result = finetune.run(fast_args(manifest_uri, small_csv, num_processes=2, max_steps=2, batch_size=2))
    experiment = tracking.get_run(result.run_id).info.experiment_id
    finetune_runs = [r for r in tracking.search_runs([experiment])
                     if r.data.tags.get(artifacts.STEP_TAG) == "finetune"]
    assert [r.info.run_id for r in finetune_runs] == [result.run_id]
    assert finetune_runs[0].info.status == "FINISHED"
    assert finetune_runs[0].data.params["trainer.world_size"] == "2"
    assert finetune_runs[0].data.params["trainer.total_batch_size"] == "4"  # 2 ranks x batch 2
    assert sorted(checkpoint_models(result.run_id)) == [2]
    assert result.checkpoint_uri == artifacts.model_uri(checkpoint_models(result.run_id)[2].model_id)
    assert sorted(loss_history(result.run_id)) == [1, 2]  # one value per step, not one per rank


def test_early_stopping_waits_patience_evaluations_and_saves_where_it_stops():
    from transformers import TrainerControl, TrainerState

    from lora_pipeline.training.trainer_utils import EarlyStopping

    stopper, state = EarlyStopping(patience=2), TrainerState()
    stopped = []
    for step, loss in [(10, 2.0), (20, 1.5), (30, 1.6), (40, 1.4), (50, 1.5), (60, 1.5)]:
        control = TrainerControl()
        state.global_step = step
        stopper.on_evaluate(None, state, control, metrics={"eval_loss": loss})
        if control.should_training_stop:
            assert control.should_save
            stopped.append(step)
    assert stopped == [60] and stopper.stopped_at == 60  # 50 and 60 did not beat 1.4
    off, control = EarlyStopping(patience=0), TrainerControl()
    for loss in (1.0, 2.0, 3.0):
        off.on_evaluate(None, state, control, metrics={"eval_loss": loss})
    assert not control.should_training_stop


# --- bad input ------------------------------------------------------------------------------------
def test_bad_hyperparameters_are_all_reported_before_any_run(tracking):
    args = finetune.Args(manifest_uri="", lora_r=0, learning_rate=-1.0, batch_size=0, lora_dropout=1.0,
                         save_steps=15, eval_steps=10, lr_scheduler="exp", resume_from="yesterday",
                         precision="fp16")
    with pytest.raises(InputError) as info:
        finetune.run(args)
    lines = info.value.lines()
    for pattern in ("manifest_uri='': is empty", "lora_r=0: must be > 0", "learning_rate=-1.0: must be > 0",
                    "batch_size=0: must be > 0", "lora_dropout=1.0: must be in [0, 1)",
                    "save_steps=15: is not a multiple of eval_steps=10", "lr_scheduler='exp': is not supported",
                    "precision='fp16': is not supported",
                    "resume_from='yesterday': is neither a run id"):
        assert any(line.startswith(pattern) for line in lines), (pattern, lines)
    assert all("; fix: " in line for line in lines)
    assert sum(line.startswith("resume_from=") for line in lines) == 1  # one line per problem
    assert not tracking.search_runs([e.experiment_id for e in tracking.search_experiments()])


def test_examples_longer_than_max_seq_length_are_counted(tracking, manifest_uri, small_csv):
    with pytest.raises(InputError, match=r"^max_seq_length=50: 40 of 40 examples are longer \(prompt\+answer up "
                                         r"to \d+ tokens\) and would be cut; fix: pass max_seq_length=\d+ or more"):
        finetune.run(fast_args(manifest_uri, small_csv, max_seq_length=50))


def test_unknown_target_modules_list_the_real_ones(tracking, manifest_uri, small_csv):
    with pytest.raises(InputError, match=r"^target_modules='q_proj,attn_qkv': attn_qkv is not a linear module of "
                                         r"LlamaForCausalLM; fix: choose from: .*down_proj.*q_proj"):
        finetune.run(fast_args(manifest_uri, small_csv, target_modules="q_proj,attn_qkv"))


def test_dataset_problems_come_with_hyperparameter_problems(tracking, manifest_uri, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("meaning,sentence\nx,y\n")
    with pytest.raises(InputError) as info:
        finetune.run(fast_args(manifest_uri, bad, warmup_steps=-1))
    text = "\n".join(info.value.lines())
    assert "dataset='" in text and "has no column mr / ref" in text and "warmup_steps=-1" in text


def test_resume_from_a_run_without_checkpoint(tracking, manifest_uri, small_csv):
    snapshot_run = manifest_uri.split("/")[1]
    with pytest.raises(InputError, match=rf"^resume_from='{snapshot_run}': run \(download_snapshot, FINISHED\) "
                                         r"has no logged checkpoint to resume from; fix:"):
        finetune.run(fast_args(manifest_uri, small_csv, resume_from=snapshot_run))
    with pytest.raises(InputError, match=r"^resume_from='last': no finetune run in experiment \d+ has a logged "
                                         r"checkpoint"):
        finetune.run(fast_args(manifest_uri, small_csv, resume_from="last"))
    with pytest.raises(InputError, match=r"^resume_from='0{32}': no run with this id"):
        finetune.run(fast_args(manifest_uri, small_csv, resume_from="0" * 32))


def test_bad_manifest_uri_names_the_parameter(tracking, small_csv):
    with pytest.raises(InputError, match=r"^manifest_uri='runs:/0{32}/snapshot/manifest\.json': cannot read"):
        finetune.run(fast_args("runs:/" + "0" * 32 + "/snapshot/manifest.json", small_csv))


def test_cli_prints_one_line_per_problem_and_exits_2(tracking, venv_env):
    proc = subprocess.run([sys.executable, "-m", "steps.finetune", "--manifest_uri", "x", "--learning_rate", "0",
                           "--dataset", "missing.csv"], env=venv_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert any(ln.startswith("error: learning_rate=0.0: must be > 0; fix:") for ln in errors), proc.stderr
    assert any(ln.startswith("error: dataset='missing.csv': no such file") for ln in errors), proc.stderr
    assert "Traceback" not in proc.stderr
