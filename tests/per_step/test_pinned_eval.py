"""Pinned numbers of evaluation on the tiny model (as torchtune pins its recipe losses).

A fixed tiny base (`sharp_model_dir`: seed 0, weights scaled so greedy answers differ per sentence), a fixed adapter (seed 1: LoRA A and a random non-zero B), a fixed
evaluation set (the first rows of the project's own data/sample.csv), greedy fp32 generation: what
`evaluate_checkpoint` logs must equal the numbers below. A change to the prompt format, the chat template
handling, tokenization, padding or the generation loop changes the generated tokens and so these numbers,
even when every other test still passes. If a change is intended, rerun this file, check the new numbers
are explained by the change, and pin them again (the test prints them).
"""

from __future__ import annotations

import hashlib
import json

import mlflow
import pandas as pd
from test_evaluate import fake_finetune
from test_serving import make_adapter, snapshot

from steps import evaluate_checkpoint as ev
from steps import log_reference as lr

from conftest import ROOT

N_ROWS = 8
# Produced by this test on the fixtures above (torch 2.13 CPU, fp32 greedy): see the module docstring.
# The digests are of the JSON list of the 8 generated answers (sha256, first 16 hex digits). The random tiny
# model answers garbage, so the task metrics are pinned at their floor (no slot parses: unparsable 1.0).
PINNED = {
    "candidate_digest": "d78a57a37dc635d0",
    "base_digest": "b0469641870986d8",
    "candidate_slot_f1": 0.0,
    "candidate_unparsable_rate": 1.0,
}


def _digest(predictions: list[str]) -> str:
    return hashlib.sha256(json.dumps(predictions).encode()).hexdigest()[:16]


def test_evaluation_of_a_fixed_adapter_on_a_fixed_set_gives_the_pinned_numbers(tracking, sharp_model_dir,
                                                                              tmp_path):
    rows = pd.read_csv(ROOT / "data" / "sample.csv").iloc[:N_ROWS][["mr", "ref"]].values.tolist()
    adapter = make_adapter(sharp_model_dir, tmp_path / "adapter", seed=1)
    ckpt, _ = fake_finetune(snapshot(str(sharp_model_dir)), adapter, rows)
    model_uri = lr.run(lr.Args(checkpoint_uri=ckpt)).model_uri
    res = ev.run(ev.Args(model_uri=model_uri, max_new_tokens=8, batch_size=4, precision="fp32", max_examples=0))

    table = json.loads(mlflow.artifacts.load_text(f"runs:/{res.run_id}/eval_table.json"))
    cols = table["columns"]
    got_rows = [dict(zip(cols, r, strict=True)) for r in table["data"]]
    got = {"candidate_digest": _digest([r["predicted"] for r in got_rows]),
           "base_digest": _digest([r["base_predicted"] for r in got_rows]),
           "candidate_slot_f1": res.candidate["slot_f1"],
           "candidate_unparsable_rate": res.candidate["unparsable_rate"]}
    print("pinned numbers:", got, sorted(res.candidate.items()))
    assert res.examples == N_ROWS
    assert got_rows[0]["predicted"] != got_rows[0]["base_predicted"]  # the adapter changes answers
    assert got == PINNED
