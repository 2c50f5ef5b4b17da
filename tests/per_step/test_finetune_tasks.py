"""finetune on your own data: the json and text tasks, messages and mapped prompt/completion columns,
on the tiny random Llama (tests/support/hubserver.make_tiny_llama)."""

from __future__ import annotations

import csv
import json

import mlflow
import pytest
import torch
from transformers import TrainerCallback

from lora_pipeline import artifacts
from lora_pipeline.errors import InputError
from steps import download_snapshot, finetune

SYSTEM = "Extract JSON."
VENUES = ["Kobo", "Aromi", "Zizzi", "Cotto", "Strada", "Giraffe", "Bibimbap", "Loch Fyne"]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def manifest_uri(tracking, tiny_model_dir) -> str:
    return download_snapshot.run(download_snapshot.Args(model=str(tiny_model_dir))).manifest_uri


@pytest.fixture
def messages_jsonl(tmp_path):
    """Two rows per venue; every other one has a follow-up turn (two assistant targets)."""
    path = tmp_path / "chat.jsonl"
    with open(path, "w", encoding="utf-8") as fh:
        for i, name in enumerate(VENUES * 2):
            turns = [{"role": "user", "content": f"{name} is a pub."},
                     {"role": "assistant", "content": json.dumps({"name": name, "type": "pub"})}]
            if i % 2:
                turns += [{"role": "user", "content": "And the area?"},
                          {"role": "assistant", "content": json.dumps({"area": "riverside"})}]
            fh.write(json.dumps({"venue": name, "dialogue": turns}) + "\n")
    return path


@pytest.fixture
def text_csv(tmp_path):
    path = tmp_path / "text.csv"
    with open(path, "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["question", "answer"])
        for name in VENUES:
            w.writerow([f"Describe {name}.", f"{name} is nice."])
    return path


def fast_args(manifest_uri: str, dataset, **kw) -> finetune.Args:
    base = dict(manifest_uri=manifest_uri, dataset=str(dataset), max_steps=2, batch_size=4, eval_steps=2,
                save_steps=2, logging_steps=1, warmup_steps=0, max_seq_length=2048,
                validation_fraction=0.25, learning_rate=5e-3, lr_scheduler="linear", augment_fraction=0.0)
    base.update(kw)
    return finetune.Args(**base)


class Weights(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kw):
        self.start = {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}

    def on_train_end(self, args, state, control, model=None, **kw):
        self.end = {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def _changed(cb: Weights) -> bool:
    return any(not torch.equal(cb.start[k], cb.end[k]) for k in cb.start)


def test_loss_covers_every_assistant_turn_and_nothing_else(tiny_model_dir):
    from lora_pipeline.model.serving import load_tokenizer
    from lora_pipeline.task.base import Example
    from lora_pipeline.task.tasks import get_task
    from lora_pipeline.training.trainer_utils import IGNORE_INDEX, encode_conversation

    tok = load_tokenizer(tiny_model_dir)
    task = get_task("json")
    ex = Example([{"role": "user", "content": "Kobo is a pub."}, {"role": "assistant", "content": '{"a": 1}'},
                  {"role": "user", "content": "Area?"}, {"role": "assistant", "content": '{"b": 2}'}],
                 [False, True, False, True])
    messages, targets = task.conversation(ex, SYSTEM)
    enc = encode_conversation(tok, task, messages, targets)
    labelled = [t for t, lab in zip(enc["input_ids"], enc["labels"], strict=True) if lab != IGNORE_INDEX]
    answers = [task.answer_text(tok, '{"a": 1}'), task.answer_text(tok, '{"b": 2}')]
    assert tok.decode(labelled) == "".join(answers)
    # the last answer's prompt is what serving renders for the same turns
    prompt = task.format_prompt(tok, ex.messages[:3], SYSTEM)
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert tok.decode(enc["input_ids"][:len(prompt_ids)]) == tok.decode(prompt_ids)


def test_json_messages_train_and_the_model_carries_its_task(tracking, manifest_uri, messages_jsonl):
    cb = Weights()
    res = finetune.run(fast_args(manifest_uri, messages_jsonl, task="json", data_format="messages",
                                 messages_column="dialogue", group_column="venue", system_prompt=SYSTEM),
                       callbacks=[cb])
    assert _changed(cb)
    client = mlflow.MlflowClient()
    run = client.get_run(res.run_id)
    assert "eval_loss" in run.data.metrics and run.data.params["task"] == "json"
    assert run.data.params["data.validation_mrs"] == "2"  # 2 of 8 venues held out, whole
    spec = json.loads(mlflow.artifacts.load_text(
        f"{client.get_logged_model(res.checkpoint_uri.split('/')[-1]).artifact_location}/artifacts/"
        f"{artifacts.TASK_ARTIFACT}"))
    assert spec == {"version": 1, "task": "json", "system_prompt": SYSTEM}
    held_out = [json.loads(line) for line in
                mlflow.artifacts.load_text(res.validation_data_uri).splitlines() if line.strip()]
    assert {r["group"] for r in held_out} and all(json.loads(r["messages"])[-1]["role"] == "assistant"
                                                   for r in held_out)


def test_text_task_with_mapped_columns_trains_with_the_default_augment_fraction(tracking, manifest_uri,
                                                                                 text_csv):
    cb = Weights()
    # augment_fraction left at finetune's default: the text task has no augmentation, so none applies
    res = finetune.run(fast_args(manifest_uri, text_csv, task="text", prompt_column="question",
                                 completion_column="answer", augment_fraction=finetune.Args().augment_fraction),
                       callbacks=[cb])
    assert _changed(cb) and res.checkpoints_logged == 1
    params = mlflow.MlflowClient().get_run(res.run_id).data.params
    assert params["data.train_mrs"] == "6"  # rows
    assert params["data.augment_fraction"] == "0.0"


def test_task_problems_are_reported_together(tracking, text_csv):
    with pytest.raises(InputError) as info:
        finetune.run(fast_args("", text_csv, task="jsno", prompt_column=" ", augment_fraction=0.5))
    lines = info.value.lines()
    assert lines[:1] == ["manifest_uri='': is empty; fix: pass the manifest URI that download_snapshot "
                         "printed (runs:/<run>/snapshot/manifest.json)"]
    assert any(line.startswith("task='jsno': is not a task; fix: did you mean json?") for line in lines)
    assert any(line.startswith("prompt_column=' ': is empty") for line in lines)
    # An explicit fraction for a task without augmentation would be silently ignored: refused.
    with pytest.raises(InputError, match=r"^augment_fraction=0\.5: augmentation rewrites E2E restaurant data; "
                                         r"task=text has none; fix: pass augment_fraction=0 \(or leave the "
                                         r"default, -1\), or use task=e2e$"):
        finetune.validate_static(fast_args("x", text_csv, task="text", augment_fraction=0.5)).raise_if_any()
    with pytest.raises(InputError, match=r"^augment_fraction=-0\.5: must be between 0 and 1, or -1 \(the "
                                         r"task's default\); fix: pass e\.g\. 0\.5"):
        finetune.validate_static(fast_args("x", text_csv, augment_fraction=-0.5)).raise_if_any()
    with pytest.raises(InputError, match=r"^system_prompt='Be brief\.': is not used by task=e2e"):
        finetune.validate_static(fast_args("x", text_csv, system_prompt="Be brief.")).raise_if_any()


def test_columns_that_are_not_there_name_the_mapping(tracking, manifest_uri, text_csv):
    with pytest.raises(InputError, match=r"^dataset='.*text\.csv': has no column 'prompt' / 'completion' for "
                                         r"data_format=prompt_completion \(columns: question, answer\); fix: map "
                                         r"yours with prompt_column=<column>, completion_column=<column>"):
        finetune.run(fast_args(manifest_uri, text_csv, task="text", data_format="prompt_completion"))


def test_e2e_from_prompt_completion_parquet_splits_by_group(tracking, manifest_uri, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"venue": name, "prompt": f"{name} is a pub.", "completion": f"name[{name}], eatType[pub]"}
            for name in VENUES]
    path = tmp_path / "e2e.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    cb = Weights()
    res = finetune.run(fast_args(manifest_uri, path, task="e2e", data_format="prompt_completion",
                                 group_column="venue", augment_fraction=0.5), callbacks=[cb])
    assert _changed(cb)
    params = mlflow.MlflowClient().get_run(res.run_id).data.params
    assert (params["data.train_mrs"], params["data.validation_mrs"]) == ("6", "2")
    held_out = [json.loads(line) for line in
                mlflow.artifacts.load_text(res.validation_data_uri).splitlines() if line.strip()]
    assert sorted(held_out[0]) == ["mr", "ref"]  # the e2e layout evaluate_checkpoint reads
