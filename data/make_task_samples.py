"""Generate the project's small datasets for each task and data format (with data/make_sample.py's generator).

    python data/make_task_samples.py                 # rewrites the files below (byte-identical every time)
    python data/make_task_samples.py --check         # exit 1 if a file differs from what this writes
    python data/make_task_samples.py --out-dir DIR   # write them somewhere else

  json_messages.jsonl            task json, format messages: a restaurant sentence -> its venue as a
                                 JSON object; every fourth conversation goes on with a follow-up
                                 ("Now give only the name and the area.") and a second JSON answer;
                                 `venue` groups the sentences of one venue for the validation split
  json_columns.csv               task json, prompt/completion under other column names (sentence,
                                 record: JSON text, venue), for prompt_column/completion_column
  text_prompt_completion.csv     task text: a venue's facts -> one sentence saying them (the direction
                                 of the original E2E challenge), with `venue`
  e2e_prompt_completion.parquet  task e2e in Parquet: sentence -> MR as prompt/completion, with `venue`

Sentences and venues come from make_sample.py's templates and invented names (nothing from the E2E
corpus); some venues are near two landmarks, so a JSON `near` list has two elements. Deterministic:
fixed seeds and `random.Random`, as make_sample.py.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import random
import sys
from pathlib import Path

import make_sample as ms

HERE = Path(__file__).resolve().parent
SEEDS = {"json_messages": 20240611, "json_columns": 20240612, "text": 20240613, "e2e": 20240614}
# JSON field names of the E2E slots (snake_case, as JSON data usually is).
FIELDS = {"name": "name", "eatType": "type", "food": "food", "priceRange": "price_range",
          "customer rating": "rating", "area": "area", "familyFriendly": "family_friendly", "near": "near"}
_FOLLOW_UP = {"type": "the type", "food": "the food", "area": "the area", "price_range": "the price range"}
_LABELS = {"eatType": "Type", "food": "Food", "priceRange": "Price", "customer rating": "Customer rating",
           "area": "Area", "familyFriendly": "Family friendly", "near": "Near"}


def venues(seed: int, n: int) -> list[tuple[dict[str, str], list[str]]]:
    """n distinct venues: (E2E slots, landmarks); a third of those with a landmark get two."""
    rng = random.Random(seed)
    names = [f"{a} {b}" for a in ms._NAME_FIRST for b in ms._NAME_SECOND] + ms._NAME_SINGLE
    rng.shuffle(names)
    out, seen, i = [], set(), 0
    while len(out) < n:
        mr = ms.make_mr(rng, i, names)
        i += 1
        if ms.format_mr(mr) in seen:
            continue
        seen.add(ms.format_mr(mr))
        near = [mr["near"]] if "near" in mr else []
        if near and rng.random() < 0.33:
            near.append(rng.choice([x for x in ms._NEAR if x != near[0]]))
        out.append((mr, near))
    return out


def sentences(rng: random.Random, mr: dict[str, str], near: list[str], k: int) -> list[str]:
    """k different sentences saying exactly the venue's slots (both landmarks, if it has two)."""
    spoken = {**mr, "near": " and ".join(near)} if near else mr
    out: list[str] = []
    for _ in range(k):
        for _attempt in range(10):
            s = ms.realise(rng, spoken)
            if s not in out:
                out.append(s)
                break
    return out


def record(mr: dict[str, str], near: list[str]) -> dict:
    rec: dict = {}
    for slot in ms.SLOTS:
        if slot in mr:
            rec[FIELDS[slot]] = (mr[slot] == "yes" if slot == "familyFriendly" else
                                 near if slot == "near" else mr[slot])
    return rec


def _dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False)


def json_messages() -> bytes:
    rng = random.Random(SEEDS["json_messages"])
    lines = []
    for mr, near in venues(SEEDS["json_messages"] + 1, 50):
        rec = record(mr, near)
        for sentence in sentences(rng, mr, near, 2):
            turns = [{"role": "user", "content": sentence}, {"role": "assistant", "content": _dumps(rec)}]
            extra = [f for f in _FOLLOW_UP if f in rec]
            if len(lines) % 4 == 3 and extra:
                other = rng.choice(extra)
                turns += [{"role": "user", "content": f"Now give only the name and {_FOLLOW_UP[other]}."},
                          {"role": "assistant", "content": _dumps({"name": rec["name"], other: rec[other]})}]
            lines.append(_dumps({"venue": mr["name"], "messages": turns}))
    return ("\n".join(lines) + "\n").encode("utf-8")


def _csv(header: list[str], rows: list[list[str]]) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue().encode("utf-8")


def json_columns() -> bytes:
    rng = random.Random(SEEDS["json_columns"])
    rows = [[mr["name"], sentence, _dumps(record(mr, near))]
            for mr, near in venues(SEEDS["json_columns"] + 1, 40)
            for sentence in sentences(rng, mr, near, 2)]
    return _csv(["venue", "sentence", "record"], rows)


def facts(mr: dict[str, str], near: list[str]) -> str:
    parts = [f"Name: {mr['name']}"]
    for slot in ms.SLOTS[1:]:
        if slot in mr:
            parts.append(f"{_LABELS[slot]}: {' and '.join(near) if slot == 'near' else mr[slot]}")
    return "Write one sentence about this place. " + "; ".join(parts) + "."


def text_prompt_completion() -> bytes:
    rng = random.Random(SEEDS["text"])
    rows = [[mr["name"], facts(mr, near), sentence]
            for mr, near in venues(SEEDS["text"] + 1, 60)
            for sentence in sentences(rng, mr, near, rng.choice((1, 2)))]
    return _csv(["venue", "prompt", "completion"], rows)


def e2e_prompt_completion() -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = ms.build_rows(seed=SEEDS["e2e"], n_mrs=60)
    table = pa.table({"venue": [mr.split("]", 1)[0].removeprefix("name[") for mr, _ in rows],
                      "prompt": [ref for _, ref in rows],
                      "completion": [mr for mr, _ in rows]})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


FILES = {"json_messages.jsonl": json_messages, "json_columns.csv": json_columns,
         "text_prompt_completion.csv": text_prompt_completion,
         "e2e_prompt_completion.parquet": e2e_prompt_completion}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="fail if a file differs from the generator")
    ap.add_argument("--out-dir", type=Path, default=HERE)
    ns = ap.parse_args(argv)
    stale = []
    for name, make in FILES.items():
        path, content = ns.out_dir / name, make()
        if ns.check:
            if not (path.is_file() and path.read_bytes() == content):
                stale.append(name)
            continue
        path.write_bytes(content)
        print(f"wrote {path} ({len(content)} bytes)")
    if ns.check:
        print("up to date" if not stale else f"DIFFER from the generator: {', '.join(stale)}")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
