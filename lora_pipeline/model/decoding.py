"""Greedy decoding of a left-padded batch in which a row leaves the batch at its end-of-sequence token.

Why not `model.generate`: it keeps every finished row in the batch, generating padding for it until
the longest answer ends, so a batch costs (rows x longest answer) decoder rows. Here a finished row's
KV cache is dropped (`DynamicCache.batch_select_indices`) and the next steps run on the rows still
going. Measured on the default base (SmolLM2-135M, fp32, one thread, process CPU time; 32 sentences
in one batch, up to 64 new tokens, answers of 10 to 64 tokens, mean 31): 23.3 s with `generate`,
16.8 s here (1.39x), the same tokens for all 32 rows; bf16 autocast: 118 s against 86 s, 32/32 the
same. With equal-length answers there is nothing to drop and both take the same time (8 x 24 tokens:
5.1 s and 4.9 s).

Measured and not kept: a static KV cache with `torch.compile` (transformers' `cache_implementation=
"static"`) on the same CPU: the first call compiles for 84 s, later calls take 4.4 s against 3.9 s
with the dynamic cache (8 sentences x 24 tokens); a static cache without compiling: 4.0 s. A CPU
decoder step of a 135M model is bound by its matmuls, not by the Python overhead compiling removes,
and each new batch shape would compile again.

Same answers: the logits of a row do not depend on which other rows share its batch (left padding
with an attention mask; tests/per_step/test_decoding.py checks the tokens against `model.generate`
in fp32), and the argmax is taken over fp32 logits, as `generate` takes it.
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


def greedy_decode(model, input_ids, attention_mask, *, max_new_tokens: int,
                  eos_token_ids: list[int]) -> list[list[int]]:
    """The generated token ids of each row (its end-of-sequence token included when it ended).

    Run under `torch.inference_mode()` (and the caller's autocast); `input_ids` left-padded.
    """
    import torch
    from transformers import DynamicCache

    n = input_ids.shape[0]
    out: list[list[int]] = [[] for _ in range(n)]
    if max_new_tokens < 1 or n == 0:
        return out
    rows = torch.arange(n)  # which input row each row of the running batch is
    eos = torch.tensor(eos_token_ids, dtype=torch.long)
    cache = DynamicCache(config=model.config)
    # Positions as `generate` makes them: padding does not count, so a row's positions are those it
    # has alone.
    positions = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
    mask = attention_mask
    # The prompt pass needs the logits of the last position only.
    last_only = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
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
            cache.batch_select_indices(keep)
            rows, token, mask, position = rows[keep], token[keep], mask[keep], position[keep]
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        logits = model(input_ids=token[:, None], attention_mask=mask, position_ids=position,
                       past_key_values=cache, use_cache=True).logits[:, -1]
        position = position + 1
    return out
