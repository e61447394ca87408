"""Linear layers: out[M, N] = x[M, K] @ w[N, K].T (+ bias).

matmul_q8: int8 weights with one fp16 scale per group of 32 along K (per output row), each row in
the interleaved layout of simd.h (reference.pack_q8_rows); the activations are quantized to int8 on
the fly, into the same layout, with one fp32 scale per group of 32 along K (int32 accumulation
inside a group, fp32 across groups).  matmul_q8_silu_mul: silu(x @ gate.T) * (x @ up.T) from two
int8 matrices, a gated feed-forward's first half, with neither product stored.  matmul_f32: the
same product in fp32, for files converted with --quant f32.

Work is split across threads by tasks, a chunk of activation rows (128 KiB of them quantized, so
that they stay in L2) against a tile of output columns (weight rows), chunk after chunk: each
thread starts with a contiguous share of the tasks (OpenMP's static split, so that it streams its
weights forward), and a thread that finishes its share takes tasks from the back of another's
instead of waiting at the barrier.  Inside a task the loop runs over blocks of activation rows so
that a weight tile and an activation block stay in L1.

_matmul_q8_team: the same product for a decode step whose whole forward pass runs in one parallel
region (models/_llama_native.pyx): each thread of the region runs its own static share.
"""
from cython.parallel cimport parallel, prange
from libc.stdint cimport int8_t, uint16_t
from libc.stdlib cimport free

from core.kernels.parallel cimport (edge_barrier, edge_lines, edge_scratch, edge_scratch_fail_after, edge_team_max,
                                    edge_team_size, edge_thread_id)

cdef extern from "simd.h" nogil:
    int edge_q8_row_bytes(int K)
    int edge_q8_pack_index(int k, int K)
    float edge_f16_to_f32(uint16_t h)
    void edge_quantize_row_q8(const float *x, int K, int8_t *q, float *s)
    void edge_prefetch(const void *p, size_t nbytes)
    int EDGE_PREFETCH_ROWS
    int EDGE_PREFETCH_BURST
    float edge_dot_q8(const int8_t *q, const float *xs, const int8_t *w, const uint16_t *ws, int K)
    void edge_dot_q8_4x1(const int8_t *q, size_t q_stride, const float *xs, size_t xs_stride, const int8_t *w,
                         const uint16_t *ws, int K, float *out, size_t out_stride, const float *bias)
    void edge_dot_q8_1x2(const int8_t *q, const float *xs, const int8_t *w0, const int8_t *w1,
                         const uint16_t *ws0, const uint16_t *ws1, int K, float *out, const float *bias)
    void edge_dot_q8_4x2(const int8_t *q, size_t q_stride, const float *xs, size_t xs_stride,
                         const int8_t *w0, const int8_t *w1, const uint16_t *ws0, const uint16_t *ws1,
                         int K, float *out, size_t out_stride, const float *bias)
    float edge_dot_f32(const float *a, const float *b, int K)
    void edge_silu_mul_f32(float *out, const float *gate, const float *up, int n)

cdef extern from *:
    """
    #include <stdint.h>
    #include "parallel.h"
    /* A thread's share of a loop's tasks, [lo, hi) packed in one 64-bit word on its own cache line:
     * the owner takes tasks from the front, and a thread that has run out of its own takes them
     * from the back of another's share (the owner keeps streaming forward, the helper finishes its
     * tail).  Shares start as OpenMP's static split, so with no stealing nothing changes. */
    typedef struct { int64_t range; char pad[56]; } edge_share;
    static inline int64_t edge_share_pack(int lo, int hi) { return ((int64_t)hi << 32) | (uint32_t)lo; }
    /* Shares start empty, so that a thread looking for work in a share its owner has not set yet
     * finds none (the owner then runs all of it). */
    static void edge_shares_clear(edge_share *s, int n) {
        for (int t = 0; t < n; t++) __atomic_store_n(&s[t].range, 0, __ATOMIC_RELAXED);
    }
    static void edge_share_init(edge_share *s, int tid, int nthr, int n) {
        const int q = n / nthr, r = n % nthr, lo = tid * q + (tid < r ? tid : r);
        __atomic_store_n(&s[tid].range, edge_share_pack(lo, lo + q + (tid < r)), __ATOMIC_RELAXED);
    }
    static int edge_share_claim(edge_share *s, int tid, int nthr, int steal) {
        int64_t r = __atomic_load_n(&s[tid].range, __ATOMIC_RELAXED);
        for (;;) {
            const int lo = (int)(uint32_t)r, hi = (int)(r >> 32);
            if (lo >= hi) break;
            if (__atomic_compare_exchange_n(&s[tid].range, &r, edge_share_pack(lo + 1, hi), 0,
                                            __ATOMIC_RELAXED, __ATOMIC_RELAXED)) return lo;
        }
        for (int v = 1; steal && v < nthr; v++) {
            edge_share *victim = &s[(tid + v) % nthr];
            r = __atomic_load_n(&victim->range, __ATOMIC_RELAXED);
            for (;;) {
                const int lo = (int)(uint32_t)r, hi = (int)(r >> 32);
                if (lo >= hi) break;
                if (__atomic_compare_exchange_n(&victim->range, &r, edge_share_pack(lo, hi - 1), 0,
                                                __ATOMIC_RELAXED, __ATOMIC_RELAXED)) return hi - 1;
            }
        }
        return -1;
    }
    """
    ctypedef struct edge_share:
        pass
    void edge_shares_clear(edge_share *s, int n) nogil
    void edge_share_init(edge_share *s, int tid, int nthr, int n) nogil
    int edge_share_claim(edge_share *s, int tid, int nthr, int steal) nogil

cdef int steal_tiles = 1
cdef int own_rows_on = 1
cdef int spread_prefetch = 1
# The fewest activation rows for which a task reads two weight rows side by side (4 x 2 tiles);
# fewer take one weight row at a time (below).  A batched decode step of SmolLM2-135M on Zen 4
# (/tmp scratch script, the two paths alternating in one process, 21 rounds, 100 and 500 tokens of
# context): 4 rows 1.35x and 1.25x faster one row at a time (21 and 21 rounds of 21), 5 rows 1.10x
# and 1.05x (21, 20), 6 rows 0.98x and 0.99x, 7 rows 0.91x, 8 rows 0.77x.
cdef int pair_rows_min = 6


def _set_pair_rows_min(int n):
    """Benchmark knob: the fewest activation rows that take 4 x 2 tiles (default 6)."""
    global pair_rows_min
    pair_rows_min = max(1, n)


def _set_spread_prefetch(int on):
    """Benchmark knob: rows ahead of more than EDGE_PREFETCH_BURST bytes are asked for a share before
    each 4 x 2 block (1, default) or all at once (0)."""
    global spread_prefetch
    spread_prefetch = on


def _set_own_rows(int on):
    """Benchmark knob: threads quantize a few activation rows each for itself (default on)."""
    global own_rows_on
    own_rows_on = on


def _fail_scratch_after(int n):
    """Tests: make the n-th scratch allocation of this module's kernels from now on fail (0: none)."""
    edge_scratch_fail_after(n)


def _set_steal_tiles(int on):
    """Tuning knob for benchmarks: whether threads that finish their tiles take others' (1) or wait (0)."""
    global steal_tiles
    steal_tiles = on


cdef enum:
    N_TILE = 16     # weight rows per task
    OWN_ROWS_MAX = 4         # up to this many activation rows, each thread quantizes them itself
    M_BLOCK = 64             # activation rows per inner block of the fp32 matmul
                    # (MAX_SHARED, in _matmul.pxd: matrices one _matmul_q8_shared call may take)


# quantized activation bytes per inner block (rounded down to a multiple of 4 rows): the block stays
# in L1 while a tile's weight rows pass over it.  Measured on Zen 3 (32 KiB L1d): 16 KiB.
cdef int m_block_bytes = 16384


# quantized activation bytes per chunk of rows: a task is a chunk of rows against a tile of weight
# rows, chunk after chunk, so that a chunk stays in L2 while every weight row passes over it.  With
# one chunk for all rows, each tile of weight rows would read every activation row again (from L3
# or memory once they outgrow L2: an encoder's 4096 x 1536 bytes of a batch).
cdef int m_chunk_bytes = 131072


def _set_m_chunk_bytes(int n):
    """Tuning knob for benchmarks: the activation chunk size of matmul_q8, in bytes."""
    global m_chunk_bytes
    m_chunk_bytes = n


def _set_m_block_bytes(int n):
    """Tuning knob for benchmarks: the activation block size of matmul_q8, in bytes."""
    global m_block_bytes
    m_block_bytes = n


cdef bint rows_tile = True


def _set_rows_tile(int on):
    """Benchmark knob: where a matmul takes one weight row at a time (a decode step of a few rows,
    its logits head), it takes that row against four activation rows at once (edge_dot_q8_4x1) and
    the rest one at a time (edge_dot_q8), else every row one at a time; the same bits."""
    global rows_tile
    rows_tile = on != 0


cdef int _matmul_q8(float *out, const float *x, const int8_t *w, const uint16_t *w_scale,
                    const float *bias, int M, int N, int K) noexcept nogil:
    return _matmul_q8_shared(1, &out, &w, &w_scale, &bias, &N, x, M, K)


cdef int _matmul_q8_shared(int n_mats, float **outs, const int8_t **ws_, const uint16_t **scales,
                           const float **biases, const int *Ns, const float *x, int M, int K) noexcept nogil:
    """out_i = quantize_q8(x) @ dequantize(w_i).T + bias_i for up to MAX_SHARED matrices that share x
    (q, k and v; gate and up): x is quantized once and one parallel region covers every tile.
    Returns 0, or -1 (having computed nothing) when its scratch memory cannot be had."""
    return _matmul_q8_tasks(n_mats, outs, ws_, scales, biases, Ns, x, M, K, False)


cdef int _matmul_q8_silu_mul(float *out, const float *x, const int8_t *w_gate, const uint16_t *s_gate,
                             const int8_t *w_up, const uint16_t *s_up, int M, int N, int K) noexcept nogil:
    """out = silu(quantize_q8(x) @ dequantize(w_gate).T) * (quantize_q8(x) @ dequantize(w_up).T), a
    gated feed-forward's input to its down projection, with the bits of _matmul_q8_shared into two
    outputs and a silu_mul pass: each task computes its columns of gate into out and of up into
    its thread's scratch, then combines them while they are in L1, so that up is never stored
    and nothing is read back from memory (a 512-token prefill of SmolLM2-135M on Zen 4: 1.02-1.05x
    while the host's memory was slow, 1.00-1.01x while it was fast; no change at 16 and 128
    tokens).  0, or -1 (nothing computed) without scratch memory."""
    cdef float *outs[2]
    cdef const int8_t *ws_[2]
    cdef const uint16_t *scales[2]
    cdef const float *biases[2]
    cdef int Ns[2]
    outs[0] = outs[1] = out
    ws_[0], ws_[1] = w_gate, w_up
    scales[0], scales[1] = s_gate, s_up
    biases[0] = biases[1] = NULL
    Ns[0] = Ns[1] = N
    return _matmul_q8_tasks(2, outs, ws_, scales, biases, Ns, x, M, K, True)


cdef int _matmul_q8_tasks(int n_mats, float **outs, const int8_t **ws_, const uint16_t **scales,
                          const float **biases, const int *Ns, const float *x, int M, int K,
                          bint pairs) noexcept nogil:
    """The tasks of _matmul_q8_shared (pairs False) and _matmul_q8_silu_mul (pairs True: a gate and
    an up matrix of Ns[0] rows, and tasks over the columns of one output)."""
    cdef int Kp = edge_q8_row_bytes(K)      # a quantized activation row (values, VNNI compensation)
    cdef int G = (K + 31) // 32
    # A few rows (a decode step): every thread quantizes them itself, into its own buffer, and
    # starts on its tiles at once; no thread waits at a barrier for another's quantization.
    cdef bint own_rows = M <= OWN_ROWS_MAX and own_rows_on
    cdef int m_block = (m_block_bytes // Kp) & ~3 if m_block_bytes // Kp >= 4 else 4
    cdef int m_chunk = (m_chunk_bytes // Kp) & ~3 if m_chunk_bytes // Kp >= 4 else 4
    if m_chunk >= M:
        m_chunk = M
    # scratch: every thread's share of the tiles (a line each), for pairs every thread's
    # block of up results (a chunk of rows x N_TILE), then the quantized rows and their scales: a
    # copy per thread (own_rows) or one for all
    cdef int n_max = edge_team_max()
    cdef size_t up_bytes = edge_lines(<size_t> m_chunk * N_TILE * sizeof(float)) if pairs else 0
    cdef size_t rows_bytes = edge_lines(<size_t> M * Kp) + edge_lines(<size_t> M * G * sizeof(float))
    cdef char *scratch = <char *> edge_scratch(<size_t> n_max * (64 + up_bytes) +
                                               (n_max if own_rows else 1) * rows_bytes)
    if scratch == NULL:
        return -1
    cdef edge_share *shares = <edge_share *> scratch
    cdef char *ups = scratch + <size_t> n_max * 64
    cdef char *rows = ups + <size_t> n_max * up_bytes
    cdef int8_t *q = <int8_t *> rows
    cdef float *xs = <float *> (rows + edge_lines(<size_t> M * Kp))
    cdef int n_chunks = (M + m_chunk - 1) // m_chunk
    cdef int chunk, mc0, mc1
    cdef int tile_start[MAX_SHARED + 1]
    cdef int i, m, mq, mr, t, n0, n1, N, tid, nthr, n_tiles
    cdef int steal = steal_tiles
    cdef int8_t *qt
    cdef float *xst
    cdef float *out
    cdef float *up
    cdef int part, m0, m1, n, pf, pf_n, row0, col0
    cdef bint ahead, spread
    cdef size_t o_stride
    cdef const int8_t *w
    cdef const uint16_t *sc
    cdef const uint16_t *ws
    cdef const float *bias
    cdef float *o_rows
    cdef float *o
    edge_shares_clear(shares, n_max)
    tile_start[0] = 0
    for i in range(n_mats):
        tile_start[i + 1] = tile_start[i] + (Ns[i] + N_TILE - 1) // N_TILE
    n_tiles = tile_start[1] if pairs else tile_start[n_mats]   # pairs: a task per tile of outputs
    with parallel():
        tid = edge_thread_id()
        nthr = edge_team_size()
        edge_share_init(shares, tid, nthr, n_chunks * n_tiles)     # tasks: chunk-major (chunk, tile)
        up = <float *> (ups + tid * up_bytes)
        if own_rows:
            qt = <int8_t *> (rows + tid * rows_bytes)
            xst = <float *> (rows + tid * rows_bytes + edge_lines(<size_t> M * Kp))
            for mr in range(M):
                edge_quantize_row_q8(x + <size_t> mr * K, K, qt + <size_t> mr * Kp, xst + <size_t> mr * G)
        else:
            qt = q
            xst = xs
            for mq in prange(M, schedule="static"):
                edge_quantize_row_q8(x + <size_t> mq * K, K, q + <size_t> mq * Kp, xs + <size_t> mq * G)
            edge_barrier()          # every row quantized and every share set before any tile starts
        while True:                 # tiles: this thread's share, then others'
            t = edge_share_claim(shares, tid, nthr, steal)
            if t < 0:
                break
            chunk = t // n_tiles
            t = t - chunk * n_tiles
            mc0 = chunk * m_chunk
            mc1 = mc0 + m_chunk if mc0 + m_chunk < M else M
            i = 0
            while t >= tile_start[i + 1]:
                i = i + 1
            out = outs[i]
            N = Ns[i]
            n0 = (t - tile_start[i]) * N_TILE
            n1 = n0 + N_TILE if n0 + N_TILE < N else N
            for part in range(2 if pairs else 1):
                # part 0: the matrix's rows into out; part 1 (pairs): the up projection's rows into
                # this thread's block, up[(m - mc0) * N_TILE + n - n0]
                if part == 0:
                    w, sc, bias, o_rows, o_stride, row0, col0 = ws_[i], scales[i], biases[i], out, N, 0, 0
                else:
                    w, sc, bias, o_rows, o_stride, row0, col0 = ws_[1], scales[1], NULL, up, N_TILE, mc0, n0
                m0 = mc0
                while m0 < mc1:
                    m1 = m0 + m_block if m0 + m_block < mc1 else mc1
                    n = n0
                    while n < n1:
                        # Two weight rows at a time, but one at a time for fewer than
                        # pair_rows_min rows (decode), whose weights stream from memory: reading
                        # two rows side by side (the 1 x 2 tile, with its software prefetch) streamed 1.3-1.4x
                        # slower than one row on Zen 4, with the AVX2 and the VNNI bodies alike;
                        # the hardware prefetcher follows one sequential stream per thread better
                        # than two interleaved ones.  Every tile shape gives the same bits.
                        o = o_rows + <size_t> (n - col0)
                        if n + 1 < n1 and M >= pair_rows_min:
                            ws = sc + <size_t> n * G      # the two rows' scales, fp16
                            # first pass over these rows: stream the rows ahead in, at once, or
                            # where they are more lines than the core can have in flight (a burst
                            # of them stalls it until they arrive), a share before each 4 x 2 block
                            ahead = m0 == mc0 and n + 2 + EDGE_PREFETCH_ROWS <= N
                            spread = ahead and spread_prefetch and 2 * K > EDGE_PREFETCH_BURST
                            if ahead and not spread:
                                edge_prefetch(w + <size_t> (n + EDGE_PREFETCH_ROWS) * K, 2 * K)
                            pf = 0
                            m = m0
                            while m + 4 <= m1:        # 4 x 2 blocks, stored (with the bias) into out
                                if spread and pf < 2 * K:
                                    pf_n = min(2 * K - pf, max(64, (2 * K // ((m1 - m0) // 4) + 63) & ~63))
                                    edge_prefetch(w + <size_t> (n + EDGE_PREFETCH_ROWS) * K + pf, pf_n)
                                    pf = pf + pf_n
                                edge_dot_q8_4x2(qt + <size_t> m * Kp, Kp, xst + <size_t> m * G, G,
                                                w + <size_t> n * K, w + <size_t> (n + 1) * K, ws, ws + G, K,
                                                o + <size_t> (m - row0) * o_stride, o_stride,
                                                bias + n if bias != NULL else NULL)
                                m = m + 4
                            if spread and pf < 2 * K:
                                edge_prefetch(w + <size_t> (n + EDGE_PREFETCH_ROWS) * K + pf, 2 * K - pf)
                            while m < m1:             # 1 x 2 for the rest
                                edge_dot_q8_1x2(qt + <size_t> m * Kp, xst + <size_t> m * G, w + <size_t> n * K,
                                                w + <size_t> (n + 1) * K, ws, ws + G, K,
                                                o + <size_t> (m - row0) * o_stride, bias + n if bias != NULL else NULL)
                                m = m + 1
                            n = n + 2
                        else:                         # one weight row: a decode step's, or an odd last one
                            ws = sc + <size_t> n * G
                            m = m0
                            while rows_tile and m + 4 <= m1:      # four rows against it at once
                                edge_dot_q8_4x1(qt + <size_t> m * Kp, Kp, xst + <size_t> m * G, G,
                                                w + <size_t> n * K, ws, K, o + <size_t> (m - row0) * o_stride,
                                                o_stride, bias + n if bias != NULL else NULL)
                                m = m + 4
                            while m < m1:
                                _store(o + <size_t> (m - row0) * o_stride, bias, n,
                                       edge_dot_q8(qt + <size_t> m * Kp, xst + <size_t> m * G, w + <size_t> n * K,
                                                   ws, K))
                                m = m + 1
                            n = n + 1
                    m0 = m1
            if pairs:               # out = silu(gate) * up over the task's block, while it is in L1
                for m in range(mc0, mc1):
                    edge_silu_mul_f32(out + <size_t> m * N + n0, out + <size_t> m * N + n0,
                                      up + <size_t> (m - mc0) * N_TILE, n1 - n0)
    free(scratch)
    return 0


cdef inline void _store(float *dst, const float *bias, int n, float value) noexcept nogil:
    dst[0] = value + bias[n] if bias != NULL else value


cdef void _matmul_f32(float *out, const float *x, const float *w, const float *bias,
                      int M, int N, int K) noexcept nogil:
    cdef int m, n, t, m0, m1, n0, n1
    cdef int n_tiles = (N + N_TILE - 1) // N_TILE
    cdef float acc
    with parallel():
        for t in prange(n_tiles, schedule="static"):
            n0 = t * N_TILE
            n1 = n0 + N_TILE if n0 + N_TILE < N else N
            m0 = 0
            while m0 < M:
                m1 = m0 + M_BLOCK if m0 + M_BLOCK < M else M
                for n in range(n0, n1):
                    for m in range(m0, m1):
                        acc = edge_dot_f32(x + <size_t> m * K, w + <size_t> n * K, K)
                        if bias != NULL:
                            acc = acc + bias[n]
                        out[<size_t> m * N + n] = acc
                m0 = m1


def _check_linear(out, x, w, bias):
    M, K = x.shape[0], x.shape[1]
    N = w.shape[0]
    if w.shape[1] != K:
        raise ValueError(f"x has {K} columns but w has {w.shape[1]}")
    if out.shape[0] != M or out.shape[1] != N:
        raise ValueError(f"out has shape {tuple(out.shape)[:2]}, expected ({M}, {N})")
    if bias is not None and bias.shape[0] != N:
        raise ValueError(f"bias has {bias.shape[0]} entries, expected {N}")


cdef bint _nothing_to_do(int M, int N, int K) except -1:
    """Whether the product of M rows and N weight rows is empty; an x without columns is refused."""
    if K == 0:
        raise ValueError("x has no columns")
    return M == 0 or N == 0


def _check_scales(w, w_scale, what):
    if w_scale.shape[0] != w.shape[0] or w_scale.shape[1] != (w.shape[1] + 31) // 32:
        raise ValueError(f"{what} has shape {tuple(w_scale.shape)[:2]}, expected "
                         f"({w.shape[0]}, {(w.shape[1] + 31) // 32})")


def matmul_q8(float[:, ::1] out,             # OUT (M, N)
              const float[:, ::1] x,         # IN  (M, K) fp32 activations
              const int8_t[:, ::1] w,        # IN  (N, K) int8 weights
              const uint16_t[:, ::1] w_scale,  # IN  (N, ceil(K/32)) fp16 bits: scale per group of 32
              const float[::1] bias=None):   # IN  (N,) or None
    """out = quantize_q8(x) @ dequantize(w, w_scale).T + bias, see reference.matmul_q8."""
    _check_linear(out, x, w, bias)
    _check_scales(w, w_scale, "w_scale")
    cdef int M = x.shape[0], N = w.shape[0], K = x.shape[1]
    if _nothing_to_do(M, N, K):
        return
    cdef const float *b = &bias[0] if bias is not None else NULL
    cdef int rc
    with nogil:
        rc = _matmul_q8(&out[0, 0], &x[0, 0], &w[0, 0], &w_scale[0, 0], b, M, N, K)
    if rc:
        raise MemoryError(f"matmul_q8: no memory for the scratch of {M} rows")


def matmul_q8_silu_mul(float[:, ::1] out,              # OUT (M, N)
                       const float[:, ::1] x,          # IN  (M, K) fp32 activations
                       const int8_t[:, ::1] w_gate,    # IN  (N, K) int8 weights
                       const uint16_t[:, ::1] s_gate,  # IN  (N, ceil(K/32)) fp16 bits
                       const int8_t[:, ::1] w_up,      # IN  (N, K) int8 weights
                       const uint16_t[:, ::1] s_up):   # IN  (N, ceil(K/32)) fp16 bits
    """out = silu(x @ gate.T) * (x @ up.T), x quantized once (Llama's feed-forward before its down
    projection): the bits of matmul_q8_shared into two outputs and a silu_mul pass, with neither
    product stored in full."""
    _check_linear(out, x, w_gate, None)
    _check_linear(out, x, w_up, None)
    _check_scales(w_gate, s_gate, "s_gate")
    _check_scales(w_up, s_up, "s_up")
    cdef int M = x.shape[0], N = w_gate.shape[0], K = x.shape[1]
    if _nothing_to_do(M, N, K):
        return
    cdef int rc
    with nogil:
        rc = _matmul_q8_silu_mul(&out[0, 0], &x[0, 0], &w_gate[0, 0], &s_gate[0, 0], &w_up[0, 0], &s_up[0, 0],
                                 M, N, K)
    if rc:
        raise MemoryError(f"matmul_q8_silu_mul: no memory for the scratch of {M} rows")


def matmul_q8_shared(outs, const float[:, ::1] x, weights, scales, biases):
    """out_i = matmul_q8(x, weights[i], scales[i], biases[i]) for up to MAX_SHARED weight matrices
    that read the same x (an attention block's q, k and v): x is quantized once and one parallel
    region covers every matrix's tiles.  The results are bit for bit those of separate calls."""
    cdef int n = len(weights), i, M = x.shape[0], K = x.shape[1]
    if not 0 < n <= MAX_SHARED or len(outs) != n or len(scales) != n or len(biases) != n:
        raise ValueError(f"matmul_q8_shared takes 1 to {MAX_SHARED} matrices, each with an output, "
                         f"scales and a bias (or None)")
    if K == 0:
        raise ValueError("x has no columns")
    cdef float *out_p[MAX_SHARED]
    cdef const int8_t *w_p[MAX_SHARED]
    cdef const uint16_t *s_p[MAX_SHARED]
    cdef const float *b_p[MAX_SHARED]
    cdef int Ns[MAX_SHARED]
    cdef float[:, ::1] o
    cdef const int8_t[:, ::1] w
    cdef const uint16_t[:, ::1] sc
    cdef const float[::1] b
    cdef int used = 0
    for i in range(n):              # the callers' arrays keep the viewed buffers alive
        o, w, sc = outs[i], weights[i], scales[i]
        b = biases[i]
        _check_linear(o, x, w, biases[i])
        _check_scales(w, sc, f"scales[{i}]")
        if M == 0 or w.shape[0] == 0:
            continue
        out_p[used], w_p[used], s_p[used] = &o[0, 0], &w[0, 0], &sc[0, 0]
        b_p[used] = &b[0] if b is not None else NULL
        Ns[used] = w.shape[0]
        used += 1
    if used == 0:
        return
    cdef int rc
    with nogil:
        rc = _matmul_q8_shared(used, out_p, w_p, s_p, b_p, Ns, &x[0, 0], M, K)
    if rc:
        raise MemoryError(f"matmul_q8_shared: no memory for the scratch of {M} rows")


def matmul_f32(float[:, ::1] out,            # OUT (M, N)
               const float[:, ::1] x,        # IN  (M, K)
               const float[:, ::1] w,        # IN  (N, K)
               const float[::1] bias=None):  # IN  (N,) or None
    """out = x @ w.T + bias in fp32."""
    _check_linear(out, x, w, bias)
    cdef int M = x.shape[0], N = w.shape[0], K = x.shape[1]
    if _nothing_to_do(M, N, K):
        return
    cdef const float *b = &bias[0] if bias is not None else NULL
    with nogil:
        _matmul_f32(&out[0, 0], &x[0, 0], &w[0, 0], b, M, N, K)


def quantize_q8(const float[:, ::1] x):
    """Quantize rows of x to int8 with one scale per group of 32 columns.

    Returns (q, scales): int8 (M, K) and float32 (M, ceil(K/32)), the values matmul_q8 multiplies,
    in natural column order (the kernel keeps them interleaved, see reference.pack_q8_rows).
    """
    import numpy as np

    cdef int M = x.shape[0], K = x.shape[1]
    if K == 0:
        raise ValueError("x has no columns")
    cdef int Kp = edge_q8_row_bytes(K)
    qp = np.zeros((M, Kp), dtype=np.int8)
    scales = np.zeros((M, (K + 31) // 32), dtype=np.float32)
    cdef int8_t[:, ::1] qv = qp
    cdef float[:, ::1] sv = scales
    cdef int m
    cdef int k
    natural = np.empty((M, K), dtype=np.int8)
    cdef int8_t[:, ::1] nv = natural
    for m in range(M):
        edge_quantize_row_q8(&x[m, 0], K, &qv[m, 0], &sv[m, 0])
        for k in range(K):
            nv[m, k] = qv[m, edge_q8_pack_index(k, K)]
    return natural, scales


cdef int _q8_row_bytes(int K) noexcept nogil:
    """Bytes of one quantized activation row of K values (values and VNNI compensation)."""
    return edge_q8_row_bytes(K)


cdef void _quantize_rows_q8(const float *x, int M, int K, int8_t *q, float *xs) noexcept nogil:
    """M rows of x quantized as _matmul_q8_shared quantizes them: q (M rows of _q8_row_bytes(K)),
    xs (M rows of ceil(K / 32) scales), for _matmul_q8_team."""
    cdef int m, Kp = edge_q8_row_bytes(K), G = (K + 31) // 32
    for m in range(M):
        edge_quantize_row_q8(x + <size_t> m * K, K, q + <size_t> m * Kp, xs + <size_t> m * G)


cdef void _matmul_q8_team(int n_mats, float **outs, const int8_t **ws_, const uint16_t **scales,
                          const float **biases, const int *Ns, const int8_t *q, const float *xs, int M, int K,
                          int tid, int nthr) noexcept nogil:
    """Run by every thread of a parallel region (a decode step's forward pass in one region,
    models/_llama_native.pyx): thread tid's share of out_i = q @ dequantize(w_i).T + bias_i for
    up to TEAM_ROWS_MAX rows that the thread has quantized itself (q, xs: _quantize_rows_q8), one
    weight row at a time (against four activation rows at once where there are four: the 4 x 1
    tile); the same bits as _matmul_q8_shared.  The tiles of all the matrices, in
    order, are split into nthr contiguous shares (OpenMP's static split), so each thread streams
    its weights forward with nothing between tiles: no claims, whose locked instructions stall the
    stream, and no stealing, which a region per call needed because its threads started late.  No
    barrier at the end: the caller waits where it reads the outputs."""
    cdef int Kp = edge_q8_row_bytes(K), G = (K + 31) // 32
    cdef int tile_start[MAX_SHARED + 1]
    cdef int i, t, n, n0, n1, m, N
    cdef float *out
    cdef const int8_t *w
    cdef const uint16_t *sc
    cdef const float *bias
    tile_start[0] = 0
    for i in range(n_mats):
        tile_start[i + 1] = tile_start[i] + (Ns[i] + N_TILE - 1) // N_TILE
    cdef int n_tiles = tile_start[n_mats]
    i = 0
    for t in range(n_tiles * tid // nthr, n_tiles * (tid + 1) // nthr):
        while t >= tile_start[i + 1]:
            i = i + 1
        out, N, w, sc, bias = outs[i], Ns[i], ws_[i], scales[i], biases[i]
        n0 = (t - tile_start[i]) * N_TILE
        n1 = n0 + N_TILE if n0 + N_TILE < N else N
        for n in range(n0, n1):
            m = 0
            while rows_tile and m + 4 <= M:         # four rows against the weight row at once
                edge_dot_q8_4x1(q + <size_t> m * Kp, Kp, xs + <size_t> m * G, G, w + <size_t> n * K,
                                sc + <size_t> n * G, K, out + <size_t> m * N + n, N,
                                bias + n if bias != NULL else NULL)
                m = m + 4
            while m < M:
                _store(out + <size_t> m * N + n, bias, n,
                       edge_dot_q8(q + <size_t> m * Kp, xs + <size_t> m * G, w + <size_t> n * K,
                                   sc + <size_t> n * G, K))
                m = m + 1
