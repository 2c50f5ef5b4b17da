"""Pinned numbers on the tiny model, as torchtune pins its recipes' loss curves.

A few seeded `finetune` steps on the tiny random Llama (tests/support/hubserver.make_tiny_llama, seed 0)
with a fixed dataset written here, fp32 on CPU: the logged per-step training loss and the validation
loss must equal the pinned values to 1e-4 relative. A change to the prompt (chat template, instruction),
the answer format, tokenization, label masking, the loss, the split, augmentation or the optimizer
settings changes these numbers; if the change is intended, re-pin them (see PINNED_LOSS).
"""

from __future__ import annotations

import csv

import mlflow
import pytest
import torch

from steps import download_snapshot, finetune

# Distinct MRs (the split is by MR), short sentences (tiny-model sequences are character-level long).
ROWS = [
    ("name[The Red Fox], eatType[pub], priceRange[cheap], area[riverside]",
     "The Red Fox is a cheap pub by the riverside."),
    ("name[Kobo], eatType[restaurant], food[Japanese]", "Kobo is a Japanese restaurant."),
    ("name[The Mill], eatType[coffee shop], area[city centre]", "The Mill is a coffee shop in the city centre."),
    ("name[Aromi], food[Italian], familyFriendly[yes]", "Aromi serves Italian food and welcomes children."),
    ("name[The Eagle], eatType[pub], near[Burger King]", "The Eagle is a pub near Burger King."),
    ("name[Zizzi], priceRange[high], customer rating[low]", "Zizzi is expensive and rated low."),
    ("name[Loch Fyne], food[Fast food], area[riverside]", "Loch Fyne sells fast food by the riverside."),
    ("name[The Punter], eatType[restaurant], priceRange[moderate]", "The Punter is a moderately priced restaurant."),
    ("name[Cotto], customer rating[5 out of 5], near[The Bakers]", "Cotto, near The Bakers, is rated 5 out of 5."),
    ("name[Giraffe], eatType[pub], familyFriendly[no]", "Giraffe is a pub that is not family-friendly."),
    ("name[Alimentum], food[Chinese], priceRange[less than £20]", "Alimentum serves Chinese food for less than £20."),
    ("name[Strada], eatType[coffee shop], customer rating[average]", "Strada is a coffee shop with an average rating."),
    ("name[The Olive Grove], area[city centre], familyFriendly[yes]",
     "The Olive Grove is in the city centre and is kid friendly."),
    ("name[Bibimbap House], food[English], near[Clare Hall]", "Bibimbap House serves English food near Clare Hall."),
    ("name[The Wrestlers], eatType[restaurant], customer rating[high]", "The Wrestlers is a highly rated restaurant."),
    ("name[Midsummer House], priceRange[£20-25], area[riverside]", "Midsummer House costs £20-25 and is by the river."),
]

# Produced once by running this test with PINNED_LOSS = PINNED_EVAL_LOSS = {} (the assertion message
# prints the logged values), on CPU, fp32, one thread: transformers 5.23.0, torch 2.13.0+cpu, peft 0.21.2;
# two runs gave identical values. For scale: a 9-character instruction before the sentence moves step 1
# by 1e-3 relative, dropping the EOS token from the answer moves step 4 by 2e-3.
PINNED_LOSS = {1: 5.937922, 2: 5.927977, 3: 5.914860, 4: 5.892770}
PINNED_EVAL_LOSS = {4: 5.886405}
REL = 1e-4


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _history(run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in mlflow.MlflowClient().get_metric_history(run_id, key)}


def test_seeded_finetune_reproduces_the_pinned_loss_curve(tracking, tiny_model_dir, tmp_path):
    data = tmp_path / "pinned.csv"
    with open(data, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["mr", "ref"])
        writer.writerows(ROWS)
    manifest = download_snapshot.run(download_snapshot.Args(model=str(tiny_model_dir))).manifest_uri
    result = finetune.run(finetune.Args(
        manifest_uri=manifest, dataset=str(data), seed=42, precision="fp32", max_steps=4, batch_size=4,
        eval_steps=4, save_steps=4, logging_steps=1, warmup_steps=0, learning_rate=5e-3,
        lr_scheduler="linear", max_seq_length=1024, validation_fraction=0.25))

    loss, eval_loss = _history(result.run_id, "loss"), _history(result.run_id, "eval_loss")
    got = f"loss={loss!r} eval_loss={eval_loss!r}"
    assert sorted(loss) == [1, 2, 3, 4] and sorted(eval_loss) == [4], got
    assert len(set(loss.values())) == 4, got  # a real curve, not a constant
    assert sorted(PINNED_LOSS) == [1, 2, 3, 4] and sorted(PINNED_EVAL_LOSS) == [4], got
    for step, want in PINNED_LOSS.items():
        assert loss[step] == pytest.approx(want, rel=REL), (step, got)
    assert eval_loss[4] == pytest.approx(PINNED_EVAL_LOSS[4], rel=REL), got
