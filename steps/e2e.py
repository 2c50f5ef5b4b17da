"""The task: read a restaurant sentence, write its E2E meaning representation (MR).

One place for the MR format (parse, normalise, score) and for the prompt, shared by `finetune`
(training targets), `evaluate_checkpoint` (scoring) and the served model (generation), so training
and serving can never format differently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# The canonical slot order of the E2E data; normalised MRs list slots in this order.
SLOTS = ("name", "eatType", "food", "priceRange", "customer rating", "area", "familyFriendly", "near")
_SLOT_INDEX = {s: i for i, s in enumerate(SLOTS)}
_SLOT_LOWER = {s.lower(): s for s in SLOTS}
# `slot[value]`: slot names are words and spaces; values are anything but brackets.
_ITEM = re.compile(r"\s*([A-Za-z][A-Za-z ]*?)\s*\[([^\[\]]*)\]\s*(?:,|$)")

SYSTEM_PROMPT = "You extract restaurant attributes."
INSTRUCTION = (
    "Write the meaning representation of this sentence as slot[value] pairs, using only the slots "
    "name, eatType, food, priceRange, customer rating, area, familyFriendly, near.\nSentence: "
)


def _clean(value: str) -> str:
    return " ".join(value.split())


def parse_mr(text: str) -> dict[str, str] | None:
    """`name[X], food[Y]` -> {"name": "X", "food": "Y"}; None if the text is not a well-formed MR.

    Slot names are matched case-insensitively to the canonical ones; unknown slot names are kept
    (they count as wrong predictions when scoring). A repeated slot makes the MR malformed.
    """
    text = text.strip()
    if not text:
        return None
    out: dict[str, str] = {}
    pos = 0
    while pos < len(text):
        m = _ITEM.match(text, pos)
        if not m or m.end() == pos:
            return None
        slot = _SLOT_LOWER.get(_clean(m[1]).lower(), _clean(m[1]))
        if slot in out:
            return None
        out[slot] = _clean(m[2])
        pos = m.end()
    return out


def format_mr(slots: dict[str, str]) -> str:
    """The normalised MR string: canonical slot order, single spaces."""
    order = sorted(slots, key=lambda s: (_SLOT_INDEX.get(s, len(SLOTS)), s))
    return ", ".join(f"{s}[{_clean(slots[s])}]" for s in order)


def normalise_mr(text: str) -> str | None:
    parsed = parse_mr(text)
    return None if parsed is None else format_mr(parsed)


def chat_messages(sentence: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": INSTRUCTION + _clean(sentence)},
    ]


def format_prompt(tokenizer, sentence: str) -> str:
    """The model's chat template applied to the instruction; ends where the answer starts."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(chat_messages(sentence), tokenize=False,
                                             add_generation_prompt=True)
    # Bases without a chat template get a plain prompt of the same content.
    return f"{SYSTEM_PROMPT}\n{INSTRUCTION}{_clean(sentence)}\nMR: "


def answer_text(tokenizer, mr: str) -> str:
    """Training target: the normalised MR followed by the end-of-sequence token."""
    return (normalise_mr(mr) or mr) + (tokenizer.eos_token or "")


# --- scoring -----------------------------------------------------------------------------------
def _pairs(slots: dict[str, str]) -> set[tuple[str, str]]:
    return {(s, v.lower()) for s, v in slots.items()}


@dataclass
class Scores:
    """Slot-level precision/recall/F1 over (slot, value) pairs, micro and per slot."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    exact: int = 0
    unparsable: int = 0
    n: int = 0
    per_slot: dict[str, list[int]] = field(default_factory=dict)  # slot -> [tp, fp, fn]

    def add(self, expected: dict[str, str], predicted: dict[str, str] | None) -> float:
        """Add one example; returns its own F1."""
        self.n += 1
        if predicted is None:
            self.unparsable += 1
            predicted = {}
        exp, pred = _pairs(expected), _pairs(predicted)
        tp, fp, fn = len(exp & pred), len(pred - exp), len(exp - pred)
        self.tp, self.fp, self.fn = self.tp + tp, self.fp + fp, self.fn + fn
        self.exact += int(exp == pred)
        for s, v in exp | pred:
            c = self.per_slot.setdefault(s, [0, 0, 0])
            c[0] += (s, v) in exp and (s, v) in pred
            c[1] += (s, v) in pred and (s, v) not in exp
            c[2] += (s, v) in exp and (s, v) not in pred
        return f1(tp, fp, fn)

    def metrics(self, prefix: str = "") -> dict[str, float]:
        p = self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0
        r = self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0
        out = {
            f"{prefix}slot_precision": p,
            f"{prefix}slot_recall": r,
            f"{prefix}slot_f1": f1(self.tp, self.fp, self.fn),
            f"{prefix}exact_match": self.exact / self.n if self.n else 0.0,
            f"{prefix}unparsable_rate": self.unparsable / self.n if self.n else 0.0,
        }
        for s, (tp, fp, fn) in sorted(self.per_slot.items()):
            if s in _SLOT_INDEX:  # per-slot metrics for real slots only; invented ones count in fp
                out[f"{prefix}slot_f1.{s.replace(' ', '_')}"] = f1(tp, fp, fn)
        return out


def f1(tp: int, fp: int, fn: int) -> float:
    # 2TP / (2TP + FP + FN); an example with nothing expected and nothing predicted is perfect.
    denom = 2 * tp + fp + fn
    return 1.0 if denom == 0 else 2 * tp / denom
