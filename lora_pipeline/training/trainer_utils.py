"""Pieces of the `finetune` step that plug into `transformers.Trainer`.

  * `tokenize_examples`: prompt (the model's chat template, `e2e.format_prompt`) + answer (the
    normalised MR, `e2e.answer_text`); labels are -100 on the prompt, so the loss counts answer
    tokens only. Other tasks' rows are conversations (`encode_conversation`): every assistant turn
    is a target, everything else (system prompt, user turns, the template's markup) is masked.
  * `AnswerCollator`: right padding (training; `serving.load_tokenizer` pads left for generation).
  * `AnswerOnlyTrainer`: computes the LM head only at answer positions. The head of a small model is
    a large part of its compute (SmolLM2-135M: vocabulary 49,152 x hidden 576 = 28M of its 135M
    weights, applied at every position), while the answer is about a quarter of each sequence; the
    loss is exactly the masked full-logits loss (tests/test_finetune.py checks it to 1e-5).
  * Callbacks: `MetricsCallback` (per-step metrics to MLflow, rank 0 only), `EarlyStopping`,
    `CheckpointLogger` (logs each saved checkpoint as an MLflow model from a background thread, so
    training does not wait for artifact uploads).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ProgressCallback

from lora_pipeline.errors import StepError
from lora_pipeline.task.e2e import answer_text, format_prompt

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
# Files of a Trainer checkpoint directory, split the way `serving.log_e2e_model` stores them.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
TRAINER_STATE_FILES = ("optimizer.pt", "scheduler.pt", "trainer_state.json", "scaler.pt")
RNG_GLOB = "rng_state*.pth"


# --- data -----------------------------------------------------------------------------------------
def encode_example(tokenizer, sentence: str, mr: str) -> dict[str, list[int]]:
    prompt = tokenizer(format_prompt(tokenizer, sentence), add_special_tokens=False)["input_ids"]
    answer = tokenizer(answer_text(tokenizer, mr), add_special_tokens=False)["input_ids"]
    return {"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer,
            "length": len(prompt) + len(answer)}


def encode_conversation(tokenizer, task, messages: list[dict[str, str]], targets: list[bool]
                        ) -> dict[str, list[int]]:
    """A whole conversation (system prompt included, `Task.conversation`) as one sequence whose
    labels cover the assistant turns only.

    Each target turn is its prompt (the chat template up to that turn, with the generation prompt:
    what serving and evaluation render) followed by `task.answer_text` (answer + end of sequence),
    both tokenized apart as `encode_example` does. The text between one answer and the next prompt
    (the template's markup, the next user turn) is context. A template that does not render earlier
    turns the same way again (or a base without one) cannot be cut like that: then only the last
    answer is a target, with the earlier turns as its context.
    """
    has_template = bool(getattr(tokenizer, "chat_template", None))
    ids: list[int] = []
    labels: list[int] = []
    done = ""  # the text `ids` holds so far
    for i, (turn, is_target) in enumerate(zip(messages, targets, strict=True)):
        if not is_target:
            continue
        if has_template:
            prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        else:
            prompt = "\n".join(m["content"] for m in messages[:i]) + "\n" + task.plain_answer_cue
        if not prompt.startswith(done):
            ids, labels, done = [], [], ""
        context = tokenizer(prompt[len(done):], add_special_tokens=False)["input_ids"]
        answer_str = task.answer_text(tokenizer, turn["content"])
        answer = tokenizer(answer_str, add_special_tokens=False)["input_ids"]
        ids += context + answer
        labels += [IGNORE_INDEX] * len(context) + answer
        done = prompt + answer_str
    return {"input_ids": ids, "labels": labels, "length": len(ids)}


def encode_row(tokenizer, row: dict, task=None, system_prompt: str | None = None) -> dict[str, list[int]]:
    """One staged row (lora_pipeline/training/plan.py): `mr`, `ref` for e2e, else a conversation."""
    if "messages" not in row:
        return encode_example(tokenizer, row["ref"], row["mr"])
    from lora_pipeline.task.formats import from_record

    messages, targets = task.conversation(from_record(row), system_prompt)
    return encode_conversation(tokenizer, task, messages, targets)


def example_length(tokenizer, row: dict, task=None, system_prompt: str | None = None) -> int:
    return encode_row(tokenizer, row, task, system_prompt)["length"]


def tokenize_examples(ds, tokenizer, *, desc: str = "tokenizing", task=None, system_prompt: str | None = None):
    """Staged rows -> `input_ids`, `labels`, `length` (one row per example, no truncation)."""
    return ds.map(lambda row: encode_row(tokenizer, row, task, system_prompt),
                  remove_columns=ds.column_names, desc=desc)


@dataclass
class AnswerCollator:
    """Pads right to the longest row of the batch (rounded up to `pad_to_multiple_of`)."""

    pad_token_id: int
    pad_to_multiple_of: int = 1

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        width = int(math.ceil(longest / self.pad_to_multiple_of) * self.pad_to_multiple_of)
        ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n] = torch.tensor(f["input_ids"])
            labels[i, :n] = torch.tensor(f["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# --- answer-only loss -----------------------------------------------------------------------------
def output_head(model) -> torch.nn.Module:
    """The LM head module of a (PEFT-, DDP-wrapped) causal LM."""
    inner = model.module if hasattr(model, "module") and not hasattr(model, "get_output_embeddings") else model
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    head = inner.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(inner).__name__} has no output embeddings (LM head)")
    return head


class HeadSelector:
    """A forward pre-hook on the LM head that keeps only the selected (flattened) positions.

    The model's own forward runs unchanged (DDP and PEFT wrappers included); only the head's input
    shrinks from (batch, seq, hidden) to (selected, hidden). The index is set per call and cleared
    afterwards, so generation and plain forward calls are unaffected.
    """

    def __init__(self, head: torch.nn.Module):
        self.index: torch.Tensor | None = None
        self.handle = head.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        if self.index is None:
            return None
        hidden = args[0]
        return (hidden.reshape(-1, hidden.shape[-1]).index_select(0, self.index),) + tuple(args[1:])

    @contextlib.contextmanager
    def select(self, index: torch.Tensor):
        self.index = index
        try:
            yield
        finally:
            self.index = None

    def remove(self) -> None:
        self.handle.remove()


def answer_only_loss(model, inputs: dict[str, torch.Tensor], selector: HeadSelector,
                     num_items_in_batch: torch.Tensor | int | None = None):
    """Cross-entropy over answer tokens, with the LM head applied only where a label follows.

    Equal to the standard shifted, masked causal-LM loss: sum over answer tokens divided by
    `num_items_in_batch` (the Trainer's count over the whole accumulated batch) or, without it, the
    mean over this batch's answer tokens. Returns (loss, selected_logits).
    """
    labels = inputs["labels"]
    targets = labels[:, 1:]  # the token at position t+1 is predicted from position t
    keep = targets != IGNORE_INDEX
    batch, seq = labels.shape
    rows, cols = keep.nonzero(as_tuple=True)
    index = rows * seq + cols  # flattened (batch * seq) positions of the hidden states
    model_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "length")}
    with selector.select(index):
        out = model(**model_inputs, use_cache=False)
    logits = out.logits.reshape(-1, out.logits.shape[-1]).float()
    loss_sum = F.cross_entropy(logits, targets[keep], reduction="sum")
    denom = num_items_in_batch if num_items_in_batch is not None else keep.sum().clamp(min=1)
    if torch.is_tensor(denom):
        denom = denom.to(loss_sum.device)
    return loss_sum / denom, logits


class AnswerOnlyTrainer(Trainer):
    """`Trainer` whose loss applies the LM head at answer positions only (same value, less compute)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._selector = HeadSelector(output_head(self.model))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, logits = answer_only_loss(model, inputs, self._selector, num_items_in_batch)
        # Mirror Trainer.compute_loss: with `num_items_in_batch` counted over all processes, DDP's
        # gradient averaging would divide by the process count once more; undo it.
        if (self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs
                and num_items_in_batch is not None):
            loss = loss * self.accelerator.num_processes
        return (loss, {"logits": logits}) if return_outputs else loss


# --- callbacks ------------------------------------------------------------------------------------
class MetricsCallback(TrainerCallback):
    """Per-step metrics to the active MLflow run (rank 0 only): loss, learning_rate, grad_norm,
    eval_loss, and tokens_per_second over the training steps of each logging window (non-pad
    tokens / seconds spent in optimizer steps, so evaluation and checkpoint time do not count)."""

    def __init__(self) -> None:
        self._step_start = 0.0
        self._window_seconds = 0.0
        self._window_tokens_start = 0
        self.history: list[dict[str, float]] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self._window_tokens_start = state.num_input_tokens_seen

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._window_seconds += time.perf_counter() - self._step_start

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        import mlflow

        metrics = {k: float(v) for k, v in logs.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        if "loss" in logs:
            # Step logs also carry running `train_runtime` / `train_tokens_per_second` averages since
            # the start; the run's summary (train_*) is logged once at the end instead.
            metrics = {k: v for k, v in metrics.items() if not k.startswith("train_")}
        if "loss" in logs and self._window_seconds > 0:
            tokens = state.num_input_tokens_seen - self._window_tokens_start
            metrics["tokens_per_second"] = tokens / self._window_seconds
            self._window_seconds = 0.0
            self._window_tokens_start = state.num_input_tokens_seen
        self.history.append({"step": state.global_step, **metrics})
        mlflow.log_metrics(metrics, step=state.global_step)


class LoggingProgress(ProgressCallback):
    """The Trainer's progress bars (stderr), with its per-step log lines sent to `logging` instead of
    stdout: the step's stdout carries only its JSON result."""

    KEYS = ("loss", "eval_loss", "learning_rate", "grad_norm")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            shown = {k: f"{logs[k]:.4g}" for k in self.KEYS if isinstance(logs.get(k), (int, float))}
            if shown:
                log.info("step %d: %s", state.global_step, " ".join(f"{k}={v}" for k, v in shown.items()))


class EarlyStopping(TrainerCallback):
    """Stops after `patience` evaluations without a lower eval_loss (0 = never), saving the last state."""

    def __init__(self, patience: int):
        self.patience = patience
        self.best = math.inf
        self.bad = 0
        self.stopped_at: int | None = None

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.patience <= 0 or not metrics or "eval_loss" not in metrics:
            return
        if metrics["eval_loss"] < self.best:
            self.best, self.bad = metrics["eval_loss"], 0
            return
        self.bad += 1
        if self.bad >= self.patience:
            log.info("early stopping at step %d: eval_loss has not improved for %d evaluations",
                     state.global_step, self.bad)
            self.stopped_at = state.global_step
            control.should_training_stop = True
            control.should_save = True  # the state training stopped in is always a logged checkpoint


@dataclass
class LoggedCheckpoint:
    step: int
    model_id: str
    eval_loss: float | None
    seconds: float


@dataclass
class _Job:
    step: int
    checkpoint_dir: Path
    eval_loss: float | None


@dataclass
class CheckpointStats:
    on_save_seconds: float = 0.0  # time the training loop spent in on_save (enqueueing)
    worker_seconds: float = 0.0  # time the background thread spent logging
    final_wait_seconds: float = 0.0  # time spent at the end waiting for the queue to drain
    logged: list[LoggedCheckpoint] = field(default_factory=list)


class CheckpointLogger(TrainerCallback):
    """At each save, log the checkpoint (adapter + trainer state) as an MLflow model, in a thread.

    `log_fn(step, adapter_dir, trainer_state_dir) -> model_id` does the logging (the step passes
    `serving.log_e2e_model`). Only rank 0 logs. At most one checkpoint is in flight (a save waits
    for the previous upload). A logging failure stops training at the next step and `finish()`
    raises it as a StepError naming the checkpoints that are kept.
    """

    def __init__(self, log_fn: Callable[[int, Path, Path], str], run_id: str, *, world_size: int = 1,
                 rng_wait_s: float = 120.0):
        self.log_fn = log_fn
        self.run_id = run_id
        self.world_size = world_size
        self.rng_wait_s = rng_wait_s
        self.stats = CheckpointStats()
        self.eval_losses: dict[int, float] = {}
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._error: BaseException | None = None
        self._failed_step: int | None = None
        self._thread: threading.Thread | None = None

    # training-loop side
    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self._thread is None:
            self._thread = threading.Thread(target=self._work, name="checkpoint-logger", daemon=True)
            self._thread.start()

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if metrics and "eval_loss" in metrics:
            self.eval_losses[state.global_step] = float(metrics["eval_loss"])

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or self._error is not None:
            return
        t0 = time.perf_counter()
        # At most one checkpoint in flight: if the previous upload is still running (a slow artifact
        # store), training waits here rather than running save intervals ahead of what is logged,
        # so a crash loses at most two intervals and local checkpoints never pile up.
        self._queue.join()
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        self._queue.put(_Job(state.global_step, ckpt, self.eval_losses.get(state.global_step)))
        self.stats.on_save_seconds += time.perf_counter() - t0

    def on_step_end(self, args, state, control, **kwargs):
        if self._error is not None:
            control.should_training_stop = True

    def finish(self) -> CheckpointStats:
        """Wait for every queued checkpoint to be logged; raise the first logging error."""
        t0 = time.perf_counter()
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        self.stats.final_wait_seconds = time.perf_counter() - t0
        if self._error is not None:
            err, kept = self._error, [c.step for c in self.stats.logged]
            what = f"logging checkpoint-{self._failed_step}" if self._failed_step else "checkpoint logging"
            detail = " ".join(f"{type(err).__name__}: {err}".split())[:300]
            keep = (f"checkpoint-{kept[-1]} and earlier are logged and intact: fix the cause and rerun "
                    f"finetune with resume_from={self.run_id}" if kept else
                    "no checkpoint was logged: fix the cause and rerun finetune")
            raise StepError(f"{what} failed ({detail}); training stopped; {keep}") from err
        return self.stats

    # worker side
    def _work(self) -> None:
        import mlflow

        # Lowest CPU priority for this thread (Linux: a thread is its own task): on a machine with as
        # many cores as training threads, copying a checkpoint must not take a core from training.
        with contextlib.suppress(AttributeError, OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        try:
            # MLflow's active run is per thread: attach this thread to the step's run (never ended
            # here; the step's own `with` ends it). No second system-metrics monitor.
            mlflow.start_run(run_id=self.run_id, log_system_metrics=False)
        except BaseException as err:  # reported by finish(); the queue is still drained below
            self._error = err
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                if self._error is None:  # after a failure: drain; the first error is what finish() raises
                    try:
                        self._log_one(job)
                    except BaseException as err:  # training stops at the next step
                        log.error("logging checkpoint-%d failed: %s", job.step, err)
                        self._failed_step, self._error = job.step, err
            finally:
                self._queue.task_done()  # on_save's join() waits for this

    def _log_one(self, job: _Job) -> None:
        t0 = time.perf_counter()
        staged = job.checkpoint_dir.parent / f".staged-{job.step}"
        adapter, state = staged / "adapter", staged / "trainer_state"
        adapter.mkdir(parents=True, exist_ok=True)
        state.mkdir(parents=True, exist_ok=True)
        # Other ranks write their RNG state into the same directory, possibly after rank 0's on_save.
        want = 1 if self.world_size == 1 else self.world_size
        deadline = time.monotonic() + self.rng_wait_s
        while len(list(job.checkpoint_dir.glob(RNG_GLOB))) < want and time.monotonic() < deadline:
            time.sleep(0.2)
        for name in ADAPTER_FILES:
            _link(job.checkpoint_dir / name, adapter / name, required=True)
        for name in TRAINER_STATE_FILES:
            _link(job.checkpoint_dir / name, state / name, required=name != "scaler.pt")
        for p in job.checkpoint_dir.glob(RNG_GLOB):
            _link(p, state / p.name, required=True)
        model_id = self.log_fn(job.step, adapter, state)
        shutil.rmtree(staged, ignore_errors=True)
        # The Trainer keeps no reference to old checkpoints (no rotation, no best-model reload):
        # once logged, the local copy only costs disk.
        shutil.rmtree(job.checkpoint_dir, ignore_errors=True)
        dt = time.perf_counter() - t0
        self.stats.worker_seconds += dt
        self.stats.logged.append(LoggedCheckpoint(job.step, model_id, job.eval_loss, dt))
        log.info("logged checkpoint-%d as models:/%s (%.1fs, eval_loss=%s)", job.step, model_id, dt,
                 "n/a" if job.eval_loss is None else f"{job.eval_loss:.4f}")


def _link(src: Path, dst: Path, *, required: bool) -> None:
    if not src.is_file():
        if required:
            raise FileNotFoundError(f"checkpoint file {src} is missing")
        return
    try:
        dst.hardlink_to(src)  # same file system: instant, no copy
    except OSError:
        shutil.copy2(src, dst)
