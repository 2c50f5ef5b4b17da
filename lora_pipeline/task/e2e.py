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

# The prompt is short on purpose: the fine-tuned model learns the format from its targets, and every
# prompt token is paid in every training step and every generation. With SmolLM2's chat template,
# over the first 500 sentences of the E2E dev set: 52.7 prompt tokens on average here, against 87.7
# with an instruction listing the slots; with the 33-token answers a training example shrinks from
# 120.7 to 85.7 tokens (-29%), and evaluation prefills 40% fewer tokens.
SYSTEM_PROMPT = "Extract the restaurant's attributes as slot[value] pairs."
INSTRUCTION = ""


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


# --- augmentation: read values from the sentence, not from memory ------------------------------
# The E2E training data names few restaurants (the cleaned dev split: 20 names; eatType coffee shop
# in 2,998 well-formed rows against 150 restaurant and 3 pub), so a model can score well by recalling
# its training names and types instead of reading them. Rewriting some training rows with names it
# has never seen, and with the eatType changed, makes copying from the sentence the only way to get
# those rows right. Names are made from two word lists (24 x 24 = 576 names, 1,152 with "The"; at
# most 8 tokens with SmolLM2's tokenizer, so a rewritten row stays far below max_seq_length);
# bench/bench_quality.py checks its probe names share no word with them.
_NAME_FIRST = ("Amber", "Birch", "Crimson", "Dapper", "Elm", "Foxglove", "Granite", "Hazel", "Indigo",
               "Jasper", "Kestrel", "Linden", "Maple", "Nutmeg", "Orchid", "Pebble", "Quince", "Rowan",
               "Sorrel", "Thistle", "Umber", "Willow", "Yarrow", "Zephyr")
_NAME_SECOND = ("Arms", "Bistro", "Corner", "Den", "Garden", "Grill", "Inn", "Kitchen", "Lodge", "Mill",
                "Nook", "Oak", "Parlour", "Place", "Rooms", "Spoon", "Station", "Tavern", "Terrace",
                "Vault", "Wharf", "Yard", "Bell", "Crown")
EAT_TYPES = ("coffee shop", "pub", "restaurant")
AUGMENTED_SLOTS = ("name", "near")


def synthetic_name(rng) -> str:
    first, second = rng.choice(_NAME_FIRST), rng.choice(_NAME_SECOND)
    return f"The {first} {second}" if rng.random() < 0.3 else f"{first} {second}"


def _verbatim(value: str) -> re.Pattern:
    return re.compile(rf"(?<!\w){re.escape(value)}(?!\w)")


def augment(sentence: str, mr: str, rng) -> tuple[str, str]:
    """(sentence, mr) with `name`/`near` values swapped for unseen names and `eatType` for another
    type, each only where the value occurs verbatim (whole words) in the sentence, so sentence and
    MR stay consistent. A row it cannot rewrite safely comes back unchanged."""
    slots = parse_mr(mr)
    if not slots:
        return sentence, mr
    copied = [s for s in AUGMENTED_SLOTS if s in slots]
    values = [slots[s] for s in copied]
    # A value inside another (name "The Eagle", near "Eagle Inn") cannot be swapped independently.
    if any(a != b and a in b for a in values for b in values):
        return sentence, mr
    original = sentence
    for slot in copied:
        pattern = _verbatim(slots[slot])
        if not pattern.search(sentence):
            continue
        new = synthetic_name(rng)
        while new in slots.values():
            new = synthetic_name(rng)
        sentence = pattern.sub(lambda _, new=new: new, sentence)  # literal: no escapes to expand
        slots[slot] = new
    eat_type = slots.get("eatType")
    mentioned = [t for t in EAT_TYPES if _verbatim(t).search(sentence)]
    # Only a sentence that names exactly its own type: "a coffee shop restaurant" stays as it is.
    if eat_type in EAT_TYPES and mentioned == [eat_type]:
        new_type = rng.choice([t for t in EAT_TYPES if t != eat_type])
        sentence = _verbatim(eat_type).sub(new_type, sentence)
        slots["eatType"] = new_type
    return (sentence, format_mr(slots)) if sentence != original else (sentence, mr)
