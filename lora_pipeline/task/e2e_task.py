"""The `e2e` task: today's E2E extraction (lora_pipeline/task/e2e.py) behind the `Task` interface.

Every method calls e2e.py's own functions, so prompts, targets, parsing and the figures of a run are
the ones the pipeline has always produced (tests/unit/test_tasks.py checks them against e2e.py).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from lora_pipeline.task import e2e
from lora_pipeline.task.base import Scored, Task

_SLOT_NAME = re.compile(r"([A-Za-z][A-Za-z ]*?)\s*\[")


class E2ETask(Task):
    name = "e2e"
    system_prompt = e2e.SYSTEM_PROMPT
    plain_answer_cue = "MR: "
    primary_metric = "slot_f1"
    metric_names = ("slot_precision", "slot_recall", "slot_f1", "exact_match", "unparsable_rate")
    target_fix = (f"write the MR as slot[value], slot[value], ... with slots {', '.join(e2e.SLOTS)}, "
                  "each slot once")
    supports_augmentation = True
    # 0.5, measured by bench/bench_quality.py (15 min, devset-cleaned, lr 1e-3): held-out slot F1
    # 0.894 vs 0.898 without, and 0.887 vs 0.796 on held-out sentences with unseen names and
    # pub/restaurant.
    default_augment_fraction = 0.5

    def user_text(self, text: str) -> str:
        return e2e.INSTRUCTION + " ".join(text.split())

    def format_prompt(self, tokenizer, prompt: str | Sequence[Mapping[str, str]],
                      system_prompt: str | None = None) -> str:
        if isinstance(prompt, str) and system_prompt in (None, e2e.SYSTEM_PROMPT):
            return e2e.format_prompt(tokenizer, prompt)
        return super().format_prompt(tokenizer, prompt, system_prompt)

    def target_text(self, completion: str) -> str:
        return e2e.normalise_mr(completion) or completion

    def answer_text(self, tokenizer, completion: str) -> str:
        return e2e.answer_text(tokenizer, completion)

    def check_target(self, completion: str) -> tuple[str, str] | None:
        # The three kinds of malformed MR lora_pipeline/task/data.py tells apart.
        parsed = e2e.parse_mr(completion or "")
        if parsed is None:
            names = [n.strip().lower() for n in _SLOT_NAME.findall(completion or "")]
            repeated = len(names) != len(set(names))
            return ("have a repeated slot" if repeated else "have an unparsable MR"), completion
        unknown = sorted(set(parsed) - set(e2e.SLOTS))
        if unknown:
            return "have an unknown slot", ", ".join(unknown)
        return None

    def parse(self, output: str) -> dict[str, str] | None:
        return e2e.parse_mr(output)

    def score(self, pairs: Sequence[tuple[str, str]], prefix: str = "") -> Scored:
        # As evaluate_checkpoint scores: an expected MR that does not parse counts as no slots.
        scores = e2e.Scores()
        rows = []
        for expected, text in pairs:
            predicted = e2e.parse_mr(text)
            row_f1 = scores.add(e2e.parse_mr(expected) or {}, predicted)
            rows.append((e2e.format_mr(predicted) if predicted is not None else text, row_f1))
        return Scored(scores.metrics(prefix), rows)

    def augment(self, prompt: str, completion: str, rng) -> tuple[str, str]:
        return e2e.augment(prompt, completion, rng)
