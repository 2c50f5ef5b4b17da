"""A json model and a text model through the steps after finetune, on the tiny random Llama:
log_reference, evaluate_checkpoint (the task's metrics for base and candidate, the per-example table),
serving (a `prompt` or an OpenAI-style `messages` column; the task's outputs) and the gate's default
metric (persist_and_register, dry run)."""

from __future__ import annotations

import csv
import json
import sys

import mlflow
import pandas as pd
import pytest
import torch

from steps import download_snapshot, evaluate_checkpoint, finetune, log_reference, persist_and_register

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import bench_quality as bq  # noqa: E402

VENUES = ["Kobo", "Aromi", "Zizzi", "Cotto", "Strada", "Giraffe", "Bibimbap", "Loch Fyne"]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _train(tracking, tiny_model_dir, dataset, **kw):
    manifest_uri = download_snapshot.run(download_snapshot.Args(model=str(tiny_model_dir))).manifest_uri
    ft = finetune.run(finetune.Args(manifest_uri=manifest_uri, dataset=str(dataset), max_steps=2, batch_size=4,
                                    eval_steps=2, save_steps=2, warmup_steps=0, max_seq_length=2048,
                                    validation_fraction=0.25, augment_fraction=0.0, **kw))
    return log_reference.run(log_reference.Args(checkpoint_uri=ft.checkpoint_uri))


def test_a_json_model_is_evaluated_served_and_gated_as_json(tracking, tiny_model_dir, tmp_path):
    data = tmp_path / "chat.jsonl"
    with open(data, "w", encoding="utf-8") as fh:
        for name in VENUES:
            fh.write(json.dumps({"venue": name, "messages": [
                {"role": "user", "content": f"{name} is a pub."},
                {"role": "assistant", "content": json.dumps({"name": name})}]}) + "\n")
    ref = _train(tracking, tiny_model_dir, data, task="json", group_column="venue", system_prompt="JSON.")

    res = evaluate_checkpoint.run(evaluate_checkpoint.Args(model_uri=ref.model_uri, max_new_tokens=8))
    assert res.examples == 2
    for key in ("field_f1", "field_precision", "field_recall", "exact_match", "valid_json_rate", "tokens_per_s"):
        assert key in res.candidate and key in res.base
    run = mlflow.MlflowClient().get_run(res.run_id)
    assert run.data.tags["eval.task"] == "json" and "candidate.field_f1" in run.data.metrics
    table = json.loads(mlflow.artifacts.load_text(f"runs:/{res.run_id}/eval_table.json"))
    assert table["columns"] == ["prompt", "expected", "predicted", "score", "base_predicted", "base_score"]

    model = mlflow.pyfunc.load_model(ref.model_uri)
    out = model.predict(pd.DataFrame({"prompt": ["Kobo is a pub.", ""]}), params={"max_new_tokens": 4})
    assert list(out.columns) == ["text", "parsed", "valid", "error"]
    assert out["error"][0] is None and out["error"][1].startswith("prompt is empty")
    chat = model.predict(pd.DataFrame({"messages": [
        [{"role": "user", "content": "Kobo is a pub."}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "{}"}]]}),
        params={"max_new_tokens": 4})
    assert chat["error"][0] is None and chat["text"][0] == out["text"][0]  # same prompt either way
    assert chat["error"][1].startswith("messages ends on a assistant turn")

    gate = persist_and_register.run(persist_and_register.Args(model_uri=ref.model_uri, dry_run=True))
    assert gate.gate_metric == "field_f1"


def test_the_quality_benchmark_scores_validation_rows_as_evaluate_checkpoint_does(tracking, sharp_model_dir,
                                                                                   tmp_path):
    """bench/bench_quality.py's validation score, what settings are chosen by, is the step's candidate
    score on the same held-out rows: the same answers to the same prompts, the same metrics (the sharp
    model answers each prompt differently, so answers from another split or decoding would show)."""
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"venue": name, "messages": [
        {"role": "user", "content": f"{name} is a pub."},
        {"role": "assistant", "content": json.dumps({"name": name})}]}) + "\n" for name in VENUES))
    ref = _train(tracking, sharp_model_dir, data, task="json", group_column="venue")
    res = evaluate_checkpoint.run(evaluate_checkpoint.Args(model_uri=ref.model_uri, max_new_tokens=8))
    table = json.loads(mlflow.artifacts.load_text(f"runs:/{res.run_id}/eval_table.json"))

    val, answers = bq.score_validation(ref.model_uri, "json", max_new_tokens=8)
    assert len({a for _, a in answers}) == 2 and all(a for _, a in answers)
    assert sorted(answers) == sorted((row[0], row[2]) for row in table["data"])
    assert val.pop("rows") == res.examples == 2 and val.pop("tokens_per_s") > 0
    assert val == {k: v for k, v in res.candidate.items() if k != "tokens_per_s"}


def test_a_text_model_scores_rouge_and_token_f1(tracking, tiny_model_dir, tmp_path):
    data = tmp_path / "text.csv"
    with open(data, "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["question", "answer"])
        for name in VENUES:
            w.writerow([f"Describe {name}.", f"{name} is nice."])
    ref = _train(tracking, tiny_model_dir, data, task="text", prompt_column="question", completion_column="answer")
    res = evaluate_checkpoint.run(evaluate_checkpoint.Args(model_uri=ref.model_uri, max_new_tokens=6))
    assert {"rouge_l", "token_f1", "exact_match"} <= set(res.candidate) and "rouge_l" in res.base
    assert {m.key for m in mlflow.MlflowClient().get_logged_model(res.model_id).metrics} >= {"rouge_l",
                                                                                            "base_rouge_l"}
    with pytest.raises(Exception, match=r"^task='json': the model .* was trained for task=text; fix: pass "
                                         r"task=text, or leave the default"):
        evaluate_checkpoint.run(evaluate_checkpoint.Args(model_uri=ref.model_uri, task="json"))
