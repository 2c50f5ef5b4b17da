"""The `text` task: free-form answers (instructions, questions, rewriting, summaries).

Metrics: exact_match (whitespace-normalised, case-sensitive), token_f1 (SQuAD-style bag-of-tokens
F1, averaged over examples) and rouge_l (ROUGE-L F-measure from `rouge-score`, averaged; the primary
metric, because it credits a right answer worded a little differently). eval_loss and perplexity
come from the trainer (base.TRAINER_METRICS).

One tokenizer for both token metrics: lower case, runs of letters and digits. On ASCII text it gives
the tokens of rouge-score's default tokenizer (without stemming); unlike that one it keeps letters
outside a-z, so text in other languages is not scored as empty.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache

from lora_pipeline.task.base import Scored, Task
from lora_pipeline.task.e2e import f1

_TOKEN = re.compile(r"[^\W_]+")


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


class _Tokenizer:
    """rouge-score's tokenizer interface."""

    def tokenize(self, text: str) -> list[str]:
        return tokens(text)


@lru_cache(maxsize=1)
def _rouge_l():
    from rouge_score import rouge_scorer  # heavy (nltk); only when scoring

    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=_Tokenizer())


def token_f1(expected: str, predicted: str) -> float:
    exp, pred = Counter(tokens(expected)), Counter(tokens(predicted))
    tp = sum((exp & pred).values())
    return f1(tp, sum(pred.values()) - tp, sum(exp.values()) - tp)


def rouge_l(expected: str, predicted: str) -> float:
    if not tokens(expected) and not tokens(predicted):
        return 1.0  # as token_f1: nothing expected and nothing said is right
    return _rouge_l().score(expected, predicted)["rougeL"].fmeasure


def _same(a: str, b: str) -> bool:
    return " ".join(a.split()) == " ".join(b.split())


class TextTask(Task):
    name = "text"
    system_prompt = ""  # the data's own prompt is the instruction
    plain_answer_cue = "Answer: "
    primary_metric = "rouge_l"
    metric_names = ("exact_match", "token_f1", "rouge_l")
    target_fix = "write the expected answer in every target"

    def score(self, pairs: Sequence[tuple[str, str]], prefix: str = "") -> Scored:
        rows, exact, tf1, rl = [], 0, 0.0, 0.0
        for expected, text in pairs:
            predicted = self.parse(text)
            exact += _same(expected, predicted)
            tf1 += token_f1(expected, predicted)
            row = rouge_l(expected, predicted)
            rl += row
            rows.append((predicted, row))
        n = len(rows)
        metrics = {f"{prefix}exact_match": exact / n if n else 0.0,
                   f"{prefix}token_f1": tf1 / n if n else 0.0,
                   f"{prefix}rouge_l": rl / n if n else 0.0}
        return Scored(metrics, rows)
