"""bench/bench_quality.py's CPU-side pieces for `--task json`: an MR as the json task's target and the
comparison with the e2e result. (The benchmark itself runs by hand, see its docstring.)"""

from __future__ import annotations

import json
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import bench_quality as bq  # noqa: E402

from lora_pipeline.task.e2e import parse_mr  # noqa: E402
from lora_pipeline.task.tasks import get_task  # noqa: E402


def test_an_mr_becomes_one_json_object_of_its_slots_in_e2e_order():
    mr = "near[Café Sicilia], name[The Punter],  eatType[coffee shop], customer rating[1 out of 5]"
    text = bq.mr_to_json(mr)
    assert text == ('{"name": "The Punter", "eatType": "coffee shop", "customer rating": "1 out of 5", '
                    '"near": "Café Sicilia"}')
    assert json.loads(text) == parse_mr(mr)
    assert get_task("json").check_target(text) is None
    with pytest.raises(ValueError, match="not a well-formed MR"):
        bq.mr_to_json("name[A], name[B]")


def test_a_split_row_becomes_a_messages_conversation_grouped_by_its_mr():
    row = {"mr": "area[riverside], name[Kobo]", "ref": "Kobo is by the riverside."}
    assert bq.json_row(row) == {
        "messages": [{"role": "user", "content": "Kobo is by the riverside."},
                     {"role": "assistant", "content": '{"name": "Kobo", "area": "riverside"}'}],
        "group": "name[Kobo], area[riverside]"}
    # The json task scores a perfect answer as perfect, and the same pairs as the e2e task does.
    target = bq.json_row(row)["messages"][1]["content"]
    assert get_task("json").score([(target, target)]).metrics["field_f1"] == 1.0
    half = '{"name": "Kobo", "area": "city centre"}'
    assert (get_task("json").score([(target, half)]).metrics["field_f1"]
            == get_task("e2e").score([(row["mr"], "name[Kobo], area[city centre]")]).metrics["slot_f1"] == 0.5)


def test_the_comparison_names_the_e2e_run_and_says_whether_the_goal_is_met(tmp_path):
    missing = tmp_path / "quality.json"
    assert bq.compare_with_e2e(0.9, 100, 15.0, missing) == ({}, "no e2e result to compare with "
                                                                "(quality.json not written yet)")
    missing.write_text(json.dumps({"commit": "0123456789abcdef", "figures": {
        "slot_f1": {"mean": 0.92, "sd": 0.01}, "seeds": [{"seed": 0}, {"seed": 1}, {"seed": 2}],
        "test_rows_scored": 100, "minutes": 15.0}}))
    figures, text = bq.compare_with_e2e(0.905, 100, 15.0, missing)
    assert figures["met"] and figures["difference"] == pytest.approx(-0.015)
    assert text == ("e2e slot F1 0.920 ± 0.010 (quality.json: seeds 0,1,2, commit 0123456789, 100 test rows): "
                    "difference -0.015, within 0.02")
    figures, text = bq.compare_with_e2e(0.89, 8, 0.3, missing)
    assert not figures["met"] and "not within 0.02" in text
    assert text.endswith("(not like for like: test_rows_scored 100 there, minutes 15 there)")


def test_a_one_seed_json_run_is_also_compared_with_the_e2e_run_of_the_same_seed(tmp_path):
    path = tmp_path / "quality.json"
    path.write_text(json.dumps({"commit": "0123456789abcdef", "figures": {
        "slot_f1": {"mean": 0.92, "sd": 0.01}, "test_rows_scored": 100, "minutes": 15.0,
        "seeds": [{"seed": s, "candidate": {"slot_f1": f}} for s, f in ((0, 0.89), (1, 0.93), (2, 0.94))]}}))
    figures, text = bq.compare_with_e2e(0.905, 100, 15.0, path, seeds=[0])
    assert figures["same_seeds"]["slot_f1"] == 0.89 and figures["same_seeds"]["difference"] == pytest.approx(0.015)
    assert figures["same_seeds"]["met"] and figures["met"]
    assert text.endswith("; against the e2e run's same seed (0: slot F1 0.890): difference +0.015, within 0.02")
    assert "same_seeds" not in bq.compare_with_e2e(0.905, 100, 15.0, path, seeds=[0, 1, 2])[0]


def test_target_lengths_are_measured_as_mrs_and_as_json_objects():
    class Chars:  # a tokenizer with one token per character
        def __call__(self, texts, add_special_tokens):
            assert add_special_tokens is False
            return {"input_ids": [list(t) for t in texts]}

    rows = [{"mr": "name[Kobo]", "ref": "-"}, {"mr": "name[Kobo], area[riverside]", "ref": "-"}]
    # '{"name": "Kobo"}' is 16 characters, '{"name": "Kobo", "area": "riverside"}' 37.
    assert bq.target_tokens(Chars(), rows) == {"mr": {"mean": 18.5, "max": 27}, "json": {"mean": 26.5, "max": 37}}


def test_the_generation_limit_must_hold_the_longest_target_with_room():
    lengths = {"mr": {"mean": 33.7, "max": 48}, "json": {"mean": 44.8, "max": 64}}
    assert bq.generation_limit("json", lengths) == bq.JSON_MAX_NEW_TOKENS
    assert bq.generation_limit("e2e", lengths, default=64) == 64
    with pytest.raises(SystemExit, match=r"^answers are generated up to 64 tokens, too few for targets of up "
                                         r"to 49 tokens plus 16 of room$"):
        bq.generation_limit("e2e", {"mr": {"mean": 40, "max": 49}, "json": lengths["json"]}, default=64)
