"""Load a GGUF checkpoint (llama.cpp's format) into a Checkpoint.

Tensors of any type the `gguf` package knows (F32, F16, BF16, Q8_0, Q4_0, Q4_1, K-quants...) are
dequantized to fp32 with gguf.quants.dequantize.  GGUF lists shapes innermost-first; the reader's
data views are already in numpy (row-major) order, which is ours.  GGUF's tensor names are ours.

Llama checkpoints in GGUF carry Q and K rows permuted for the interleaved rotary pairing
(llama.cpp's convert script does that); we keep them and record rope_style "interleaved".
Qwen2 keeps the Hugging Face layout: rope_style "neox".

The tokenizer is rebuilt from the tokenizer.ggml.* metadata as a `tokenizers` byte-level BPE with
the pre-tokenizer that llama.cpp's tokenizer.ggml.pre names.
"""

from __future__ import annotations

import json

import numpy as np

from core.errors import ConversionError
from models.convert import Checkpoint

# tokenizer.ggml.pre -> split regex applied before byte-level BPE (None: GPT-2's own regex)
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {
    "default": ("gpt2", None),
    "gpt2": ("gpt2", None),
    "smollm": ("digits+gpt2", None),
    "llama-bpe": ("split", LLAMA3_SPLIT),
    "llama3": ("split", LLAMA3_SPLIT),
    "qwen2": ("split", QWEN2_SPLIT),
}
TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED = 3, 4


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def build_tokenizer_json(reader) -> str:
    """tokenizer.json text for the byte-level BPE vocabulary in a GGUF file's metadata."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ConversionError(f"GGUF tokenizer model {kind!r} is not supported yet (only byte-level BPE, 'gpt2')")
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise ConversionError(f"GGUF pre-tokenizer {pre!r} is not supported; known: {', '.join(PRE_TOKENIZERS)}")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    merges = _field(reader, "tokenizer.ggml.merges", [])
    types = _field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges]))
    style, regex = PRE_TOKENIZERS[pre]
    if style == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif style == "digits+gpt2":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types)
               if ty in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED)]
    tok.add_special_tokens(special)
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    if _field(reader, "tokenizer.ggml.add_bos_token", False) and bos is not None:
        from tokenizers import processors
        tok.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A {tokens[bos]} $B",
            special_tokens=[(tokens[bos], bos)])
    return tok.to_str()


def load_gguf(path: str) -> Checkpoint:
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the gguf package raises plain ValueError/struct errors on damage
        raise ConversionError(f"{path}: cannot read GGUF file ({e})") from None
    arch = _field(reader, "general.architecture")
    if arch not in ("llama", "qwen2"):
        raise ConversionError(f"{path}: GGUF architecture {arch!r} is not supported (llama, qwen2)")

    def key(name, default=None):
        v = _field(reader, f"{arch}.{name}", default)
        if v is None:
            raise ConversionError(f"{path}: GGUF metadata lacks {arch}.{name}")
        return v

    tensors = {t.name: t for t in reader.tensors}
    n_heads = int(key("attention.head_count"))
    dim = int(key("embedding_length"))
    head_dim = dim // n_heads
    vocab = len(_field(reader, "tokenizer.ggml.tokens", []))
    config = {
        "dim": dim,
        "hidden_dim": int(key("feed_forward_length")),
        "n_layers": int(key("block_count")),
        "n_heads": n_heads,
        "n_kv_heads": int(key("attention.head_count_kv", n_heads)),
        "head_dim": head_dim,
        "vocab_size": int(_field(reader, f"{arch}.vocab_size", vocab) or vocab),
        "seq_len": int(key("context_length")),
        "norm_eps": float(key("attention.layer_norm_rms_epsilon")),
        "rope_base": float(key("rope.freq_base", 10000.0)),
        "rope_dim": int(key("rope.dimension_count", head_dim)),
        "rope_style": "interleaved" if arch == "llama" else "neox",
        "attn_bias": "blk.0.attn_q.bias" in tensors,
        "tied_embeddings": "output.weight" not in tensors,
    }

    def loader(t):
        def load():
            if t.tensor_type in (gguf.GGMLQuantizationType.F32,):
                a = np.asarray(t.data, dtype=np.float32)
            else:
                a = gguf.quants.dequantize(t.data, t.tensor_type)
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            return np.asarray(a, dtype=np.float32).reshape(shape)
        return load

    meta = {
        "source": {"format": "gguf", "path": path, "name": _field(reader, "general.name")},
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "chat_template": _field(reader, "tokenizer.chat_template"),
    }
    meta = {k: (int(v) if isinstance(v, (np.integer,)) else v) for k, v in meta.items()}
    json.dumps(meta)  # metadata must serialise; fail here rather than mid-write
    return Checkpoint("llama", config, meta, build_tokenizer_json(reader),
                      {name: loader(t) for name, t in tensors.items()})
