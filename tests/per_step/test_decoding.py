"""Faster greedy decoding (lora_pipeline/model/decoding.py) gives the tokens of plain batched
`model.generate`, while rows that ended leave the batch and the prefix every prompt shares is
prefilled once."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from test_serving import SENTENCES
from transformers import GenerationConfig

from lora_pipeline.model import decoding, packed_linear, serving
from lora_pipeline.model.decoding import (
    MIN_SHARED_PREFIX,
    fill_holes,
    greedy_decode,
    left_padded,
    length_groups,
    reserve_room,
    shared_prefix_length,
)
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


@pytest.fixture
def one_prefill_call(monkeypatch):
    """Every row prefilled in one call (no length groups): the tests that count forward calls."""
    monkeypatch.setattr(decoding, "GROUP_CALL_ROWS", 10**9)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_rows_leave_the_batch_at_their_end_and_tokens_are_those_of_generate(sharp, precision, one_prefill_call):
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
    # The shared prefix (chat template + instruction) first, as a batch of one; then each finished
    # row left: the batch shrinks step by step, down to the longest row alone.
    assert rows_per_forward[0] == 1
    decode = rows_per_forward[1:]
    assert decode[0] == len(SENTENCES) and decode == sorted(decode, reverse=True)
    assert decode[-1] == sum(len(r) == max(map(len, expected)) for r in expected)
    assert len(decode) == max(map(len, expected))


def test_served_generate_in_bf16_answers_the_same_on_onednn_packed_weights(sharp):
    """The served model's bf16 copy with its Linear weights packed for oneDNN (what
    `generation_model("bf16")` returns on a CPU) answers as the unpacked bf16 copy does, and runs the
    packed op."""
    model, tok = sharp
    if not packed_linear.supported_bf16():
        pytest.skip("this PyTorch build cannot pack bf16 Linear weights for oneDNN")
    bf16 = serving.bf16_linear_copy(model)
    packed = packed_linear.packed_linear_copy(bf16)
    assert packed is not bf16
    want = serving.generate(bf16, tok, SENTENCES, max_new_tokens=MAX_NEW_TOKENS, batch_size=8, precision="bf16")
    with torch.profiler.profile() as prof:
        got = {batch_size: serving.generate(packed, tok, SENTENCES, max_new_tokens=MAX_NEW_TOKENS,
                                            batch_size=batch_size, precision="bf16") for batch_size in (3, 8)}
    assert got == {3: want, 8: want}
    assert len(set(want)) > 1
    assert "mkldnn::_linear_pointwise" in {e.key for e in prof.key_averages()}


@pytest.mark.parametrize("packed", [False, True], ids=["as-loaded", "mkl-packed"])
def test_served_generate_answers_as_plain_transformers_in_fp32(sharp, packed):
    """`serving.generate` (length buckets, greedy_decode) against hand-written plain batched generate,
    on the model as loaded and on the copy the served model generates with in fp32 (its Linear
    weights packed for MKL: lora_pipeline/model/packed_linear.py)."""
    model, tok = sharp
    plain = [t.strip() for t in tok.batch_decode(plain_generate(model, tok, SENTENCES, eos=tok.eos_token_id),
                                                 skip_special_tokens=True)]
    if packed:
        if not packed_linear.supported():
            pytest.skip("this PyTorch build cannot pack Linear weights for MKL")
        model = packed_linear.packed_linear_copy(model)
        assert model is not sharp[0]
    with torch.profiler.profile() as prof:
        got = {batch_size: serving.generate(model, tok, SENTENCES, max_new_tokens=MAX_NEW_TOKENS,
                                            batch_size=batch_size, precision="fp32") for batch_size in (3, 8)}
    assert got == {3: plain, 8: plain}
    assert len(set(plain)) == len(SENTENCES)  # distinct answers: a mix-up of rows would show
    # The packed copy really computes with its packs (MKL's op), the model as loaded never does.
    assert ("mkl::_mkl_linear" in {e.key for e in prof.key_averages()}) is packed


def test_zero_rows_and_zero_tokens():
    ids, mask = left_padded([[5, 6], [7]], pad_id=0)
    assert ids.tolist() == [[5, 6], [0, 7]] and mask.tolist() == [[1, 1], [0, 1]]
    assert greedy_decode(None, ids, mask, max_new_tokens=0, eos_token_ids=[1]) == [[], []]


def generate_ids(model, ids, mask, eos: int) -> list[list[int]]:
    """Plain `model.generate` on an already left-padded batch, each row cut after its end."""
    cfg = GenerationConfig(max_new_tokens=MAX_NEW_TOKENS, do_sample=False, temperature=None, top_p=None,
                           top_k=None, pad_token_id=0, eos_token_id=eos)
    with torch.inference_mode():
        gen = model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)[:, ids.shape[1]:].tolist()
    return [row[:row.index(eos) + 1] if eos in row else row for row in gen]


def _common_prefix(rows: list[list[int]]) -> int:
    n = 0
    while all(len(r) > n for r in rows) and len({r[n] for r in rows}) == 1:
        n += 1
    return n


def _batches(tok) -> dict[str, list[list[int]]]:
    enc = serving.encode_prompts(tok, SENTENCES)
    whole = enc[1]  # one prompt is the whole common prefix of the batch
    return {
        "shared prefix, different lengths": [enc[i] for i in (0, 3, 4, 6)],
        "one row": [enc[3]],
        "one prompt is the common prefix": [whole, whole + enc[3][-7:], whole + enc[6][-3:]],
        "no common prefix": [enc[0], enc[4][::-1], enc[6]],
    }


@pytest.mark.parametrize("case", ["shared prefix, different lengths", "one row",
                                  "one prompt is the common prefix", "no common prefix"])
def test_shared_prefix_prefill_gives_the_tokens_of_generate(sharp, case, one_prefill_call):
    """Prefix prefilled once (token ids, not text), each row's remainder after [prefix | padding]:
    the tokens of `model.generate` and of the path that prefills every row whole, in fp32."""
    model, tok = sharp
    rows = _batches(tok)[case]
    ids, mask = left_padded(rows, tok.pad_token_id)
    common = _common_prefix(rows)
    shared = shared_prefix_length(ids, mask)
    # Every row keeps at least one token for the remainder pass; one row or nothing shared: no prefix.
    assert shared == (0 if len(rows) < 2 else min(common, min(map(len, rows)) - 1))
    if case == "one prompt is the common prefix":
        assert common == len(rows[0]) and shared == len(rows[0]) - 1
    if case == "no common prefix":
        assert common == 0
    if case == "shared prefix, different lengths":
        assert len({len(r) for r in rows}) == len(rows) and shared >= MIN_SHARED_PREFIX

    shapes: list[tuple[int, int]] = []
    hook = model.register_forward_hook(lambda m, args, kwargs, out: shapes.append(
        tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    with torch.inference_mode():
        got = greedy_decode(model, ids, mask, max_new_tokens=MAX_NEW_TOKENS, eos_token_ids=[tok.eos_token_id])
    hook.remove()
    if shared >= MIN_SHARED_PREFIX:  # the prefix once, then every row's remainder
        assert shapes[:2] == [(1, shared), (len(rows), ids.shape[1] - shared)]
    else:
        assert shapes[0] == tuple(ids.shape)
    with torch.inference_mode():
        whole_rows = greedy_decode(model, ids, mask, max_new_tokens=MAX_NEW_TOKENS,
                                   eos_token_ids=[tok.eos_token_id], share_prefix=False)
    assert got == whole_rows == generate_ids(model, ids, mask, tok.eos_token_id)
    assert all(len(r) == MAX_NEW_TOKENS for r in got)  # compared over every step


def test_shared_prefix_length_of_a_batch_that_is_not_left_padded():
    ids = torch.tensor([[5] * 10 + [6, 0], [5] * 10 + [7, 8]])
    assert shared_prefix_length(ids, torch.tensor([[1] * 11 + [0], [1] * 12])) == 0  # right padding
    assert shared_prefix_length(ids, torch.ones_like(ids)) == 10


@pytest.mark.parametrize("share_prefix", [True, False])
def test_rows_prefilled_in_length_groups_give_the_tokens_of_generate(sharp, monkeypatch, share_prefix):
    """Prompts of very different lengths, each length its own prefill call (a call costs nothing
    here: GROUP_CALL_ROWS 0), their caches placed into one batch: the tokens of `model.generate` on
    the one left-padded batch, in fp32, and of the one-call path."""
    model, tok = sharp
    enc = serving.encode_prompts(tok, SENTENCES)
    rows = [enc[0], enc[3] + enc[3][-30:], enc[4], enc[6] + enc[0][-60:]]  # 4 lengths, far apart
    ids, mask = left_padded(rows, tok.pad_token_id)
    shared = shared_prefix_length(ids, mask) if share_prefix else 0
    expected = generate_ids(model, ids, mask, tok.eos_token_id)

    monkeypatch.setattr(decoding, "GROUP_CALL_ROWS", 0)
    shapes: list[tuple[int, int]] = []
    hook = model.register_forward_hook(lambda m, args, kwargs, out: shapes.append(
        tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    with torch.inference_mode():
        got = greedy_decode(model, ids, mask, max_new_tokens=MAX_NEW_TOKENS, eos_token_ids=[tok.eos_token_id],
                            share_prefix=share_prefix)
    hook.remove()
    assert got == expected
    assert all(len(r) == MAX_NEW_TOKENS for r in got)  # compared over every step
    # The prefix once (when shared), then one call per row, each as wide as its own remainder.
    prefill = shapes[1:5] if shared else shapes[:4]
    assert sorted(prefill) == sorted((1, len(r) - shared) for r in rows)
    if shared:
        assert shapes[0] == (1, shared) and shared >= MIN_SHARED_PREFIX
    monkeypatch.setattr(decoding, "GROUP_CALL_ROWS", 10**9)
    with torch.inference_mode():
        assert greedy_decode(model, ids, mask, max_new_tokens=MAX_NEW_TOKENS, eos_token_ids=[tok.eos_token_id],
                             share_prefix=share_prefix) == got


def _padded_cost(groups: list[list[int]], lengths: list[int], call_rows: int) -> int:
    return sum(len(g) * max(lengths[i] for i in g) + call_rows for g in groups)


def test_length_groups_pad_least_for_what_a_call_costs():
    assert length_groups([]) == []
    assert length_groups([5, 5, 5], call_rows=32) == [[0, 1, 2]]  # nothing to save by splitting
    # Two clusters of lengths: padding the short ones to 100 costs 3 x 90 rows, far over one more call.
    assert length_groups([100, 10, 100, 12, 11], call_rows=32) == [[1, 4, 3], [0, 2]]
    # The same two clusters when a call costs more than the padding it saves: one group.
    assert length_groups([100, 10, 100, 12, 11], call_rows=1000) == [[1, 4, 3, 0, 2]]
    # Least cost over every split of the sorted order (brute force on small random cases).
    import itertools
    import random

    rng = random.Random(0)
    for _ in range(50):
        lengths = [rng.randint(1, 80) for _ in range(rng.randint(1, 7))]
        call = rng.choice([0, 8, 32, 200])
        groups = length_groups(lengths, call_rows=call)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        best = min(_padded_cost([order[a:b] for a, b in itertools.pairwise((0, *cuts, len(order)))],
                                lengths, call)
                   for k in range(len(order)) for cuts in itertools.combinations(range(1, len(order)), k))
        assert _padded_cost(groups, lengths, call) == best


def test_reserved_cache_holds_what_concatenation_would():
    """Keys and values written into reserved room (outgrown: doubled) read back as the
    concatenated tensors; rows selected, repeated and placed keep their values; places no row
    wrote are zero."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=None)
    cache.layers = [DynamicLayer()]  # one plain layer, as a config without sliding windows gives
    assert reserve_room(cache, room=3)
    layer = cache.layers[0]
    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(2, 3, t, 4, generator=g) for t in (2, 1, 1, 3)]  # 7 positions > room 3
    for p in parts:
        k, v = layer.update(p, -p)
    assert torch.equal(k, torch.cat(parts, dim=2)) and torch.equal(v, -k)
    assert layer.get_seq_length() == 7 and layer._k.shape[2] >= 7
    layer.batch_select_indices(torch.tensor([1]))
    assert torch.equal(layer.keys, torch.cat(parts, dim=2)[1:])
    layer.batch_repeat_interleave(3)
    assert torch.equal(layer.keys, torch.cat(parts, dim=2)[[1, 1, 1]])
    k, _ = layer.update(parts[1][:1].expand(3, -1, -1, -1), parts[1][:1].expand(3, -1, -1, -1))
    assert k.shape == (3, 3, 8, 4) and torch.equal(k[:, :, -1:], parts[1][[0, 0, 0]])

    # Rows leaving: the kept rows read back in `fill_holes`' order, and the next step appends to them.
    layer.batch_repeat_interleave(2)
    layer._k[:6, :, :8] += torch.arange(6).float()[:, None, None, None]  # tell the 6 rows apart
    before = layer.keys.clone()
    order = decoding._drop_rows(cache, torch.tensor([1, 3, 4]), reserved=True)
    assert order.tolist() == [3, 1, 4]  # rows 0, 2 and 5 left: rows 3 and 4 fill holes 0 and 2
    assert torch.equal(layer.keys, before[order])
    step = torch.randn(3, 3, 1, 4, generator=g)
    k, _ = layer.update(step, step)
    assert k.shape == (3, 3, 9, 4) and torch.equal(k[:, :, :8], before[order]) and torch.equal(k[:, :, 8:], step)

    with pytest.raises(NotImplementedError, match="greedy_decode never crops its cache"):
        layer.crop(-1)  # DynamicLayer's crop would cut `keys` and leave the buffers' length behind

    placed = DynamicCache(config=None)
    placed.layers = [DynamicLayer()]
    reserve_room(placed, room=6)
    row = torch.randn(1, 3, 2, 4, generator=g)
    placed.layers[0].put_rows(torch.tensor([2]), row, row, at=3, batch=4, length=5)
    assert placed.layers[0].keys.shape == (4, 3, 5, 4)
    assert torch.equal(placed.layers[0].keys[2, :, 3:], row[0])
    assert not placed.layers[0].keys[[0, 1, 3]].any() and not placed.layers[0].keys[2, :, :3].any()


def test_prompt_pass_hands_the_lm_head_contiguous_rows(sharp_model_dir):
    """A frozen model held in bf16 (a bf16 checkpoint loaded as stored): the prompt passes give the LM
    head each row's last position as a contiguous tensor. A strided view makes torch.matmul copy the
    head's weight once per row (on the default base, ~1 s per prefill call instead of 5 ms), with the
    same tokens, so only the layout shows it."""
    model = serving.load_causal_lm(sharp_model_dir, dtype="bf16").eval().requires_grad_(False)
    tok = serving.load_tokenizer(sharp_model_dir)
    seen: list[tuple[tuple[int, ...], bool]] = []
    hook = model.lm_head.register_forward_pre_hook(
        lambda m, args: seen.append((tuple(args[0].shape), args[0].is_contiguous())))
    ids, mask = left_padded(serving.encode_prompts(tok, SENTENCES), tok.pad_token_id)
    with torch.inference_mode():
        greedy_decode(model, ids, mask, max_new_tokens=2, eos_token_ids=[tok.eos_token_id])
    prompt_passes = seen[:-1]  # the last call is the one decoding step
    assert prompt_passes and {shape[1] for shape, _ in prompt_passes} == {1}
    assert all(contiguous for _, contiguous in prompt_passes), prompt_passes
    seen.clear()  # sampling (`generate`) too
    serving.generate(model, tok, SENTENCES, max_new_tokens=2, do_sample=True, temperature=1.0, precision="fp32")
    hook.remove()
    assert seen and seen[0][0][1] == 1 and all(contiguous for _, contiguous in seen), seen


def test_fill_holes_keeps_the_rows_asked_moving_the_fewest():
    """Against the plain gather on random cases: the same rows kept, those already in place not moved,
    each moved row copied once."""
    import random

    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 12)
        keep = sorted(rng.sample(range(n), rng.randint(1, n)))
        order, holes, movers = fill_holes(keep)
        assert sorted(order) == keep
        assert all(order[r] == r for r in keep if r < len(keep))
        assert len(holes) == len(movers) == sum(r >= len(keep) for r in keep)
        rows = list(range(n))
        for h, m in zip(holes, movers, strict=True):
            rows[h] = rows[m]
        assert rows[:len(keep)] == order


def test_cache_kept_in_the_autocast_dtype_under_autocast(sharp):
    """Under bf16 autocast attention casts the keys and values to bf16 at every step; the cache
    keeps them in bf16 (cast once), outside autocast in the model's fp32."""
    from transformers import DynamicCache

    model, tok = sharp
    ids, mask = left_padded(serving.encode_prompts(tok, SENTENCES[:2]), tok.pad_token_id)
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        cache = DynamicCache(config=model.config)
        assert reserve_room(cache, ids.shape[1] + 1)
        with torch.inference_mode(), autocast(model, precision):
            model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        assert {layer.keys.dtype for layer in cache.layers} == {dtype}
