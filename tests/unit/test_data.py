"""Loading, checking and splitting E2E examples (lora_pipeline/task/data.py), and the project's own sample."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from lora_pipeline.errors import InputError
from lora_pipeline.task import data
from lora_pipeline.task.e2e import SLOTS, normalise_mr, parse_mr

from conftest import ROOT, e2e_corpus_file

SAMPLE = ROOT / "data" / "sample.csv"
GOOD = [("name[The Red Fox], eatType[pub], area[riverside]", "The Red Fox is a pub by the river."),
        ("name[Kobo], food[Japanese], near[Elm Bridge]", "Kobo serves Japanese food near Elm Bridge."),
        ("name[Bramble], eatType[coffee shop]", "Bramble is a coffee shop.")]


def write_csv(path, rows, header=("mr", "ref")):
    with open(path, "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
    return path


# --- the project's sample --------------------------------------------------------------------------
def test_sample_is_what_the_generator_writes():
    proc = subprocess.run([sys.executable, str(ROOT / "data" / "make_sample.py"), "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_sample_is_balanced_and_covers_every_slot():
    ds = data.load_examples(str(SAMPLE))
    assert 300 <= len(ds) <= 600
    slots, types, names = set(), {}, set()
    for mr, ref in zip(ds["mr"], ds["ref"], strict=True):
        parsed = parse_mr(mr)
        slots.update(parsed)
        names.add(parsed["name"])
        if "eatType" in parsed:
            types[parsed["eatType"]] = types.get(parsed["eatType"], 0) + 1
        assert parsed["name"] in ref  # the sentence says what the MR says
    assert slots == set(SLOTS)
    assert set(types) == {"restaurant", "pub", "coffee shop"}
    assert max(types.values()) <= 1.5 * min(types.values()), types
    assert len(names) >= 100  # varied names: the model must copy them, not memorise a few


def test_sample_shares_no_sentence_with_the_e2e_corpus():
    e2e = {row["ref"] for row in csv.DictReader(open(e2e_corpus_file("devset.csv"), encoding="utf-8"))}
    assert len(e2e) > 4000
    ours = set(data.load_examples(str(SAMPLE))["ref"])
    assert not ours & e2e


# --- loading ---------------------------------------------------------------------------------------
def test_csv_jsonl_and_json_load_the_same_examples(tmp_path):
    csv_path = write_csv(tmp_path / "d.csv", GOOD)
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps({"mr": m, "ref": r, "extra": 1}) + "\n" for m, r in GOOD))
    js = tmp_path / "d.json"
    js.write_text(json.dumps([{"mr": m, "ref": r} for m, r in GOOD]))
    for path in (csv_path, jsonl, js):
        ds = data.load_examples(str(path))
        assert ds.column_names == ["mr", "ref"]
        assert list(zip(ds["mr"], ds["ref"], strict=True)) == GOOD, path


def test_relative_path_resolves_against_the_project_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the project dir: `data/sample.csv` is not here
    assert len(data.load_examples("data/sample.csv")) == len(data.load_examples(str(SAMPLE)))


def test_values_like_NA_stay_text(tmp_path):
    path = write_csv(tmp_path / "d.csv", [("name[NA], eatType[pub]", "NA is a pub.")] + GOOD)
    assert data.load_examples(str(path))["mr"][0] == "name[NA], eatType[pub]"


@pytest.mark.parametrize("setup, pattern", [
    (lambda p: p / "nope.csv", r"^dataset='.*nope\.csv': no such file .*; fix: check the path"),
    (lambda p: p, r"^dataset='.*': is a directory; fix: pass the \.csv or \.jsonl file"),
    (lambda p: (p / "d.txt").write_text("x") and p / "d.txt", r"unsupported extension '\.txt'"),
    (lambda p: (p / "e.csv").write_text("") or p / "e.csv", r"is an empty file; fix: pass a file with a header"),
    (lambda p: (p / "h.csv").write_text("mr,ref\n") and p / "h.csv", r"has no examples \(only a header\)"),
    (lambda p: write_csv(p / "c.csv", [("a", "b")], header=("meaning", "sentence")),
     r"has no column mr / ref \(columns: meaning, sentence\); fix: name the columns mr"),
    (lambda p: write_csv(p / "c.csv", [("name[X]",)], header=("mr",)), r"has no column ref \(columns: mr\)"),
])
def test_bad_files_name_the_parameter_and_the_fix(tmp_path, setup, pattern):
    path = setup(tmp_path)
    with pytest.raises(InputError, match=pattern) as info:
        data.load_examples(str(path))
    assert len(info.value.lines()) == 1 and "\n" not in info.value.lines()[0]


def test_non_utf8_file_reports_the_line(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("mr,ref\n\"name[A]\",ok\n\"name[Café]\",caf\u00e9\n".encode("latin-1"))
    with pytest.raises(InputError, match=r"is not UTF-8 text \(first bad byte 0xe9 on line 3\); "
                                         r"fix: re-save the file as UTF-8"):
        data.load_examples(str(path))


def test_malformed_rows_are_counted_with_line_numbers(tmp_path):
    rows = [GOOD[0],
            ("name[Broken", "unclosed bracket"),  # line 3
            ("name[Two\nLines], eatType[pub]", "a quoted MR spanning two lines"),  # lines 4-5 (valid)
            ("name[A], name[B]", "repeated slot"),  # line 6
            ("name[A], colour[red]", "unknown slot"),  # line 7
            ("name[A], eatType[pub]", ""),  # line 8: empty sentence
            GOOD[1]]
    path = write_csv(tmp_path / "m.csv", rows)
    with pytest.raises(InputError) as info:
        data.load_examples(str(path))
    msg = info.value.lines()[0]
    assert msg.startswith(f"dataset='{path}': 4 of 7 rows are malformed (")
    assert "1 unparsable MR, 1 repeated slot, 1 unknown slot, 1 empty ref" in msg
    assert "first at lines 3, 6, 7, 8)" in msg
    assert "pass skip_malformed=true to skip them" in msg

    ds, report = data.load_examples_report(str(path), skip_malformed=True)
    assert (report.rows_read, report.rows_skipped, len(ds)) == (7, 4, 3)
    assert ds["ref"] == [GOOD[0][1], "a quoted MR spanning two lines", GOOD[1][1]]


def test_all_rows_malformed_fails_even_when_skipping(tmp_path):
    path = write_csv(tmp_path / "m.csv", [("garbage", "x"), ("more garbage", "y")])
    with pytest.raises(InputError, match=r"all 2 rows are malformed"):
        data.load_examples(str(path), skip_malformed=True)


def test_jsonl_malformed_rows_report_file_lines(tmp_path):
    path = tmp_path / "m.jsonl"
    lines = [json.dumps({"mr": m, "ref": r}) for m, r in GOOD] + [json.dumps({"mr": "bad", "ref": "x"})]
    path.write_text("\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]) + "\n")  # a blank line 3
    with pytest.raises(InputError, match=r"1 of 4 rows are malformed \(1 unparsable MR; first at lines 5\)"):
        data.load_examples(str(path))


def test_revision_only_for_hub_datasets():
    with pytest.raises(InputError, match=r"^dataset_revision='v1': applies only to Hub dataset ids"):
        data.load_examples(str(SAMPLE), "v1")


def test_unreachable_hub_is_one_clear_line():
    # conftest points HF_ENDPOINT at a closed local port (huggingface_hub retries 5 times: ~20 s).
    with pytest.raises(InputError, match=r"^dataset='e2e_nlg': cannot load Hub dataset e2e_nlg@abc "
                                         r"from http://127\.0\.0\.1:9 .*; fix: check the dataset id"):
        data.load_examples("e2e_nlg", "abc")


def test_shared_cleaned_devset_needs_skip_for_its_repeated_slots():
    path = e2e_corpus_file("devset-cleaned.csv")
    with pytest.raises(InputError, match=r"rows are malformed \(\d+ repeated slot; first at lines 116,"):
        data.load_examples(str(path))
    ds, report = data.load_examples_report(str(path), skip_malformed=True)
    assert report.rows_skipped > 0 and len(ds) == report.rows_read - report.rows_skipped


# --- splitting -------------------------------------------------------------------------------------
def test_split_keeps_each_mr_on_one_side_and_is_deterministic():
    ds = data.load_examples(str(SAMPLE))
    train, val = data.split_by_mr(ds, 0.1, seed=7)
    assert len(train) + len(val) == len(ds)
    tr = {normalise_mr(m) for m in train["mr"]}
    va = {normalise_mr(m) for m in val["mr"]}
    assert tr and va and not tr & va
    n_mrs = len(tr | va)
    assert len(va) == round(0.1 * n_mrs)
    again = data.split_by_mr(ds, 0.1, seed=7)[1]
    assert again["mr"] == val["mr"] and again["ref"] == val["ref"]
    other = data.split_by_mr(ds, 0.1, seed=8)[1]
    assert set(other["mr"]) != set(val["mr"])


def test_split_treats_differently_written_mrs_as_one():
    import datasets

    same = "name[X], eatType[pub]"
    ds = datasets.Dataset.from_dict({"mr": [same, "eatType[pub],  name[X]", "name[Y], area[riverside]"],
                                     "ref": ["a", "b", "c"]})
    for seed in range(5):
        train, val = data.split_by_mr(ds, 0.5, seed)
        assert {len(train), len(val)} == {1, 2}  # the two spellings of one MR stay together


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_split_fraction_must_be_inside_0_1(fraction):
    with pytest.raises(InputError, match=r"^validation_fraction=.*must be between 0 and 1"):
        data.split_by_mr(data.load_examples(str(SAMPLE)), fraction, 0)


def test_mlflow_dataset_digest_follows_the_content(tmp_path):
    a = data.to_mlflow_dataset(data.load_examples(str(SAMPLE)), str(SAMPLE))
    b = data.to_mlflow_dataset(data.load_examples(str(SAMPLE)), str(SAMPLE))
    path = write_csv(tmp_path / "d.csv", GOOD)
    c = data.to_mlflow_dataset(data.load_examples(str(path)), str(path))
    assert a.digest == b.digest and a.digest != c.digest
    assert json.loads(a.source.to_json())["uri"] == str(SAMPLE)


# --- augmentation (e2e.augment) ----------------------------------------------------------------
def test_augment_swaps_verbatim_values_in_sentence_and_mr_alike():
    import random

    from lora_pipeline.task.e2e import augment

    sentence = "Near Café Sicilia, The Punter is a coffee shop serving Chinese food. The Punter is cheap."
    mr = "name[The Punter], eatType[coffee shop], food[Chinese], priceRange[cheap], near[Café Sicilia]"
    new_sentence, new_mr = augment(sentence, mr, random.Random(0))
    got = parse_mr(new_mr)
    assert got is not None
    assert got["name"] not in ("The Punter", "Café Sicilia") and got["near"] not in ("The Punter", "Café Sicilia")
    assert got["name"] != got["near"]
    # every occurrence swapped, and the new values are in the sentence: it still states its MR
    assert "Punter" not in new_sentence and "Sicilia" not in new_sentence
    assert new_sentence.count(got["name"]) == 2 and got["near"] in new_sentence
    assert got["eatType"] in ("pub", "restaurant") and got["eatType"] in new_sentence
    assert "coffee shop" not in new_sentence
    # slots that are not copied from the sentence are untouched
    assert (got["food"], got["priceRange"]) == ("Chinese", "cheap")
    assert augment(sentence, mr, random.Random(0)) == (new_sentence, new_mr)  # seeded: reproducible


@pytest.mark.parametrize("sentence, mr", [
    # the value is not written verbatim: nothing to swap, the row stays as it is
    ("The punter sells coffee.", "name[The Punter]"),
    # one value inside another cannot be swapped on its own
    ("The Eagle is near The Eagle Inn.", "name[The Eagle], near[The Eagle Inn]"),
    # the sentence names two types: changing one would contradict the other
    ("Aromi is a coffee shop and restaurant.", "name[Zizzi], eatType[coffee shop]"),
    ("not an MR", "name[Aromi"),
])
def test_augment_leaves_rows_it_cannot_rewrite_safely(sentence, mr):
    import random

    from lora_pipeline.task.e2e import augment

    assert augment(sentence, mr, random.Random(0)) == (sentence, mr)


def test_augment_rows_rewrites_the_asked_fraction_reproducibly():
    import datasets

    from lora_pipeline.training.session import augment_rows

    rows = [{"ref": f"Aromi {i} is a pub near Zizzi.", "mr": f"name[Aromi {i}], eatType[pub], near[Zizzi]"}
            for i in range(200)]
    ds = datasets.Dataset.from_list(rows)
    none, half, every = (augment_rows(ds, f, seed=1) for f in (0.0, 0.5, 1.0))
    changed = [sum(a != b for a, b in zip(ds["mr"], out["mr"], strict=True)) for out in (none, half, every)]
    assert changed[0] == 0 and changed[2] == 200
    assert 70 <= changed[1] <= 130  # binomial(200, 0.5): 100 +- 4.2 sigma
    assert augment_rows(ds, 0.5, seed=1)["mr"] == half["mr"]
    assert augment_rows(ds, 0.5, seed=2)["mr"] != half["mr"]
    for ref, mr in zip(every["ref"], every["mr"], strict=True):
        assert all(v in ref for v in parse_mr(mr).values())
