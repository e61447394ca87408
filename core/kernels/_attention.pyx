"""Scaled dot-product attention in fp32, grouped-query heads (n_heads a multiple of n_kv_heads).

attention_paged: causal attention of new query rows over a paged KV cache.  The cache of one layer
  is a pool of slots (n_blocks * block_size rows of n_kv_heads * head_dim), float32 or float16 (the
  halves of a block are widened to fp32 as the block is read; the dot products, softmax and
  weighted sums are fp32 either way); a sequence owns whole
  blocks, listed in its row of block_tables; position j of sequence s lives in slot
  block_tables[s, j // block_size] * block_size + j % block_size.  Query row t belongs to sequence
  seq_ids[t], sits at positions[t] and sees positions 0..positions[t].  Rows of different
  sequences may be mixed in one call (batched decode).
attention_varlen: bidirectional attention over packed sequences held contiguously (an encoder's
  batch without padding): row t sees the key rows key_start[t] <= j < key_end[t].

attention_paged: one task is a run of consecutive rows of one sequence and one KV head, or all its
KV heads in a batched decode step (see attention_paged_rows); attention_varlen: one task is one
head of a run of rows that see the same keys.
"""
from cython.parallel cimport parallel, prange
from libc.stdint cimport int32_t, uint16_t
from libc.math cimport exp
from libc.stdlib cimport free
from libc.string cimport memcpy

from core.kernels.parallel cimport (edge_barrier, edge_lines, edge_scratch, edge_scratch_fail_after, edge_team_max,
                                    edge_thread_id)

cdef extern from *:
    """
    static inline int edge_take(int *next) { return __atomic_fetch_add(next, 1, __ATOMIC_RELAXED); }
    """
    int edge_take(int *next) nogil

cdef extern from "simd.h" nogil:
    void edge_softmax_f32(float *x, int n)
    double edge_exp_shifted_f32(float *x, int n, float *max_out)
    void edge_scores_f32_queries(const float *q, int nq, size_t q_stride, const float *k, size_t stride, int n,
                                 int hd, float scale, float *scores, size_t scores_stride)
    void edge_weighted_sum_f32_queries(float *o, int nq, size_t o_stride, const float *p, size_t p_stride,
                                       const float *v, size_t stride, int n, int hd)
    void edge_scores_f16_queries(const float *q, int nq, size_t q_stride, const uint16_t *k, size_t stride, int n,
                                 int hd, float scale, float *scores, size_t scores_stride)
    void edge_weighted_sum_f16_queries(float *o, int nq, size_t o_stride, const float *p, size_t p_stride,
                                       const uint16_t *v, size_t stride, int n, int hd)
    void edge_weighted_sum_queries(float *o, int nq, size_t o_stride, const float *p, size_t p_stride,
                                   size_t p_jstride, const void *v, size_t stride, int n, int hd, int H16)
    int EDGE_ROWS_IN_LANES
    int edge_lanes_rows(int n_rows)
    void edge_transpose_queries(const float *q, size_t q_stride, int n_rows, int hd, float *qt, int RP)
    void edge_attention_probs_lanes(const float *qt, int RP, const float *k, size_t k_stride, int n, int hd,
                                    float scale, float *p)
    int EDGE_KV_ROW_MAX
    int EDGE_F16C
    void edge_f32_to_f16_row(const float *x, uint16_t *h, int n)
    void edge_f16_to_f32_row(const uint16_t *h, float *x, int n)
    void edge_prefetch(const void *p, size_t nbytes)
    void edge_touch(const void *p, size_t nbytes)


def _fail_scratch_after(int n):
    """Tests: make the n-th scratch allocation of this module's kernels from now on fail (0: none)."""
    edge_scratch_fail_after(n)


cdef bint _is_f16(cache) except -1:
    """Whether a KV cache array holds float16 (else float32; anything else is refused)."""
    kind = getattr(getattr(cache, "dtype", None), "str", None)
    if kind in ("<f2", "=f2"):
        return True
    if kind in ("<f4", "=f4"):
        return False
    raise TypeError(f"attention: a KV cache must be a float32 or float16 array, not {kind or type(cache).__name__}")


cdef size_t _cache_address(cache, bint f16, bint writable, Py_ssize_t *rows, Py_ssize_t *cols) except? 0:
    """The address of a C-contiguous 2-d KV cache array (0 if it is empty) and its shape."""
    cdef const float[:, ::1] c32
    cdef const uint16_t[:, ::1] c16
    cdef float[:, ::1] w32
    cdef uint16_t[:, ::1] w16
    if f16:
        if writable:
            w16 = cache.view("u2")
            c16 = w16
        else:
            c16 = cache.view("u2")
        rows[0], cols[0] = c16.shape[0], c16.shape[1]
        return <size_t> &c16[0, 0] if c16.shape[0] and c16.shape[1] else 0
    if writable:
        w32 = cache
        c32 = w32
    else:
        c32 = cache
    rows[0], cols[0] = c32.shape[0], c32.shape[1]
    return <size_t> &c32[0, 0] if c32.shape[0] and c32.shape[1] else 0


cdef struct KVPair:
    bint f16               # halves (else floats)
    size_t k, v            # addresses of the K and V caches (0 if empty)
    Py_ssize_t rows, cols  # the shape both caches share


cdef int _kv_pair(k_cache, v_cache, bint writable, str what, KVPair *pair) except -1:
    """Check that the K and V caches are C-contiguous 2-d arrays of one dtype and one shape, and
    fill `pair` with their dtype, addresses and shape."""
    pair.f16 = _is_f16(k_cache)
    if _is_f16(v_cache) != pair.f16:
        raise TypeError(f"{what}: the K and V caches must have one dtype")
    cdef Py_ssize_t v_rows, v_cols
    pair.k = _cache_address(k_cache, pair.f16, writable, &pair.rows, &pair.cols)
    pair.v = _cache_address(v_cache, pair.f16, writable, &v_rows, &v_cols)
    if v_rows != pair.rows or v_cols != pair.cols:
        raise ValueError(f"{what}: the K and V caches must have one shape")
    return 0


def attention_paged(float[:, ::1] out,                  # OUT (T, n_heads * head_dim)
                    const float[:, ::1] q,              # IN  (T, n_heads * head_dim)
                    k_cache,                            # IN  (n_slots, n_kv_heads * head_dim), float32 or float16
                    v_cache,                            # IN  (n_slots, n_kv_heads * head_dim), the same dtype
                    const int32_t[:, ::1] block_tables, # IN  (n_seqs, max_blocks)
                    const int32_t[::1] seq_ids,         # IN  (T,)
                    const int32_t[::1] positions,       # IN  (T,)
                    int n_heads, int n_kv_heads, int block_size, float scale):
    cdef KVPair kv
    _kv_pair(k_cache, v_cache, False, "attention", &kv)
    cdef Py_ssize_t T = q.shape[0]
    if n_heads <= 0 or n_kv_heads <= 0 or n_heads % n_kv_heads or q.shape[1] % n_heads:
        raise ValueError(f"attention: {n_heads} heads cannot share {n_kv_heads} kv heads over width {q.shape[1]}")
    cdef int hd = q.shape[1] // n_heads
    if kv.cols != n_kv_heads * hd:
        raise ValueError("attention: cache width must be n_kv_heads * head_dim")
    if block_size <= 0 or kv.rows % block_size:
        raise ValueError("attention: the caches must hold a whole number of blocks")
    if out.shape[0] != T or out.shape[1] != q.shape[1] or seq_ids.shape[0] != T or positions.shape[0] != T:
        raise ValueError("attention: out, q, seq_ids and positions must have T rows")
    cdef int n_blocks = kv.rows // block_size
    cdef int n_seqs = block_tables.shape[0], max_blocks = block_tables.shape[1]
    cdef Py_ssize_t t
    cdef int max_pos = 0, bad = -1
    if T and max_blocks:
        with nogil:
            bad = check_paged_rows(&block_tables[0, 0], n_seqs, max_blocks, n_blocks, &seq_ids[0], &positions[0],
                                   T, block_size)
    elif T:
        bad = 0
    if bad >= 0:
        raise ValueError(f"attention: row {bad} names a sequence, position or KV block outside the cache")
    for t in range(T):
        max_pos = positions[t] if positions[t] > max_pos else max_pos
    if T == 0:
        return
    cdef int rc
    with nogil:
        rc = attention_paged_rows(&out[0, 0], &q[0, 0], <const void *> kv.k, <const void *> kv.v, kv.f16,
                                  &block_tables[0, 0], max_blocks, &seq_ids[0], &positions[0], T, max_pos,
                                  n_heads, n_kv_heads, hd, block_size, scale)
    if rc:
        raise MemoryError(f"attention: no memory for the scratch of {T} rows over {max_pos + 1} positions")


cdef int check_paged_rows(const int32_t *block_tables, int n_seqs, int max_blocks, int n_blocks,
                          const int32_t *seq_ids, const int32_t *positions, int T, int block_size) noexcept nogil:
    """The first row (0..T-1) whose sequence, position or KV blocks fall outside the cache, or -1."""
    cdef int t, j, s, b
    for t in range(T):
        s = seq_ids[t]
        if s < 0 or s >= n_seqs or positions[t] < 0 or positions[t] // block_size >= max_blocks:
            return t
        for j in range(positions[t] // block_size + 1):
            b = block_tables[<size_t> s * max_blocks + j]
            if b < 0 or b >= n_blocks:
                return t
    return -1


cdef int _rows_per_task = 16    # consecutive query rows of a sentence that share a task (attention_varlen)
# the same for a sequence's rows in attention_paged: a prefill's task widens each K and V block of
# its chunk from halves once for all its rows, so longer runs widen less often.  32 rows against 16
# (SmolLM2 on Zen 4, alternating): prefill of 2,000 tokens 1.040x, 512 1.013x, 128 0.991x; 64
# against 32: 1.001x and 1.007x for twice the scores' scratch; 128 slower.  The encoder's tasks
# (attention_varlen) lost 4% at 64 rows, so they keep their own setting.
cdef int _paged_rows_per_task = 32


def _set_rows_per_task(int n):
    """Benchmark knob: how many consecutive query rows of one sentence one attention_varlen task
    takes (>= 1)."""
    global _rows_per_task
    if n < 1:
        raise ValueError("rows per task must be >= 1")
    _rows_per_task = n


def _set_paged_rows_per_task(int n):
    """Benchmark knob: how many consecutive query rows of one sequence one attention_paged task
    takes (>= 1); returns the previous setting."""
    global _paged_rows_per_task
    if n < 1:
        raise ValueError("rows per task must be >= 1")
    old, _paged_rows_per_task = _paged_rows_per_task, n
    return old


cdef int split_runs(const int32_t *a, const int32_t *b, int b_step, int T, int max_rows,
                    int32_t *starts) noexcept nogil:
    """Cut rows 0..T-1 into runs of at most max_rows rows with a[t] = a[t - 1] and
    b[t] = b[t - 1] + b_step (paged: one sequence at consecutive positions; varlen: one key span);
    starts[0..n_runs] are their first rows (starts[n_runs] = T).  Returns n_runs."""
    cdef int t, n_runs = 0
    for t in range(T):
        if (t == 0 or a[t] != a[t - 1] or b[t] != b[t - 1] + b_step
                or t - starts[n_runs - 1] == max_rows):
            starts[n_runs] = t
            n_runs += 1
    starts[n_runs] = T
    return n_runs


cdef int longest_run(const int32_t *starts, int n_runs) noexcept nogil:
    """The most rows in one of the runs starts[0..n_runs] (the scores buffer a task needs)."""
    cdef int run, longest = 0
    for run in range(n_runs):
        longest = max(longest, starts[run + 1] - starts[run])
    return longest


cdef int _chunk_blocks = 16     # KV blocks per task of a long context: keys in chunks of 16 x 16
cdef int _sequence_tasks = 1    # one-row runs take every KV head of their sequence in one task
cdef int _sequence_tasks_min = 2     # ... where that gives at least this many tasks per thread


def _set_sequence_tasks(int on, int min_tasks_per_thread=2):
    """Benchmark knob: in a call that would have at least min_tasks_per_thread tasks per thread
    with every KV head in one task (a task per run and chunk of keys), one-row runs each take all
    KV heads of their sequence in one task (on), or one task per KV head (off).  The same bits
    either way."""
    global _sequence_tasks, _sequence_tasks_min
    _sequence_tasks = on != 0
    _sequence_tasks_min = max(1, min_tasks_per_thread)


def _set_chunk_blocks(int n):
    """Tuning and test knob: how many KV blocks one attention task of a long context takes (>= 1)."""
    global _chunk_blocks
    if n < 1:
        raise ValueError("blocks per chunk must be >= 1")
    _chunk_blocks = n


cdef int attention_paged_rows(float *out, const float *q, const void *k_cache, const void *v_cache, bint f16,
                              const int32_t *block_tables, int max_blocks, const int32_t *seq_ids,
                              const int32_t *positions, int T, int max_pos, int n_heads, int n_kv_heads,
                              int hd, int block_size, float scale) noexcept nogil:
    """attention_paged on raw rows (already checked; max_pos = max(positions)); the caches hold
    float16 (f16) or float32.  Returns 0, or -1 (having computed nothing) when its scratch memory
    cannot be had.

    One task is a run of consecutive rows of one sequence (a prefill chunk gives runs of
    _paged_rows_per_task rows, a batched decode step runs of one), one KV head with the n_heads /
    n_kv_heads query heads that share it, and one chunk of _chunk_blocks KV blocks: the task walks
    its blocks once, and every query row of the task takes its scores (then its weighted sum) from
    a block while the block is in L1 (widened to fp32 first where the cache holds halves).  In a
    call that would still have _sequence_tasks_min tasks per thread (a batched decode step, or one
    sequence deep into a long context), a one-row run's task takes all KV heads of its sequence
    instead (each block read a head's columns at a time).  A row
    whose keys fit in the first chunk is normalised in its task (softmax, then the weighted sum).  A
    row with more keys (a long context: few rows but many keys, which one task per KV head would
    spread over only n_kv_heads threads) leaves, per chunk, the chunk's max score, sum of
    exponentials and unnormalised weighted sum; a second pass combines the chunks in order
    (flash-decoding).  Chunks start at fixed key positions and each (row, head) sees the same
    blocks in the same order whatever else is in the call, so results depend neither on grouping
    nor on the thread count."""
    cdef PagedPlan plan
    cdef int i
    if paged_plan(&plan, seq_ids, positions, T, max_pos, n_heads, n_kv_heads, hd, block_size, f16, scale):
        return -1
    with parallel():
        for i in prange(plan.task_start[plan.n_runs], schedule="guided"):
            _plan_task(&plan, i, edge_thread_id(), out, q, k_cache, v_cache, block_tables, max_blocks, seq_ids,
                       positions)
    if plan.parts != NULL:         # combine the chunks of split runs, one (row, head) per task
        for i in prange(T * n_heads, schedule="static"):
            _plan_combine(&plan, i, out, positions)
    paged_free(&plan)
    return 0


cdef int paged_plan(PagedPlan *p, const int32_t *seq_ids, const int32_t *positions, int T, int max_pos,
                    int n_heads, int n_kv_heads, int hd, int block_size, bint f16, float scale) noexcept nogil:
    """The tasks of attention_paged_rows over these rows, and their scratch: the same for every layer
    of a forward pass.  0, or -1 (nothing to free) when the scratch memory cannot be had."""
    cdef int n_max = edge_team_max(), run, n_rows, n_chunks
    p.T, p.n_heads, p.n_kv_heads, p.hd, p.block_size = T, n_heads, n_kv_heads, hd, block_size
    p.f16, p.scale = f16, scale
    p.group, p.width, p.kv_width = n_heads // n_kv_heads, n_heads * hd, n_kv_heads * hd
    p.chunk_blocks = _chunk_blocks
    p.next_task = 0
    # the runs (at most T): where each starts, its first task, and its first partial result (chunks
    # of a split run, hd + 2 floats each)
    cdef size_t ints = edge_lines((T + 1) * sizeof(int32_t))
    p.runs = <char *> edge_scratch(2 * ints + (T + 1) * sizeof(size_t))
    if p.runs == NULL:
        return -1
    p.starts = <int32_t *> p.runs
    p.task_start = <int32_t *> (p.runs + ints)
    p.part_start = <size_t *> (p.runs + 2 * ints)
    p.n_runs = split_runs(seq_ids, positions, 1, T, _paged_rows_per_task, p.starts)
    cdef int longest = longest_run(p.starts, p.n_runs)
    p.stride = max_pos + 1          # scores of one (row, head) of a task
    # KV heads per task: a one-row run (a decoding sequence) of a call with tasks enough to keep
    # every thread busy when each takes all KV heads of a chunk of keys (many sequences, or one
    # with a long context) takes all of its sequence's (whole), so that one task reads each of its
    # blocks (a head's columns at a time) instead of one task per KV head each reading a third of
    # every row; other runs take one KV head
    cdef int whole_tasks = 0
    for run in range(p.n_runs):
        whole_tasks += _chunks_of(positions[p.starts[run + 1] - 1] + 1, block_size, p.chunk_blocks)
    p.whole = (_sequence_tasks and whole_tasks >= _sequence_tasks_min * n_max and f16
               and hd <= EDGE_KV_ROW_MAX and EDGE_F16C and _f16_in_place)
    p.task_start[0], p.part_start[0] = 0, 0
    for run in range(p.n_runs):
        n_rows = p.starts[run + 1] - p.starts[run]
        n_chunks = _chunks_of(positions[p.starts[run + 1] - 1] + 1, block_size, p.chunk_blocks)
        p.task_start[run + 1] = p.task_start[run] + n_kv_heads // _heads_of(p.whole, n_rows, n_kv_heads) * n_chunks
        p.part_start[run + 1] = p.part_start[run] + (<size_t> n_rows * n_heads * n_chunks if n_chunks > 1 else 0)
    # every thread's scores and one block of one head widened to fp32, then the partial results
    p.scores_bytes = edge_lines(<size_t> max(longest, n_kv_heads if p.whole else 1) * p.group * p.stride
                                * sizeof(float))
    p.thread_bytes = p.scores_bytes + edge_lines(<size_t> block_size * hd * sizeof(float))
    p.work = <char *> edge_scratch(n_max * p.thread_bytes + p.part_start[p.n_runs] * (hd + 2) * sizeof(float))
    if p.work == NULL:
        free(p.runs)
        return -1
    p.parts = <float *> (p.work + n_max * p.thread_bytes) if p.part_start[p.n_runs] else NULL
    return 0


cdef void paged_free(PagedPlan *p) noexcept nogil:
    free(p.work)
    free(p.runs)


cdef void attention_paged_team(PagedPlan *p, float *out, const float *q, const void *k_cache, const void *v_cache,
                               const int32_t *block_tables, int max_blocks, const int32_t *seq_ids,
                               const int32_t *positions, int tid, int nthr) noexcept nogil:
    """attention_paged_rows inside a parallel region that every thread of the team enters (a forward
    pass in one region): the plan's tasks go to whichever thread asks next, then (where runs are
    split) a barrier and the combining pass in static shares.  The plan's next_task is 0 on entry
    (paged_plan, then paged_plan_reset before the barrier that precedes each call), and the caller
    waits at a barrier before reading out.  The same bits as attention_paged_rows."""
    cdef int i, n = p.task_start[p.n_runs]
    while True:
        i = edge_take(&p.next_task)
        if i >= n:
            break
        _plan_task(p, i, tid, out, q, k_cache, v_cache, block_tables, max_blocks, seq_ids, positions)
    if p.parts != NULL:
        edge_barrier()
        n = p.T * p.n_heads
        for i in range(n * tid // nthr, n * (tid + 1) // nthr):
            _plan_combine(p, i, out, positions)


cdef void paged_plan_reset(PagedPlan *p) noexcept nogil:
    p.next_task = 0


cdef inline void _plan_task(PagedPlan *p, int i, int tid, float *out, const float *q, const void *k_cache,
                            const void *v_cache, const int32_t *block_tables, int max_blocks,
                            const int32_t *seq_ids, const int32_t *positions) noexcept nogil:
    """Task i of the plan, on thread tid's scratch."""
    cdef int run = _run_of(p.task_start, p.n_runs, i)
    cdef int heads = _heads_of(p.whole, p.starts[run + 1] - p.starts[run], p.n_kv_heads)
    cdef int n_chunks = (p.task_start[run + 1] - p.task_start[run]) // (p.n_kv_heads // heads)
    cdef int kvh = (i - p.task_start[run]) // n_chunks * heads
    cdef int c = (i - p.task_start[run]) % n_chunks
    _paged_task(out, q, k_cache, v_cache, p.f16, block_tables + <size_t> seq_ids[p.starts[run]] * max_blocks,
                positions, p.starts[run], p.starts[run + 1] - p.starts[run], kvh, heads, c, n_chunks, p.chunk_blocks,
                p.parts + p.part_start[run] * (p.hd + 2) if n_chunks > 1 else NULL,
                p.n_heads, p.group, p.hd, p.width, p.kv_width, p.block_size, p.scale,
                <float *> (p.work + tid * p.thread_bytes), p.stride,
                <float *> (p.work + tid * p.thread_bytes + p.scores_bytes))


cdef inline void _plan_combine(PagedPlan *p, int i, float *out, const int32_t *positions) noexcept nogil:
    """Combine the chunks of (row, head) i = row * n_heads + head where its run is split."""
    cdef int t0 = i // p.n_heads, h = i % p.n_heads
    cdef int run = _run_of(p.starts, p.n_runs, t0)     # the run holding row t0
    cdef int heads = _heads_of(p.whole, p.starts[run + 1] - p.starts[run], p.n_kv_heads)
    cdef int n_chunks = (p.task_start[run + 1] - p.task_start[run]) // (p.n_kv_heads // heads)
    cdef int rg
    if n_chunks > 1 and positions[t0] + 1 > p.chunk_blocks * p.block_size:
        rg = (t0 - p.starts[run]) * p.n_heads + h
        _combine_chunks(out + <size_t> t0 * p.width + h * p.hd,
                        p.parts + (p.part_start[run] + <size_t> rg * n_chunks) * (p.hd + 2), n_chunks, p.hd)


cdef inline int _heads_of(bint whole, int n_rows, int n_kv_heads) noexcept nogil:
    """KV heads per task of a run of n_rows rows (see attention_paged_rows)."""
    return n_kv_heads if whole and n_rows == 1 else 1


cdef inline int _chunks_of(int n_keys, int block_size, int chunk_blocks) noexcept nogil:
    return ((n_keys + block_size - 1) // block_size + chunk_blocks - 1) // chunk_blocks


cdef inline int _run_of(const int32_t *first, int n_runs, int i) noexcept nogil:
    """The last run with first[run] <= i: the run holding task i (first = task_start) or row i
    (first = starts)."""
    cdef int lo = 0, hi = n_runs - 1, mid
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if first[mid] <= i:
            lo = mid
        else:
            hi = mid - 1
    return lo


cdef void _paged_task(float *out, const float *q, const void *k_cache, const void *v_cache, bint f16,
                      const int32_t *table, const int32_t *positions, int t0, int n_rows, int kvh, int heads, int c,
                      int n_chunks, int chunk_blocks, float *parts, int n_heads, int group, int hd, int width,
                      int kv_width,
                      int block_size, float scale, float *scores, size_t stride, float *widened) noexcept nogil:
    """Chunk c (blocks c * chunk_blocks ...) of one run and KV heads kvh..kvh+heads-1 (see
    attention_paged_rows; several heads only for a one-row run, read in place).  parts: the run's
    partial results where it is split (n_chunks > 1), else NULL.  Scores of row r, query head
    kvh * group + hg of the task: scores + (r * heads * group + hg) * stride."""
    cdef int n_keys = positions[t0 + n_rows - 1] + 1          # the run's last row sees the most keys
    cdef int b0 = c * chunk_blocks
    cdef int b1 = min(b0 + chunk_blocks, (n_keys + block_size - 1) // block_size)
    cdef int end = min(b1 * block_size, n_keys)                # one past the chunk's last key
    cdef int b, j, n, r, hg, h, e, d, first = b0 * block_size, seen
    cdef const float *kb
    cdef const float *vb
    cdef const uint16_t *rows
    cdef float *o
    cdef int chunk_keys = chunk_blocks * block_size       # a row with no more keys is never split
    cdef bint in_place = f16 and n_rows == 1 and hd <= EDGE_KV_ROW_MAX and EDGE_F16C and _f16_in_place
    cdef bint touch = n_rows <= TOUCH_ROWS_MAX and _touch_chunk     # little arithmetic per byte: the chunk first
    if touch:
        _touch_rows(k_cache, f16, table, b0, b1, end, block_size, kv_width, kvh * hd, heads * hd)
    for b in range(b0, b1):
        j = b * block_size
        if in_place:        # one row: each half is used once, so widen it in register as it is loaded
            n = positions[t0] + 1 - j
            rows = <const uint16_t *> k_cache + <size_t> table[b] * block_size * kv_width
            for e in range(heads):      # the next block's columns of a head before each head: a
                # whole block's lines at once (16 x kv_width halves) are more than the core can have
                # in flight, and the prefetches would stall it
                if not touch:
                    _prefetch_next(k_cache, table, b, end, block_size, kv_width, (kvh + e) * hd, hd, 2)
                edge_scores_f16_queries(q + <size_t> t0 * width + (kvh + e) * group * hd, group, hd,
                                        rows + (kvh + e) * hd, kv_width, min(n, block_size), hd, scale,
                                        scores + e * group * stride + j, stride)
            continue
        kb = _head_block(k_cache, f16, widened, table, b, end, block_size, kv_width, kvh * hd, hd)
        for r in range(n_rows):
            n = positions[t0 + r] + 1 - j
            if n > 0:
                edge_scores_f32_queries(q + <size_t> (t0 + r) * width + kvh * group * hd, group, hd, kb,
                                        hd if f16 else kv_width, min(n, block_size), hd, scale,
                                        scores + r * group * stride + j, stride)
    for r in range(n_rows):
        seen = min(positions[t0 + r] + 1, end) - first             # this row's keys in the chunk
        for hg in range(heads * group):
            h = kvh * group + hg
            if parts == NULL or positions[t0 + r] + 1 <= chunk_keys:     # the row's keys all in this chunk
                if seen <= 0:
                    continue
                edge_softmax_f32(scores + (r * heads * group + hg) * stride, positions[t0 + r] + 1)
                o = out + <size_t> (t0 + r) * width + h * hd
            else:        # the chunk's max score and sum of exp(score - max), after its weighted sum
                o = parts + ((<size_t> r * n_heads + h) * n_chunks + c) * (hd + 2)
                o[hd] = -1e30
                o[hd + 1] = 0.0
                if seen > 0:
                    o[hd + 1] = <float> edge_exp_shifted_f32(scores + (r * heads * group + hg) * stride + first,
                                                            seen, &o[hd])
            for d in range(hd):
                o[d] = 0.0
    if touch:
        _touch_rows(v_cache, f16, table, b0, b1, end, block_size, kv_width, kvh * hd, heads * hd)
    for b in range(b0, b1):
        j = b * block_size
        if in_place:
            n = positions[t0] + 1 - j
            rows = <const uint16_t *> v_cache + <size_t> table[b] * block_size * kv_width
            for e in range(heads):
                if not touch:
                    _prefetch_next(v_cache, table, b, end, block_size, kv_width, (kvh + e) * hd, hd, 2)
                if parts == NULL or positions[t0] + 1 <= chunk_keys:
                    edge_weighted_sum_f16_queries(out + <size_t> t0 * width + (kvh + e) * group * hd, group, hd,
                                                  scores + e * group * stride + j, stride, rows + (kvh + e) * hd,
                                                  kv_width, min(n, block_size), hd)
                else:
                    edge_weighted_sum_f16_queries(parts + (<size_t> (kvh + e) * group * n_chunks + c) * (hd + 2),
                                                  group, <size_t> n_chunks * (hd + 2), scores + e * group * stride + j,
                                                  stride, rows + (kvh + e) * hd, kv_width, min(n, block_size), hd)
            continue
        vb = _head_block(v_cache, f16, widened, table, b, end, block_size, kv_width, kvh * hd, hd)
        for r in range(n_rows):
            n = positions[t0 + r] + 1 - j
            if n > 0:
                if parts == NULL or positions[t0 + r] + 1 <= chunk_keys:
                    edge_weighted_sum_f32_queries(out + <size_t> (t0 + r) * width + kvh * group * hd, group, hd,
                                                  scores + r * group * stride + j, stride, vb,
                                                  hd if f16 else kv_width, min(n, block_size), hd)
                else:
                    edge_weighted_sum_f32_queries(
                        parts + ((<size_t> r * n_heads + kvh * group) * n_chunks + c) * (hd + 2), group,
                        <size_t> n_chunks * (hd + 2), scores + r * group * stride + j, stride, vb,
                        hd if f16 else kv_width, min(n, block_size), hd)


cdef void _combine_chunks(float *o, const float *parts, int n_chunks, int hd) noexcept nogil:
    """o = sum_c exp(m_c - m) o_c / sum_c exp(m_c - m) l_c over the chunks in order, where chunk c
    left o_c (hd floats), its max score m_c and its sum of exponentials l_c; m = max_c m_c."""
    cdef int c, d
    cdef float m = -1e30
    cdef double total = 0.0
    cdef float w
    for c in range(n_chunks):
        m = max(m, parts[<size_t> c * (hd + 2) + hd])
    for c in range(n_chunks):
        total += exp(<double> (parts[<size_t> c * (hd + 2) + hd] - m)) * parts[<size_t> c * (hd + 2) + hd + 1]
    for d in range(hd):
        o[d] = 0.0
    for c in range(n_chunks):
        if parts[<size_t> c * (hd + 2) + hd + 1] == 0.0:          # no key of this row in the chunk
            continue
        w = <float> (exp(<double> (parts[<size_t> c * (hd + 2) + hd] - m)) / total)
        for d in range(hd):
            o[d] += w * parts[<size_t> c * (hd + 2) + d]


cdef bint _f16_in_place = True


def _set_f16_in_place(int on):
    """Benchmark knob: a one-row task reads float16 K and V in place, widening in register (else
    through the widened block; the same bits)."""
    global _f16_in_place
    _f16_in_place = on != 0


# A task of at most this many rows (a decode step's, drafted rows included) loads its chunk's K
# rows, then its V rows, before it computes with them (_touch_rows): with so little arithmetic per
# byte, KV blocks read head by head as the loops go come from memory at a third of the rate.
# 2,000 cold keys (f16, SmolLM2's heads, 2 threads; runs alternating): 1 row 1.37x, 2 rows 1.09x,
# 4 rows 1.12x, 8 rows 1.08x, 16 rows 1.03x; but a prefill, whose keys were just written, lost
# 0.3-0.7% with every task touching (512 and 2,000 tokens), and keys in cache lose up to 3.6%.
cdef enum:
    TOUCH_ROWS_MAX = 8
cdef bint _touch_chunk = True


def _set_touch_chunk(int on):
    """Benchmark knob: a task of up to TOUCH_ROWS_MAX rows loads its chunk's K (then V) rows first
    (_touch_rows), instead of prefetching each next block as it goes (the same bits)."""
    global _touch_chunk
    _touch_chunk = on != 0


cdef inline void _touch_rows(const void *cache, bint f16, const int32_t *table, int b0, int b1, int end,
                             int block_size, int kv_width, int col, int width) noexcept nogil:
    """Load (edge_touch) columns col..col+width-1 of blocks b0..b1-1's rows (keys up to end)."""
    cdef int b, i
    cdef size_t size = 2 if f16 else 4, slot
    for b in range(b0, b1):
        slot = <size_t> table[b] * block_size
        for i in range(min(end - b * block_size, block_size)):
            edge_touch(<const char *> cache + ((slot + i) * kv_width + col) * size, width * size)


cdef inline void _prefetch_next(const void *cache, const int32_t *table, int b, int end, int block_size,
                                int kv_width, int col, int hd, size_t size) noexcept nogil:
    """Ask for block b + 1's rows, columns col..col+hd-1 (keys up to end): the next block of a
    sequence is anywhere in the pool, where the hardware prefetcher cannot guess it."""
    cdef int i, j = (b + 1) * block_size
    cdef size_t slot
    if j < end:
        slot = <size_t> table[b + 1] * block_size
        for i in range(min(end - j, block_size)):
            edge_prefetch(<const char *> cache + ((slot + i) * kv_width + col) * size, hd * size)


cdef inline const float *_head_block(const void *cache, bint f16, float *widened, const int32_t *table, int b,
                                     int end, int block_size, int kv_width, int col, int hd) noexcept nogil:
    """Block b of a sequence (keys b * block_size up to end), columns col..col+hd-1, as fp32 rows
    (_block_rows), after asking for block b + 1's rows (_prefetch_next)."""
    cdef int j = b * block_size
    cdef size_t size = 2 if f16 else 4
    _prefetch_next(cache, table, b, end, block_size, kv_width, col, hd, size)
    return _block_rows(cache, f16, widened, <size_t> table[b] * block_size, kv_width, col, hd,
                       min(end - j, block_size))


cdef inline const float *_block_rows(const void *cache, bint f16, float *widened, size_t slot, int kv_width,
                                     int col, int hd, int n) noexcept nogil:
    """Rows slot..slot+n-1, columns col..col+hd-1 of a cache: in place (stride kv_width) where it
    holds floats, else widened from halves into `widened` (stride hd)."""
    cdef int i
    if not f16:
        return <const float *> cache + slot * kv_width + col
    for i in range(n):
        edge_f16_to_f32_row(<const uint16_t *> cache + (slot + i) * kv_width + col, widened + <size_t> i * hd, hd)
    return widened


def attention_varlen(float[:, ::1] out,          # OUT (T, n_heads * head_dim)
                     const float[:, ::1] q,      # IN  (T, n_heads * head_dim)
                     const float[:, ::1] k,      # IN  (T, n_kv_heads * head_dim)
                     const float[:, ::1] v,      # IN  (T, n_kv_heads * head_dim)
                     const int32_t[::1] key_start,  # IN (T,)
                     const int32_t[::1] key_end,    # IN (T,)
                     int n_heads, int n_kv_heads, float scale):
    cdef Py_ssize_t T = q.shape[0]
    if n_heads <= 0 or n_kv_heads <= 0 or n_heads % n_kv_heads or q.shape[1] % n_heads:
        raise ValueError(f"attention: {n_heads} heads cannot share {n_kv_heads} kv heads over width {q.shape[1]}")
    cdef int hd = q.shape[1] // n_heads
    if k.shape[1] != n_kv_heads * hd or v.shape[1] != n_kv_heads * hd or k.shape[0] != T or v.shape[0] != T:
        raise ValueError("attention: k and v must be (T, n_kv_heads * head_dim)")
    if out.shape[0] != T or out.shape[1] != q.shape[1] or key_start.shape[0] != T or key_end.shape[0] != T:
        raise ValueError("attention: out, key_start and key_end must have T rows")
    cdef Py_ssize_t t
    cdef int max_len = 0
    for t in range(T):
        if not (0 <= key_start[t] < key_end[t] <= T):
            raise ValueError(f"attention: row {t} has an empty or out-of-range key span")
        max_len = max(max_len, key_end[t] - key_start[t])
    if T == 0:
        return
    cdef int rc
    with nogil:
        rc = attention_varlen_rows(&out[0, 0], &q[0, 0], &k[0, 0], &v[0, 0], &key_start[0], &key_end[0], T,
                                   max_len, n_heads, n_kv_heads, hd, scale)
    if rc:
        raise MemoryError(f"attention: no memory for the scratch of {T} rows")


cdef bint _rows_in_lanes = EDGE_ROWS_IN_LANES


def _set_rows_in_lanes(int on):
    """Benchmark knob: attention_varlen puts a run's rows in SIMD lanes (on, where simd.h has
    EDGE_ROWS_IN_LANES) or takes a horizontal sum per score (off).  Results differ in rounding."""
    global _rows_in_lanes
    _rows_in_lanes = on != 0 and EDGE_ROWS_IN_LANES


cdef int attention_varlen_rows(float *out, const float *q, const float *k, const float *v,
                               const int32_t *key_start, const int32_t *key_end, int T, int max_len, int n_heads,
                               int n_kv_heads, int hd, float scale) noexcept nogil:
    """attention_varlen on raw rows (spans already checked); 0, or -1 when its scratch cannot be had.
    One task is one head of a run of up to _rows_per_task consecutive rows that see the same keys
    (rows of one sentence): their queries share every K and V row loaded into a register.  Where
    simd.h has EDGE_ROWS_IN_LANES (AVX2, NEON), the run's rows sit in SIMD lanes: its queries transposed,
    scores and softmax a row per lane (edge_attention_probs_lanes), probabilities kept transposed for
    the weighted sum."""
    cdef int group = n_heads // n_kv_heads, width = n_heads * hd, kv_width = n_kv_heads * hd
    cdef int max_rows = _rows_per_task
    cdef int32_t *starts = <int32_t *> edge_scratch((T + 1) * sizeof(int32_t))
    if starts == NULL:
        return -1
    cdef int n_runs = split_runs(key_start, key_end, 0, T, max_rows, starts)
    cdef int i, run, h, kvh, t0, n_rows, r, d, j0, n, RP
    cdef int longest = longest_run(starts, n_runs)
    cdef bint lanes = _rows_in_lanes
    # every thread's scores (a run's rows by its keys), then, in lanes, its queries transposed
    cdef size_t scores_bytes = edge_lines(<size_t> (edge_lanes_rows(longest) if lanes else longest) * max_len
                                          * sizeof(float))
    cdef size_t thread_bytes = scores_bytes + (edge_lines(<size_t> edge_lanes_rows(longest) * hd * sizeof(float))
                                               if lanes else 0)
    cdef char *work = <char *> edge_scratch(edge_team_max() * thread_bytes)
    if work == NULL:
        free(starts)
        return -1
    cdef float *scores
    cdef float *qt
    cdef float *o
    with parallel():
        scores = <float *> (work + edge_thread_id() * thread_bytes)
        qt = <float *> (work + edge_thread_id() * thread_bytes + scores_bytes)
        for i in prange(n_runs * n_heads, schedule="static"):
            run = i // n_heads
            h = i % n_heads
            kvh = h // group
            t0 = starts[run]
            n_rows = starts[run + 1] - t0
            j0 = key_start[t0]
            n = key_end[t0] - j0
            for r in range(n_rows):
                o = out + <size_t> (t0 + r) * width + h * hd
                for d in range(hd):
                    o[d] = 0.0
            if lanes:
                RP = edge_lanes_rows(n_rows)
                edge_transpose_queries(q + <size_t> t0 * width + h * hd, width, n_rows, hd, qt, RP)
                edge_attention_probs_lanes(qt, RP, k + <size_t> j0 * kv_width + kvh * hd, kv_width, n, hd, scale,
                                           scores)
                edge_weighted_sum_queries(out + <size_t> t0 * width + h * hd, n_rows, width, scores, 1, RP,
                                          v + <size_t> j0 * kv_width + kvh * hd, kv_width, n, hd, 0)
                continue
            edge_scores_f32_queries(q + <size_t> t0 * width + h * hd, n_rows, width,
                                    k + <size_t> j0 * kv_width + kvh * hd, kv_width, n, hd, scale, scores, n)
            for r in range(n_rows):
                edge_softmax_f32(scores + r * n, n)
            edge_weighted_sum_f32_queries(out + <size_t> t0 * width + h * hd, n_rows, width, scores, n,
                                          v + <size_t> j0 * kv_width + kvh * hd, kv_width, n, hd)
    free(work)
    free(starts)
    return 0


def kv_write(k_cache,                      # OUT (n_slots, width) float32 or float16
             v_cache,                      # OUT (n_slots, width) the same dtype
             const float[:, ::1] k,        # IN  (T, width)
             const float[:, ::1] v,        # IN  (T, width)
             const int32_t[::1] slots):    # IN  (T,)
    """k_cache[slots[t]] = k[t]; v_cache[slots[t]] = v[t] (rounded to the nearest half where the
    caches hold float16)."""
    cdef KVPair kv
    _kv_pair(k_cache, v_cache, True, "kv_write", &kv)
    cdef Py_ssize_t t, T = k.shape[0], W = k.shape[1], n_slots = kv.rows
    if v.shape[0] != T or slots.shape[0] != T or v.shape[1] != W or kv.cols != W:
        raise ValueError("kv_write: shapes of caches, k, v and slots disagree")
    for t in range(T):
        if not (0 <= slots[t] < n_slots):
            raise ValueError(f"kv_write: slot {slots[t]} is outside the cache of {n_slots}")
    if T and W:
        with nogil:
            kv_write_rows(<void *> kv.k, <void *> kv.v, kv.f16, &k[0, 0], &v[0, 0], &slots[0], T, W)


cdef void kv_write_rows(void *k_cache, void *v_cache, bint f16, const float *k, const float *v,
                        const int32_t *slots, int T, int W) noexcept nogil:
    cdef int t
    for t in range(T):
        if f16:
            edge_f32_to_f16_row(k + <size_t> t * W, <uint16_t *> k_cache + <size_t> slots[t] * W, W)
            edge_f32_to_f16_row(v + <size_t> t * W, <uint16_t *> v_cache + <size_t> slots[t] * W, W)
        else:
            memcpy(<float *> k_cache + <size_t> slots[t] * W, k + <size_t> t * W, W * sizeof(float))
            memcpy(<float *> v_cache + <size_t> slots[t] * W, v + <size_t> t * W, W * sizeof(float))
