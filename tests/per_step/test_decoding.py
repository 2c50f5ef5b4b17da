"""Faster greedy decoding (lora_pipeline/model/decoding.py) gives the tokens of plain batched
`model.generate`, while rows that ended leave the batch."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from test_serving import SENTENCES
from transformers import GenerationConfig

from lora_pipeline.model import serving
from lora_pipeline.model.decoding import greedy_decode, left_padded
from lora_pipeline.model.precision import autocast
from lora_pipeline.task.e2e import format_prompt

MAX_NEW_TOKENS = 16


def plain_generate(model, tokenizer, sentences, eos: int, precision: str = "fp32") -> list[list[int]]:
    """Plain transformers: one left-padded batch through `model.generate`, each row cut after its end."""
    enc = tokenizer([format_prompt(tokenizer, s) for s in sentences], return_tensors="pt", padding=True,
                    add_special_tokens=False)
    cfg = GenerationConfig(max_new_tokens=MAX_NEW_TOKENS, do_sample=False, temperature=None, top_p=None,
                           top_k=None, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)
    with torch.inference_mode(), autocast(model, precision):
        gen = model.generate(**enc, generation_config=cfg)[:, enc["input_ids"].shape[1]:].tolist()
    return [row[:row.index(eos) + 1] if eos in row else row for row in gen]


@pytest.fixture(scope="module")
def sharp(sharp_model_dir):  # noqa: F811
    return serving.load_causal_lm(sharp_model_dir).eval(), serving.load_tokenizer(sharp_model_dir)


def _stop_token(answers: list[list[int]]) -> int:
    """A token the random model emits early in some answers, late in others and never in the rest:
    made the end-of-sequence token, rows end at different steps (a random model never emits EOS)."""
    best, spread = None, 0
    for t in Counter(t for a in answers for t in a):
        firsts = {a.index(t) if t in a else None for a in answers}
        if None in firsts and len(firsts) > spread:
            best, spread = t, len(firsts)
    assert spread >= 3, "no token ends the rows at different steps"
    return best


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_rows_leave_the_batch_at_their_end_and_tokens_are_those_of_generate(sharp, precision):
    model, tok = sharp
    if precision == "bf16":
        model = serving.bf16_linear_copy(model)
    stop = _stop_token(plain_generate(model, tok, SENTENCES, eos=tok.eos_token_id, precision=precision))
    expected = plain_generate(model, tok, SENTENCES, eos=stop, precision=precision)
    assert len({len(r) for r in expected}) >= 3  # rows really end at different steps

    rows_per_forward: list[int] = []
    hook = model.register_forward_hook(lambda m, args, kwargs, out: rows_per_forward.append(
        kwargs["input_ids"].shape[0]), with_kwargs=True)
    ids, mask = left_padded(serving.encode_prompts(tok, SENTENCES), tok.pad_token_id)
    with torch.inference_mode(), autocast(model, precision):
        got = greedy_decode(model, ids, mask, max_new_tokens=MAX_NEW_TOKENS, eos_token_ids=[stop])
    hook.remove()
    assert got == expected
    # Each finished row left: the batch shrinks step by step, down to the longest row alone.
    assert rows_per_forward[0] == len(SENTENCES) and rows_per_forward == sorted(rows_per_forward, reverse=True)
    assert rows_per_forward[-1] == sum(len(r) == max(map(len, expected)) for r in expected)
    assert len(rows_per_forward) == max(map(len, expected))


def test_served_generate_answers_as_plain_transformers_in_fp32(sharp):
    """`serving.generate` (length buckets, greedy_decode) against hand-written plain batched generate."""
    model, tok = sharp
    plain = [t.strip() for t in tok.batch_decode(plain_generate(model, tok, SENTENCES, eos=tok.eos_token_id),
                                                 skip_special_tokens=True)]
    for batch_size in (3, 8):
        assert serving.generate(model, tok, SENTENCES, max_new_tokens=MAX_NEW_TOKENS, batch_size=batch_size,
                                precision="fp32") == plain
    assert len(set(plain)) == len(SENTENCES)  # distinct answers: a mix-up of rows would show


def test_zero_rows_and_zero_tokens():
    ids, mask = left_padded([[5, 6], [7]], pad_id=0)
    assert ids.tolist() == [[5, 6], [0, 7]] and mask.tolist() == [[1, 1], [0, 1]]
    assert greedy_decode(None, ids, mask, max_new_tokens=0, eos_token_ids=[1]) == [[], []]
