"""What a task is: how an example becomes a prompt and a target, and how answers are scored.

A task (`lora_pipeline/task/tasks.py:get_task`) is the one place that decides, for training,
evaluation and serving alike:
  * the prompt: the conversation before the answer, with the task's system prompt in front
    (`prompt_messages`, rendered by the base's chat template in `format_prompt`);
  * the target: the answer text the loss covers (`target_text`, plus end-of-sequence in
    `answer_text`), and whether a target is well-formed for the task (`check_target`);
  * parsing and scoring a generated answer (`parse`, `score` -> metrics and a per-row score), with a
    primary metric for gates and model comparison;
  * optional augmentation of training rows (`augment`).

Examples come from `lora_pipeline/task/formats.py` as `Example`s: a conversation (list of
{role, content}) and which of its turns are targets, whatever the file's format was.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

ROLES = ("system", "user", "assistant")
# Computed by the trainer from the validation loss, not from generated answers; every task logs them.
TRAINER_METRICS = ("eval_loss", "perplexity")
# Metrics where smaller is better (a gate on one of them must compare the other way round).
LOWER_IS_BETTER = frozenset({"eval_loss", "perplexity", "unparsable_rate"})

Message = dict[str, str]


@dataclass
class Example:
    """One training or evaluation example, whatever format it was read from.

    `messages` is the conversation without the task's system prompt (a system turn the data itself
    carries stays); the last turn is the assistant's answer. `targets[i]` says whether turn i is
    one the loss covers (assistant turns). `row` (1-based record number) and `line` (where the
    record starts in its file, None for sources without lines) are for error messages; `group`
    keeps related examples on one side of the train/validation split (None: split by row).
    """

    messages: list[Message]
    targets: list[bool]
    row: int = 0
    group: str | None = None
    line: int | None = None

    @property
    def prompt_turns(self) -> list[Message]:
        return self.messages[:-1]

    @property
    def completion(self) -> str:
        return self.messages[-1]["content"]


@dataclass
class Scored:
    """A task's score of (expected, predicted) pairs: `metrics` (names carry the caller's prefix)
    and, per pair, the prediction as the evaluation table shows it and that row's own score."""

    metrics: dict[str, float]
    rows: list[tuple[str, float]] = field(default_factory=list)


class Task:
    """The base of every task; subclasses set the class attributes and override what differs."""

    name: ClassVar[str] = ""
    # Used when the caller passes no system prompt; "" means no system turn.
    system_prompt: ClassVar[str] = ""
    # Bases without a chat template get a plain prompt: the turns on lines, then this cue.
    plain_answer_cue: ClassVar[str] = "Answer: "
    primary_metric: ClassVar[str] = ""
    # Metrics `score` always returns (without prefix); per-field ones come on top, named `<metric>.<field>`.
    metric_names: ClassVar[tuple[str, ...]] = ()
    # What a well-formed target looks like: the fix of a data error about targets.
    target_fix: ClassVar[str] = "fill in every target"
    supports_augmentation: ClassVar[bool] = False
    # What finetune's augment_fraction=-1 (its default) means for this task; > 0 only where
    # `supports_augmentation`.
    default_augment_fraction: ClassVar[float] = 0.0

    # --- prompt ------------------------------------------------------------------------------------
    def user_text(self, text: str) -> str:
        """A user turn as the model sees it (a task may normalise it)."""
        return text

    def prompt_messages(self, prompt: str | Sequence[Mapping[str, str]],
                        system_prompt: str | None = None) -> list[Message]:
        """The turns before the answer, with the system prompt in front.

        `prompt` is one user text or earlier turns. `system_prompt` None means the task's default;
        "" means none. A conversation that starts with its own system turn keeps it (the data's
        instruction is more specific than a task-wide one).
        """
        turns = ([{"role": "user", "content": prompt}] if isinstance(prompt, str)
                 else [dict(t) for t in prompt])
        turns = [{"role": t["role"], "content": self.user_text(t["content"])} if t["role"] == "user"
                 else {"role": t["role"], "content": t["content"]} for t in turns]
        system = self.system_prompt if system_prompt is None else system_prompt
        if system and not (turns and turns[0]["role"] == "system"):
            turns.insert(0, {"role": "system", "content": system})
        return turns

    def conversation(self, example: Example, system_prompt: str | None = None
                     ) -> tuple[list[Message], list[bool]]:
        """The whole conversation for training (system prompt added) and which turns are targets;
        target turns carry `target_text`, so training and scoring see the same normalised answers."""
        messages = self.prompt_messages(example.messages, system_prompt)
        targets = [False] * (len(messages) - len(example.messages)) + list(example.targets)
        for m, is_target in zip(messages, targets, strict=True):
            if is_target:
                m["content"] = self.target_text(m["content"])
        return messages, targets

    def format_prompt(self, tokenizer, prompt: str | Sequence[Mapping[str, str]],
                      system_prompt: str | None = None) -> str:
        """The model's chat template applied to the prompt; ends where the answer starts."""
        messages = self.prompt_messages(prompt, system_prompt)
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return "\n".join(m["content"] for m in messages) + "\n" + self.plain_answer_cue

    # --- target ------------------------------------------------------------------------------------
    def target_text(self, completion: str) -> str:
        """The answer the model learns to write (normalised where the task has a canonical form)."""
        return completion.strip()

    def answer_text(self, tokenizer, completion: str) -> str:
        """Training target: `target_text` followed by the end-of-sequence token."""
        return self.target_text(completion) + (getattr(tokenizer, "eos_token", None) or "")

    def check_target(self, completion: str) -> tuple[str, str] | None:
        """(reason, detail) if `completion` is not a well-formed target for this task, else None.

        The reason completes "N of M rows ..." (e.g. "have a target that is not valid JSON"): rows
        are grouped by it in error messages, with the detail of the first one."""
        return None

    # --- answers -----------------------------------------------------------------------------------
    def parse(self, output: str) -> Any:
        """A generated answer in the task's structure; None if it does not have it."""
        return output.strip()

    def score(self, pairs: Sequence[tuple[str, str]], prefix: str = "") -> Scored:
        raise NotImplementedError

    def augment(self, prompt: str, completion: str, rng) -> tuple[str, str]:
        """A training row rewritten to teach the task better; unchanged where the task has none."""
        return prompt, completion

    @property
    def all_metric_names(self) -> tuple[str, ...]:
        return self.metric_names + TRAINER_METRICS
