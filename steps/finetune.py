"""`finetune`: LoRA fine-tune the pinned base on E2E examples with `transformers.Trainer` + PEFT.

Input: the snapshot manifest URI (from `download_snapshot`; the base is loaded from that pinned
reference, digests verified, never from "latest"), a dataset (local .csv/.jsonl/.json with columns
`mr`, `ref`, or a Hub dataset id + `dataset_revision`), LoRA and training parameters.
Training: prompt = the base's chat template around the extraction instruction (`e2e.format_prompt`,
shared with evaluation and serving), target = the normalised MR; loss on answer tokens only, with the
LM head applied at answer positions only. Train/validation split by distinct MR.
MLflow: parameters, per-step loss / learning_rate / grad_norm / tokens_per_second, eval_loss, system
metrics, the dataset as a run input (digest), the validation split as `data/validation.jsonl`, and at
every save a checkpoint model `checkpoint-<step>` (adapter + optimizer/scheduler/RNG state, loadable
by `mlflow.pyfunc.load_model`), logged from a background thread so training does not wait.
Resume: `resume_from=<run id>|last` continues from that run's newest logged checkpoint.
Multi-process: `num_processes>1` relaunches this step under torchrun (DDP: gloo on CPU, NCCL on
GPUs); only rank 0 talks to MLflow.
Output tags: `checkpoint` (best by validation loss), `last_checkpoint`, `validation_data`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_pipeline import artifacts
from lora_pipeline.cli import param, run_cli
from lora_pipeline.errors import InputError, Problems, StepError
from lora_pipeline.model import precision as precision_mod
from lora_pipeline.paths import PROJECT_ROOT

log = logging.getLogger(__name__)

ENTRY_POINT = "finetune"
VALIDATION_DATA_PATH = artifacts.VALIDATION_DATA_PATH
DATASET_DIGEST_TAG = artifacts.DATASET_DIGEST_TAG
RESUMED_FROM_TAG = artifacts.RESUMED_FROM_TAG
CHECKPOINT_STEP_TAG = artifacts.CHECKPOINT_STEP_TAG
CHECKPOINT_EVAL_LOSS_TAG = artifacts.CHECKPOINT_EVAL_LOSS_TAG
BEST_TAG = artifacts.BEST_TAG
DEFAULT_TARGET_MODULES = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
PRECISIONS = precision_mod.PRECISIONS
resolve_precision = precision_mod.resolve_precision
# Set by the launcher for the torchrun workers: the path of the prepared plan (JSON).
_SPEC_ENV = "E2E_FINETUNE_SPEC"
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass
class Args:
    manifest_uri: str = param("", "the snapshot manifest URI printed by download_snapshot "
                              "(runs:/<run>/snapshot/manifest.json)")
    dataset: str = param("data/sample.csv", "training data: a .csv/.jsonl/.json file with columns mr, "
                         "ref (relative paths: cwd, then the project root), or a Hub dataset id")
    dataset_revision: str = param("", "Hub datasets only: branch, tag or commit to pin")
    skip_malformed: bool = param(False, "skip rows whose MR is malformed instead of failing")
    validation_fraction: float = param(0.1, "fraction of the distinct MRs held out for validation")
    # 0.5, measured by bench/bench_quality.py (15 min, devset-cleaned, lr 1e-3): held-out slot F1
    # 0.894 vs 0.898 without, and 0.887 vs 0.796 on held-out sentences with unseen names and
    # pub/restaurant.
    augment_fraction: float = param(0.5, "fraction of training rows rewritten with unseen restaurant "
                                    "names (name, near) and another eatType, where the sentence "
                                    "states them verbatim: teaches reading values rather than "
                                    "recalling training ones (e2e.augment); validation rows never")
    # r=4 on all 7 projections of SmolLM2-135M: 30 layers x 4 x (q 576+576, k 576+192, v 576+192,
    # o 576+576, gate/up/down 3 x (576+1536)) = 1,221,120 fp32 parameters = 4.9 MB, 0.91% of the
    # 538 MB base (the 1% storage goal); r=16 would be 3.6%.
    lora_r: int = param(4, "LoRA rank")
    lora_alpha: float = param(8.0, "LoRA scaling numerator (scale = alpha / r)")
    lora_dropout: float = param(0.05, "dropout on the LoRA input, in [0, 1)")
    target_modules: str = param(DEFAULT_TARGET_MODULES, "comma-separated names of the linear "
                                "modules that get LoRA adapters")
    # 2e-3, measured by bench/bench_quality.py (240 steps, 15 min): held-out slot F1 0.925 against
    # 0.894 at 1e-3, everything else equal.
    learning_rate: float = param(2e-3, "peak learning rate (AdamW)")
    lr_scheduler: str = param("cosine", f"learning-rate schedule: {', '.join(SCHEDULERS)}")
    warmup_steps: int = param(5, "linear warm-up steps")
    epochs: float = param(1.0, "passes over the training split (used only when max_steps is 0)")
    max_steps: int = param(40, "optimizer steps to train; 0 = use epochs")
    batch_size: int = param(8, "examples per device per step")
    gradient_accumulation_steps: int = param(1, "micro-batches accumulated per optimizer step")
    max_seq_length: int = param(256, "longest prompt+answer in tokens; longer examples are an error "
                                "(never silently cut)")
    logging_steps: int = param(1, "log training metrics every N steps (1: a value per step)")
    eval_steps: int = param(20, "compute validation loss every N steps")
    save_steps: int = param(20, "log a checkpoint model every N steps (a multiple of eval_steps); "
                            "the last step is always saved")
    seed: int = param(42, "seed for LoRA init, data order, dropout and the validation split")
    early_stopping_patience: int = param(0, "stop after N evaluations without a lower validation "
                                         "loss; 0 = off")
    resume_from: str = param("", "continue from the newest checkpoint of this finetune run id, or "
                             "'last' (the newest finetune run in the experiment with a checkpoint)")
    num_processes: int = param(1, "training processes (DDP via torchrun: gloo on CPU, NCCL on GPUs)")
    precision: str = param("auto", "compute precision of training: bf16 (autocast; weights, "
                           "optimizer and saved adapters stay fp32), fp32, or auto = bf16 where the "
                           "hardware has bf16 matmuls (CUDA bf16, or a CPU with avx512_bf16 / amx_bf16)")


@dataclass
class Result:
    run_id: str
    checkpoint_uri: str  # best by validation loss
    last_checkpoint_uri: str
    validation_data_uri: str
    dataset_digest: str
    best_step: int
    best_eval_loss: float
    global_step: int
    train_loss: float
    train_runtime_s: float
    tokens_per_second: float
    checkpoints_logged: int
    checkpoint_on_save_s: float  # time the training loop spent handing checkpoints over
    checkpoint_final_wait_s: float  # time spent after training waiting for logging to finish


@dataclass
class ResumePoint:
    run_id: str
    model_id: str
    step: int
    checkpoint_dir: str  # a rebuilt Trainer checkpoint dir (adapter + trainer state)


@dataclass
class Plan:
    """Everything validated before training: what the workers need, JSON-serialisable."""

    args: dict[str, Any]
    manifest_json: str
    base_dir: str
    work_dir: str
    all_path: str  # JSONL (mr, ref): every example used (logged as the run's dataset input)
    train_path: str  # JSONL (mr, ref): the training split
    validation_path: str  # JSONL (mr, ref): the held-out split
    dataset_source: str  # resolved location (file path or Hub id)
    n_train_mrs: int
    n_validation_mrs: int
    rows_skipped: int
    longest_tokens: int
    resume: ResumePoint | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Plan:
        data = json.loads(text)
        resume = data.pop("resume")
        return cls(**data, resume=ResumePoint(**resume) if resume else None)


# --- validation -----------------------------------------------------------------------------------
def validate_static(args: Args) -> Problems:
    p = Problems()
    p.require(bool(args.manifest_uri.strip()), "manifest_uri", args.manifest_uri, "is empty",
              "pass the manifest URI that download_snapshot printed (runs:/<run>/snapshot/manifest.json)")
    for name in ("lora_r", "lora_alpha", "learning_rate", "batch_size", "gradient_accumulation_steps",
                 "max_seq_length", "logging_steps", "eval_steps", "save_steps", "num_processes"):
        p.positive(name, getattr(args, name))
    for name in ("warmup_steps", "max_steps", "early_stopping_patience"):
        p.positive(name, getattr(args, name), allow_zero=True)
    if args.max_steps == 0:
        p.require(args.epochs > 0, "epochs", args.epochs, "must be > 0 when max_steps is 0",
                  "pass epochs > 0, or max_steps > 0")
    p.require(0.0 <= args.lora_dropout < 1.0, "lora_dropout", args.lora_dropout, "must be in [0, 1)",
              "pass e.g. 0.05")
    p.require(0.0 <= args.augment_fraction <= 1.0, "augment_fraction", args.augment_fraction,
              "must be between 0 and 1", "pass e.g. 0.5 to rewrite half of the training rows, or 0")
    p.require(0.0 < args.validation_fraction < 1.0, "validation_fraction", args.validation_fraction,
              "must be between 0 and 1 (exclusive)", "pass e.g. 0.1 for 10% of the distinct MRs")
    p.require(args.precision in PRECISIONS, "precision", args.precision, "is not supported",
              f"use one of: {', '.join(PRECISIONS)}")
    p.require(args.lr_scheduler in SCHEDULERS, "lr_scheduler", args.lr_scheduler, "is not supported",
              f"use one of: {', '.join(SCHEDULERS)}")
    p.require(bool(_modules(args.target_modules)), "target_modules", args.target_modules, "is empty",
              f"pass comma-separated linear module names, e.g. {DEFAULT_TARGET_MODULES}")
    if args.eval_steps > 0 and args.save_steps > 0:
        p.require(args.save_steps % args.eval_steps == 0, "save_steps", args.save_steps,
                  f"is not a multiple of eval_steps={args.eval_steps}, so some checkpoints would have "
                  "no validation loss to rank them by", f"pass save_steps={args.eval_steps * max(1, round(args.save_steps / args.eval_steps))}")
    rf = args.resume_from.strip()
    p.require(rf in ("", "last") or bool(_RUN_ID.match(rf)), "resume_from", args.resume_from,
              "is neither a run id (32 hex digits) nor 'last'", "pass a finetune run id, 'last', or ''")
    return p


def _modules(text: str) -> list[str]:
    return [m.strip() for m in text.split(",") if m.strip()]


def _check_target_modules(base_dir: Path, wanted: list[str], problems: Problems) -> None:
    """Every target module name must name linear layers of the architecture (checked on an empty
    model: no weights loaded)."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base_dir)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                     if isinstance(m, torch.nn.Linear)})
    missing = [m for m in wanted if m not in linear]
    if missing:
        problems.add("target_modules", ",".join(wanted),
                     f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not a linear module "
                     f"of {type(model).__name__}",
                     f"choose from: {', '.join(linear)}")


def _experiment_id(client) -> str:
    import mlflow

    if os.environ.get("MLFLOW_RUN_ID"):
        return client.get_run(os.environ["MLFLOW_RUN_ID"]).info.experiment_id
    if os.environ.get("MLFLOW_EXPERIMENT_ID"):
        return os.environ["MLFLOW_EXPERIMENT_ID"]
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME")
    if name:
        exp = mlflow.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
    return "0"  # MLflow's Default experiment


def _checkpoints_of(client, run) -> list[tuple[int, Any]]:
    models = client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                         filter_string=f"source_run_id = '{run.info.run_id}'")
    prefix = artifacts.CHECKPOINT_MODEL_PREFIX + "-"
    out = []
    for m in models:
        if m.name.startswith(prefix) and m.name[len(prefix):].isdigit() and str(m.status).endswith("READY"):
            out.append((int(m.name[len(prefix):]), m))
    return sorted(out, key=lambda x: x[0])


def resolve_resume(args: Args, problems: Problems) -> tuple[str, int, Any] | None:
    """(run id, step, logged model) of the checkpoint to continue from, or None."""
    import mlflow
    from mlflow.exceptions import MlflowException

    rf = args.resume_from.strip()
    if not rf or (rf != "last" and not _RUN_ID.match(rf)):
        return None  # empty, or malformed (validate_static reports that once)
    from lora_pipeline.cli import configure_tracking

    configure_tracking()
    client = mlflow.MlflowClient()
    if rf == "last":
        exp = _experiment_id(client)
        runs = client.search_runs([exp], filter_string=f"tags.`{artifacts.STEP_TAG}` = '{ENTRY_POINT}'",
                                  order_by=["attributes.start_time DESC"], max_results=50)
        for run in runs:
            if run.info.run_id == os.environ.get("MLFLOW_RUN_ID"):
                continue
            ckpts = _checkpoints_of(client, run)
            if ckpts:
                step, model = ckpts[-1]
                return run.info.run_id, step, model
        problems.add("resume_from", rf, f"no finetune run in experiment {exp} has a logged checkpoint",
                     "pass a run id explicitly, or train without resume_from")
        return None
    try:
        run = client.get_run(rf)
    except MlflowException:
        problems.add("resume_from", rf, f"no run with this id in {mlflow.get_tracking_uri()}",
                     "pass the run id of a finetune run (see the MLflow UI), or 'last'")
        return None
    ckpts = _checkpoints_of(client, run)
    if not ckpts:
        step_tag = run.data.tags.get(artifacts.STEP_TAG, "?")
        problems.add("resume_from", rf, f"run ({step_tag}, {run.info.status}) has no logged checkpoint "
                     "to resume from", "pass a finetune run that saved at least one checkpoint "
                     "(save_steps <= its max_steps), or train without resume_from")
        return None
    step, model = ckpts[-1]
    return rf, step, model


def _download_resume(run_id: str, step: int, model, dest: Path, args: Args,
                     problems: Problems) -> ResumePoint | None:
    """Rebuild a Trainer checkpoint dir (adapter files + trainer state) from a logged model."""
    import mlflow
    from mlflow.models import Model

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=artifacts.model_uri(model.model_id),
                                                     dst_path=str(dest / "download")))
    arts = Model.load(str(local)).flavors.get("python_function", {}).get("artifacts", {})
    paths = {k: local / v["path"] for k, v in arts.items()}
    if artifacts.TRAINER_STATE_ARTIFACT not in paths or artifacts.ADAPTER_ARTIFACT not in paths:
        problems.add("resume_from", args.resume_from, f"checkpoint models:/{model.model_id} has no "
                     "trainer state (optimizer/scheduler/RNG)", "resume from a finetune checkpoint model")
        return None
    ckpt = dest / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    for src_dir in (paths[artifacts.ADAPTER_ARTIFACT], paths[artifacts.TRAINER_STATE_ARTIFACT]):
        for f in src_dir.iterdir():
            shutil.move(str(f), ckpt / f.name)
    cfg = json.loads((ckpt / "adapter_config.json").read_text())
    theirs = (cfg.get("r"), float(cfg.get("lora_alpha")), sorted(cfg.get("target_modules") or []))
    ours = (args.lora_r, float(args.lora_alpha), sorted(_modules(args.target_modules)))
    if theirs != ours:
        problems.add("resume_from", args.resume_from,
                     f"checkpoint-{step} was trained with lora_r={theirs[0]}, lora_alpha={theirs[1]}, "
                     f"target_modules={','.join(theirs[2])}",
                     "pass the same LoRA parameters as the run you resume")
        return None
    return ResumePoint(run_id=run_id, model_id=model.model_id, step=step, checkpoint_dir=str(ckpt))


def prepare(args: Args) -> Plan:
    """Validate every input (reporting all problems at once) and stage data, base and resume state."""
    from lora_pipeline.base.manifest import load_manifest
    from lora_pipeline.cli import configure_tracking
    from lora_pipeline.task import data

    configure_tracking()
    problems = validate_static(args)
    ds = report = None
    try:
        ds, report = data.load_examples_report(args.dataset, args.dataset_revision,
                                               skip_malformed=args.skip_malformed)
    except InputError as err:
        problems.items.extend(err.problems)
    manifest = None
    if args.manifest_uri.strip():
        try:
            manifest = load_manifest(args.manifest_uri)
        except StepError as err:
            problems.add("manifest_uri", args.manifest_uri, str(err).split(";")[0],
                         "pass the manifest URI that download_snapshot printed")
    resume_target = resolve_resume(args, problems)
    if resume_target is not None and 0 < args.max_steps <= resume_target[1]:
        problems.add("max_steps", args.max_steps, f"the checkpoint to resume from is already at step "
                     f"{resume_target[1]}", f"pass max_steps > {resume_target[1]} to train further")
    problems.raise_if_any()
    assert ds is not None and report is not None and manifest is not None  # else raised above

    train, val = data.split_by_mr(ds, args.validation_fraction, args.seed)
    work = Path(tempfile.mkdtemp(prefix="finetune-"))
    try:
        from lora_pipeline.model.serving import load_tokenizer, resolve_base

        base_dir = resolve_base(manifest)
        _check_target_modules(base_dir, _modules(args.target_modules), problems)
        tok = load_tokenizer(base_dir)
        from lora_pipeline.training.trainer_utils import encode_example

        lengths = [encode_example(tok, r, m)["length"] for r, m in
                   zip(list(train["ref"]) + list(val["ref"]), list(train["mr"]) + list(val["mr"]), strict=True)]
        too_long = sum(n > args.max_seq_length for n in lengths)
        if too_long:
            problems.add("max_seq_length", args.max_seq_length,
                         f"{too_long} of {len(lengths)} examples are longer (prompt+answer up to "
                         f"{max(lengths)} tokens) and would be cut",
                         f"pass max_seq_length={max(lengths)} or more, or drop those examples")
        resume = None
        if resume_target is not None:
            resume = _download_resume(*resume_target, work / "resume", args, problems)
        problems.raise_if_any()
        paths = {k: work / f"{k}.jsonl" for k in ("all", "train", "validation")}
        for k, part in (("all", ds), ("train", train), ("validation", val)):
            part.to_json(str(paths[k]), force_ascii=False)
        return Plan(
            args=dataclasses.asdict(args), manifest_json=manifest.to_json(), base_dir=str(base_dir),
            work_dir=str(work), all_path=str(paths["all"]), train_path=str(paths["train"]),
            validation_path=str(paths["validation"]), dataset_source=report.source.location,
            n_train_mrs=_distinct_mrs(train), n_validation_mrs=_distinct_mrs(val),
            rows_skipped=report.rows_skipped, longest_tokens=max(lengths), resume=resume,
        )
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def _distinct_mrs(ds) -> int:
    from lora_pipeline.task.e2e import normalise_mr

    return len({normalise_mr(m) or m for m in ds["mr"]})


# --- training -------------------------------------------------------------------------------------
def _load_split(path: str):
    import datasets

    # The Arrow cache goes beside the file (the plan's work dir, removed after the run), not into the
    # shared HF datasets cache, which would keep a copy per run.
    return datasets.load_dataset("json", data_files=path, split="train",
                                 cache_dir=str(Path(path).parent / "hf-datasets-cache"))


def _training_arguments(a: Args, output_dir: Path, world_size: int):
    import torch
    from transformers import TrainingArguments

    cuda = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=a.max_steps if a.max_steps > 0 else -1,
        num_train_epochs=a.epochs,
        per_device_train_batch_size=a.batch_size,
        per_device_eval_batch_size=a.batch_size,
        gradient_accumulation_steps=a.gradient_accumulation_steps,
        learning_rate=a.learning_rate,
        lr_scheduler_type=a.lr_scheduler,
        warmup_steps=a.warmup_steps,
        logging_strategy="steps",
        logging_steps=a.logging_steps,
        logging_first_step=True,
        eval_strategy="steps",
        eval_steps=a.eval_steps,
        save_strategy="steps",
        save_steps=a.save_steps,
        save_total_limit=None,  # CheckpointLogger removes each local checkpoint once it is logged
        seed=a.seed,
        data_seed=a.seed,
        # Explicit: the step logs to MLflow through its own callback (transformers' MLflowCallback
        # would log every TrainingArguments field as a parameter, clashing with the step's own).
        report_to="none",
        include_num_input_tokens_seen="non_padding",
        prediction_loss_only=True,
        remove_unused_columns=False,
        # Batches of similar lengths: random batches are 75-85% real tokens (padding to the longest
        # row), length-grouped ones about 97% (measured on E2E with SmolLM2's tokenizer).
        train_sampling_strategy="group_by_length",
        length_column_name="length",
        label_names=["labels"],
        dataloader_num_workers=0,
        use_cpu=not cuda,
        bf16=resolve_precision(a.precision) == "bf16",
        ddp_backend=("nccl" if cuda else "gloo") if world_size > 1 else None,
        ddp_find_unused_parameters=False,  # every LoRA weight gets a gradient at every step
        disable_tqdm=False,
    )


def _flat_params(plan: Plan, targs, lora_config, n_train: int, n_val: int, world: int) -> dict[str, str]:
    """Parameters beyond the step's own Args, flattened as `group.key` (MLflow params are flat)."""
    out = {
        "trainer.optim": getattr(targs.optim, "value", targs.optim), "trainer.weight_decay": targs.weight_decay,
        "trainer.adam_beta1": targs.adam_beta1, "trainer.adam_beta2": targs.adam_beta2,
        "trainer.adam_epsilon": targs.adam_epsilon, "trainer.max_grad_norm": targs.max_grad_norm,
        "trainer.world_size": world,
        "trainer.precision": "bf16" if targs.bf16 else "fp32",
        "trainer.total_batch_size": targs.per_device_train_batch_size * targs.gradient_accumulation_steps * world,
        "lora.bias": lora_config.bias, "lora.task_type": getattr(lora_config.task_type, "value", lora_config.task_type),
        "lora.scale": plan.args["lora_alpha"] / plan.args["lora_r"],
        "data.source": plan.dataset_source, "data.train_examples": n_train,
        "data.validation_examples": n_val, "data.train_mrs": plan.n_train_mrs,
        "data.validation_mrs": plan.n_validation_mrs, "data.rows_skipped": plan.rows_skipped,
        "data.longest_tokens": plan.longest_tokens,
    }
    return {k: str(v) for k, v in out.items()}


@dataclass
class Parts:
    model: Any  # PEFT model, LoRA freshly initialised
    tokenizer: Any  # right padding
    lora_config: Any
    train_raw: Any  # datasets.Dataset (mr, ref)
    validation_raw: Any
    train: Any  # tokenized (input_ids, labels, length)
    validation: Any


def build(plan: Plan) -> Parts:
    """Model with fresh LoRA adapters, tokenizer and tokenized splits of a prepared plan (the
    benchmark builds its baselines from the same parts)."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model

    from lora_pipeline.model import serving
    from lora_pipeline.training.trainer_utils import tokenize_examples

    a = Args(**plan.args)
    base_dir = Path(plan.base_dir)
    tok = serving.load_tokenizer(base_dir)
    tok.padding_side = "right"  # training batches; generation (serving) pads left
    train_raw, val_raw = _load_split(plan.train_path), _load_split(plan.validation_path)
    if a.augment_fraction > 0:
        train_raw = augment_rows(train_raw, a.augment_fraction, a.seed)
    torch.manual_seed(a.seed)  # LoRA A matrices are initialised from the global RNG
    lora_config = LoraConfig(r=a.lora_r, lora_alpha=a.lora_alpha, lora_dropout=a.lora_dropout,
                             target_modules=_modules(a.target_modules), task_type=TaskType.CAUSAL_LM)
    model = get_peft_model(serving.load_causal_lm(base_dir), lora_config)
    return Parts(model=model, tokenizer=tok, lora_config=lora_config, train_raw=train_raw,
                 validation_raw=val_raw,
                 train=tokenize_examples(train_raw, tok, desc="tokenizing train"),
                 validation=tokenize_examples(val_raw, tok, desc="tokenizing validation"))


def augment_rows(ds, fraction: float, seed: int):
    """`e2e.augment` applied to a seeded `fraction` of the rows, in place of the originals (the same
    rows on every DDP rank and every resume: one RNG per row, seeded by row index)."""
    import random

    from lora_pipeline.task.e2e import augment

    def rewrite(row, idx):
        rng = random.Random(seed * 1_000_003 + idx)
        if rng.random() >= fraction:
            return row
        row["ref"], row["mr"] = augment(row["ref"], row["mr"], rng)
        return row

    out = ds.map(rewrite, with_indices=True, desc="augmenting train")
    changed = sum(a != b for a, b in zip(ds["mr"], out["mr"], strict=True))
    log.info("augment_fraction=%s: %d of %d training rows rewritten with unseen names/types",
             fraction, changed, len(ds))
    return out


def _world() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def train(plan: Plan, *, callbacks: Sequence[Any] = ()) -> Result:
    """Train under an MLflow run (rank 0) and return the outputs. Callable on every DDP rank."""
    import mlflow
    from transformers.trainer_callback import ProgressCallback

    from lora_pipeline.base.manifest import Manifest
    from lora_pipeline.model import serving
    from lora_pipeline.tracking.runs import step_run
    from lora_pipeline.training.trainer_utils import (
        AnswerCollator,
        AnswerOnlyTrainer,
        CheckpointLogger,
        EarlyStopping,
        LoggingProgress,
        MetricsCallback,
    )

    a = Args(**plan.args)
    rank, world = _world()
    is_main = rank == 0
    manifest = Manifest.from_json(plan.manifest_json)
    parts = build(plan)
    model, tok, lora_config = parts.model, parts.tokenizer, parts.lora_config
    train_raw, val_raw = parts.train_raw, parts.validation_raw
    trainable, total = model.get_nb_trainable_parameters()
    log.info("LoRA: %d trainable of %d parameters (%.2f%%)", trainable, total, 100 * trainable / total)
    targs = _training_arguments(a, Path(plan.work_dir) / "trainer", world)

    if is_main and os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING") is None:
        mlflow.enable_system_metrics_logging()  # CPU/memory/GPU alongside the training metrics
    run_ctx = step_run(ENTRY_POINT, a) if is_main else contextlib.nullcontext(None)
    with run_ctx as active:
        run_id = active.info.run_id if active is not None else ""
        digest = ""
        if is_main:
            _write_spec_result(plan, {"run_id": run_id})
            digest = _log_inputs(plan, a, targs, lora_config, train_raw, val_raw, world, run_id)
            mlflow.log_metrics({"trainable_parameters": trainable, "total_parameters": total})

        def log_checkpoint(step: int, adapter_dir: Path, state_dir: Path) -> str:
            info = serving.log_e2e_model(
                name=artifacts.checkpoint_model_name(step), manifest=manifest, adapter_dir=adapter_dir,
                trainer_state_dir=state_dir, step=step, with_input_example=False,
                tags={CHECKPOINT_STEP_TAG: str(step)})
            return info.model_id

        metrics_cb = MetricsCallback()
        ckpt_cb = CheckpointLogger(log_checkpoint, run_id, world_size=world)
        stopper = EarlyStopping(a.early_stopping_patience)
        trainer = AnswerOnlyTrainer(
            model=model, args=targs, train_dataset=parts.train, eval_dataset=parts.validation,
            data_collator=AnswerCollator(tok.pad_token_id), processing_class=tok,
            callbacks=[metrics_cb, stopper, ckpt_cb, *callbacks],
        )
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(LoggingProgress())
        t0 = time.perf_counter()
        try:
            out = trainer.train(resume_from_checkpoint=plan.resume.checkpoint_dir if plan.resume else None)
        finally:
            stats = ckpt_cb.finish() if is_main else None
        wall = time.perf_counter() - t0
        if not is_main:
            return Result(run_id="", checkpoint_uri="", last_checkpoint_uri="", validation_data_uri="",
                          dataset_digest="", best_step=0, best_eval_loss=float("nan"),
                          global_step=trainer.state.global_step, train_loss=float(out.training_loss),
                          train_runtime_s=wall, tokens_per_second=0.0, checkpoints_logged=0,
                          checkpoint_on_save_s=0.0, checkpoint_final_wait_s=0.0)
        return _finish(plan, a, run_id, digest, trainer, out, stats, metrics_cb, wall)


def _log_inputs(plan: Plan, a: Args, targs, lora_config, train_raw, val_raw, world: int, run_id: str) -> str:
    import mlflow

    from lora_pipeline.task import data

    mlflow.log_params(_flat_params(plan, targs, lora_config, len(train_raw), len(val_raw), world))
    name = Path(plan.dataset_source).name
    ds = data.to_mlflow_dataset(_load_split(plan.all_path), a.dataset, a.dataset_revision, name=name)
    mlflow.log_input(ds, context="training")
    held_out = data.to_mlflow_dataset(val_raw, a.dataset, a.dataset_revision, name=f"{name}:validation")
    mlflow.log_input(held_out, context="validation")
    mlflow.set_tag(DATASET_DIGEST_TAG, ds.digest)
    # The held-out MRs, so evaluation scores exactly what training never saw.
    mlflow.log_artifact(plan.validation_path, artifact_path=str(Path(VALIDATION_DATA_PATH).parent))
    outputs = {"validation_data": f"runs:/{run_id}/{VALIDATION_DATA_PATH}"}
    if plan.resume:
        mlflow.set_tags({RESUMED_FROM_TAG: plan.resume.run_id,
                         "finetune.resumed_checkpoint": artifacts.model_uri(plan.resume.model_id),
                         "finetune.resumed_step": str(plan.resume.step)})
    artifacts.set_outputs(mlflow.MlflowClient(), run_id, outputs)
    return ds.digest


def _finish(plan: Plan, a: Args, run_id: str, digest: str, trainer, out, stats, metrics_cb,
            wall: float) -> Result:
    import mlflow

    client = mlflow.MlflowClient()
    logged = sorted(stats.logged, key=lambda c: c.step)
    if not logged:
        raise StepError("training saved no checkpoint (max_steps reached before save_steps?); "
                        "lower save_steps or raise max_steps")
    last = logged[-1]
    ranked = [c for c in logged if c.eval_loss is not None]
    best = min(ranked, key=lambda c: (c.eval_loss, c.step)) if ranked else last
    for c in logged:
        client.set_logged_model_tags(c.model_id, {
            CHECKPOINT_EVAL_LOSS_TAG: "" if c.eval_loss is None else f"{c.eval_loss:.6f}",
            BEST_TAG: str(c is best).lower()})
    tok_rates = [h["tokens_per_second"] for h in metrics_cb.history if "tokens_per_second" in h]
    tps = sum(tok_rates) / len(tok_rates) if tok_rates else 0.0
    overhead = stats.on_save_seconds + stats.final_wait_seconds
    mlflow.log_metrics({
        "best_eval_loss": best.eval_loss if best.eval_loss is not None else float("nan"),
        "best_step": best.step, "train_wall_seconds": wall,
        "checkpoint_on_save_seconds": stats.on_save_seconds,
        "checkpoint_logging_seconds": stats.worker_seconds,
        "checkpoint_final_wait_seconds": stats.final_wait_seconds,
        # What checkpoint logging cost the training loop: hand-over + the final drain, over wall time.
        "checkpoint_overhead_fraction": overhead / wall if wall > 0 else 0.0,
    }, step=trainer.state.global_step)
    outputs = {"checkpoint": artifacts.model_uri(best.model_id),
               "last_checkpoint": artifacts.model_uri(last.model_id)}
    artifacts.set_outputs(client, run_id, outputs)
    log.info("best checkpoint: step %d eval_loss %s -> %s", best.step, best.eval_loss,
             outputs["checkpoint"])
    return Result(
        run_id=run_id, checkpoint_uri=outputs["checkpoint"], last_checkpoint_uri=outputs["last_checkpoint"],
        validation_data_uri=f"runs:/{run_id}/{VALIDATION_DATA_PATH}", dataset_digest=digest,
        best_step=best.step, best_eval_loss=float("nan") if best.eval_loss is None else best.eval_loss,
        global_step=trainer.state.global_step, train_loss=float(out.training_loss),
        train_runtime_s=float(out.metrics.get("train_runtime", wall)), tokens_per_second=tps,
        checkpoints_logged=len(logged), checkpoint_on_save_s=stats.on_save_seconds,
        checkpoint_final_wait_s=stats.final_wait_seconds,
    )


# --- multi-process --------------------------------------------------------------------------------
def _write_spec_result(plan: Plan, payload: dict[str, Any]) -> None:
    path = Path(plan.work_dir) / "result.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps({**old, **payload}))


def _launch(plan: Plan) -> Result:
    """Run `train` on `num_processes` ranks with torchrun; this process only waits and reports."""
    import mlflow

    n = plan.args["num_processes"]
    spec = Path(plan.work_dir) / "plan.json"
    spec.write_text(plan.to_json())
    env = dict(os.environ)
    env[_SPEC_ENV] = str(spec)
    root = str(PROJECT_ROOT)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
           f"--nproc_per_node={n}", "-m", "steps.finetune"]
    log.info("launching %d training processes: %s", n, " ".join(cmd))
    proc = subprocess.run(cmd, env=env, cwd=root)
    result_path = Path(plan.work_dir) / "result.json"
    info = json.loads(result_path.read_text()) if result_path.is_file() else {}
    if proc.returncode != 0 or "result" not in info:
        run_id = info.get("run_id")
        if run_id:
            from lora_pipeline.cli import configure_tracking

            configure_tracking()
            client = mlflow.MlflowClient()
            if client.get_run(run_id).info.status == "RUNNING":
                client.set_terminated(run_id, "FAILED")
        raise StepError(f"training processes failed (torchrun exit {proc.returncode}); the first "
                        "error is in the log above" + (f"; run {run_id} marked FAILED" if run_id else ""))
    return Result(**info["result"])


def _worker_main() -> int:
    """Entry of each torchrun rank: train the prepared plan; rank 0 writes the result."""
    from lora_pipeline.cli import setup_logging

    setup_logging()
    plan = Plan.from_json(Path(os.environ[_SPEC_ENV]).read_text())
    result = train(plan)
    if _world()[0] == 0:
        _write_spec_result(plan, {"result": dataclasses.asdict(result)})
    return 0


# --- entry ----------------------------------------------------------------------------------------
def run(args: Args, *, callbacks: Sequence[Any] = ()) -> Result:
    """Validate, then train (in this process, or under torchrun when num_processes > 1).

    `callbacks`: extra `TrainerCallback`s (single-process only), e.g. for tests and benchmarks.
    """
    plan = prepare(args)
    try:
        if args.num_processes > 1:
            return _launch(plan)
        return train(plan, callbacks=callbacks)
    finally:
        shutil.rmtree(plan.work_dir, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    if os.environ.get(_SPEC_ENV):
        return _worker_main()
    return run_cli(Args, run, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
