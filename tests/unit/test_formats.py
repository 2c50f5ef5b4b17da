"""Data formats (lora_pipeline/task/formats.py): reading every file type and layout, checks, splits."""

from __future__ import annotations

import csv
import json
import re

import pytest

from lora_pipeline.errors import InputError, Problems
from lora_pipeline.task import data, formats
from lora_pipeline.task.base import Example
from lora_pipeline.task.e2e import normalise_mr
from lora_pipeline.task.formats import DataArgs
from lora_pipeline.task.tasks import get_task

from conftest import ROOT

PAIRS = [("What is 2 + 2?", "4"), ("Name a colour.", "Blue"), ("Say hi.", "Hi!")]
JSON_PAIRS = [("Kobo is a pub.", '{"name": "Kobo", "type": "pub"}'),
              ("Bell serves tea.", '{"name": "Bell", "food": ["tea"]}')]


def write_csv(path, header, rows):
    with open(path, "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
    return str(path)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def load(path, task="text", **kw):
    return formats.load(str(path), task=get_task(task), args=DataArgs(task=task, **kw))


def pairs_of(examples):
    return [(ex.messages[0]["content"], ex.completion) for ex in examples]


# --- files and layouts ---------------------------------------------------------------------------
def test_prompt_completion_reads_the_same_from_csv_jsonl_json_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [{"prompt": p, "completion": c} for p, c in PAIRS]
    paths = [write_csv(tmp_path / "d.csv", ["prompt", "completion"], PAIRS),
             write_jsonl(tmp_path / "d.jsonl", records)]
    (tmp_path / "d.json").write_text(json.dumps(records))
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "d.parquet")
    paths += [tmp_path / "d.json", tmp_path / "d.parquet"]
    for path in paths:
        loaded = load(path)
        assert loaded.data_format == "prompt_completion" and loaded.unit == "row"
        assert pairs_of(loaded.examples) == PAIRS, path
        ex = loaded.examples[1]
        assert ex.targets == [False, True] and ex.row == 2 and ex.group is None
    # Line numbers where the file has lines (header on line 1 of the CSV).
    assert [ex.line for ex in load(paths[0]).examples] == [2, 3, 4]
    assert [ex.line for ex in load(paths[1]).examples] == [1, 2, 3]
    assert load(tmp_path / "d.parquet").examples[0].line is None


def test_explicit_column_mapping(tmp_path):
    path = write_csv(tmp_path / "qa.csv", ["id", "question", "answer"],
                     [(i, q, a) for i, (q, a) in enumerate(PAIRS)])
    with pytest.raises(InputError, match=r"^dataset='.*qa\.csv': has no column 'messages', nor 'prompt' and "
                                         r"'completion', nor mr and ref \(columns: id, question, answer\); "
                                         r"fix: name your columns in messages_column, or in prompt_column and "
                                         r"completion_column \(e\.g\. prompt_column=question"):
        load(path)
    with pytest.raises(InputError, match=r"has no column 'prompt' / 'completion' for data_format=prompt_completion "
                                         r"\(columns: id, question, answer\); fix: map yours with "
                                         r"prompt_column=<column>, completion_column=<column>$"):
        load(path, data_format="prompt_completion")
    loaded = load(path, prompt_column="question", completion_column="answer")
    assert pairs_of(loaded.examples) == PAIRS


def test_messages_multi_turn_in_jsonl_and_as_json_text_in_csv(tmp_path):
    convo = [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "2 + 2?"},
             {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3 + 3?"},
             {"role": "assistant", "content": "6"}]
    short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    jsonl = write_jsonl(tmp_path / "m.jsonl", [{"messages": convo}, {"messages": short}])
    csv_path = write_csv(tmp_path / "m.csv", ["chat"], [(json.dumps(convo),), (json.dumps(short),)])
    for loaded in (load(jsonl), load(csv_path, messages_column="chat", data_format="messages")):
        assert loaded.data_format == "messages"
        first = loaded.examples[0]
        assert first.messages == convo and first.targets == [False, False, True, False, True]
        assert first.completion == "6" and first.prompt_turns == convo[:-1]


def test_trl_conversational_prompt_completion(tmp_path):
    rec = {"prompt": [{"role": "user", "content": "2 + 2?"}],
           "completion": [{"role": "assistant", "content": "4"}]}
    ex = load(write_jsonl(tmp_path / "c.jsonl", [rec])).examples[0]
    assert ex.messages == rec["prompt"] + rec["completion"] and ex.targets == [False, True]


def test_json_objects_as_completions_in_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "j.jsonl", [{"prompt": p, "completion": json.loads(c)} for p, c in JSON_PAIRS])
    assert [json.loads(ex.completion) for ex in load(path, "json").examples] == [json.loads(c) for _, c in
                                                                                  JSON_PAIRS]


def test_e2e_columns_give_today_s_examples_and_split(tmp_path):
    sample = str(ROOT / "data" / "sample.csv")
    loaded = load(sample, "e2e")
    ds = data.load_examples(sample)
    assert loaded.data_format == "e2e" and loaded.unit == "MR"
    assert pairs_of(loaded.examples) == list(zip(ds["ref"], ds["mr"], strict=True))
    assert all(ex.group == normalise_mr(ex.completion) for ex in loaded.examples)
    train, val = formats.split(loaded.examples, 0.1, 7, unit=loaded.unit)
    d_train, d_val = data.split_by_mr(ds, 0.1, 7)
    assert [ex.completion for ex in train] == d_train["mr"] and [ex.completion for ex in val] == d_val["mr"]


def test_hub_dataset_at_a_pinned_revision(tmp_path, monkeypatch):
    from hubserver import LocalHub, point_hf_hub_at, publish_git_repo

    files = tmp_path / "files"
    files.mkdir()
    convo = [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"}]
    write_jsonl(files / "train.jsonl", [{"messages": convo}] * 3)
    v1 = publish_git_repo(tmp_path / "mirror", "org/chat", files, repo_type="datasets")
    write_jsonl(files / "train.jsonl", [{"messages": convo[:1]}])  # v2 is broken: no answer
    publish_git_repo(tmp_path / "mirror", "org/chat", files, repo_type="datasets")
    with LocalHub(tmp_path / "mirror") as hub:
        point_hf_hub_at(monkeypatch, hub.endpoint, tmp_path / "hf_home")
        # datasets copies HF_ENDPOINT into its config at import (an earlier test may have imported it).
        import datasets

        monkeypatch.setattr(datasets.config, "HF_ENDPOINT", hub.endpoint)
        monkeypatch.setattr(datasets.config, "HUB_DATASETS_URL",
                            hub.endpoint + "/datasets/{repo_id}/resolve/{revision}/{path}")
        loaded = formats.load("org/chat", v1, task=get_task("text"))
        assert loaded.source.kind == "hub" and loaded.source.revision == v1
        assert [ex.messages for ex in loaded.examples] == [convo] * 3
        assert loaded.examples[0].line is None and loaded.examples[2].row == 3
        with pytest.raises(InputError, match=r"^dataset='org/chat': column 'messages': 1 of 1 rows do not end "
                                             r"on an assistant turn \(row 1\)"):
            formats.load("org/chat", "main", task=get_task("text"))


# --- every problem at once -----------------------------------------------------------------------
def test_bad_conversations_are_all_reported_with_their_lines(tmp_path):
    u, a = "user", "assistant"

    def turns(*pairs):
        return [{"role": r, "content": c} for r, c in pairs]

    rows = [turns((u, "q"), (a, "x")),  # line 1: fine
            turns((u, "q")),  # 2: no answer
            turns((u, "q"), (a, "x"), (u, "more?")),  # 3: no answer
            turns((a, "x"), (u, "q"), (a, "y")),  # 4: assistant first
            turns((u, "q"), ("bot", "x")),  # 5: unknown role
            turns((u, "q"), (a, "  ")),  # 6: empty answer
            "not a conversation",  # 7
            turns((u, "q"), ("system", "late"), (a, "x"))]  # 8: system not first
    path = write_jsonl(tmp_path / "bad.jsonl", [{"messages": m} for m in rows])
    with pytest.raises(InputError) as err:
        load(path)
    lines = err.value.lines()
    assert len(lines) == 5, lines
    expect = [
        r"^dataset='.*bad\.jsonl': column 'messages': 2 of 8 rows do not end on an assistant turn \(lines 2, 3\); "
        r"fix: end each conversation with the assistant's answer",
        r": column 'messages': 2 of 8 rows have turns out of order \(lines 4, 8\); fix: start with an optional "
        r"system turn, then alternate user and assistant, user first$",
        r": column 'messages': 1 of 8 rows have a role other than system, user, assistant \(line 5\); "
        r"fix: use the roles system, user and assistant$",
        r": column 'messages': 1 of 8 rows have an empty turn \(line 6\); fix: give every turn some content",
        r": column 'messages': 1 of 8 rows are not a list of \{role, content\} turns \(line 7\); fix: write each "
        r"conversation as \[",
    ]
    for line in expect:
        assert any(re.search(line, got) for got in lines), (line, lines)


def test_json_targets_that_do_not_parse_name_column_rows_and_first_error(tmp_path):
    rows = JSON_PAIRS + [("x", '{"name": "A",}'), ("y", ""), ("z", '["A"]'), ("w", "name: B")]
    path = write_csv(tmp_path / "j.csv", ["sentence", "record"], rows)
    with pytest.raises(InputError) as err:
        load(path, "json", prompt_column="sentence", completion_column="record")
    assert err.value.lines() == [
        f"dataset={path!r}: column 'record': 2 of 6 rows have a target that is not valid JSON (lines 4, 7; "
        "first: Expecting property name enclosed in double quotes: line 1 column 14 (char 13)); fix: make each "
        'target one JSON object, e.g. {"name": "Kobo", "area": "riverside"}',
        f"dataset={path!r}: column 'record': 1 of 6 rows are empty (line 5); fix: fill in those cells, or drop "
        "the rows",
        f"dataset={path!r}: column 'record': 1 of 6 rows have a target that is not a JSON object (line 6; first: "
        'a JSON list); fix: make each target one JSON object, e.g. {"name": "Kobo", "area": "riverside"}',
    ]


def test_malformed_mrs_for_the_e2e_task(tmp_path):
    path = write_csv(tmp_path / "e.csv", ["mr", "ref"],
                     [("name[Kobo]", "Kobo."), ("name[A], name[B]", "A."), ("oops", "B."), ("name[C]", "")])
    with pytest.raises(InputError, match=r"column 'mr': 1 of 4 rows have a repeated slot \(line 3; first: "
                                         r"name\[A\], name\[B\]\); fix: write the MR as slot\[value\]") as err:
        load(path, "e2e")
    assert len(err.value.problems) == 3  # repeated slot, unparsable MR, empty ref
    assert any("column 'ref': 1 of 4 rows are empty (line 5)" in s for s in err.value.lines())


def test_file_level_problems(tmp_path):
    cells = tmp_path / "cells.csv"
    cells.write_text("prompt,completion\na,b\nc,d,e\nf\n")
    with pytest.raises(InputError, match=r"2 rows have another number of cells than the header's 2 \(lines 3, 4\)"):
        load(cells)
    lines = tmp_path / "l.jsonl"
    lines.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": \n[1]\n')
    with pytest.raises(InputError, match=r"2 lines are not a JSON object \(lines 3, 4\); fix: write one object"):
        load(lines)
    with pytest.raises(InputError, match=r"^dataset='.*x\.txt': has unsupported extension '\.txt'; fix: pass a "
                                         r"\.csv, \.jsonl, \.json or \.parquet file$"):
        (tmp_path / "x.txt").write_text("a")
        load(tmp_path / "x.txt")
    with pytest.raises(InputError, match=r"^dataset='nope/none\.csv': no such file"):
        load("nope/none.csv")
    with pytest.raises(InputError, match=r"^dataset_revision='v1': applies only to Hub dataset ids"):
        formats.load(str(cells), "v1", task=get_task("text"))
    with pytest.raises(InputError, match=r"cannot be read as Parquet"):
        (tmp_path / "p.parquet").write_text("not parquet")
        load(tmp_path / "p.parquet")


def test_group_column_must_exist_and_be_filled(tmp_path):
    path = write_csv(tmp_path / "g.csv", ["prompt", "completion", "topic"],
                     [("a", "b", "t1"), ("c", "d", ""), ("e", "f", "t2")])
    with pytest.raises(InputError, match=r"^group_column='topc': is not a column of .*g\.csv \(columns: prompt, "
                                         r"completion, topic\); fix: pass one of the columns"):
        load(path, group_column="topc")
    with pytest.raises(InputError, match=r"column 'topic': 1 of 3 rows are empty \(line 3\); fix: give every row "
                                         r"a group, or leave group_column empty to split by row$"):
        load(path, group_column="topic")


def test_check_args_reports_every_bad_parameter():
    problems = Problems()
    formats.check_args(DataArgs(task="jsno", data_format="chat", prompt_column=" "), problems)
    assert [p.field for p in problems.items] == ["task", "data_format", "prompt_column"]
    assert str(problems.items[1]) == ("data_format='chat': is not a data format; fix: pass one of: auto, "
                                      "prompt_completion, messages, e2e")


# --- split and length ----------------------------------------------------------------------------
def _examples(n, groups=None):
    return [Example([{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}],
                    [False, True], row=i + 1, group=None if groups is None else groups[i]) for i in range(n)]


def test_split_by_row_and_by_group_is_deterministic():
    rows = _examples(50)
    train, val = formats.split(rows, 0.2, seed=1)
    assert len(val) == 10 and len(train) == 40
    assert formats.split(rows, 0.2, seed=1) == (train, val) and formats.split(rows, 0.2, seed=2) != (train, val)
    grouped = _examples(30, [f"g{i % 6}" for i in range(30)])
    train, val = formats.split(grouped, 0.34, seed=1, unit="topic value")
    assert len({ex.group for ex in val}) == 2 and not {ex.group for ex in train} & {ex.group for ex in val}


def test_split_problems_name_the_unit():
    with pytest.raises(InputError, match=r"^validation_fraction=1\.0: must be between 0 and 1 \(exclusive\); "
                                         r"fix: pass e\.g\. 0\.1 for 10% of the distinct MRs$"):
        formats.split(_examples(4), 1.0, 0, unit="MR")
    with pytest.raises(InputError, match=r"^dataset='1 distinct topic value': needs at least 2 distinct topic values "
                                         r"to hold some out for validation; fix: add examples with other topic "
                                         r"values$"):
        formats.split(_examples(3, ["a"] * 3), 0.5, 0, unit="topic value")
    with pytest.raises(InputError, match=r"^dataset='1 row': needs at least 2 rows .*; fix: add examples$"):
        formats.split(_examples(1), 0.5, 0)


def test_length_problem_counts_with_any_token_counter(tmp_path):
    path = write_csv(tmp_path / "d.csv", ["prompt", "completion"], PAIRS)
    examples = load(path).examples

    def count(ex):  # characters as "tokens": no tokenizer needed
        return sum(len(m["content"]) for m in ex.messages)

    lengths, problem = formats.length_problem(examples, count, 100)
    assert lengths == [15, 18, 10] and problem is None
    _, problem = formats.length_problem(examples, count, 12)
    assert str(problem) == ("max_seq_length=12: 2 of 3 examples are longer (prompt+answer up to 18 tokens) and "
                            "would be cut; fix: pass max_seq_length=18 or more, or drop those examples "
                            "(lines 2, 3)")
