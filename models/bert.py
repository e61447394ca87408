"""BERT encoder (all-MiniLM-L6-v2 and other sentence-embedding / classification BERTs).

    x = layernorm(embed(tokens) + pos_embd[positions] + type_embd[0])
    for each layer (post-norm):
        x = layernorm(x + attention(x Wq + bq, x Wk + bk, x Wv + bv) Wo + bo)
        x = layernorm(x + gelu(x Wup + bup) Wdown + bdown)
    sentence embedding = normalize(mean of x over the sentence's tokens)   (or its [CLS] row)
    classification     = softmax(tanh(x[CLS] Wpool + bpool) Wcls + bcls)

A batch is packed: the sentences' tokens are concatenated without padding, and each row attends
to the rows of its own sentence (attention_varlen).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from core import kernels as K
from core.wfile import WeightsFile
from models.layers import Linear, Norm, project


@dataclass(frozen=True)
class BertConfig:
    dim: int                 # width of the hidden states
    hidden_dim: int          # width of the FFN's inner layer
    n_layers: int
    n_heads: int
    vocab_size: int
    seq_len: int             # learned positions
    type_vocab_size: int
    norm_eps: float
    max_tokens: int = 512    # inputs are truncated to this many tokens ([CLS] and [SEP] included)
    pooling: str = "mean"    # "mean" or "cls"
    normalize: bool = True   # L2-normalise sentence embeddings
    labels: list = field(default_factory=list)  # classifier's label names, when it has one

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


class BertLayer:
    def __init__(self, wf: WeightsFile, l: int, cfg: BertConfig):
        p = f"blk.{l}"
        self.attn_q = Linear(wf, f"{p}.attn_q")                     # (dim, dim) + bias
        self.attn_k = Linear(wf, f"{p}.attn_k")
        self.attn_v = Linear(wf, f"{p}.attn_v")
        self.attn_output = Linear(wf, f"{p}.attn_output")
        self.attn_norm = Norm(wf, f"{p}.attn_norm", cfg.norm_eps)   # after the residual add
        self.ffn_up = Linear(wf, f"{p}.ffn_up")                     # (hidden_dim, dim) + bias
        self.ffn_down = Linear(wf, f"{p}.ffn_down")                 # (dim, hidden_dim) + bias
        self.ffn_norm = Norm(wf, f"{p}.ffn_norm", cfg.norm_eps)


class BertWeights:
    def __init__(self, wf: WeightsFile, cfg: BertConfig):
        self.token_embd = wf.tensor("token_embd.weight")            # (vocab, dim)
        self.pos_embd = wf.tensor("pos_embd.weight")                # (seq_len, dim)
        self.type_embd = wf.tensor("type_embd.weight")              # (type_vocab, dim)
        self.embd_norm = Norm(wf, "embd_norm", cfg.norm_eps)
        self.layers = [BertLayer(wf, l, cfg) for l in range(cfg.n_layers)]
        self.pooler = Linear(wf, "pooler") if "pooler.weight" in wf else None           # (dim, dim)
        self.classifier = Linear(wf, "classifier") if "classifier.weight" in wf else None  # (n_labels, dim)


class RunState:
    def __init__(self, cfg: BertConfig, max_rows: int):
        f32 = np.float32
        self.max_rows = max_rows
        self.x = np.zeros((max_rows, cfg.dim), f32)
        self.h = np.zeros((max_rows, cfg.dim), f32)
        self.q = np.zeros((max_rows, cfg.dim), f32)
        self.k = np.zeros((max_rows, cfg.dim), f32)
        self.v = np.zeros((max_rows, cfg.dim), f32)
        self.att = np.zeros((max_rows, cfg.dim), f32)
        self.hb = np.zeros((max_rows, cfg.hidden_dim), f32)


@dataclass
class PackedBatch:
    tokens: np.ndarray      # (T,) int32, sentences concatenated
    positions: np.ndarray   # (T,) int32, position within its sentence
    key_start: np.ndarray   # (T,) int32, first row of the row's sentence
    key_end: np.ndarray     # (T,) int32, one past its last row
    starts: list            # first row of each sentence


def pack(sentences: list[list[int]]) -> PackedBatch:
    lens = [len(s) for s in sentences]
    starts = np.cumsum([0] + lens[:-1]).astype(np.int32)
    return PackedBatch(
        tokens=np.concatenate([np.asarray(s, np.int32) for s in sentences]),
        positions=np.concatenate([np.arange(n, dtype=np.int32) for n in lens]),
        key_start=np.repeat(starts, lens).astype(np.int32),
        key_end=np.repeat(starts + np.asarray(lens, np.int32), lens).astype(np.int32),
        starts=starts.tolist(),
    )


def embed(w: BertWeights, s: RunState, batch: PackedBatch, T: int) -> None:
    # gathered into the run state's rows, not into temporaries: a batch of 32 x 128 rows made two
    # 6 MB arrays a call, fresh pages each time (page faults were 1.2% of its time)
    np.take(w.token_embd, batch.tokens, axis=0, out=s.h[:T])
    np.take(w.pos_embd, batch.positions, axis=0, out=s.q[:T])
    s.h[:T] += s.q[:T]
    s.h[:T] += w.type_embd[0]
    w.embd_norm(s.x[:T], s.h[:T])


def attention(cfg: BertConfig, s: RunState, layer: BertLayer, batch: PackedBatch, T: int) -> None:
    """s.x -> s.h: bidirectional self-attention within each sentence (the residual is added by
    the norm that follows)."""
    q, k, v = project([layer.attn_q, layer.attn_k, layer.attn_v], [s.q[:T], s.k[:T], s.v[:T]], s.x[:T])
    K.attention_varlen(s.att[:T], q, k, v, batch.key_start, batch.key_end, cfg.n_heads, cfg.n_heads,
                       cfg.head_dim ** -0.5)
    layer.attn_output(s.h[:T], s.att[:T])


def ffn(s: RunState, layer: BertLayer, T: int) -> None:
    """s.x -> s.h: GELU feed-forward (the residual is added by the norm that follows)."""
    layer.ffn_up(s.hb[:T], s.x[:T])
    K.gelu_erf(s.hb[:T])
    layer.ffn_down(s.h[:T], s.hb[:T])


def forward(cfg: BertConfig, w: BertWeights, s: RunState, batch: PackedBatch) -> np.ndarray:
    """Hidden states (T, dim) of a packed batch, a view of s.x."""
    T = len(batch.tokens)
    embed(w, s, batch, T)
    for layer in w.layers:
        attention(cfg, s, layer, batch, T)
        layer.attn_norm(s.x[:T], s.h[:T], residual=s.x[:T])      # x = norm(attention(x) + x)
        ffn(s, layer, T)
        layer.ffn_norm(s.x[:T], s.h[:T], residual=s.x[:T])       # x = norm(ffn(x) + x)
    return s.x[:T]


def pool(cfg: BertConfig, hidden: np.ndarray, batch: PackedBatch) -> np.ndarray:
    """One vector per sentence: mean over its rows (or its [CLS] row), L2-normalised if configured."""
    starts = batch.starts
    if cfg.pooling == "cls":
        out = hidden[starts].astype(np.float32)
    else:
        out = np.add.reduceat(hidden, starts, axis=0) / np.diff(starts + [len(hidden)])[:, None]
    if cfg.normalize:
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out.astype(np.float32)


def classify(w: BertWeights, hidden: np.ndarray, batch: PackedBatch) -> np.ndarray:
    """Class probabilities (n_sentences, n_labels) from each sentence's [CLS] row."""
    cls = np.ascontiguousarray(hidden[batch.starts])
    pooled = np.empty((len(cls), cls.shape[1]), np.float32)
    np.tanh(w.pooler(pooled, cls), out=pooled)
    logits = np.empty((len(cls), w.classifier.n_out), np.float32)
    w.classifier(logits, pooled)
    K.softmax_inplace(logits)
    return logits
