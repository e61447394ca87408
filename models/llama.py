"""Llama-family decoder (Llama, SmolLM2, Qwen2 with QKV biases, Mistral-style GQA).

    x   = embed(tokens)
    for each layer:
        h = rmsnorm(x) ; q, k, v = h Wq (+bq), h Wk (+bk), h Wv (+bv) ; rope(q, k)
        x = x + attention(q, K_cache, V_cache) Wo
        h = rmsnorm(x) ; x = x + (silu(h Wgate) * (h Wup)) Wdown
    logits = rmsnorm(x) Wout           (Wout = token embedding when tied)

The forward pass reads rows of a Batch: tokens of one or several sequences at their positions,
their KV slots and the block tables of the paged cache.  Nothing allocates inside forward.
"""

from __future__ import annotations

from collections import namedtuple

from core import kernels as K
from core.wfile import WeightsFile
from models.layers import Embedding, Linear, Norm


class LlamaConfig(namedtuple("LlamaConfig", [
    "dim",              # width of the residual stream
    "hidden_dim",       # width of the FFN's inner layer
    "n_layers",
    "n_heads",          # query heads
    "n_kv_heads",       # key/value heads (grouped-query attention when < n_heads)
    "head_dim",
    "vocab_size",
    "seq_len",          # the model's context length
    "norm_eps",
    "rope_base",
    "rope_dim",         # leading dims of each head that rotate
    "rope_style",       # "neox" (pairs i, i + rope_dim/2) or "interleaved" (pairs 2i, 2i+1)
    "attn_bias",        # Qwen2: q, k and v projections have biases
    "tied_embeddings",  # logits head is the token embedding
])):
    """A named tuple, not a dataclass: `dataclasses` imports `inspect`, which a new process's
    first token would wait for (models/api.py)."""
    __slots__ = ()

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim


class LlamaLayer:
    def __init__(self, wf: WeightsFile, l: int, cfg: LlamaConfig):
        p = f"blk.{l}"
        self.attn_norm = Norm(wf, f"{p}.attn_norm", cfg.norm_eps)   # (dim,)
        self.attn_q = Linear(wf, f"{p}.attn_q")                     # (n_heads*head_dim, dim)
        self.attn_k = Linear(wf, f"{p}.attn_k")                     # (kv_dim, dim)
        self.attn_v = Linear(wf, f"{p}.attn_v")                     # (kv_dim, dim)
        self.attn_output = Linear(wf, f"{p}.attn_output")           # (dim, n_heads*head_dim)
        self.ffn_norm = Norm(wf, f"{p}.ffn_norm", cfg.norm_eps)     # (dim,)
        self.ffn_gate = Linear(wf, f"{p}.ffn_gate")                 # (hidden_dim, dim)
        self.ffn_up = Linear(wf, f"{p}.ffn_up")                     # (hidden_dim, dim)
        self.ffn_down = Linear(wf, f"{p}.ffn_down")                 # (dim, hidden_dim)


class LlamaWeights:
    def __init__(self, wf: WeightsFile, cfg: LlamaConfig):
        self.token_embd = Embedding(wf, "token_embd")                              # (vocab, dim)
        self.layers = [LlamaLayer(wf, l, cfg) for l in range(cfg.n_layers)]
        self.output_norm = Norm(wf, "output_norm", cfg.norm_eps)                   # (dim,)
        self.output = self.token_embd.as_linear() if cfg.tied_embeddings else Linear(wf, "output")  # (vocab, dim)


class RunState:
    """Scratch for up to max_rows rows per forward call, allocated once."""

    def __init__(self, cfg: LlamaConfig, max_rows: int):
        import numpy as np        # the Python forward's scratch (the native one allocates its own)

        f32 = np.float32
        self.max_rows = max_rows
        self.x = np.zeros((max_rows, cfg.dim), f32)                       # residual stream
        self.xb = np.zeros((max_rows, cfg.dim), f32)                      # normed input of a block
        self.xb2 = np.zeros((max_rows, cfg.dim), f32)                     # output of a block
        self.q = np.zeros((max_rows, cfg.n_heads * cfg.head_dim), f32)
        self.k = np.zeros((max_rows, cfg.kv_dim), f32)
        self.v = np.zeros((max_rows, cfg.kv_dim), f32)
        self.att = np.zeros((max_rows, cfg.n_heads * cfg.head_dim), f32)  # attention output, heads concatenated
        self.hb = np.zeros((max_rows, cfg.hidden_dim), f32)               # FFN gate, then silu(gate) * up
        self.hb2 = np.zeros((max_rows, cfg.hidden_dim), f32)              # FFN up
        self.logits = np.empty((max_rows, cfg.vocab_size), f32)


def attention(cfg: LlamaConfig, s: RunState, layer: LlamaLayer, kv_k, kv_v, batch, T: int) -> None:
    """s.xb -> s.xb2: rotary self-attention over the paged cache (this layer's kv_k, kv_v)."""
    q, k, v = layer.attn_q(s.q[:T], s.xb[:T]), layer.attn_k(s.k[:T], s.xb[:T]), layer.attn_v(s.v[:T], s.xb[:T])
    neox = cfg.rope_style == "neox"
    K.rope(q, batch.positions, cfg.n_heads, cfg.head_dim, cfg.rope_dim, cfg.rope_base, neox)
    K.rope(k, batch.positions, cfg.n_kv_heads, cfg.head_dim, cfg.rope_dim, cfg.rope_base, neox)
    K.kv_write(kv_k, kv_v, k, v, batch.slots)
    K.attention_paged(s.att[:T], q, kv_k, kv_v, batch.block_tables, batch.seq_ids, batch.positions,
                      cfg.n_heads, cfg.n_kv_heads, batch.block_size, cfg.head_dim ** -0.5)
    layer.attn_output(s.xb2[:T], s.att[:T])


def ffn(s: RunState, layer: LlamaLayer, T: int) -> None:
    """s.xb -> s.xb2: SiLU-gated feed-forward."""
    layer.ffn_gate(s.hb[:T], s.xb[:T])
    layer.ffn_up(s.hb2[:T], s.xb[:T])
    K.silu_mul(s.hb[:T], s.hb[:T], s.hb2[:T])
    layer.ffn_down(s.xb2[:T], s.hb[:T])


def forward(cfg: LlamaConfig, w: LlamaWeights, s: RunState, cache, batch) -> np.ndarray:
    """Run batch.tokens (T <= s.max_rows rows) through the model; returns the final hidden
    states (T, dim), already normed, as a view of s.xb.  Writes the rows' K and V into the cache."""
    T = len(batch.tokens)
    x = s.x[:T]
    w.token_embd(x, batch.tokens)
    for l, layer in enumerate(w.layers):
        layer.attn_norm(s.xb[:T], x)
        attention(cfg, s, layer, cache.k[l], cache.v[l], batch, T)
        x += s.xb2[:T]
        layer.ffn_norm(s.xb[:T], x)
        ffn(s, layer, T)
        x += s.xb2[:T]
    return w.output_norm(s.xb[:T], x)


def native_forward(cfg: LlamaConfig, wf: WeightsFile, cache, max_rows: int):
    """forward() over this weights file and cache, in one native call per step, with the logits
    head (models/_llama_native.pyx; this file's forward and LlamaWeights.output are its twin)."""
    from models._llama_native import LlamaNative
    return LlamaNative(cfg, wf, cache, max_rows)
