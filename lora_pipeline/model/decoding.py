"""Greedy decoding of a left-padded batch in which a row leaves the batch at its end-of-sequence token.

Why not `model.generate`: it keeps every finished row in the batch, generating padding for it until
the longest answer ends, so a batch costs (rows x longest answer) decoder rows. Here a finished row's
KV cache is dropped (`fill_holes`: a kept row from the end of the batch moves into its place) and
the next steps run on the rows still going. Measured on the default base (SmolLM2-135M, fp32, one
thread, process CPU time; 32 sentences in one batch, up to 64 new tokens, answers of 10 to 64
tokens, mean 31): 23.3 s with `generate`, 16.8 s here (1.39x), the same tokens for all 32 rows; bf16
autocast: 118 s against 86 s, 32/32 the same. With equal-length answers there is nothing to drop and
both take the same time (8 x 24 tokens: 5.1 s and 4.9 s).

Shared-prefix prefill: every prompt of a batch starts with the same tokens (the chat template's
system turn and the task's instruction before the sentence), often most of the prompt. The longest
common prefix of the rows' token ids (after encoding: text boundaries need not tokenize alike) is run
once as a batch of one, its KV cache copied to every row (`Cache.batch_repeat_interleave`), and then
each row prefills only its remainder, the rows left-padded after the prefix: the attention mask spans
[prefix | padding | remainder], the padding masked, the remainder's positions continuing from the
prefix (the positions each row has alone, as before). Each row keeps at least one token of its own
(its last prompt token gives the first answer token's logits); a prefix under `MIN_SHARED_PREFIX`
tokens, one row, or a cache with other than plain full-attention layers (sliding window, linear
attention, quantized) takes the whole-prompt path. Prefill then costs (prefix + rows x remainder)
token rows instead of rows x prompt.

Length groups (`length_groups`, `_prefill`): the rows' remainders are prefilled in groups of similar
length, each padded to its own longest row, and the groups' caches placed into one batch cache as one
left-padded pass would have filled it; the groups minimise padded token rows plus what a call costs.

Reserved cache (`reserve_room`): each layer writes a step's keys and values into room reserved ahead
instead of concatenating (which copies the whole cache every step), and under autocast keeps them in
the autocast dtype that attention casts them to at every step.

Measured on the default base with a fine-tuned adapter (32 E2E prompts of 36-76 tokens, 20 shared,
batch 32, <= 64 new tokens, answers of 23-64 tokens; one process, `greedy_decode` alone, second of
two runs, Intel Xeon with AMX, 2 cores): fp32 8.4 s before these two, 7.5 s with the reserved cache,
6.9 s with length groups too, the same tokens for all 32 rows; bf16 autocast 5.7 s -> 4.6 s with the
cache kept in bf16. The evaluation benchmark (bench/bench_eval_throughput.py) has the end-to-end
figures.

Measured and not kept: a static KV cache with `torch.compile` (transformers' `cache_implementation=
"static"`) on the same CPU: the first call compiles for 84 s, later calls take 4.4 s against 3.9 s
with the dynamic cache (8 sentences x 24 tokens); a static cache without compiling: 4.0 s. A CPU
decoder step of a 135M model is bound by its matmuls, not by the Python overhead compiling removes,
and each new batch shape would compile again.
Also measured and not kept: speculative decoding with prompt-lookup drafts (the next tokens after the
latest n-gram, n <= 3, matching a row's last tokens, in its own prompt and answer or else in any row
of the batch; 2-4 drafts verified per step, the longest agreeing run accepted) on the 32 prompts
above: the same greedy tokens (fp32), 65 forward calls down to 29-36, but no faster: fp32 6.3 s
against 6.7-8.0 s, bf16 4.2 s against 4.0-4.9 s. A step's cost here grows with its token rows (fp32:
~100 ms at 32 rows against ~45 ms at 2; bf16: ~62 ms against ~43 ms), so verifying 3-5 tokens per
row costs about what the saved steps save. Nor when drafting only once few rows remain, where a step
costs about what streaming the weights costs whatever its rows (fp32 on a Xeon without AMX, 4
alternated runs, medians): <= 4 rows with 4 drafts, 52 calls against 64, 8.0 s against 7.7 s; <= 8
rows with 3, 49 calls, 8.7 s; every step with 3, 32 calls, 10.4 s; the same tokens for all 32 rows.

Same answers: the logits of a row do not depend on which other rows share its batch (left padding
with an attention mask; tests/per_step/test_decoding.py checks the tokens against `model.generate`
in fp32), and the argmax is taken over fp32 logits, as `generate` takes it. In exact arithmetic the
shared prefix changes nothing either (each row attends to the same keys at the same positions); in
floating point the prefix's keys come from a pass of another shape, so a logit can differ in its
last bits, as it can for a row padded to another width (length buckets do that already): a greedy
token can change only at a near-tie. The tests compare the tokens of both paths and of `generate`
(a shared prefix, one row, a prompt that is the whole common prefix, none shared).
"""

from __future__ import annotations

import inspect


def left_padded(rows: list[list[int]], pad_id: int):
    """(input_ids, attention_mask) of `rows`, left-padded to the longest: a decoder-only model
    continues from the last position of each row."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
    return ids, mask


# Shortest shared prefix worth its own pass. The prefix pass is one more forward call over the
# weights (batch 1) plus a copy of its KV cache to every row; what it saves is (rows - 1) x prefix
# token rows of compute. Below a few tokens the extra call and copy can cost about what they save
# (not measured: a judgement); the prompts this pipeline batches share far more (the chat template's
# system turn and the task's instruction: tens of tokens), so the exact value matters little.
MIN_SHARED_PREFIX = 8


# Positions reserved ahead for answers; beyond, a layer's buffers double when full. 256 covers this
# pipeline's answers (max_new_tokens 64 by default) and bounds what a request for many tokens reserves
# before it has generated any: at batch 32 on the default base, 256 positions x 30 layers x 2 x 3
# heads x 64 x 4 bytes x 32 rows = 377 MB.
MAX_RESERVED_NEW_TOKENS = 256


def shared_prefix_length(input_ids, attention_mask) -> int:
    """How many leading tokens every row of a left-padded batch shares, capped so that each row keeps
    at least one token of its own (the remainder pass needs the last prompt token of every row).
    0 when the batch is not left-padded (a hole in a row's mask) or has fewer than two rows."""
    import torch

    n, width = input_ids.shape
    if n < 2 or width == 0:
        return 0
    mask = attention_mask.bool()
    if bool((mask[:, :-1] & ~mask[:, 1:]).any()):  # a row's tokens are not one run ending at the right
        return 0
    lengths = mask.sum(-1)
    shortest = int(lengths.min())
    if shortest < 2:
        return 0
    # The first `shortest` tokens of each row, wherever its padding ends.
    cols = (width - lengths)[:, None] + torch.arange(shortest, device=input_ids.device)[None]
    heads = input_ids.gather(1, cols)
    differs = (heads != heads[:1]).any(0).nonzero()
    common = int(differs[0]) if differs.numel() else shortest
    return min(common, shortest - 1)


def _cache_takes_prefix(cache) -> bool:
    """Whether `cache` is made of plain full-attention dynamic layers only: a sliding-window,
    linear-attention or quantized layer would not keep the semantics of a prefix shared this way."""
    from transformers.cache_utils import DynamicLayer

    if cache.layers:
        return all(type(layer) is DynamicLayer for layer in cache.layers)
    return getattr(cache, "layer_class_to_replicate", None) is DynamicLayer


def _reserved_layer_class():
    """`DynamicLayer` that writes each step's keys and values into room reserved ahead instead of
    concatenating (see `reserve_room`); the class is made on first use (transformers imports lazily)."""
    global _RESERVED_LAYER
    if _RESERVED_LAYER is not None:
        return _RESERVED_LAYER
    import torch
    from transformers.cache_utils import DynamicLayer

    class ReservedLayer(DynamicLayer):
        """Keys and values live in buffers of `room` positions (more when outgrown: doubled), and
        `keys`/`values` are views of their first `length` positions, which attention reads as it
        would read the concatenated tensors (same values, same order)."""

        def __init__(self, room: int):
            super().__init__()
            self.room = room
            self._k = self._v = None
            self.length = 0
            self.batch = 0  # rows in use: the buffers' first `batch` rows (`drop_rows` keeps spares)

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            end = self.length + key_states.shape[-2]
            if self._k is None or end > self._k.shape[-2] or self.batch != key_states.shape[0]:
                self._grow(key_states, max(end, self.room, 2 * (self._k.shape[-2] if self._k is not None else 0)))
            self._k[:self.batch, :, self.length:end].copy_(key_states)
            self._v[:self.batch, :, self.length:end].copy_(value_states)
            self.length = end
            self._views()
            return self.keys, self.values

        def _views(self) -> None:
            self.keys = self._k[:self.batch, :, :self.length]
            self.values = self._v[:self.batch, :, :self.length]

        def _grow(self, like, room: int) -> None:
            k, v = _buffers(like, like.shape[0], room, zeroed=False)
            if self.length:
                k[:, :, :self.length].copy_(self._k[:self.batch, :, :self.length])
                v[:, :, :self.length].copy_(self._v[:self.batch, :, :self.length])
            self._k, self._v, self.batch = k, v, like.shape[0]

        def get_seq_length(self) -> int:
            return self.length

        def put_rows(self, rows, keys, values, *, at: int, batch: int, length: int) -> None:
            """Write `keys`/`values` (rows x heads x t x dim) into rows `rows` of a `batch`-row
            cache, positions at..at+t, and make the cache `length` long. Positions no call wrote
            stay zero: they are padding, masked, and attention weighs them by exactly 0 (garbage
            could be NaN, and 0 x NaN is NaN)."""
            if not self.is_initialized:
                self.lazy_initialization(keys, values)
            if self._k is None:
                self._k, self._v = _buffers(keys, batch, max(self.room, length), zeroed=True)
                self.batch = batch
            self._k[rows, :, at:at + keys.shape[-2]] = keys
            self._v[rows, :, at:at + values.shape[-2]] = values
            self.length = length
            self._views()

        def drop_rows(self, holes, movers, kept: int) -> None:
            """Keep `kept` rows: the rows at `movers` are copied into `holes` (rows that left, all
            below `kept`), and the buffers' rows from `kept` on become spare (see `fill_holes`)."""
            if self.length and len(holes):
                self._k[holes, :, :self.length] = self._k[movers, :, :self.length]
                self._v[holes, :, :self.length] = self._v[movers, :, :self.length]
            self.batch = kept
            if self.length:
                self._views()

        def reset(self) -> None:
            self._k = self._v = None
            self.length = self.batch = 0
            super().reset()

        def crop(self, tokens_to_remove: int) -> None:
            raise NotImplementedError("greedy_decode never crops its cache")

        def batch_repeat_interleave(self, repeats: int) -> None:
            if self.length:
                self._k = self._k[:self.batch].repeat_interleave(repeats, dim=0)
                self._v = self._v[:self.batch].repeat_interleave(repeats, dim=0)
                self.batch *= repeats
                self._views()

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            if self.length:
                self._k, self._v = self._k[indices], self._v[indices]
                self.batch = len(indices)
                self._views()

    _RESERVED_LAYER = ReservedLayer
    return ReservedLayer


_RESERVED_LAYER = None


def _buffers(like, batch: int, room: int, *, zeroed: bool):
    """Key and value buffers of `batch` rows and `room` positions, with `like`'s heads, head size
    and device, in the dtype `_stored_dtype` picks; zero-filled or left uninitialised."""
    _, heads, _, dim = like.shape
    make = like.new_zeros if zeroed else like.new_empty
    dtype = _stored_dtype(like)
    return make((batch, heads, room, dim), dtype=dtype), make((batch, heads, room, dim), dtype=dtype)


def _stored_dtype(states):
    """The dtype to keep keys and values in: under autocast, the autocast dtype (attention, SDPA or
    eager matmuls, is an autocast op that casts them to it at every step anyway, so storing them cast
    once gives attention the same values); else their own. Measured on the default base under bf16
    autocast (32 prompts, <= 64 new tokens): the per-step casts of fp32 caches (rotary embeddings
    promote keys to fp32) were 0.67 s of `aten::copy_` in a 5.0 s profile."""
    import torch

    kind = states.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return states.dtype


def reserve_room(cache, room: int) -> bool:
    """Make every layer of `cache` (a fresh `DynamicCache` of plain full-attention layers) write its
    keys and values into `room` positions reserved ahead. Returns whether it did (False: another kind
    of layer, left as it is).

    Why: `DynamicLayer.update` concatenates, so every decoding step copies the whole cache, each
    layer's keys and values, to append one position. Measured on the default base in fp32 (32
    prompts of 36-76 tokens, answers of 23-64 tokens, 65 forward calls): `aten::cat` took 2.3 s of a
    9.6 s `greedy_decode` under the profiler, 24%, about what the arithmetic says: at batch 32 and
    ~100 positions a layer's keys and values are 2 x 32 x 3 heads x 100 x 64 x 4 bytes = 4.9 MB,
    x 30 layers = 147 MB copied per step. Here a step writes its one position; a row leaving the
    batch costs one row's copy (`drop_rows`, `fill_holes`)."""
    if not _cache_takes_prefix(cache) or not cache.layers:
        return False
    layer = _reserved_layer_class()
    cache.layers = [layer(room) for _ in cache.layers]
    return True


def fill_holes(keep: list[int]) -> tuple[list[int], list[int], list[int]]:
    """How a batch keeps the rows `keep` (ascending indices) by moving as few rows as it can:
    (order, holes, movers). The kept rows become rows 0..len(keep)-1; a row already there stays; each
    row that left from there (a hole) takes one kept row from beyond (a mover). `order[j]` is the row
    that new row j was.

    Why: gathering the kept rows (`batch_select_indices`) copies every kept row's keys and values each
    time a row ends; on the evaluation benchmark (32 rows, answers ending at ~20 distinct steps)
    that was `aten::index` 0.18 s of a 4.0 s bf16 profile. Filling holes copies at most one row per
    row that leaves. `greedy_decode` alone on those 32 prompts, 5 runs alternating with the gather (medians
    of runs 2-5): fp32 7.32 s -> 6.95 s, bf16 4.63 s -> 4.42 s, the same tokens."""
    kept = len(keep)
    stays = {r for r in keep if r < kept}
    holes = [r for r in range(kept) if r not in stays]
    movers = [r for r in keep if r >= kept]
    order = list(range(kept))
    for h, m in zip(holes, movers, strict=True):
        order[h] = m
    return order, holes, movers


def _drop_rows(cache, keep, reserved: bool):
    """Keep the rows `keep` (ascending) of `cache`; returns which old row each kept row is, in the
    cache's new order (`reserved` layers, see `reserve_room`, fill holes, `fill_holes`; others gather
    in order), on the CPU: it indexes the CPU row map and, as PyTorch allows a CPU index for a tensor
    on any device, the running tensors on the model's."""
    import torch

    if reserved:
        order, holes, movers = fill_holes(keep.tolist())
        holes, movers = torch.tensor(holes, dtype=torch.long), torch.tensor(movers, dtype=torch.long)
        for layer in cache.layers:
            layer.drop_rows(holes, movers, len(order))
        return torch.tensor(order, dtype=torch.long)
    cache.batch_select_indices(keep)
    return keep.cpu()


def last_position_only(model, device) -> dict:
    """Forward kwargs that make a prompt pass compute the logits of the last position only (`{}` for
    a model without `logits_to_keep`).

    Asked by index, not as `1`: the int slices the hidden states to a strided (rows, 1, hidden) view,
    and where the LM head's weight does not require grad (a frozen or merged model) and the view
    reaches it uncast (weights held in bf16, no autocast or bf16 autocast), torch.matmul does not
    fold it into one matrix product but broadcasts the weight to every row and copies it: on the
    default base in bf16, 13 rows x 49,152 x 576 x 2 bytes = 736 MB copied, ~1 s for what takes
    5 ms on a contiguous input. An index gathers a contiguous copy of the last positions, the same
    values. `greedy_decode` alone on the evaluation benchmark's 32 prompts with the weights held in
    bf16: 6.77 s -> 3.63 s, the same tokens."""
    import torch

    if "logits_to_keep" not in inspect.signature(model.forward).parameters:
        return {}
    return {"logits_to_keep": torch.tensor([-1], device=device)}


def greedy_decode(model, input_ids, attention_mask, *, max_new_tokens: int,
                  eos_token_ids: list[int], share_prefix: bool = True) -> list[list[int]]:
    """The generated token ids of each row (its end-of-sequence token included when it ended).

    Run under `torch.inference_mode()` (and the caller's autocast); `input_ids` left-padded.
    `share_prefix`: prefill the tokens every row starts with once (see the module docstring); False:
    every row prefills its whole prompt.
    """
    import torch
    from transformers import DynamicCache

    n = input_ids.shape[0]
    out: list[list[int]] = [[] for _ in range(n)]
    if max_new_tokens < 1 or n == 0:
        return out
    rows = torch.arange(n)  # which input row each row of the running batch is (on the CPU)
    eos = torch.tensor(eos_token_ids, dtype=torch.long, device=input_ids.device)
    cache = DynamicCache(config=model.config)
    plain_layers = _cache_takes_prefix(cache)
    # Room for the prompt and the answers, up to a bound (a large max_new_tokens grows as it goes).
    reserved = reserve_room(cache, input_ids.shape[1] + min(max_new_tokens, MAX_RESERVED_NEW_TOKENS))
    last_only = last_position_only(model, input_ids.device)
    shared = shared_prefix_length(input_ids, attention_mask) if share_prefix else 0
    if shared >= MIN_SHARED_PREFIX and plain_layers:
        input_ids, attention_mask = _prefill_shared_prefix(model, cache, input_ids, attention_mask, shared,
                                                           last_only)
    # Positions as `generate` makes them: padding does not count, so a row's positions are those it
    # has alone (with a shared prefix in the cache, the mask spans [prefix | padding | remainder] and
    # the remainder's positions continue from the prefix).
    positions = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
    positions = positions[:, attention_mask.shape[1] - input_ids.shape[1]:]
    mask = attention_mask
    if plain_layers:
        logits = _prefill(model, cache, input_ids, mask, positions, last_only)
    else:
        logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                       past_key_values=cache, use_cache=True, **last_only).logits[:, -1]
    position = positions[:, -1:] + 1
    for step in range(max_new_tokens):
        token = logits.float().argmax(-1)
        for row, t in zip(rows.tolist(), token.tolist(), strict=True):
            out[row].append(t)
        if step == max_new_tokens - 1:
            break
        done = torch.isin(token, eos)
        if bool(done.any()):
            keep = (~done).nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            order = _drop_rows(cache, keep, reserved)
            rows, token, mask, position = rows[order], token[order], mask[order], position[order]
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        logits = model(input_ids=token[:, None], attention_mask=mask, position_ids=position,
                       past_key_values=cache, use_cache=True).logits[:, -1]
        position = position + 1
    return out


def _prefill_shared_prefix(model, cache, input_ids, attention_mask, shared: int, last_only: dict):
    """Run the first `shared` tokens (the same in every row) once, as a batch of one, into `cache`
    (`_prefill` copies it to every row). Returns what the rows still have to prefill: their remainders,
    left-padded, and the attention mask over [prefix | padding | remainder] that the cache and the
    remainders make together."""
    import torch

    n, width = input_ids.shape
    lengths = attention_mask.sum(-1)
    start = int(width - lengths[0])  # where row 0's tokens (and so the prefix) begin
    prefix = input_ids[:1, start:start + shared]
    model(input_ids=prefix, attention_mask=attention_mask.new_ones((1, shared)),
          position_ids=torch.arange(shared, device=input_ids.device)[None],
          past_key_values=cache, use_cache=True, **last_only)
    # Each row [padding | prefix | remainder] without its prefix: [padding | remainder], still
    # left-padded, `shared` columns narrower.
    cols = torch.arange(width - shared, device=input_ids.device)[None].expand(n, -1)
    cols = cols + shared * (cols >= (width - lengths)[:, None])
    rest_ids, rest_mask = input_ids.gather(1, cols), attention_mask.gather(1, cols)
    return rest_ids, torch.cat([attention_mask.new_ones((n, shared)), rest_mask], dim=1)


# What one more prefill call costs, in token rows of prefill compute: a call streams every weight
# once whatever its rows (on this project's 2-core CPU, the Linear layers of the default base take
# ~23 ms at 1 row, against ~0.93 ms per row at 600 rows: 23 / 0.93 = ~25 rows), plus copying the
# shared prefix's cache to the group's rows and the group's cache into the batch's. Rounded up to 32.
GROUP_CALL_ROWS = 32


def length_groups(lengths: list[int], call_rows: int | None = None) -> list[list[int]]:
    """Rows (indices into `lengths`) grouped for prefill, each group padded to its longest row, so
    that (padded token rows + `call_rows` x groups) is least: rows sorted by length, then the best
    split of that order (dynamic programming over split points, O(rows^2))."""
    call_rows = GROUP_CALL_ROWS if call_rows is None else call_rows
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    sizes = [lengths[i] for i in order]
    best = [0] + [None] * len(sizes)  # best[j]: least cost of the first j rows of `order`
    cut = [0] * (len(sizes) + 1)
    for j in range(1, len(sizes) + 1):
        for i in range(j):
            cost = best[i] + (j - i) * sizes[j - 1] + call_rows
            if best[j] is None or cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], len(sizes)
    while j:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]


def _prefill(model, cache, input_ids, attention_mask, positions, last_only: dict):
    """Prefill the rows of a left-padded batch into `cache` (reserved layers, see `reserve_room`),
    which holds nothing or a shared prefix at batch 1 (`attention_mask` then spans [prefix |
    padding | remainder]); the logits of each row's last position.

    Rows of very different lengths are prefilled in groups (`length_groups`), each padded only to its
    own longest row, and their caches then placed into one batch cache, each row's tokens at the
    right end of the batch's width as one left-padded pass would have put them. Why: a batch pads
    every row to its longest; on the evaluation benchmark's 32 prompts (36-76 tokens, 20 shared) one
    pass prefills 32 x 56 = 1,792 token rows for 1,203 real ones (33% padding)."""
    import torch
    from transformers import DynamicCache

    n, width = input_ids.shape
    prefix = attention_mask.shape[1] - width
    lengths = attention_mask[:, prefix:].sum(-1).tolist()
    groups = length_groups(lengths)
    if len(groups) == 1:
        if prefix:
            cache.batch_repeat_interleave(n)
        return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                     past_key_values=cache, use_cache=True, **last_only).logits[:, -1]
    shared = [(layer.keys, layer.values) for layer in cache.layers] if prefix else None
    for layer in cache.layers:  # refilled below at batch n (`shared` keeps the prefix alive)
        layer.reset()
    logits = None
    for group in groups:
        rows = torch.tensor(group, device=input_ids.device)
        w = max(lengths[i] for i in group)
        sub = DynamicCache(config=model.config)
        reserve_room(sub, prefix + w)
        if shared:
            for layer, (k, v) in zip(sub.layers, shared, strict=True):
                layer.update(k.expand(len(group), -1, -1, -1), v.expand(len(group), -1, -1, -1))
        out = model(input_ids=input_ids[rows, width - w:],
                    attention_mask=torch.cat([attention_mask[rows, :prefix], attention_mask[rows, -w:]], dim=1),
                    position_ids=positions[rows, width - w:], past_key_values=sub, use_cache=True,
                    **last_only).logits[:, -1]
        if logits is None:
            logits = out.new_empty((n, out.shape[-1]))
        logits[rows] = out
        for layer, part in zip(cache.layers, sub.layers, strict=True):
            layer.put_rows(rows, part.keys[:, :, prefix:], part.values[:, :, prefix:],
                           at=prefix + width - w, batch=n, length=prefix + width)
    if shared:
        everyone = torch.arange(n, device=input_ids.device)
        for layer, (k, v) in zip(cache.layers, shared, strict=True):
            layer.put_rows(everyone, k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1), at=0, batch=n,
                           length=prefix + width)
    return logits
