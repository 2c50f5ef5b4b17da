"""Test helper: a tiny, deterministic Llama-architecture GGUF file.

Not a test module (no `test_` prefix): tests import `write_tiny_gguf` to get a GGUF that loads in
milliseconds with transformers' GGUF loader, instead of the ~100 MB real base model.

The tokenizer is a byte-level BPE (`tokenizer.ggml.model = "gpt2"`), the same kind SmolLM2 ships:
transformers 5.x rebuilds it from the GGUF metadata with `GPT2Tokenizer(vocab=..., merges=...)`, which
needs every one of the 256 byte-alphabet symbols in the vocabulary (else unseen bytes cannot be
encoded) and every merge's two halves and result to be tokens. Control tokens (token type 3) become
special tokens, so the ChatML markers stay whole.
"""

from __future__ import annotations

from pathlib import Path

# Mirrors SmolLM2's layout: the three ChatML control tokens first, so bos/eos/pad ids match it.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2

# A ChatML template, like SmolLM2-Instruct's, so chat-template handling is exercised end to end.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Hand-picked merges (in the byte-level alphabet, where "Ġ" is a space) so that common English
# splits into multi-byte tokens and the merge path of the tokenizer is really used.
_MERGES = (
    "Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "r e", "Ġ s", "a t", "e n", "Ġ w", "Ġ h",
    "Ġ i", "l l", "o u", "Ġ c", "in g", "Ġ o", "e s", "Ġ b", "o r", "Ġ f", "e d", "Ġ m", "a n",
    "Ġ d", "l o", "Ġ l", "Ġh e", "ll o", "Ġhe llo", "Ġw or", "Ġwor l", "Ġworl d", "H e", "He llo",
    "Ġa n", "Ġan d", "Ġ 1", "Ġ 2",
)

HIDDEN = 32
LAYERS = 2
HEADS = 4
KV_HEADS = 2  # grouped-query attention, as in SmolLM2, so the k/v reshapes are exercised
FFN = 64
CONTEXT = 256


def tiny_vocab() -> tuple[list[str], list[str]]:
    """The tiny tokenizer's `(tokens, merges)`: specials, the 256 byte symbols, then merge results."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_symbols = [bytes_to_unicode()[b] for b in range(256)]
    tokens = [*SPECIAL_TOKENS, *byte_symbols]
    known = set(tokens)
    for merge in _MERGES:
        left, right = merge.split(" ")
        # A merge whose halves are not yet tokens would make the BPE model reject the vocabulary.
        assert left in known and right in known, merge
        if left + right not in known:
            tokens.append(left + right)
            known.add(left + right)
    return tokens, list(_MERGES)


def write_tiny_gguf(path: Path, *, seed: int = 0, tie_embeddings: bool = True) -> Path:
    """Write a tiny random Llama GGUF (F32 tensors, ~300-token BPE vocab, chat template) to `path`.

    Deterministic for a given `seed`. With `tie_embeddings=False` an `output.weight` tensor is
    written too, which transformers reads as `tie_word_embeddings=False`.
    """
    import gguf
    import numpy as np

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokens, merges = tiny_vocab()
    vocab = len(tokens)
    head_dim = HIDDEN // HEADS
    rng = np.random.default_rng(seed)

    def weight(*shape: int) -> np.ndarray:
        # Large enough that logits differ clearly between positions; float32 as GGML F32.
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    def norm() -> np.ndarray:
        return (1.0 + rng.standard_normal(HIDDEN) * 0.05).astype(np.float32)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-random-llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")  # no special split regex in transformers: GPT-2's default
    writer.add_token_list(tokens)
    writer.add_token_types(
        [gguf.TokenType.CONTROL if t in SPECIAL_TOKENS else gguf.TokenType.NORMAL for t in tokens]
    )
    writer.add_token_merges(merges)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_unk_token_id(UNK_ID)
    writer.add_pad_token_id(EOS_ID)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    # numpy shapes are (out_features, in_features), as torch's; GGUFWriter reverses them to ggml order.
    writer.add_tensor("token_embd.weight", weight(vocab, HIDDEN))
    for i in range(LAYERS):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", norm())
        writer.add_tensor(f"blk.{i}.attn_q.weight", weight(HEADS * head_dim, HIDDEN))
        writer.add_tensor(f"blk.{i}.attn_k.weight", weight(KV_HEADS * head_dim, HIDDEN))
        writer.add_tensor(f"blk.{i}.attn_v.weight", weight(KV_HEADS * head_dim, HIDDEN))
        writer.add_tensor(f"blk.{i}.attn_output.weight", weight(HIDDEN, HEADS * head_dim))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", norm())
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", weight(FFN, HIDDEN))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", weight(FFN, HIDDEN))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", weight(HIDDEN, FFN))
    writer.add_tensor("output_norm.weight", norm())
    if not tie_embeddings:
        writer.add_tensor("output.weight", weight(vocab, HIDDEN))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
