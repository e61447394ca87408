"""models/llama.py's forward pass in one native call: the same equations, the same kernels, no
return to Python between layers.

    x   = embed(tokens)
    for each layer:
        h = rmsnorm(x) ; q, k, v = h Wq (+bq), h Wk (+bk), h Wv (+bv) ; rope(q, k)
        x = x + attention(q, K_cache, V_cache) Wo
        h = rmsnorm(x) ; x = x + (silu(h Wgate) * (h Wup)) Wdown
    h = rmsnorm(x)                     (the logits head stays with the caller)

A decode step makes about 360 kernel calls; from Python each costs a few microseconds of argument
checking and buffer acquisition, a fifth of the step at 135M parameters.  Here the batch is checked
once, then everything runs without the GIL.  int8 projections that read the same input (q, k, v;
gate, up) share one quantization of it and one parallel region.  The Python forward is the twin:
tests/test_native.py checks that the two agree bit for bit.
"""
from libc.stdint cimport int8_t, int32_t, uint16_t
from libc.stdlib cimport calloc, free

from core.kernels._activations cimport silu_mul_rows
from core.kernels._attention cimport attention_paged_rows, check_paged_rows, kv_write_rows
from core.kernels._embedding cimport embed_f32_rows, embed_q8_rows
from core.kernels._matmul cimport MAX_SHARED, _matmul_f32, _matmul_q8_shared
from core.kernels._norms cimport rmsnorm_rows
from core.kernels._rope cimport rope_rows

import numpy as np


cdef struct Proj:                 # one linear layer: int8 (w, scale) or fp32 (wf), optional bias
    const int8_t *w
    const uint16_t *scale
    const float *wf
    const float *bias
    int n_out


cdef struct Layer:
    const float *attn_norm
    const float *ffn_norm
    Proj q, k, v, o, gate, up, down
    float *k_cache
    float *v_cache


cdef size_t _addr(a, dtype, name) except 0:
    """The address of a C-contiguous array of the given dtype (kept alive by the caller)."""
    if a.dtype != dtype or not a.flags["C_CONTIGUOUS"] or a.size == 0:
        raise ValueError(f"native forward: {name} must be a non-empty C-contiguous {dtype} array")
    return a.__array_interface__["data"][0]


cdef Proj _proj(linear, name) except *:
    cdef Proj p
    p.w = NULL
    p.scale = NULL
    p.wf = NULL
    p.bias = NULL
    p.n_out = linear.n_out
    if linear.quantized:
        p.w = <const int8_t *> _addr(linear.weight, np.int8, name)
        p.scale = <const uint16_t *> _addr(linear.scale, np.uint16, name + ".scale")
    else:
        p.wf = <const float *> _addr(linear.weight, np.float32, name)
    if linear.bias is not None:
        p.bias = <const float *> _addr(linear.bias, np.float32, name + ".bias")
    return p


cdef void _project(int n, Proj *projs, float **outs, const float *x, int T, int K) noexcept nogil:
    """outs[i] = x @ W_i.T (+ b_i) for n projections of one input: int8 ones in one shared call."""
    cdef const int8_t *w[MAX_SHARED]
    cdef const uint16_t *scales[MAX_SHARED]
    cdef const float *biases[MAX_SHARED]
    cdef int Ns[MAX_SHARED]
    cdef int i
    if projs[0].w != NULL:
        for i in range(n):
            w[i] = projs[i].w
            scales[i] = projs[i].scale
            biases[i] = projs[i].bias
            Ns[i] = projs[i].n_out
        _matmul_q8_shared(n, outs, w, scales, biases, Ns, x, T, K)
    else:
        for i in range(n):
            _matmul_f32(outs[i], x, projs[i].wf, projs[i].bias, T, projs[i].n_out, K)


cdef void _add_rows(float *x, const float *y, size_t n) noexcept nogil:
    cdef size_t i
    for i in range(n):
        x[i] = x[i] + y[i]


cdef class LlamaNative:
    """Pointers into the weights file, the run state and the KV cache of one DecoderModel, taken
    once; forward(batch) runs models.llama.forward on them."""
    cdef Layer *layers
    cdef int n_layers, dim, hidden, n_heads, n_kv_heads, head_dim, rope_dim, vocab, max_rows, n_slots
    cdef int block_size, n_blocks
    cdef double rope_base
    cdef bint neox
    cdef float eps, attn_scale
    cdef const int8_t *embd_q
    cdef const uint16_t *embd_scale
    cdef const float *embd_f32
    cdef const float *output_norm
    cdef float *x
    cdef float *xb
    cdef float *xb2
    cdef float *q
    cdef float *k
    cdef float *v
    cdef float *att
    cdef float *hb
    cdef float *hb2
    cdef object keep

    def __cinit__(self):
        self.layers = NULL

    def __init__(self, cfg, weights, state, cache):
        self.keep = (weights, state, cache)
        self.n_layers, self.dim, self.hidden = cfg.n_layers, cfg.dim, cfg.hidden_dim
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.rope_dim, self.rope_base, self.neox = cfg.rope_dim, cfg.rope_base, cfg.rope_style == "neox"
        self.vocab, self.eps, self.attn_scale = cfg.vocab_size, cfg.norm_eps, cfg.head_dim ** -0.5
        self.max_rows = state.max_rows
        self.block_size, self.n_blocks = cache.block_size, cache.n_blocks
        self.n_slots = cache.n_blocks * cache.block_size
        embd = weights.token_embd
        self.embd_q, self.embd_scale, self.embd_f32 = NULL, NULL, NULL
        if embd.scale is not None:
            self.embd_q = <const int8_t *> _addr(embd.weight, np.int8, "token_embd")
            self.embd_scale = <const uint16_t *> _addr(embd.scale, np.uint16, "token_embd.scale")
        else:
            self.embd_f32 = <const float *> _addr(embd.weight, np.float32, "token_embd")
        self.output_norm = <const float *> _addr(weights.output_norm.weight, np.float32, "output_norm")
        self.x = <float *> _addr(state.x, np.float32, "x")
        self.xb = <float *> _addr(state.xb, np.float32, "xb")
        self.xb2 = <float *> _addr(state.xb2, np.float32, "xb2")
        self.q = <float *> _addr(state.q, np.float32, "q")
        self.k = <float *> _addr(state.k, np.float32, "k")
        self.v = <float *> _addr(state.v, np.float32, "v")
        self.att = <float *> _addr(state.att, np.float32, "att")
        self.hb = <float *> _addr(state.hb, np.float32, "hb")
        self.hb2 = <float *> _addr(state.hb2, np.float32, "hb2")
        self.layers = <Layer *> calloc(self.n_layers, sizeof(Layer))
        if self.layers == NULL:
            raise MemoryError()
        cdef Layer *L
        for l, layer in enumerate(weights.layers):
            L = &self.layers[l]
            L.attn_norm = <const float *> _addr(layer.attn_norm.weight, np.float32, f"blk.{l}.attn_norm")
            L.ffn_norm = <const float *> _addr(layer.ffn_norm.weight, np.float32, f"blk.{l}.ffn_norm")
            L.q, L.k, L.v = _proj(layer.attn_q, f"blk.{l}.attn_q"), _proj(layer.attn_k, f"blk.{l}.attn_k"), \
                _proj(layer.attn_v, f"blk.{l}.attn_v")
            L.o = _proj(layer.attn_output, f"blk.{l}.attn_output")
            L.gate, L.up = _proj(layer.ffn_gate, f"blk.{l}.ffn_gate"), _proj(layer.ffn_up, f"blk.{l}.ffn_up")
            L.down = _proj(layer.ffn_down, f"blk.{l}.ffn_down")
            L.k_cache = <float *> _addr(cache.k[l], np.float32, "k cache")
            L.v_cache = <float *> _addr(cache.v[l], np.float32, "v cache")
            if L.q.w != NULL and not (L.k.w != NULL and L.v.w != NULL and L.gate.w != NULL and L.up.w != NULL):
                raise ValueError("native forward: a layer mixes int8 and fp32 projections")

    def __dealloc__(self):
        free(self.layers)

    def __call__(self, cfg, weights, state, cache, batch):
        """models.llama.forward(cfg, weights, state, cache, batch), natively (the first four must be
        the ones this object was made from).  Returns the final normed hidden rows, a view of state.xb."""
        if state is not self.keep[1] or cache is not self.keep[2]:
            raise ValueError("native forward: called with another run state or cache")
        cdef const int32_t[::1] tokens = batch.tokens, positions = batch.positions
        cdef const int32_t[::1] seq_ids = batch.seq_ids, slots = batch.slots
        cdef const int32_t[:, ::1] tables = batch.block_tables
        cdef int T = tokens.shape[0], t, bad = -1, max_pos = 0
        if not 0 < T <= self.max_rows:
            raise ValueError(f"native forward: {T} rows, expected 1..{self.max_rows}")
        if positions.shape[0] != T or seq_ids.shape[0] != T or slots.shape[0] != T:
            raise ValueError("native forward: tokens, positions, seq_ids and slots must have T rows")
        if batch.block_size != self.block_size:
            raise ValueError("native forward: the batch's block size is not the cache's")
        for t in range(T):
            if not 0 <= tokens[t] < self.vocab:
                raise IndexError(f"token id {tokens[t]} is outside the vocabulary of {self.vocab}")
            if not 0 <= slots[t] < self.n_slots:
                raise ValueError(f"kv_write: slot {slots[t]} is outside the cache of {self.n_slots}")
            max_pos = positions[t] if positions[t] > max_pos else max_pos
        if tables.shape[1] == 0:
            bad = 0
        else:
            bad = check_paged_rows(&tables[0, 0], tables.shape[0], tables.shape[1], self.n_blocks,
                                   &seq_ids[0], &positions[0], T, self.block_size)
        if bad >= 0:
            raise ValueError(f"attention: row {bad} names a sequence, position or KV block outside the cache")
        with nogil:
            self._forward(T, &tokens[0], &positions[0], &seq_ids[0], &slots[0], &tables[0, 0],
                          tables.shape[1], max_pos)
        return state.xb[:T]

    cdef void _forward(self, int T, const int32_t *tokens, const int32_t *positions, const int32_t *seq_ids,
                       const int32_t *slots, const int32_t *tables, int max_blocks, int max_pos) noexcept nogil:
        cdef int dim = self.dim, kv_dim = self.n_kv_heads * self.head_dim, l
        cdef Layer *L
        cdef Proj projs[3]
        cdef float *outs[3]
        if self.embd_q != NULL:
            embed_q8_rows(self.x, tokens, self.embd_q, self.embd_scale, T, dim)
        else:
            embed_f32_rows(self.x, tokens, self.embd_f32, T, dim)
        for l in range(self.n_layers):
            L = &self.layers[l]
            # attention block
            rmsnorm_rows(self.xb, self.x, L.attn_norm, T, dim, self.eps)
            projs[0], projs[1], projs[2] = L.q, L.k, L.v
            outs[0], outs[1], outs[2] = self.q, self.k, self.v
            _project(3, projs, outs, self.xb, T, dim)
            rope_rows(self.q, positions, T, self.n_heads, self.head_dim, self.rope_dim, self.rope_base, self.neox)
            rope_rows(self.k, positions, T, self.n_kv_heads, self.head_dim, self.rope_dim, self.rope_base, self.neox)
            kv_write_rows(L.k_cache, L.v_cache, self.k, self.v, slots, T, kv_dim)
            attention_paged_rows(self.att, self.q, L.k_cache, L.v_cache, tables, max_blocks, seq_ids, positions,
                                 T, max_pos, self.n_heads, self.n_kv_heads, self.head_dim, self.block_size,
                                 self.attn_scale)
            _project(1, &L.o, &self.xb2, self.att, T, self.n_heads * self.head_dim)
            _add_rows(self.x, self.xb2, <size_t> T * dim)
            # feed-forward block
            rmsnorm_rows(self.xb, self.x, L.ffn_norm, T, dim, self.eps)
            projs[0], projs[1] = L.gate, L.up
            outs[0], outs[1] = self.hb, self.hb2
            _project(2, projs, outs, self.xb, T, dim)
            silu_mul_rows(self.hb, self.hb, self.hb2, T, self.hidden)
            _project(1, &L.down, &self.xb2, self.hb, T, self.hidden)
            _add_rows(self.x, self.xb2, <size_t> T * dim)
        rmsnorm_rows(self.xb, self.x, self.output_norm, T, dim, self.eps)
