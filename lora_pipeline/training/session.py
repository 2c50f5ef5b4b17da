"""One training session: the model with fresh LoRA adapters, the Trainer, and the MLflow run around it.

`train` runs on every DDP rank; only rank 0 talks to MLflow (parameters, dataset inputs, the held-out
split, per-step metrics, a checkpoint model per save, the outputs).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_pipeline import artifacts
from lora_pipeline.errors import StepError
from lora_pipeline.model.precision import resolve_precision
from lora_pipeline.training import ENTRY_POINT
from lora_pipeline.training.plan import Plan, load_split, target_module_names

log = logging.getLogger(__name__)


@dataclass
class Result:
    """What the finetune step returns (and rank 0 hands the launching process, as JSON)."""

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


def training_arguments(a: Any, output_dir: Path, world_size: int, decided: dict[str, Any] | None = None):
    """`TrainingArguments` from the step's Args (`a`) and the plan's device decisions (`decided`:
    `Plan.extra`, {device, precision, dtype}; without them, today's choice: CUDA when present)."""
    import torch
    from transformers import TrainingArguments

    decided = decided or {}
    cuda = decided.get("device", "cuda" if torch.cuda.is_available() else "cpu") == "cuda"
    compute = decided.get("precision") or resolve_precision(a.precision)
    checkpointing = bool(getattr(a, "gradient_checkpointing", False))
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
        bf16=compute == "bf16",
        fp16=compute == "fp16",  # auto on GPUs where only fp16 is fast; the Trainer scales the loss
        # (transformers 5 renamed gradient_checkpointing; the step keeps the name users know.)
        activation_checkpointing=checkpointing,
        # Non-reentrant: works with a frozen base whose inputs need no gradient (PEFT), and is
        # what torch recommends.
        activation_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
        ddp_backend=("nccl" if cuda else "gloo") if world_size > 1 else None,
        ddp_find_unused_parameters=False,  # every LoRA weight gets a gradient at every step
        disable_tqdm=False,
    )


def flat_params(plan: Plan, targs, lora_config, n_train: int, n_val: int, world: int) -> dict[str, str]:
    """Parameters beyond the step's own Args, flattened as `group.key` (MLflow params are flat)."""
    from lora_pipeline.task.tasks import augment_fraction, get_task

    out = {
        "trainer.optim": getattr(targs.optim, "value", targs.optim), "trainer.weight_decay": targs.weight_decay,
        "trainer.adam_beta1": targs.adam_beta1, "trainer.adam_beta2": targs.adam_beta2,
        "trainer.adam_epsilon": targs.adam_epsilon, "trainer.max_grad_norm": targs.max_grad_norm,
        "trainer.world_size": world,
        "trainer.precision": "bf16" if targs.bf16 else "fp16" if targs.fp16 else "fp32",
        "trainer.device": plan.extra.get("device", "cpu" if targs.use_cpu else "cuda"),
        "trainer.dtype": plan.extra.get("dtype", "fp32"),
        "trainer.total_batch_size": targs.per_device_train_batch_size * targs.gradient_accumulation_steps * world,
        "lora.bias": lora_config.bias, "lora.task_type": getattr(lora_config.task_type, "value", lora_config.task_type),
        "lora.scale": plan.args.lora_alpha / plan.args.lora_r,
        "data.source": plan.dataset_source, "data.train_examples": n_train,
        "data.validation_examples": n_val, "data.train_mrs": plan.n_train_mrs,
        "data.validation_mrs": plan.n_validation_mrs, "data.rows_skipped": plan.rows_skipped,
        "data.longest_tokens": plan.longest_tokens,
        # what augment_fraction=-1 (the default) resolved to for this task
        "data.augment_fraction": augment_fraction(get_task(plan.args.task), plan.args.augment_fraction),
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
    from lora_pipeline.task.tasks import augment_fraction, get_task
    from lora_pipeline.training.trainer_utils import tokenize_examples

    a = plan.args
    task, system_prompt = get_task(a.task), a.system_prompt or None
    base_dir = Path(plan.base_dir)
    tok = serving.load_tokenizer(base_dir)
    tok.padding_side = "right"  # training batches; generation (serving) pads left
    train_raw, val_raw = load_split(plan.train_path), load_split(plan.validation_path)
    fraction = augment_fraction(task, a.augment_fraction)
    if fraction > 0 and task.supports_augmentation:
        train_raw = augment_rows(train_raw, fraction, a.seed)
    torch.manual_seed(a.seed)  # LoRA A matrices are initialised from the global RNG
    lora_config = LoraConfig(r=a.lora_r, lora_alpha=a.lora_alpha, lora_dropout=a.lora_dropout,
                             target_modules=target_module_names(a.target_modules), task_type=TaskType.CAUSAL_LM)
    model = get_peft_model(load_base_model(plan), lora_config)
    return Parts(model=model, tokenizer=tok, lora_config=lora_config, train_raw=train_raw,
                 validation_raw=val_raw,
                 train=tokenize_examples(train_raw, tok, desc="tokenizing train", task=task,
                                         system_prompt=system_prompt),
                 validation=tokenize_examples(val_raw, tok, desc="tokenizing validation", task=task,
                                              system_prompt=system_prompt))


def load_base_model(plan: Plan):
    """The frozen base in the plan's dtype; with `load_in_4bit`, quantized to NF4 on this rank's GPU
    and prepared for k-bit training (QLoRA)."""
    from lora_pipeline.model import serving
    from lora_pipeline.model.device import MemoryPlan

    a = plan.args
    dtype = plan.extra.get("dtype", "fp32")
    if not getattr(a, "load_in_4bit", False):
        return serving.load_causal_lm(Path(plan.base_dir), dtype=dtype)
    from peft import prepare_model_for_kbit_training

    # The 4-bit matmuls compute in the training precision (bf16 on Ampere and later: the QLoRA recipe).
    kwargs = MemoryPlan(load_in_4bit=True).from_pretrained_kwargs(plan.extra.get("precision", "bf16"))
    # bitsandbytes quantizes while loading onto the GPU: each DDP rank onto its own.
    kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    model = serving.load_causal_lm(Path(plan.base_dir), dtype=dtype, **kwargs)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=a.gradient_checkpointing,
                                           gradient_checkpointing_kwargs={"use_reentrant": False})


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


def rank_and_world() -> tuple[int, int]:
    """(this process's DDP rank, number of ranks): (0, 1) outside torchrun."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def train(plan: Plan, *, callbacks: Sequence[Any] = ()) -> Result:
    """Train under an MLflow run (rank 0) and return the outputs. Callable on every DDP rank."""
    import mlflow
    from transformers.trainer_callback import ProgressCallback

    from lora_pipeline.base.manifest import Manifest
    from lora_pipeline.model import serving
    from lora_pipeline.task.tasks import task_spec
    from lora_pipeline.tracking.runs import step_run
    from lora_pipeline.training.trainer_utils import (
        AnswerCollator,
        AnswerOnlyTrainer,
        CheckpointLogger,
        EarlyStopping,
        LoggingProgress,
        MetricsCallback,
    )

    a = plan.args
    rank, world = rank_and_world()
    is_main = rank == 0
    manifest = Manifest.from_json(plan.manifest_json)
    parts = build(plan)
    model, tok, lora_config = parts.model, parts.tokenizer, parts.lora_config
    train_raw, val_raw = parts.train_raw, parts.validation_raw
    trainable, total = model.get_nb_trainable_parameters()
    log.info("LoRA: %d trainable of %d parameters (%.2f%%)", trainable, total, 100 * trainable / total)
    targs = training_arguments(a, Path(plan.work_dir) / "trainer", world, plan.extra)

    if is_main and os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING") is None:
        mlflow.enable_system_metrics_logging()  # CPU/memory/GPU alongside the training metrics
    run_ctx = step_run(ENTRY_POINT, a) if is_main else contextlib.nullcontext(None)
    with run_ctx as active:
        run_id = active.info.run_id if active is not None else ""
        digest = ""
        if is_main:
            plan.write_result({"run_id": run_id})
            digest = log_inputs(plan, a, targs, lora_config, train_raw, val_raw, world, run_id)
            mlflow.log_metrics({"trainable_parameters": trainable, "total_parameters": total})

        def log_checkpoint(step: int, adapter_dir: Path, state_dir: Path) -> str:
            info = serving.log_e2e_model(
                name=artifacts.checkpoint_model_name(step), manifest=manifest, adapter_dir=adapter_dir,
                trainer_state_dir=state_dir, step=step, with_input_example=False,
                task_spec=task_spec(a.task, a.system_prompt),
                tags={artifacts.CHECKPOINT_STEP_TAG: str(step)})
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
        return finish(run_id, digest, trainer, out, stats, metrics_cb, wall)


def log_inputs(plan: Plan, a: Any, targs, lora_config, train_raw, val_raw, world: int, run_id: str) -> str:
    """Parameters, the dataset and its validation split as run inputs, the held-out file; returns the
    dataset digest."""
    import mlflow

    from lora_pipeline.task import data

    mlflow.log_params(flat_params(plan, targs, lora_config, len(train_raw), len(val_raw), world))
    name = Path(plan.dataset_source).name
    ds = data.to_mlflow_dataset(load_split(plan.all_path), a.dataset, a.dataset_revision, name=name,
                                location=plan.dataset_source)
    mlflow.log_input(ds, context="training")
    held_out = data.to_mlflow_dataset(val_raw, a.dataset, a.dataset_revision, name=f"{name}:validation",
                                      location=plan.dataset_source)
    mlflow.log_input(held_out, context="validation")
    mlflow.set_tag(artifacts.DATASET_DIGEST_TAG, ds.digest)
    # The held-out MRs, so evaluation scores exactly what training never saw.
    mlflow.log_artifact(plan.validation_path, artifact_path=str(Path(artifacts.VALIDATION_DATA_PATH).parent))
    outputs = {"validation_data": f"runs:/{run_id}/{artifacts.VALIDATION_DATA_PATH}"}
    if plan.resume:
        mlflow.set_tags({artifacts.RESUMED_FROM_TAG: plan.resume.run_id,
                         "finetune.resumed_checkpoint": artifacts.model_uri(plan.resume.model_id),
                         "finetune.resumed_step": str(plan.resume.step)})
    artifacts.set_outputs(mlflow.MlflowClient(), run_id, outputs)
    return ds.digest


def finish(run_id: str, digest: str, trainer, out, stats, metrics_cb, wall: float) -> Result:
    """Rank the logged checkpoints by validation loss, tag them, log the summary metrics and outputs."""
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
            artifacts.CHECKPOINT_EVAL_LOSS_TAG: "" if c.eval_loss is None else f"{c.eval_loss:.6f}",
            artifacts.BEST_TAG: str(c is best).lower()})
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
        validation_data_uri=f"runs:/{run_id}/{artifacts.VALIDATION_DATA_PATH}", dataset_digest=digest,
        best_step=best.step, best_eval_loss=float("nan") if best.eval_loss is None else best.eval_loss,
        global_step=trainer.state.global_step, train_loss=float(out.training_loss),
        train_runtime_s=float(out.metrics.get("train_runtime", wall)), tokens_per_second=tps,
        checkpoints_logged=len(logged), checkpoint_on_save_s=stats.on_save_seconds,
        checkpoint_final_wait_s=stats.final_wait_seconds,
    )
