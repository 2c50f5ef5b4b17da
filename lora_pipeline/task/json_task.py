"""The `json` task: structured extraction, where the target is one JSON object.

Scoring is field-level, as E2E's is slot-level: each (field, value) pair of the expected object is
found or missed, each predicted pair is right or wrong. Nested objects are fields with dotted names
(`address.city`); a list value scores per element (a list of three names is three pairs, so two of
three right is partial credit, not a miss). Values compare as text, case- and space-insensitively
(`"5"` and `5` are the same value: the model is judged on what it read, not on JSON typing).
A field whose value is null, or an empty list, counts as absent: annotators and models write
"not mentioned" both ways, and neither should be an error.

Metrics: field_precision / field_recall / field_f1 (micro over pairs, and field_f1.<field> per field
of the expected data), exact_match (the predicted pairs equal the expected ones), valid_json_rate
(answers that are one JSON object).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

from lora_pipeline.task.base import Scored, Task
from lora_pipeline.task.e2e import f1

# Chat models wrap JSON in a markdown fence out of habit; the object inside is still the answer.
_FENCE = re.compile(r"^```[A-Za-z]*\s*\n?(.*?)\n?```$", re.S)
# MLflow metric names allow letters, digits, _ - . / and spaces; anything else in a field name is _.
_METRIC_UNSAFE = re.compile(r"[^A-Za-z0-9_\-./]")


def _value(v: Any) -> str:
    """One value as compared: text, whitespace collapsed, lower case; numbers without a spurious .0;
    an object or list inside a list as canonical JSON of its compared values."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    if isinstance(v, (dict, list)):
        return json.dumps(_canonical(v), ensure_ascii=False, sort_keys=True)
    return " ".join(str(v).split()).lower()


def _canonical(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _canonical(x) for k, x in v.items() if x is not None and x != []}
    if isinstance(v, list):
        return [_canonical(x) for x in v]
    return _value(v)


def field_pairs(obj: dict[str, Any], prefix: str = "") -> Counter:
    """The (field, value) pairs of an object, as a multiset (a list may repeat a value)."""
    out: Counter = Counter()
    for key, v in obj.items():
        name = f"{prefix}{key}"
        if v is None:
            continue
        if isinstance(v, dict):
            out += field_pairs(v, name + ".")
        elif isinstance(v, list):
            out.update((name, _value(x)) for x in v if x is not None)
        else:
            out[(name, _value(v))] += 1
    return out


def parse_json_object(text: str) -> dict[str, Any] | None:
    """The JSON object `text` holds (a markdown fence around it allowed), or None."""
    text = (text or "").strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced[1].strip()
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


class JsonTask(Task):
    name = "json"
    system_prompt = "Extract the requested fields as one JSON object."
    plain_answer_cue = "JSON: "
    primary_metric = "field_f1"
    metric_names = ("field_precision", "field_recall", "field_f1", "exact_match", "valid_json_rate")
    target_fix = 'make each target one JSON object, e.g. {"name": "Kobo", "area": "riverside"}'

    def target_text(self, completion: str) -> str:
        # One form for every target (the data's key order kept: it is part of what the model learns),
        # with json.dumps' default separators (a space after , and :) on purpose: targets without those
        # spaces are fewer tokens, but on the E2E json benchmark (bench/bench_quality.py --task json,
        # seed 0) the model trained on them scored lower field F1 on finetune's held-out split (the
        # validation rows, not the test split), mostly on customer rating and priceRange.
        obj = parse_json_object(completion)
        return completion.strip() if obj is None else json.dumps(obj, ensure_ascii=False)

    def check_target(self, completion: str) -> tuple[str, str] | None:
        try:
            obj = json.loads(completion)
        except ValueError as err:
            return "have a target that is not valid JSON", str(err)
        if not isinstance(obj, dict):
            return "have a target that is not a JSON object", f"a JSON {type(obj).__name__}"
        return None

    def parse(self, output: str) -> dict[str, Any] | None:
        return parse_json_object(output)

    def score(self, pairs: Sequence[tuple[str, str]], prefix: str = "") -> Scored:
        tp = fp = fn = exact = valid = 0
        per_field: dict[str, list[int]] = {}
        expected_fields: set[str] = set()
        rows = []
        for expected_text, text in pairs:
            predicted = parse_json_object(text)
            exp = field_pairs(parse_json_object(expected_text) or {})
            pred = field_pairs(predicted or {})
            hit, extra, missed = exp & pred, pred - exp, exp - pred
            n_tp, n_fp, n_fn = sum(hit.values()), sum(extra.values()), sum(missed.values())
            tp, fp, fn = tp + n_tp, fp + n_fp, fn + n_fn
            valid += predicted is not None
            exact += predicted is not None and exp == pred
            expected_fields.update(f for f, _ in exp)
            for counts, slot in ((hit, 0), (extra, 1), (missed, 2)):
                for (name, _), n in counts.items():
                    per_field.setdefault(name, [0, 0, 0])[slot] += n
            shown = json.dumps(predicted, ensure_ascii=False) if predicted is not None else text
            rows.append((shown, f1(n_tp, n_fp, n_fn)))
        n = len(rows)
        metrics = {
            f"{prefix}field_precision": tp / (tp + fp) if tp + fp else 0.0,
            f"{prefix}field_recall": tp / (tp + fn) if tp + fn else 0.0,
            f"{prefix}field_f1": f1(tp, fp, fn),
            f"{prefix}exact_match": exact / n if n else 0.0,
            f"{prefix}valid_json_rate": valid / n if n else 0.0,
        }
        # Per field of the expected data only; fields the model invents count in field_precision.
        for name in sorted(expected_fields):
            metrics[f"{prefix}field_f1.{_METRIC_UNSAFE.sub('_', name)}"] = f1(*per_field[name])
        return Scored(metrics, rows)
