"""GPT-2 decoder.

    x   = embed(tokens) + pos_embd[positions]
    for each layer:
        h = layernorm(x) ; q, k, v = h Wq + bq, h Wk + bk, h Wv + bv
        x = x + attention(q, K_cache, V_cache) Wo + bo
        h = layernorm(x) ; x = x + gelu_tanh(h Wup + bup) Wdown + bdown
    logits = layernorm(x) Wembd^T      (tied)
"""

from __future__ import annotations

from collections import namedtuple

import numpy as np

from core import kernels as K
from core.wfile import WeightsFile
from models.layers import Embedding, Linear, Norm


class GPT2Config(namedtuple("GPT2Config", [
    "dim",          # width of the residual stream
    "hidden_dim",   # width of the MLP's inner layer
    "n_layers",
    "n_heads",
    "vocab_size",
    "seq_len",      # learned positions: the hard context limit
    "norm_eps",
])):
    """A named tuple like LlamaConfig (no dataclasses on the path to a first token)."""
    __slots__ = ()

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def n_kv_heads(self) -> int:
        return self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.dim


class GPT2Layer:
    def __init__(self, wf: WeightsFile, l: int, cfg: GPT2Config):
        p = f"blk.{l}"
        self.attn_norm = Norm(wf, f"{p}.attn_norm", cfg.norm_eps)   # (dim,) + bias
        self.attn_q = Linear(wf, f"{p}.attn_q")                     # (dim, dim) + bias
        self.attn_k = Linear(wf, f"{p}.attn_k")
        self.attn_v = Linear(wf, f"{p}.attn_v")
        self.attn_output = Linear(wf, f"{p}.attn_output")
        self.ffn_norm = Norm(wf, f"{p}.ffn_norm", cfg.norm_eps)
        self.ffn_up = Linear(wf, f"{p}.ffn_up")                     # (hidden_dim, dim) + bias
        self.ffn_down = Linear(wf, f"{p}.ffn_down")                 # (dim, hidden_dim) + bias


class GPT2Weights:
    def __init__(self, wf: WeightsFile, cfg: GPT2Config):
        self.token_embd = Embedding(wf, "token_embd")               # (vocab, dim)
        self.pos_embd = wf.tensor("pos_embd.weight")                # (seq_len, dim)
        self.layers = [GPT2Layer(wf, l, cfg) for l in range(cfg.n_layers)]
        self.output_norm = Norm(wf, "output_norm", cfg.norm_eps)
        self.output = self.token_embd.as_linear()                   # (vocab, dim)


class RunState:
    def __init__(self, cfg: GPT2Config, max_rows: int):
        f32 = np.float32
        self.max_rows = max_rows
        self.x = np.zeros((max_rows, cfg.dim), f32)
        self.xb = np.zeros((max_rows, cfg.dim), f32)
        self.xb2 = np.zeros((max_rows, cfg.dim), f32)
        self.q = np.zeros((max_rows, cfg.dim), f32)
        self.k = np.zeros((max_rows, cfg.dim), f32)
        self.v = np.zeros((max_rows, cfg.dim), f32)
        self.att = np.zeros((max_rows, cfg.dim), f32)
        self.hb = np.zeros((max_rows, cfg.hidden_dim), f32)
        self.logits = np.empty((max_rows, cfg.vocab_size), f32)


def attention(cfg: GPT2Config, s: RunState, layer: GPT2Layer, kv_k, kv_v, batch, T: int) -> None:
    q, k, v = layer.attn_q(s.q[:T], s.xb[:T]), layer.attn_k(s.k[:T], s.xb[:T]), layer.attn_v(s.v[:T], s.xb[:T])
    K.kv_write(kv_k, kv_v, k, v, batch.slots)
    K.attention_paged(s.att[:T], q, kv_k, kv_v, batch.block_tables, batch.seq_ids, batch.positions,
                      cfg.n_heads, cfg.n_heads, batch.block_size, cfg.head_dim ** -0.5)
    layer.attn_output(s.xb2[:T], s.att[:T])


def mlp(s: RunState, layer: GPT2Layer, T: int) -> None:
    layer.ffn_up(s.hb[:T], s.xb[:T])
    K.gelu_tanh(s.hb[:T])
    layer.ffn_down(s.xb2[:T], s.hb[:T])


def forward(cfg: GPT2Config, w: GPT2Weights, s: RunState, cache, batch) -> np.ndarray:
    T = len(batch.tokens)
    x = s.x[:T]
    w.token_embd(x, batch.tokens)
    x += w.pos_embd[batch.positions]
    for l, layer in enumerate(w.layers):
        layer.attn_norm(s.xb[:T], x)
        attention(cfg, s, layer, cache.k[l], cache.v[l], batch, T)
        x += s.xb2[:T]
        layer.ffn_norm(s.xb[:T], x)
        mlp(s, layer, T)
        x += s.xb2[:T]
    return w.output_norm(s.xb[:T], x)
