"""`finetune`: LoRA fine-tune the pinned base on a task's examples with `transformers.Trainer` + PEFT.

Input: the snapshot manifest URI (from `download_snapshot`; the base is loaded from that pinned
reference, digests verified, never from "latest"), a dataset (local .csv/.jsonl/.json with columns
`mr`, `ref`, or a Hub dataset id + `dataset_revision`), LoRA and training parameters.
Training: prompt = the base's chat template around the extraction instruction (`e2e.format_prompt`,
shared with evaluation and serving), target = the normalised MR; loss on answer tokens only, with the
LM head applied at answer positions only. Train/validation split by distinct MR.
Other data (`task` json or text, `data_format`, column mapping, `messages` conversations,
`group_column`, `system_prompt`; lora_pipeline/task/formats.py): the task's system prompt and the
chat template around each conversation, loss on the assistant turns only, split by group or row. The
task and its system prompt are logged with every checkpoint (`task.json`) for serving and evaluation.
MLflow: parameters, per-step loss / learning_rate / grad_norm / tokens_per_second, eval_loss, system
metrics, the dataset as a run input (digest), the validation split as `data/validation.jsonl`, and at
every save a checkpoint model `checkpoint-<step>` (adapter + optimizer/scheduler/RNG state, loadable
by `mlflow.pyfunc.load_model`), logged from a background thread so training does not wait.
Resume: `resume_from=<run id>|last` continues from that run's newest logged checkpoint.
Multi-process: `num_processes>1` relaunches this step under torchrun (DDP: gloo on CPU, NCCL on
GPUs); only rank 0 talks to MLflow.
Output tags: `checkpoint` (best by validation loss), `last_checkpoint`, `validation_data`.

The work lives in `lora_pipeline.training`: `plan` (staging), `resume`, `session` (model, Trainer,
MLflow run), `launch` (torchrun).
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lora_pipeline.cli import param, run_cli
from lora_pipeline.errors import InputError, Problems, StepError
from lora_pipeline.model import device, precision
from lora_pipeline.task import formats, tasks
from lora_pipeline.training import launch, plan, resume, session

DEFAULT_TARGET_MODULES = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")


@dataclass
class Args:
    manifest_uri: str = param("", "the snapshot manifest URI printed by download_snapshot "
                              "(runs:/<run>/snapshot/manifest.json)")
    dataset: str = param("data/sample.csv", "training data: a .csv/.jsonl/.json/.parquet file "
                         "(columns mr, ref; prompt, completion; or messages: see data_format; relative "
                         "paths: cwd, then the project root), or a Hub dataset id")
    dataset_revision: str = param("", "Hub datasets only: branch, tag or commit to pin")
    # What the model learns and how the data lays it out: declared with their defaults and help in
    # lora_pipeline/task/formats.py:DataArgs, shared with evaluate_checkpoint.
    task: str = formats.data_param("task")
    data_format: str = formats.data_param("data_format")
    prompt_column: str = formats.data_param("prompt_column")
    completion_column: str = formats.data_param("completion_column")
    messages_column: str = formats.data_param("messages_column")
    group_column: str = formats.data_param("group_column")
    system_prompt: str = formats.data_param("system_prompt")
    skip_malformed: bool = param(False, "E2E mr/ref data: skip rows whose MR is malformed instead of "
                                 "failing")
    validation_fraction: float = param(0.1, "fraction of the distinct MRs held out for validation")
    # -1: the task's own (Task.default_augment_fraction: 0.5 for e2e, measured; 0 where the task
    # has no augmentation), so task=json/text with the defaults trains and e2e keeps its figures.
    augment_fraction: float = param(tasks.AUGMENT_TASK_DEFAULT, "fraction of training rows rewritten "
                                    "with unseen restaurant names (name, near) and another eatType, "
                                    "where the sentence states them verbatim: teaches reading values "
                                    "rather than recalling training ones (e2e.augment; task=e2e only); "
                                    "validation rows never; -1 = the task's default (0.5 for e2e, 0 "
                                    "for json and text)")
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
                           "hardware has fast bf16 matmuls (CUDA bf16, or a CPU with AMX: amx_bf16)")
    device: str = param("auto", "where to train: cuda, cpu, or auto = cuda when torch sees a GPU; "
                        "cuda without one is an error")
    dtype: str = param("auto", "dtype of the frozen base weights: fp32, bf16, or auto = the "
                       "checkpoint's stored dtype, fp32 where that format is slow on the device "
                       "(a CPU without AMX); LoRA weights stay fp32")
    gradient_checkpointing: bool = param(False, "recompute activations in the backward pass: less "
                                         "memory for long sequences or big bases, about a third more compute")
    load_in_4bit: bool = param(False, "QLoRA: hold the frozen base in 4-bit NF4 through bitsandbytes "
                               "(CUDA only; needs the bitsandbytes package)")


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
    auto = args.augment_fraction == tasks.AUGMENT_TASK_DEFAULT
    p.require(auto or 0.0 <= args.augment_fraction <= 1.0, "augment_fraction", args.augment_fraction,
              "must be between 0 and 1, or -1 (the task's default)",
              "pass e.g. 0.5 to rewrite half of the training rows, 0 for none, or -1")
    formats.check_args(formats.data_args(args), p)
    task = tasks.TASKS.get(args.task.strip().lower())
    if task is not None and not task.supports_augmentation:
        # An explicit fraction would be silently ignored: say so instead.
        p.require(auto or args.augment_fraction == 0, "augment_fraction", args.augment_fraction,
                  f"augmentation rewrites E2E restaurant data; task={args.task} has none",
                  "pass augment_fraction=0 (or leave the default, -1), or use task=e2e")
    if task is not None and task.name == "e2e":
        # e2e trains with e2e.format_prompt's fixed prompt (the figures pinned in tests/per_step).
        p.require(not args.system_prompt, "system_prompt", args.system_prompt,
                  "is not used by task=e2e (it has its own, e2e.SYSTEM_PROMPT)",
                  "leave system_prompt empty, or use task=text or json for your own prompt")
    else:
        p.require(not args.skip_malformed, "skip_malformed", args.skip_malformed,
                  f"applies to E2E mr/ref data only, not task={args.task}",
                  "pass skip_malformed=false and fix or drop the rows the error lists")
    p.require(0.0 < args.validation_fraction < 1.0, "validation_fraction", args.validation_fraction,
              "must be between 0 and 1 (exclusive)", "pass e.g. 0.1 for 10% of the distinct MRs")
    p.require(args.precision in precision.PRECISIONS, "precision", args.precision, "is not supported",
              f"use one of: {', '.join(precision.PRECISIONS)}")
    p.require(args.device in device.DEVICES, "device", args.device, "is not a device this pipeline "
              "runs on", f"use one of: {', '.join(device.DEVICES)}")
    p.require(args.dtype in device.DTYPES, "dtype", args.dtype, "is not supported",
              f"use one of: {', '.join(device.DTYPES)}")
    p.require(args.lr_scheduler in SCHEDULERS, "lr_scheduler", args.lr_scheduler, "is not supported",
              f"use one of: {', '.join(SCHEDULERS)}")
    p.require(bool(plan.target_module_names(args.target_modules)), "target_modules", args.target_modules,
              "is empty", f"pass comma-separated linear module names, e.g. {DEFAULT_TARGET_MODULES}")
    if args.eval_steps > 0 and args.save_steps > 0:
        p.require(args.save_steps % args.eval_steps == 0, "save_steps", args.save_steps,
                  f"is not a multiple of eval_steps={args.eval_steps}, so some checkpoints would have "
                  "no validation loss to rank them by", f"pass save_steps={args.eval_steps * max(1, round(args.save_steps / args.eval_steps))}")
    rf = args.resume_from.strip()
    p.require(rf in ("", "last") or bool(resume.RUN_ID.match(rf)), "resume_from", args.resume_from,
              "is neither a run id (32 hex digits) nor 'last'", "pass a finetune run id, 'last', or ''")
    return p


def prepare(args: Args) -> plan.Plan:
    """Validate every input (reporting all problems at once) and stage data, base and resume state."""
    from lora_pipeline.base.manifest import load_manifest
    from lora_pipeline.cli import configure_tracking

    configure_tracking()
    problems = validate_static(args)
    # The machine's side (CUDA asked for where there is none, 4-bit without CUDA or bitsandbytes):
    # a machine that cannot run the step at all is reported, with the other parameter problems,
    # before the data or the base is downloaded.
    before = len(problems.items)
    hardware = plan.check_hardware(args, problems)
    if len(problems.items) > before:
        problems.raise_if_any()
    loaded = None
    # Reading the data needs a valid task and data layout; other problems are reported with its own.
    if not any(p.field in plan.DATA_FIELDS for p in problems.items):
        try:
            loaded = plan.load_data(args)
        except InputError as err:
            problems.items.extend(err.problems)
    manifest = None
    if args.manifest_uri.strip():
        try:
            manifest = load_manifest(args.manifest_uri)
        except StepError as err:
            problems.add("manifest_uri", args.manifest_uri, str(err).split(";")[0],
                         "pass the manifest URI that download_snapshot printed")
    resume_target = resume.resolve_resume(args.resume_from, problems)
    if resume_target is not None and 0 < args.max_steps <= resume_target.step:
        problems.add("max_steps", args.max_steps, f"the checkpoint to resume from is already at step "
                     f"{resume_target.step}", f"pass max_steps > {resume_target.step} to train further")
    problems.raise_if_any()
    assert loaded is not None and manifest is not None  # else raised above
    # Split, then the checks that need the base (target modules, lengths) and the resume state.
    return plan.stage(args, loaded, manifest, resume_target, problems, hardware)


def run(args: Args, *, callbacks: Sequence[Any] = ()) -> session.Result:
    """Validate, then train (in this process, or under torchrun when num_processes > 1).

    `callbacks`: extra `TrainerCallback`s (single-process only), e.g. for tests and benchmarks.
    """
    staged = prepare(args)
    try:
        if args.num_processes > 1:
            return launch.launch(staged, module="steps.finetune")  # each rank: main() below
        return session.train(staged, callbacks=callbacks)
    finally:
        shutil.rmtree(staged.work_dir, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    if os.environ.get(launch.SPEC_ENV):  # a torchrun rank started by launch.launch
        return launch.worker_main(Args)
    return run_cli(Args, run, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
