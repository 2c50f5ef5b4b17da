"""Generate the project's own small E2E-format sample: `data/sample.csv` (columns `mr`, `ref`).

    python data/make_sample.py            # rewrites data/sample.csv (byte-identical every time)
    python data/make_sample.py --check    # exit 1 if data/sample.csv differs from what this writes

Everything here is made by the project: invented venue names and landmarks, and hand-written phrase
templates for every value of the 8 E2E slots. Nothing is copied from the E2E corpus. The sample is
meant for the default pipeline run and for tests, so it is:
  * small: 170 meaning representations x 2-3 sentences each (about 420 rows), so the default
    fine-tune of a 135M model fits in minutes on 2 CPU cores;
  * balanced: eatType cycles restaurant / pub / coffee shop (unlike the E2E dev split, which is
    mostly coffee shops), every value of every slot appears, names are varied;
  * faithful: every slot in `mr` is said in `ref` and nothing else is (the extraction target is
    recoverable from the sentence).
Deterministic: a fixed seed and Python's `random.Random` (stable across platforms and versions for
`random()`, `choice`, `shuffle`, `sample` on the same inputs).
"""

from __future__ import annotations

import argparse
import csv
import io
import random
import sys
from pathlib import Path

SEED = 20240601
N_MRS = 170
OUT = Path(__file__).resolve().parent / "sample.csv"

SLOTS = ("name", "eatType", "food", "priceRange", "customer rating", "area", "familyFriendly", "near")

# Invented names (two-part names combined, so the model must copy names, not memorise a short list).
_NAME_FIRST = ["The Golden", "The Silver", "The Blue", "The Red", "The Green", "The Copper", "The Old",
               "The Little", "The Crooked", "The Velvet", "The Rusty", "The Lucky", "The Jolly",
               "The Hidden", "The Painted", "The Sleepy"]
_NAME_SECOND = ["Lantern", "Heron", "Kettle", "Anchor", "Fox", "Teapot", "Compass", "Acorn", "Otter",
                "Bell", "Spoon", "Barrel", "Lark", "Mill", "Harp", "Pebble", "Thistle", "Wagon"]
_NAME_SINGLE = ["Marigold", "Bramble", "Juniper", "Saffron", "Casa Lumo", "Bistro Vela", "Kobo",
                "Tamarind", "Little Osaka", "Wok Street", "Chez Amelie", "Pasta Nostra", "Curry Leaf",
                "Bean There", "Daily Grind", "Brew Haven", "Nimbus", "Oakridge", "Willowby",
                "Harbour Lights", "Café Soleil", "Riverside Rest", "Mulberry", "Quill & Crumb"]
_NEAR = ["Rosewood Park", "the Old Library", "St. Cuthbert's Church", "the Market Hall", "Elm Bridge",
         "the Clock Tower", "Kingsgate Station", "the Museum of Maps", "Westfield Green",
         "the Town Hall", "Larkspur Theatre", "the Botanic Garden", "Mill Lane Cinema", "Harbour Square",
         "Café Bluebird", "The Tin Whistle", "Pizza Corner", "The Drowsy Owl", "Noodle House",
         "Burger Barn"]

EAT_TYPES = ["restaurant", "pub", "coffee shop"]
FOODS = ["Chinese", "English", "Fast food", "French", "Indian", "Italian", "Japanese"]
PRICES = ["cheap", "moderate", "high", "less than £20", "£20-25", "more than £30"]
RATINGS = ["low", "average", "high", "1 out of 5", "3 out of 5", "5 out of 5"]
AREAS = ["city centre", "riverside"]
FAMILY = ["yes", "no"]

# How often an optional slot is present (E2E MRs carry 3-8 slots; these give about 5 on average).
P_SLOT = {"eatType": 0.92, "food": 0.7, "priceRange": 0.6, "customer rating": 0.6, "area": 0.7,
          "familyFriendly": 0.6, "near": 0.45}

# --- phrase templates: (adjective before the eat type, verb phrase after "it") per value -------------
_FOOD_ADJ = {"Fast food": "fast food"}  # "a fast food pub", otherwise the cuisine name as adjective
_FOOD_VP = ["serves {f} food", "offers {f} food", "has a {f} menu", "specialises in {f} food",
            "cooks {f} food"]
_PRICE_ADJ = {"cheap": ["cheap", "inexpensive", "low-priced"],
              "moderate": ["moderately priced", "mid-priced", "reasonably priced"],
              "high": ["expensive", "high-priced", "pricey"]}
_PRICE_VP = {"cheap": ["is cheap", "has low prices", "is inexpensive"],
             "moderate": ["has moderate prices", "is moderately priced", "charges moderate prices"],
             "high": ["is expensive", "has high prices", "is on the pricey side"],
             "less than £20": ["costs less than £20 per person", "has meals for less than £20",
                               "charges less than £20"],
             "£20-25": ["costs £20-25 per person", "has a price range of £20-25",
                        "charges around £20-25 a head"],
             "more than £30": ["costs more than £30 per person", "charges more than £30",
                               "has meals for more than £30"]}
_RATING_VP = {"low": ["has a low customer rating", "is rated low by customers",
                      "gets low ratings from customers"],
              "average": ["has an average customer rating", "is rated average by customers",
                          "gets average reviews from customers"],
              "high": ["has a high customer rating", "is rated high by customers",
                       "gets high ratings from customers"],
              "1 out of 5": ["has a customer rating of 1 out of 5", "is rated 1 out of 5 by customers"],
              "3 out of 5": ["has a customer rating of 3 out of 5", "is rated 3 out of 5 by customers"],
              "5 out of 5": ["has a customer rating of 5 out of 5", "is rated 5 out of 5 by customers"]}
_AREA_PP = {"city centre": ["in the city centre", "in the centre of the city", "in the city centre area"],
            "riverside": ["by the riverside", "in the riverside area", "on the riverside"]}
_FAMILY_ADJ = {"yes": ["family-friendly", "kid-friendly", "child-friendly"],
               "no": ["adults-only", "non-family-friendly"]}
_FAMILY_VP = {"yes": ["is family-friendly", "welcomes children", "is kid friendly",
                      "is a good place for families"],
              "no": ["is not family-friendly", "does not welcome children", "is not kid friendly",
                     "is not suitable for families"]}
_NEAR_PP = ["near {n}", "close to {n}", "not far from {n}"]
_NEAR_VP = ["is near {n}", "is close to {n}", "is located near {n}", "can be found near {n}"]
_PLACE_NOUN = ["place", "venue", "spot"]  # when the MR has no eatType


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def make_mr(rng: random.Random, i: int, names: list[str]) -> dict[str, str]:
    mr = {"name": names[i % len(names)]}
    if rng.random() < P_SLOT["eatType"]:
        mr["eatType"] = EAT_TYPES[i % 3]  # cycled, so the three types are balanced
    choices = {"food": FOODS, "priceRange": PRICES, "customer rating": RATINGS, "area": AREAS,
               "familyFriendly": FAMILY, "near": _NEAR}
    for slot, values in choices.items():
        if rng.random() < P_SLOT[slot]:
            mr[slot] = rng.choice(values)
    if len(mr) < 3:  # E2E MRs have at least 3 slots
        for slot in rng.sample(list(choices), k=3 - len(mr) + 1):
            mr.setdefault(slot, rng.choice(choices[slot]))
    return mr


def format_mr(mr: dict[str, str]) -> str:
    return ", ".join(f"{s}[{mr[s]}]" for s in SLOTS if s in mr)


def _join(parts: list[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def realise(rng: random.Random, mr: dict[str, str]) -> str:
    """One sentence (or two) saying exactly the slots of `mr`."""
    name = mr["name"]
    rest = [s for s in SLOTS[1:] if s in mr]
    # Some slots go into the noun phrase ("a cheap Italian pub in the city centre"), the rest into
    # verb phrases after the name or "It".
    pre: list[str] = []  # adjectives before the eat type
    post: list[str] = []  # prepositional phrases after it
    vps: list[str] = []
    for slot in rng.sample(rest, k=len(rest)):
        v = mr[slot]
        in_np = rng.random() < 0.45
        if slot == "eatType":
            continue
        if slot == "food":
            if in_np:
                pre.append(_FOOD_ADJ.get(v, v))
            else:
                vps.append(rng.choice(_FOOD_VP).format(f=v if v != "Fast food" else "fast"))
        elif slot == "priceRange":
            if in_np and v in _PRICE_ADJ:
                pre.insert(0, rng.choice(_PRICE_ADJ[v]))
            else:
                vps.append(rng.choice(_PRICE_VP[v]))
        elif slot == "customer rating":
            if in_np and v in ("low", "average", "high"):
                post.append(f"with {_article(v)} {v} customer rating")
            elif in_np:
                post.append(f"with a customer rating of {v}")
            else:
                vps.append(rng.choice(_RATING_VP[v]))
        elif slot == "area":
            (post if in_np else vps).append(rng.choice(_AREA_PP[v]) if in_np
                                            else "is located " + rng.choice(_AREA_PP[v]))
        elif slot == "familyFriendly":
            if in_np:
                pre.insert(0, rng.choice(_FAMILY_ADJ[v]))
            else:
                vps.append(rng.choice(_FAMILY_VP[v]))
        elif slot == "near":
            if in_np:
                post.append(rng.choice(_NEAR_PP).format(n=v))
            else:
                vps.append(rng.choice(_NEAR_VP).format(n=v))
    noun = mr.get("eatType") or rng.choice(_PLACE_NOUN)
    np_words = " ".join(pre + [noun])
    np = f"{_article(np_words)} {np_words}" + ("" if not post else " " + " ".join(post))
    form = rng.randrange(4)
    if form == 0:
        head = f"{name} is {np}"
    elif form == 1:
        head = f"There is {np} called {name}"
    elif form == 2:
        head = f"{name}, {np},"
        if not vps:  # an apposition needs a verb after it
            return f"{name} is {np}."
    else:
        head = f"Try {name}, {np}"
        if vps:
            return f"{head}. It {_join(vps)}."
        return f"{head}."
    if not vps:
        return f"{head}."
    if form == 2:
        return f"{head} {_join(vps)}."
    if len(vps) <= 2 and rng.random() < 0.5:
        return f"{head} that {_join(vps)}."
    return f"{head}. It {_join(vps)}."


def build_rows(seed: int = SEED, n_mrs: int = N_MRS) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    names = [f"{a} {b}" for a in _NAME_FIRST for b in _NAME_SECOND] + _NAME_SINGLE
    rng.shuffle(names)
    rows: list[tuple[str, str]] = []
    seen: set[str] = set()
    i = 0
    while len(seen) < n_mrs:
        mr = make_mr(rng, i, names)
        i += 1
        key = format_mr(mr)
        if key in seen:
            continue
        seen.add(key)
        refs: list[str] = []
        for _ in range(rng.choice((2, 2, 3))):
            for _attempt in range(10):  # different wording for each sentence of one MR
                ref = realise(rng, mr)
                if ref not in refs:
                    refs.append(ref)
                    break
        rows.extend((key, ref) for ref in refs)
    _check(rows)
    return rows


def _check(rows: list[tuple[str, str]]) -> None:
    """The sample's own guarantees; a template edit that breaks one fails here, not in training."""
    seen_slots: set[str] = set()
    types = {t: 0 for t in EAT_TYPES}
    for mr, ref in rows:
        parts = dict(p.rstrip("]").split("[", 1) for p in mr.split(", "))
        seen_slots.update(parts)
        if parts["name"] not in ref or ("near" in parts and parts["near"] not in ref):
            raise AssertionError(f"name/near not in sentence: {mr!r} / {ref!r}")
        if "eatType" in parts:
            types[parts["eatType"]] += 1
    if seen_slots != set(SLOTS):
        raise AssertionError(f"slots missing from the sample: {set(SLOTS) - seen_slots}")
    if max(types.values()) > 1.5 * min(types.values()):
        raise AssertionError(f"eatType unbalanced: {types}")


def render(rows: list[tuple[str, str]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["mr", "ref"])
    w.writerows(rows)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="fail if the file differs from the generator")
    ap.add_argument("--out", type=Path, default=OUT)
    ns = ap.parse_args(argv)
    text = render(build_rows())
    if ns.check:
        same = ns.out.is_file() and ns.out.read_text(encoding="utf-8") == text
        print(f"{ns.out}: {'up to date' if same else 'DIFFERS from the generator'}")
        return 0 if same else 1
    ns.out.write_text(text, encoding="utf-8")
    print(f"wrote {ns.out} ({text.count(chr(10)) - 1} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
