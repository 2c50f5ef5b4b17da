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
TASKS: dict[str, type[Task]] = {t.name: t for t in (E2ETask, JsonTask, TextTask)}


def get_task(name: str, *, field: str = "task") -> Task:
    """The task called `name`; InputError naming `field` and the nearest task name otherwise."""
    key = (name or "").strip().lower()
    if key in TASKS:
        return TASKS[key]()
    close = difflib.get_close_matches(key, TASKS, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    raise InputError(Problem(field, name, "is not a task",
                             f"{hint}pass one of: {', '.join(TASKS)}"))
