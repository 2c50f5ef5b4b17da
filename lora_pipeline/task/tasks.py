"""The tasks the pipeline can fine-tune, evaluate and serve, by name (the `task` parameter).

    e2e   restaurant sentence -> E2E meaning representation (the default; lora_pipeline/task/e2e.py)
    json  structured extraction: the target is one JSON object, scored field by field
    text  free-form answers: exact match, token F1, ROUGE-L

A new task is a `Task` subclass (lora_pipeline/task/base.py) added to TASKS.
"""

from __future__ import annotations

import difflib

from lora_pipeline.errors import InputError, Problem
from lora_pipeline.task.base import Task
from lora_pipeline.task.e2e_task import E2ETask
from lora_pipeline.task.json_task import JsonTask
from lora_pipeline.task.text_task import TextTask

DEFAULT_TASK = "e2e"
TASK_SPEC_VERSION = 1
TASKS: dict[str, type[Task]] = {t.name: t for t in (E2ETask, JsonTask, TextTask)}
# finetune's augment_fraction default: "the task's own" (Task.default_augment_fraction), so that
# task=json or text with every default trains, and e2e keeps its measured 0.5.
AUGMENT_TASK_DEFAULT = -1.0


def get_task(name: str, *, field: str = "task") -> Task:
    """The task called `name`; InputError naming `field` and the nearest task name otherwise."""
    key = (name or "").strip().lower()
    if key in TASKS:
        return TASKS[key]()
    close = difflib.get_close_matches(key, TASKS, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    raise InputError(Problem(field, name, "is not a task",
                             f"{hint}pass one of: {', '.join(TASKS)}"))


def augment_fraction(task: Task, value: float) -> float:
    """The fraction of training rows to augment: `value`, or the task's own for AUGMENT_TASK_DEFAULT."""
    return task.default_augment_fraction if value == AUGMENT_TASK_DEFAULT else value


def task_spec(name: str, system_prompt: str = "") -> dict[str, object]:
    """What a logged model records about its task (`task.json`): the task's name and the system
    prompt its training conversations started with (empty `system_prompt`: the task's own)."""
    task = get_task(name)
    return {"version": TASK_SPEC_VERSION, "task": task.name,
            "system_prompt": system_prompt or task.system_prompt}


def task_from_spec(spec: dict | None) -> tuple[Task, str | None]:
    """(task, system prompt) of a logged model's `task.json`; no spec (a model logged before tasks
    existed) is the e2e task with its own prompt."""
    if not spec:
        return get_task(DEFAULT_TASK), None
    return get_task(str(spec.get("task", DEFAULT_TASK))), spec.get("system_prompt")
