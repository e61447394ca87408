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
gate, up) share one quantization of it and one parallel region.  A decode step (up to
TEAM_ROWS_MAX rows) runs in a single parallel region instead, its threads meeting at barriers
(LlamaNative._forward_team).  The Python forward is the twin: tests/test_native.py checks that the
two agree bit for bit.
"""
from cpython cimport array
from cython.parallel cimport parallel, prange
from libc.stdint cimport int8_t, int32_t, uint16_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy

from core.kernels._activations cimport silu_mul_rows
from core.kernels._attention cimport (PagedPlan, attention_paged_rows, attention_paged_team, check_paged_rows,
                                     kv_write_rows, paged_free, paged_plan, paged_plan_reset)
from core.kernels._embedding cimport embed_f32_rows, embed_q8_rows
from core.kernels._matmul cimport (MAX_SHARED, TEAM_ROWS_MAX, _matmul_f32, _matmul_q8, _matmul_q8_shared,
                                  _matmul_q8_silu_mul, _matmul_q8_team, _q8_row_bytes, _quantize_rows_q8)
from core.kernels._norms cimport rmsnorm_rows
from core.kernels._rope cimport ROPE_MAX_DIM, rope_angles, rope_qk_rows_at
from core.kernels.parallel cimport (edge_barrier, edge_lines, edge_scratch, edge_scratch_fail_after, edge_team_max,
                                    edge_team_size, edge_thread_id)

import array

cdef extern from *:
    """
    static Py_ssize_t edge_item_refcount(PyObject *list, Py_ssize_t i) { return Py_REFCNT(PyList_GET_ITEM(list, i)); }
    """
    Py_ssize_t edge_item_refcount(list items, Py_ssize_t i)

# Logits rows kept for reuse, at most this many bytes of them per forward: a fresh array('f') of a
# 49152-word vocabulary is 192 KiB, which malloc takes from (and gives back to) the OS each time,
# page faults and all; 16 of them per batched decode step cost 1.7 ms of a 24 ms step on Zen 4.
LOGIT_POOL_BYTES = 8 << 20


cdef struct Proj:                 # one linear layer: int8 (w, scale) or fp32 (wf), optional bias
    const int8_t *w
    const uint16_t *scale
    const float *wf
    const float *bias
    int n_out


cdef struct Layer:
    const float *attn_norm
    const float *ffn_norm
    Proj q, k, v, o, gate, up, down  # in this order: &q is the array q, k, v and &gate gate, up
    void *k_cache               # this layer's K and V slots, float16 or float32 (LlamaNative.kv_f16)
    void *v_cache


cdef class _Tensors:
    """Addresses of tensors in a weights file (or any buffer), checked for dtype and shape."""
    cdef object wf
    cdef list views                # the memoryviews the addresses point into, kept alive

    def __init__(self, wf):
        self.wf = wf
        self.views = []

    cdef size_t address(self, name, dtype, shape) except 0:
        info = self.wf.tensors.get(name)
        if info is None:
            raise ValueError(f"native forward: tensor '{name}' is missing")
        if info.dtype != dtype or tuple(info.shape) != tuple(shape) or info.nbytes == 0:
            raise ValueError(f"native forward: tensor '{name}' is {info.dtype} {list(info.shape)}, "
                             f"expected {dtype} {list(shape)}")
        return _address(self.wf.buffer(name), self.views)

    cdef Proj proj(self, prefix, int n_out, int n_in) except *:
        """NAME.weight int8 + NAME.scale f16, or NAME.weight f32; NAME.bias f32 when present."""
        cdef Proj p
        p.w, p.scale, p.wf, p.bias, p.n_out = NULL, NULL, NULL, NULL, n_out
        if f"{prefix}.scale" in self.wf:
            p.w = <const int8_t *> self.address(f"{prefix}.weight", "i8", (n_out, n_in))
            p.scale = <const uint16_t *> self.address(f"{prefix}.scale", "f16", (n_out, (n_in + 31) // 32))
        else:
            p.wf = <const float *> self.address(f"{prefix}.weight", "f32", (n_out, n_in))
        if f"{prefix}.bias" in self.wf:
            p.bias = <const float *> self.address(f"{prefix}.bias", "f32", (n_out,))
        return p


cdef size_t _address(buf, list keep) except 0:
    cdef const unsigned char[::1] view = buf
    if view.shape[0] == 0:
        raise ValueError("native forward: an empty buffer")
    keep.append(view)
    return <size_t> &view[0]


cdef int _project(int n, Proj *projs, float **outs, const float *x, int T, int K) noexcept nogil:
    """outs[i] = x @ W_i.T (+ b_i) for n projections of one input: int8 ones in one shared call.
    0, or -1 when the kernel's scratch memory cannot be had."""
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
        return _matmul_q8_shared(n, outs, w, scales, biases, Ns, x, T, K)
    for i in range(n):
        _matmul_f32(outs[i], x, projs[i].wf, projs[i].bias, T, projs[i].n_out, K)
    return 0


cdef void _team_project(int n, Proj *projs, float *out0, float *out1, float *out2, const int8_t *q, const float *xs,
                        int T, int K, int tid, int nthr) noexcept nogil:
    """This thread's share of n int8 projections of one quantized input (q, k, v; gate, up) in a
    forward pass run in one parallel region (_matmul_q8_team)."""
    cdef const int8_t *w[3]
    cdef const uint16_t *scales[3]
    cdef const float *biases[3]
    cdef int Ns[3]
    cdef float *outs[3]
    cdef int i
    outs[0], outs[1], outs[2] = out0, out1, out2
    for i in range(n):
        w[i], scales[i], biases[i], Ns[i] = projs[i].w, projs[i].scale, projs[i].bias, projs[i].n_out
    _matmul_q8_team(n, outs, w, scales, biases, Ns, q, xs, T, K, tid, nthr)


def _fail_scratch_after(int n):
    """Tests: make the n-th scratch allocation of this module from now on fail (0: none)."""
    edge_scratch_fail_after(n)


cdef bint team_forward_on = True


def _set_team_forward(int on):
    """Benchmark and test knob: a decode step (up to TEAM_ROWS_MAX rows, int8 layers) runs in one
    parallel region (1, default) or with a region per kernel call (0); the same bits either way."""
    global team_forward_on
    team_forward_on = on


cdef bint fused_silu_on = True


def _set_fused_silu(int on):
    """Benchmark knob: silu(gate) * up fused into the gate/up matmul from four rows up (1, default),
    or the two projections and a silu_mul pass (0); the same bits either way."""
    global fused_silu_on
    fused_silu_on = on


cdef int _project_silu_mul(Proj *gate_up, float *out, float *spare, const float *x, int T, int K) noexcept nogil:
    """out = silu(x @ gate.T) * (x @ up.T): fused into one matmul for int8 layers without biases
    from four rows up (prefill, batched steps), so that gate and up are never stored; for fewer (a
    decode step, whose weight rows stream from memory one matrix at a time) and otherwise, the two
    projections into out and spare and a silu_mul pass.  The same bits either way.
    0, or -1 when the kernel's scratch memory cannot be had."""
    cdef float *outs[2]
    if T >= 4 and fused_silu_on and gate_up[0].w != NULL and gate_up[0].bias == NULL and gate_up[1].bias == NULL:
        return _matmul_q8_silu_mul(out, x, gate_up[0].w, gate_up[0].scale, gate_up[1].w, gate_up[1].scale, T,
                                   gate_up[0].n_out, K)
    outs[0], outs[1] = out, spare
    if _project(2, gate_up, outs, x, T, K):
        return -1
    silu_mul_rows(out, out, spare, T, gate_up[0].n_out)
    return 0


cdef bint parallel_add_on = True


def _set_parallel_add(int on):
    """Benchmark knob: a residual add of 16 rows or more shared out among the threads (1, default)
    or run by the calling thread alone (0); the same sums either way.  A 512-token prefill of
    SmolLM2-135M on Zen 4 (bench/bench_knob_ab.py, 21 rounds each order): 1.003x and 1.006x (on
    faster in 14 and 18 rounds); perf had the serial adds at 1.3% of the samples."""
    global parallel_add_on
    parallel_add_on = on


cdef void _add_rows(float *x, const float *y, size_t n) noexcept nogil:
    cdef size_t i
    for i in range(n):
        x[i] = x[i] + y[i]


cdef void _add_rows_parallel(float *x, const float *y, int T, int dim) noexcept nogil:
    """x += y over T rows of dim, the rows shared out among the threads (the same sums)."""
    cdef int t
    if T < 16 or not parallel_add_on:
        _add_rows(x, y, <size_t> T * dim)
        return
    for t in prange(T, schedule="static"):
        _add_rows(x + <size_t> t * dim, y + <size_t> t * dim, dim)


cdef class LlamaNative:
    """The Llama forward pass over a weights file and a KV cache, with its own scratch for up to
    max_rows rows.  Tensors are read through memoryviews of the file's map and the cache's memory:
    nothing here needs numpy.

        native(batch)        runs models.llama.forward on batch (a models.api.Batch), returns the
                             final normed hidden rows (T, dim) as a float32 memoryview of scratch
        native.logits(rows)  the logits head on some of those rows: one array('f') copy each (an
                             array its caller has released is refilled, not allocated anew)
    """
    cdef Layer *layers
    cdef int n_layers, dim, hidden, n_heads, n_kv_heads, head_dim, rope_dim, vocab, max_rows, n_slots
    cdef int block_size, n_blocks, T
    cdef double rope_base
    cdef bint neox, kv_f16           # kv_f16: the KV cache holds float16 (else float32)
    cdef bint int8_layers            # every projection of every layer int8 (_forward_team)
    cdef float eps, attn_scale
    cdef const int8_t *embd_q
    cdef const uint16_t *embd_scale
    cdef const float *embd_f32
    cdef const float *output_norm
    cdef Proj head
    cdef float *scratch[12]
    cdef float *x
    cdef float *xb
    cdef float *xb2
    cdef float *q
    cdef float *k
    cdef float *v
    cdef float *att
    cdef float *hb
    cdef float *hb2
    cdef float *rows
    cdef float *logit_rows
    cdef float *rope_cs
    cdef _Tensors tensors
    cdef object cache
    cdef list logit_pool           # array('f', vocab) rows logits() made, reused once only the pool holds them

    def __cinit__(self):
        self.layers = NULL
        cdef int i
        for i in range(12):
            self.scratch[i] = NULL

    def __init__(self, cfg, wf, cache, int max_rows):
        if max_rows < 1:
            raise ValueError("native forward: max_rows must be at least 1")
        self.cache = cache
        self.n_layers, self.dim, self.hidden = cfg.n_layers, cfg.dim, cfg.hidden_dim
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.rope_dim, self.rope_base, self.neox = cfg.rope_dim, cfg.rope_base, cfg.rope_style == "neox"
        self.vocab, self.eps, self.attn_scale = cfg.vocab_size, cfg.norm_eps, cfg.head_dim ** -0.5
        self.max_rows, self.T = max_rows, 0
        self.logit_pool = []
        if self.rope_dim <= 0 or self.rope_dim % 2 or self.rope_dim > min(self.head_dim, ROPE_MAX_DIM):
            raise ValueError(f"native forward: rope over {self.rope_dim} of {self.head_dim} dimensions per head "
                             f"(even, at most {ROPE_MAX_DIM})")
        self.block_size, self.n_blocks = cache.block_size, cache.n_blocks
        self.n_slots = cache.n_blocks * cache.block_size
        cdef int dim = self.dim, qd = self.n_heads * self.head_dim, kvd = self.n_kv_heads * self.head_dim
        if tuple(cache.shape) != (self.n_layers, self.n_slots, kvd):
            raise ValueError(f"native forward: the KV cache is {cache.shape}, expected "
                             f"{(self.n_layers, self.n_slots, kvd)}")
        cdef _Tensors t = _Tensors(wf)
        self.tensors = t
        self.embd_q, self.embd_scale, self.embd_f32 = NULL, NULL, NULL
        if "token_embd.scale" in wf:
            self.embd_q = <const int8_t *> t.address("token_embd.weight", "i8", (self.vocab, dim))
            self.embd_scale = <const uint16_t *> t.address("token_embd.scale", "f16", (self.vocab, (dim + 31) // 32))
        else:
            self.embd_f32 = <const float *> t.address("token_embd.weight", "f32", (self.vocab, dim))
        self.output_norm = <const float *> t.address("output_norm.weight", "f32", (dim,))
        self.head = t.proj("token_embd" if cfg.tied_embeddings else "output", self.vocab, dim)
        # scratch, as models.llama.RunState, plus the gathered rows and logits of the head and the
        # step's rope angles (cosine, sine)
        cdef size_t sizes[12]
        sizes[:] = [dim, dim, dim, qd, kvd, kvd, qd, self.hidden, self.hidden, dim, self.vocab, self.rope_dim]
        cdef int i
        for i in range(12):
            self.scratch[i] = <float *> calloc(<size_t> max_rows * sizes[i], sizeof(float))
            if self.scratch[i] == NULL:
                raise MemoryError()
        self.x, self.xb, self.xb2, self.q, self.k, self.v = self.scratch[0], self.scratch[1], self.scratch[2], \
            self.scratch[3], self.scratch[4], self.scratch[5]
        self.att, self.hb, self.hb2, self.rows, self.logit_rows = self.scratch[6], self.scratch[7], \
            self.scratch[8], self.scratch[9], self.scratch[10]
        self.rope_cs = self.scratch[11]     # the step's rope cosines and sines, for every layer
        if cache.dtype not in ("f16", "f32"):
            raise ValueError(f"native forward: a KV cache of {cache.dtype!r}")
        self.kv_f16 = cache.dtype == "f16"
        cdef size_t layer_bytes = <size_t> self.n_slots * kvd * (2 if self.kv_f16 else 4)
        cdef char *k_cache = <char *> _address(cache.k_memory, t.views)
        cdef char *v_cache = <char *> _address(cache.v_memory, t.views)
        self.layers = <Layer *> calloc(self.n_layers, sizeof(Layer))
        if self.layers == NULL:
            raise MemoryError()
        cdef Layer *L
        self.int8_layers = True
        for l in range(self.n_layers):
            L = &self.layers[l]
            p = f"blk.{l}"
            L.attn_norm = <const float *> t.address(f"{p}.attn_norm.weight", "f32", (dim,))
            L.ffn_norm = <const float *> t.address(f"{p}.ffn_norm.weight", "f32", (dim,))
            L.q, L.k, L.v = t.proj(f"{p}.attn_q", qd, dim), t.proj(f"{p}.attn_k", kvd, dim), \
                t.proj(f"{p}.attn_v", kvd, dim)
            L.o = t.proj(f"{p}.attn_output", dim, qd)
            L.gate, L.up = t.proj(f"{p}.ffn_gate", self.hidden, dim), t.proj(f"{p}.ffn_up", self.hidden, dim)
            L.down = t.proj(f"{p}.ffn_down", dim, self.hidden)
            L.k_cache = k_cache + <size_t> l * layer_bytes
            L.v_cache = v_cache + <size_t> l * layer_bytes
            if L.q.w != NULL and not (L.k.w != NULL and L.v.w != NULL and L.gate.w != NULL and L.up.w != NULL):
                raise ValueError("native forward: a layer mixes int8 and fp32 projections")
            self.int8_layers = self.int8_layers and L.q.w != NULL and L.o.w != NULL and L.down.w != NULL

    def __dealloc__(self):
        free(self.layers)
        cdef int i
        for i in range(12):
            free(self.scratch[i])

    def __call__(self, batch):
        """Run the rows of batch (tokens, positions, seq_ids, slots, block_tables: int32 buffers);
        returns the final normed hidden rows, (T, dim) float32, a view of scratch that the next
        call overwrites."""
        cdef const int32_t[::1] tokens = batch.tokens, positions = batch.positions
        cdef const int32_t[::1] seq_ids = batch.seq_ids, slots = batch.slots
        cdef const int32_t[:, ::1] tables = batch.block_tables
        cdef int T = tokens.shape[0], t, bad = -1, max_pos = 0
        self.T = 0
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
        cdef int rc
        cdef bint team = T <= TEAM_ROWS_MAX and team_forward_on and self.int8_layers
        with nogil:
            if team:
                rc = self._forward_team(T, &tokens[0], &positions[0], &seq_ids[0], &slots[0], &tables[0, 0],
                                        tables.shape[1], max_pos)
            else:
                rc = self._forward(T, &tokens[0], &positions[0], &seq_ids[0], &slots[0], &tables[0, 0],
                                   tables.shape[1], max_pos)
        if rc:
            raise MemoryError(f"native forward: no memory for the kernels' scratch ({T} rows, "
                              f"{max_pos + 1} positions)")
        self.T = T
        return <float[:T, :self.dim]> self.xb

    def logits(self, rows):
        """The logits of the given rows of the last call's output: a list of array('f', vocab).  The
        arrays are recycled: one that nothing but this object references any more (its caller
        dropped it, with every view of it) is refilled by a later call instead of allocating."""
        cdef int n = len(rows), i, r
        if not 0 < n <= self.max_rows:
            raise ValueError(f"native forward: {n} logits rows, expected 1..{self.max_rows}")
        for i in range(n):
            r = rows[i]
            if not 0 <= r < self.T:
                raise IndexError(f"native forward: row {r} is not one of the last call's {self.T}")
            memcpy(self.rows + <size_t> i * self.dim, self.xb + <size_t> r * self.dim, self.dim * sizeof(float))
        cdef int rc = 0
        with nogil:
            if self.head.w != NULL:
                rc = _matmul_q8(self.logit_rows, self.rows, self.head.w, self.head.scale, self.head.bias, n,
                                self.vocab, self.dim)
            else:
                _matmul_f32(self.logit_rows, self.rows, self.head.wf, self.head.bias, n, self.vocab, self.dim)
        if rc:
            raise MemoryError(f"native forward: no memory for the logits head's scratch ({n} rows)")
        cdef array.array template = array.array("f"), row
        cdef list pool = self.logit_pool
        cdef Py_ssize_t p = 0, pool_max = max(1, LOGIT_POOL_BYTES // (4 * self.vocab))
        out = []
        for i in range(n):
            while p < len(pool) and edge_item_refcount(pool, p) > 1:     # held by someone: not free
                p += 1
            if p < len(pool):
                row = pool[p]
                p += 1
            else:
                row = array.clone(template, self.vocab, False)
                if len(pool) < pool_max:
                    pool.append(row)
                    p += 1
            memcpy(row.data.as_floats, self.logit_rows + <size_t> i * self.vocab, self.vocab * sizeof(float))
            out.append(row)
        return out

    cdef int _forward(self, int T, const int32_t *tokens, const int32_t *positions, const int32_t *seq_ids,
                      const int32_t *slots, const int32_t *tables, int max_blocks, int max_pos) noexcept nogil:
        """0, or -1 where a kernel could not have its scratch memory (the rows' results are then
        undefined, and so are their KV slots: the caller does not count them as fed)."""
        cdef int dim = self.dim, kv_dim = self.n_kv_heads * self.head_dim, l
        cdef Layer *L
        cdef Proj projs[3]
        cdef float *outs[3]
        if self.embd_q != NULL:
            embed_q8_rows(self.x, tokens, self.embd_q, self.embd_scale, T, dim)
        else:
            embed_f32_rows(self.x, tokens, self.embd_f32, T, dim)
        rope_angles(self.rope_cs, positions, T, self.rope_dim, self.rope_base)   # once for all layers
        for l in range(self.n_layers):
            L = &self.layers[l]
            # attention block
            rmsnorm_rows(self.xb, self.x, L.attn_norm, T, dim, self.eps)
            projs[0], projs[1], projs[2] = L.q, L.k, L.v
            outs[0], outs[1], outs[2] = self.q, self.k, self.v
            if _project(3, projs, outs, self.xb, T, dim):
                return -1
            rope_qk_rows_at(self.q, self.k, self.rope_cs, T, self.n_heads, self.n_kv_heads, self.head_dim,
                            self.rope_dim, self.neox)
            kv_write_rows(L.k_cache, L.v_cache, self.kv_f16, self.k, self.v, slots, T, kv_dim)
            if attention_paged_rows(self.att, self.q, L.k_cache, L.v_cache, self.kv_f16, tables, max_blocks, seq_ids,
                                    positions, T, max_pos, self.n_heads, self.n_kv_heads, self.head_dim,
                                    self.block_size, self.attn_scale):
                return -1
            if _project(1, &L.o, &self.xb2, self.att, T, self.n_heads * self.head_dim):
                return -1
            _add_rows_parallel(self.x, self.xb2, T, dim)
            # feed-forward block
            rmsnorm_rows(self.xb, self.x, L.ffn_norm, T, dim, self.eps)
            projs[0], projs[1] = L.gate, L.up
            if _project_silu_mul(projs, self.hb, self.hb2, self.xb, T, dim):
                return -1
            if _project(1, &L.down, &self.xb2, self.hb, T, self.hidden):
                return -1
            _add_rows_parallel(self.x, self.xb2, T, dim)
        rmsnorm_rows(self.xb, self.x, self.output_norm, T, dim, self.eps)
        return 0

    cdef int _forward_team(self, int T, const int32_t *tokens, const int32_t *positions, const int32_t *seq_ids,
                           const int32_t *slots, const int32_t *tables, int max_blocks, int max_pos) noexcept nogil:
        """_forward for a decode step (up to TEAM_ROWS_MAX rows; every layer int8) in one parallel
        region, with the same bits.  A region per kernel call costs its fork and join, and a thread
        that comes late to one (the main thread, from the serial work between calls) holds up the
        other; a decode step's weights stream from memory in about 2 us a matrix while the host's
        memory is fast, so those costs were a fifth of the step.  Here every thread keeps its own
        copy of the residual rows and does the small row-wise work itself (norms, silu, quantizing
        a matmul's input), the matmuls and attention are shared out, and the threads meet at a
        barrier wherever one reads what all wrote; the main thread alone applies rope and writes
        the KV cache.  0, or -1 (nothing computed) without scratch memory."""
        cdef int dim = self.dim, hidden = self.hidden, width = self.n_heads * self.head_dim
        cdef int kv_dim = self.n_kv_heads * self.head_dim, k_max = max(dim, hidden, width), l, t, tid, nthr
        cdef size_t q_bytes = edge_lines(<size_t> T * _q8_row_bytes(k_max))
        cdef size_t s_bytes = edge_lines(<size_t> T * ((k_max + 31) // 32) * sizeof(float))
        cdef size_t x_bytes = edge_lines(<size_t> T * dim * sizeof(float))
        cdef size_t h_bytes = edge_lines(<size_t> T * hidden * sizeof(float))
        cdef size_t thread_bytes = q_bytes + s_bytes + 2 * x_bytes + h_bytes
        cdef PagedPlan plan
        if paged_plan(&plan, seq_ids, positions, T, max_pos, self.n_heads, self.n_kv_heads, self.head_dim,
                      self.block_size, self.kv_f16, self.attn_scale):
            return -1
        cdef char *scratch = <char *> edge_scratch(<size_t> edge_team_max() * thread_bytes)
        if scratch == NULL:
            paged_free(&plan)
            return -1
        cdef Layer *L
        cdef char *mine
        cdef int8_t *q8         # this thread's: the next matmul's input, quantized, and its scales
        cdef float *q8_scales
        cdef float *x           # this thread's copy of the residual rows
        cdef float *h           # this thread's normed rows
        cdef float *gated       # this thread's silu(gate) * up
        if self.embd_q != NULL:
            embed_q8_rows(self.x, tokens, self.embd_q, self.embd_scale, T, dim)
        else:
            embed_f32_rows(self.x, tokens, self.embd_f32, T, dim)
        rope_angles(self.rope_cs, positions, T, self.rope_dim, self.rope_base)
        with parallel():
            tid = edge_thread_id()
            nthr = edge_team_size()
            mine = scratch + <size_t> tid * thread_bytes
            q8 = <int8_t *> mine
            q8_scales = <float *> (mine + q_bytes)
            x = <float *> (mine + q_bytes + s_bytes)
            h = <float *> (mine + q_bytes + s_bytes + x_bytes)
            gated = <float *> (mine + q_bytes + s_bytes + 2 * x_bytes)
            memcpy(x, self.x, <size_t> T * dim * sizeof(float))
            for l in range(self.n_layers):
                L = &self.layers[l]
                # attention block
                for t in range(T):
                    rmsnorm_rows(h + <size_t> t * dim, x + <size_t> t * dim, L.attn_norm, 1, dim, self.eps)
                _quantize_rows_q8(h, T, dim, q8, q8_scales)
                _team_project(3, &L.q, self.q, self.k, self.v, q8, q8_scales, T, dim, tid, nthr)
                edge_barrier()
                if tid == 0:
                    for t in range(T):
                        rope_qk_rows_at(self.q + <size_t> t * width, self.k + <size_t> t * kv_dim,
                                        self.rope_cs + <size_t> t * self.rope_dim, 1, self.n_heads,
                                        self.n_kv_heads, self.head_dim, self.rope_dim, self.neox)
                    kv_write_rows(L.k_cache, L.v_cache, self.kv_f16, self.k, self.v, slots, T, kv_dim)
                    paged_plan_reset(&plan)
                edge_barrier()
                attention_paged_team(&plan, self.att, self.q, L.k_cache, L.v_cache, tables, max_blocks, seq_ids,
                                     positions, tid, nthr)
                edge_barrier()
                _quantize_rows_q8(self.att, T, width, q8, q8_scales)
                _team_project(1, &L.o, self.xb2, NULL, NULL, q8, q8_scales, T, width, tid, nthr)
                edge_barrier()
                _add_rows(x, self.xb2, <size_t> T * dim)
                # feed-forward block
                for t in range(T):
                    rmsnorm_rows(h + <size_t> t * dim, x + <size_t> t * dim, L.ffn_norm, 1, dim, self.eps)
                _quantize_rows_q8(h, T, dim, q8, q8_scales)
                _team_project(2, &L.gate, self.hb, self.hb2, NULL, q8, q8_scales, T, dim, tid, nthr)
                edge_barrier()
                for t in range(T):
                    silu_mul_rows(gated + <size_t> t * hidden, self.hb + <size_t> t * hidden,
                                  self.hb2 + <size_t> t * hidden, 1, hidden)
                _quantize_rows_q8(gated, T, hidden, q8, q8_scales)
                _team_project(1, &L.down, self.xb2, NULL, NULL, q8, q8_scales, T, hidden, tid, nthr)
                edge_barrier()
                _add_rows(x, self.xb2, <size_t> T * dim)
            if tid == 0:
                memcpy(self.x, x, <size_t> T * dim * sizeof(float))
                for t in range(T):
                    rmsnorm_rows(self.xb + <size_t> t * dim, x + <size_t> t * dim, self.output_norm, 1, dim,
                                 self.eps)
        free(scratch)
        paged_free(&plan)
        return 0
