"""Tasks (lora_pipeline/task/tasks.py and the Task classes): prompts, targets, parsing and scores."""

from __future__ import annotations

import json
import random

import pytest

from lora_pipeline.errors import InputError
from lora_pipeline.task import e2e
from lora_pipeline.task.base import TRAINER_METRICS, Example
from lora_pipeline.task.tasks import TASKS, get_task
from lora_pipeline.task.text_task import token_f1, tokens

from conftest import ROOT


class ChatTokenizer:
    """Renders exactly the messages it is given, so equal prompts mean equal messages."""

    chat_template = "{{ messages }}"
    eos_token = "</s>"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        assert tokenize is False and add_generation_prompt is True
        return json.dumps(messages) + "<|assistant|>"


class PlainTokenizer:
    chat_template = None
    eos_token = "</s>"


def _sample_rows(n=60):
    import csv

    with open(ROOT / "data" / "sample.csv", encoding="utf-8") as fh:
        return [(r["ref"], r["mr"]) for r in csv.DictReader(fh)][:n]


# --- registry ------------------------------------------------------------------------------------
def test_registry_has_the_three_tasks_and_each_names_its_metrics():
    assert set(TASKS) == {"e2e", "json", "text"}
    for name in TASKS:
        task = get_task(name)
        assert task.name == name
        assert task.primary_metric in task.metric_names
        assert task.all_metric_names[-2:] == TRAINER_METRICS == ("eval_loss", "perplexity")
    assert get_task(" JSON ").name == "json"


def test_unknown_task_names_the_nearest():
    with pytest.raises(InputError, match=r"^task='jsn': is not a task; fix: did you mean json\? pass one "
                                         r"of: e2e, json, text$"):
        get_task("jsn")
    with pytest.raises(InputError, match=r"^mode='zzz': is not a task; fix: pass one of: e2e, json, text$"):
        get_task("zzz", field="mode")


# --- e2e: today's functions, unchanged --------------------------------------------------------------
@pytest.mark.parametrize("tok", [ChatTokenizer(), PlainTokenizer()], ids=["chat", "plain"])
def test_e2e_prompts_and_answers_are_e2e_py_s(tok):
    task = get_task("e2e")
    for sentence, mr in _sample_rows():
        messy = f"  {sentence}\n "
        assert task.format_prompt(tok, messy) == e2e.format_prompt(tok, messy)
        assert task.answer_text(tok, mr) == e2e.answer_text(tok, mr)
        # The generic path (a conversation, as messages data gives it) renders the same prompt.
        assert task.format_prompt(tok, [{"role": "user", "content": messy}]) == e2e.format_prompt(tok, messy)
    assert task.prompt_messages("a  b") == e2e.chat_messages("a  b")


def test_e2e_conversation_marks_the_answer_and_normalises_it():
    task = get_task("e2e")
    ex = Example([{"role": "user", "content": "Kobo is a pub."},
                  {"role": "assistant", "content": "eatType[pub],name[Kobo]"}], [False, True])
    messages, targets = task.conversation(ex)
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert targets == [False, False, True]
    assert messages[-1]["content"] == "name[Kobo], eatType[pub]" == task.target_text("eatType[pub],name[Kobo]")
    assert ex.messages[-1]["content"] == "eatType[pub],name[Kobo]"  # the example itself is not changed


def test_e2e_scores_are_evaluate_checkpoint_s():
    task = get_task("e2e")
    rows = _sample_rows(40)
    rng = random.Random(3)
    predicted = []
    for _, mr in rows:  # right, half right, invented slots, unparsable
        slots = e2e.parse_mr(mr)
        kind = rng.randrange(4)
        if kind == 1:
            slots = dict(list(slots.items())[: len(slots) // 2])
        elif kind == 2:
            slots = {**slots, "cuisine": "x"}
        predicted.append(e2e.format_mr(slots) if kind < 3 else "no idea")
    scores = e2e.Scores()
    expected_rows = []
    for (_, mr), text in zip(rows, predicted, strict=True):
        p = e2e.parse_mr(text)
        expected_rows.append((e2e.format_mr(p) if p is not None else text, scores.add(e2e.parse_mr(mr), p)))
    got = task.score(list(zip([mr for _, mr in rows], predicted, strict=True)), prefix="eval_")
    assert got.metrics == scores.metrics("eval_")
    assert got.rows == expected_rows
    assert 0 < got.metrics["eval_slot_f1"] < 1 and "eval_slot_f1.name" in got.metrics


def test_e2e_augment_is_e2e_py_s():
    task = get_task("e2e")
    assert task.supports_augmentation and not get_task("json").supports_augmentation
    for seed, (sentence, mr) in enumerate(_sample_rows(20)):
        assert task.augment(sentence, mr, random.Random(seed)) == e2e.augment(sentence, mr, random.Random(seed))
    assert get_task("text").augment("p", "c", random.Random(0)) == ("p", "c")


def test_the_default_augment_fraction_is_the_tasks_own():
    from lora_pipeline.task.tasks import AUGMENT_TASK_DEFAULT, augment_fraction
    from steps import finetune

    assert finetune.Args().augment_fraction == AUGMENT_TASK_DEFAULT
    # e2e keeps the measured 0.5; json and text have no augmentation; an explicit value is kept
    assert [augment_fraction(get_task(t), AUGMENT_TASK_DEFAULT) for t in ("e2e", "json", "text")] == [0.5, 0, 0]
    assert augment_fraction(get_task("e2e"), 0.25) == 0.25


def test_e2e_target_checks_name_the_kind_of_malformed_mr():
    task = get_task("e2e")
    assert task.check_target("name[Kobo], eatType[pub]") is None
    assert task.check_target("name[Kobo], name[Bell]")[0] == "have a repeated slot"
    assert task.check_target("just words")[0] == "have an unparsable MR"
    assert task.check_target("name[Kobo], cuisine[x]") == ("have an unknown slot", "cuisine")


# --- prompts of every task -----------------------------------------------------------------------
def test_system_prompt_default_override_none_and_the_data_s_own():
    task = get_task("json")
    assert task.prompt_messages("s")[0] == {"role": "system", "content": task.system_prompt}
    assert task.prompt_messages("s", "Be brief.")[0] == {"role": "system", "content": "Be brief."}
    assert task.prompt_messages("s", "") == [{"role": "user", "content": "s"}]
    own = [{"role": "system", "content": "Mine."}, {"role": "user", "content": "s"}]
    assert task.prompt_messages(own, "Be brief.") == own
    assert get_task("text").prompt_messages("s") == [{"role": "user", "content": "s"}]  # no default


def test_multi_turn_conversation_keeps_every_assistant_turn_as_a_target():
    task = get_task("json")
    turns = [{"role": "user", "content": "Kobo is a pub."},
             {"role": "assistant", "content": '{ "name" : "Kobo", "type": "pub" }'},
             {"role": "user", "content": "Only the name."},
             {"role": "assistant", "content": '{"name": "Kobo"}'}]
    messages, targets = task.conversation(Example(turns, [False, True, False, True]), "Extract.")
    assert targets == [False, False, True, False, True]
    assert messages[2]["content"] == '{"name": "Kobo", "type": "pub"}'  # targets normalised
    prompt = task.format_prompt(PlainTokenizer(), turns[:3], "Extract.")
    assert prompt.startswith("Extract.\nKobo is a pub.\n") and prompt.endswith("Only the name.\nJSON: ")


# --- json --------------------------------------------------------------------------------------
def _json(task, expected, predicted, prefix=""):
    return task.score([(json.dumps(e), p if isinstance(p, str) else json.dumps(p))
                       for e, p in zip(expected, predicted, strict=True)], prefix)


def test_json_scores_fields_list_elements_and_nested_objects():
    task = get_task("json")
    expected = [{"name": "Kobo", "near": ["Elm Bridge", "the Market Hall"], "address": {"city": "York"}},
                {"name": "Bell", "rating": 5, "kids": True}]
    predicted = [{"name": " kobo ", "near": ["Elm Bridge"], "address": {"city": "Leeds"}, "extra": "x"},
                 {"name": "Bell", "rating": "5", "kids": True}]
    got = _json(task, expected, predicted, "eval_")
    m = got.metrics
    # Pairs: row 1 expects 4 (name, near x2, address.city), gets name + one near right, city wrong, extra wrong.
    assert m["eval_field_precision"] == pytest.approx(5 / 7)
    assert m["eval_field_recall"] == pytest.approx(5 / 7)
    assert m["eval_field_f1"] == pytest.approx(5 / 7)
    assert m["eval_field_f1.near"] == pytest.approx(2 / 3)
    assert m["eval_field_f1.address.city"] == 0.0 and m["eval_field_f1.rating"] == 1.0
    assert "eval_field_f1.extra" not in m  # invented fields count in precision only
    assert m["eval_exact_match"] == 0.5 and m["eval_valid_json_rate"] == 1.0
    assert [f for _, f in got.rows] == [0.5, 1.0]  # row 1: 2 right, 2 wrong, 2 missed
    assert json.loads(got.rows[0][0])["extra"] == "x"


def test_json_invalid_answers_fences_nulls_and_empty_lists():
    task = get_task("json")
    expected = [{"name": "Kobo", "food": None, "near": []}] * 4
    predicted = ['```json\n{"name": "Kobo"}\n```', "name: Kobo", '["Kobo"]', {"name": "Kobo", "near": None}]
    m = _json(task, expected, predicted).metrics
    assert m["valid_json_rate"] == 0.5  # the fenced object and the last one
    assert m["exact_match"] == 0.5  # null and [] are absent on both sides
    assert m["field_recall"] == 0.5 and m["field_precision"] == 1.0
    assert task.parse("```\n{}\n```") == {} and task.parse("[]") is None
    assert set(m) == set(task.metric_names) | {"field_f1.name"}


def test_json_targets_are_checked_and_normalised():
    task = get_task("json")
    assert task.check_target('{"a": 1}') is None
    reason, detail = task.check_target('{"a": 1,}')
    assert reason == "have a target that is not valid JSON" and "line 1" in detail
    assert task.check_target('["a"]') == ("have a target that is not a JSON object", "a JSON list")
    assert task.target_text(' {"b":1,  "a": "é"} ') == '{"b": 1, "a": "é"}'  # key order kept
    assert task.answer_text(PlainTokenizer(), '{"a":1}') == '{"a": 1}</s>'


# --- text --------------------------------------------------------------------------------------
def test_text_metrics():
    task = get_task("text")
    got = task.score([("The cat sat on the mat.", "  The cat sat on the mat. "),
                      ("The cat sat on the mat.", "the mat the cat sat on"),
                      ("Paris", "It is London.")], prefix="eval_")
    m = got.metrics
    assert m["eval_exact_match"] == pytest.approx(1 / 3)
    assert m["eval_token_f1"] == pytest.approx((1 + 1 + 0) / 3)  # bag of tokens: order does not matter
    # ROUGE-L: the longest common subsequence of the second pair is "the cat sat on" (4 of 6 tokens).
    assert m["eval_rouge_l"] == pytest.approx((1 + 4 / 6 + 0) / 3)
    assert [r for _, r in got.rows] == pytest.approx([1, 4 / 6, 0])
    assert got.rows[0][0] == "The cat sat on the mat."


def test_text_tokens_match_rouge_score_on_ascii_and_keep_other_letters():
    from rouge_score.tokenizers import DefaultTokenizer

    default = DefaultTokenizer(use_stemmer=False)
    for s in ("Hello, World! It's 5 o'clock -- e-mail me_now.", "A  b\tc\n1.5"):
        assert tokens(s) == default.tokenize(s)
    assert tokens("Café Größe") == ["café", "größe"]  # the default tokenizer drops é and ö
    assert token_f1("Größe", "größe") == 1.0 and get_task("text").score([("Größe", "Größe")]).metrics[
        "rouge_l"] == 1.0
