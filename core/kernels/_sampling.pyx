"""Next-token sampling from a row of logits (or many rows at once: sample_rows), in C, so that
generating needs no numpy.

    z = logits (fp64)
    z[i] = z[i] / r if z[i] > 0 else z[i] * r      for each distinct i in history   (repetition_penalty r)
    z[i] -= f * count_i + p * (count_i > 0)          for each i in generated          (frequency f, presence p)
    temperature 0: the first index of max(z)
    else: z = z / temperature
          candidates: the top_k by (z descending, index ascending) when 0 < top_k < vocab, else all
          e = exp(z - max z) over candidates
          top_p < 1: order candidates by (e descending, index ascending) and keep the shortest head
                     whose sum reaches top_p * sum(e) (sum(e) over all the vocabulary added a block
                     at a time, as below)
          the token: walk the kept candidates in order, the first whose running sum of e passes
                     u * (sum of the kept e), u uniform in [0, 1) drawn by the caller; where all
                     the vocabulary is kept (no top_k or top_p), the running sum at i is that of
                     the blocks of 64 before i's block (each block's sum four lanes wide, see
                     simd.h's EDGE_DRAW_BLOCK) then of i's block's weights one by one

reference.sample_logits is the numpy twin (same order of candidates, same order of sums; its exp
is numpy's, the kernel's a polynomial within an ulp of libm's, see edge_exp_keys_f64).
"""
from cython.parallel cimport prange
from libc.math cimport exp
from libc.stdint cimport int32_t, uint8_t, uint64_t
from libc.stdlib cimport free, malloc, qsort
from libc.string cimport memcpy, memset

from core.kernels.parallel cimport edge_lines, edge_team_max, edge_thread_id

cdef extern from "simd.h" nogil:
    int edge_argmax_f32(const float *x, int n)
    double edge_max_f64(const double *x, int n)
    int edge_indices_at_least_f64(const double *x, int n, double tau, int32_t *idx)
    int edge_first_above_f64(const double *x, int i, int n, double tau)
    double edge_exp_keys_blocks_f64(const double *z, int n, double temperature, double zmax, double *e,
                                    double *sums)
    int EDGE_DRAW_BLOCK


cdef struct Cand:
    double key
    int32_t id


cdef int _by_key_desc(const void *a, const void *b) noexcept nogil:
    cdef const Cand *x = <const Cand *> a
    cdef const Cand *y = <const Cand *> b
    if x.key > y.key:
        return -1
    if x.key < y.key:
        return 1
    return -1 if x.id < y.id else (1 if x.id > y.id else 0)


cdef inline bint _before(const Cand *x, const Cand *y) noexcept nogil:
    """x ranks before y: larger key, then smaller id."""
    return x.key > y.key or (x.key == y.key and x.id < y.id)


cdef void _sift_down(Cand *heap, int n, int i) noexcept nogil:
    """Min-heap by rank (the root ranks last) of the best n seen so far."""
    cdef int child
    cdef Cand tmp
    while True:
        child = 2 * i + 1
        if child >= n:
            return
        if child + 1 < n and _before(&heap[child], &heap[child + 1]):
            child = child + 1
        if not _before(&heap[i], &heap[child]):
            return
        tmp = heap[i]
        heap[i] = heap[child]
        heap[child] = tmp
        i = child


cdef int _top_keys(const double *z, int n, int k, double temperature, Cand *out) noexcept nogil:
    """The k best of the keys (z[i] / temperature, i) by (key descending, index ascending), best
    first, into out (k <= n): a min-heap of the best k so far, which a later key enters only by
    ranking before its root.  The root's index is smaller than every later one, so that takes a
    strictly larger key, and dividing by the temperature keeps order (a larger z may round to an
    equal key, never a smaller one): no z at or below the root's can enter.  The scan skips those
    four at a time (edge_first_above_f64) and divides only the few that can; a NaN never enters,
    as before a root whose key is NaN."""
    cdef int i
    cdef Cand cand
    for i in range(k):
        out[i].key = z[i] / temperature
        out[i].id = i
    for i in range(k // 2 - 1, -1, -1):
        _sift_down(out, k, i)
    i = k
    while True:
        i = edge_first_above_f64(z, i, n, z[out[0].id])
        if i >= n:
            break
        cand.key = z[i] / temperature
        cand.id = i
        if _before(&cand, &out[0]):
            out[0] = cand
            _sift_down(out, k, 0)
        i = i + 1
    qsort(out, k, sizeof(Cand), _by_key_desc)
    return k


cdef void _rank_all(Cand *c, int n, Cand *tmp) noexcept nogil:
    """Sort c by (key descending, index ascending) for keys >= 0 in index order: a stable LSD radix
    sort on the complemented bits of the keys (non-negative doubles order as their bits do), a
    byte per pass, skipping the bytes that all keys share."""
    cdef size_t count[256]
    cdef size_t pos, k
    cdef int shift, i
    cdef uint64_t bits
    cdef Cand *src = c
    cdef Cand *dst = tmp
    cdef Cand *swap
    for shift in range(0, 64, 8):
        for k in range(256):
            count[k] = 0
        for i in range(n):
            memcpy(&bits, &src[i].key, 8)
            count[((~bits) >> shift) & 255] += 1
        memcpy(&bits, &src[0].key, 8)
        if count[((~bits) >> shift) & 255] == <size_t> n:
            continue
        pos = 0
        for k in range(256):
            pos, count[k] = pos + count[k], pos
        for i in range(n):
            memcpy(&bits, &src[i].key, 8)
            k = ((~bits) >> shift) & 255
            dst[count[k]] = src[i]
            count[k] += 1
        swap = src
        src = dst
        dst = swap
    if src != c:
        memcpy(c, src, n * sizeof(Cand))


cdef int _rank_head(const double *e, int n, double target, Cand *c) noexcept nogil:
    """Put in c[0..m), ranked (weight descending, index ascending), the candidates whose weight
    e[i] is at least tau, for the largest tau of 1e-3, 1e-6, 1e-12 (of the largest weight, 1) with
    which their running sum in that order reaches target, and return m; 0 (c unchanged) if none
    does.  Those candidates are exactly the head of the whole ranking, so the nucleus cut from it
    is the same; ranking a few hundred candidates instead of all of them is most of the cost of
    top_p.  e: every candidate's weight, in index order; the indices are gathered into the end of
    c (c holds n)."""
    cdef double tau, acc
    cdef int i, m
    cdef int32_t *hits = <int32_t *> (c + n) - n            # the last 4 n bytes of c
    for tau in (1e-3, 1e-6, 1e-12):
        m = edge_indices_at_least_f64(e, n, tau, hits)
        if m > n // 4:              # the head would overrun the hits: rank everything instead
            return 0
        acc = 0.0
        for i in range(m):          # in index order, as the whole ranking's first pass adds them
            acc += e[hits[i]]
        if acc < target * (1.0 - 1e-9):        # (a margin for the order of the sums)
            continue
        for i in range(m):
            c[i].key = e[hits[i]]
            c[i].id = hits[i]
        qsort(c, m, sizeof(Cand), _by_key_desc)
        acc = 0.0
        for i in range(m):
            acc += c[i].key
            if acc >= target:
                return m
        return 0
    return 0


cdef int _first_block_above(const double *sums, int nb, double target) noexcept nogil:
    """The first block b whose running sum sums[b] passes target (the sums are non-decreasing),
    else -1."""
    cdef int lo = 0, hi = nb, mid
    while lo < hi:
        mid = (lo + hi) // 2
        if sums[mid] > target:
            hi = mid
        else:
            lo = mid + 1
    return lo if lo < nb else -1


cdef int _walk_block(const double *e, int m, double before, double target) noexcept nogil:
    """In a block of m weights whose blocks before it sum to `before`, the first i at which the
    running sum from `before`, added in index order, passes target; else the last positive
    weight's (-1 if none: a row of NaNs)."""
    cdef int i, last = -1
    cdef double acc = before
    for i in range(m):
        acc += e[i]
        if acc > target:
            return i
        if e[i] > 0:
            last = i
    return last


cdef int _draw_from_blocks(const double *e, const double *sums, int n, double u) noexcept nogil:
    """The token for uniform u from the weights e[0..n) and their blocks' running sums: the block
    whose running sum first passes u * total, walked from the sum of the blocks before it (the
    last positive weight of the row if no block's does, as rounding allows for u near 1)."""
    cdef int nb = (n + EDGE_DRAW_BLOCK - 1) // EDGE_DRAW_BLOCK, b, i, at
    cdef double target = u * sums[nb - 1]
    b = _first_block_above(sums, nb, target)
    if b >= 0:
        at = b * EDGE_DRAW_BLOCK
        i = _walk_block(e + at, min(EDGE_DRAW_BLOCK, n - at), sums[b - 1] if b > 0 else 0.0, target)
        if i >= 0:
            return at + i
    for i in range(n - 1, -1, -1):
        if e[i] > 0:
            return i
    return n - 1


cdef int _choose(int V, double temperature, int top_k, double top_p, double u,
                 double *z, Cand *c, Cand *best) noexcept nogil:
    """The sampling steps after the penalties (z holds the penalised logits); c and best hold V."""
    cdef int i, n, keep
    cdef double zmax, total, acc, target
    if temperature == 0.0:
        n = 0
        for i in range(1, V):
            if z[i] > z[n]:
                n = i
        return n
    n = V
    total = 0.0
    if 0 < top_k < V:
        n = _top_keys(z, V, top_k, temperature, c)
        zmax = c[0].key
        for i in range(1, n):
            if c[i].key > zmax:
                zmax = c[i].key
        for i in range(n):
            c[i].key = exp(c[i].key - zmax)
            total += c[i].key
    else:                                       # every candidate, in index order: z becomes e
        zmax = edge_max_f64(z, V)       # (max z) / t = max(z / t) below: rounding is monotonic
        total = edge_exp_keys_blocks_f64(z, V, temperature, zmax / temperature, z, <double *> best)
        if top_p >= 1.0:    # no nucleus: draw straight from e, a block of it at a time
            return _draw_from_blocks(z, <double *> best, V, u)
        n = _rank_head(z, V, top_p * total, c)  # the head of the ranking,
        if n == 0:                              # or all of it for a wide nucleus
            for i in range(V):
                c[i].key = z[i]
                c[i].id = i
            _rank_all(c, V, best)
            n = V
    if top_p < 1.0:
        if 0 < top_k < V:                       # ranked by z: rank by e (equal when exp rounds alike)
            qsort(c, n, sizeof(Cand), _by_key_desc)
        acc = 0.0
        keep = n
        for i in range(n):
            acc += c[i].key
            if acc >= top_p * total:
                keep = i + 1
                break
        n = keep
        total = 0.0
        for i in range(n):
            total += c[i].key
    target = u * total
    acc = 0.0
    for i in range(n):
        acc += c[i].key
        if acc > target:
            return c[i].id
    return c[n - 1].id


# One call's scratch (2.2 MB for a vocabulary of 49152) is kept for the next: allocated afresh, a
# block that size comes from the OS and goes back to it on every call, and its page faults cost
# more than the sampling (0.14 ms of 0.94 for temperature 0.7 and top_p 0.9).  Taken and given back
# with the GIL held, so two threads sampling at once each have their own.
cdef char *_spare = NULL
cdef size_t _spare_bytes = 0


cdef char *_take_scratch(size_t nbytes) noexcept:
    global _spare, _spare_bytes
    cdef char *p = _spare
    if p != NULL and _spare_bytes == nbytes:
        _spare = NULL
        return p
    return <char *> malloc(nbytes)


cdef void _give_scratch(char *p, size_t nbytes) noexcept:
    global _spare, _spare_bytes
    if _spare == NULL or _spare_bytes != nbytes:      # the latest vocabulary's size is the one kept
        free(_spare)
        _spare, _spare_bytes = p, nbytes
    else:
        free(p)


def sample_logits(const float[::1] logits, double temperature=0.0, int top_k=0, double top_p=1.0,
                  double repetition_penalty=1.0, double frequency_penalty=0.0, double presence_penalty=0.0,
                  history=(), generated=(), double u=0.0):
    """The next token id from logits (vocab,); see the module docstring.  history: prompt and
    generated ids (repetition penalty); generated: the generated ids alone (frequency, presence)."""
    cdef int V = logits.shape[0], i, t
    if V == 0:
        raise ValueError("sample_logits: no logits")
    if temperature < 0 or not 0.0 < top_p <= 1.0 or top_k < 0 or repetition_penalty <= 0 or not 0.0 <= u < 1.0:
        raise ValueError("sample_logits: temperature >= 0, top_k >= 0, 0 < top_p <= 1, repetition_penalty > 0 "
                         "and 0 <= u < 1 are required")
    cdef bint penalized = ((repetition_penalty != 1.0 and len(history))
                           or ((frequency_penalty != 0.0 or presence_penalty != 0.0) and len(generated)))
    if temperature == 0.0 and not penalized:       # plain greedy (most decode steps): no copy of the row
        with nogil:
            t = edge_argmax_f32(&logits[0], V)
        return t
    # scratch: z, then the candidates' two buffers (sampling only), then the penalties' counts
    cdef size_t z_bytes = edge_lines(V * sizeof(double)), c_bytes = edge_lines(V * sizeof(Cand))
    cdef size_t nbytes = z_bytes + 2 * c_bytes + edge_lines(V) + edge_lines(V * sizeof(int32_t))
    cdef char *scratch = _take_scratch(nbytes)
    if scratch == NULL:
        raise MemoryError(f"sample_logits: no memory for the scratch of {V} logits")
    cdef double *z = <double *> scratch
    cdef Cand *c = <Cand *> (scratch + z_bytes)
    cdef Cand *best = <Cand *> (scratch + z_bytes + c_bytes)
    cdef uint8_t *seen = <uint8_t *> (scratch + z_bytes + 2 * c_bytes)
    cdef int32_t *count = <int32_t *> (scratch + z_bytes + 2 * c_bytes + edge_lines(V))
    try:
        for i in range(V):
            z[i] = logits[i]
        if repetition_penalty != 1.0 and len(history):
            memset(seen, 0, V)
            for t in history:
                if not 0 <= t < V:
                    raise ValueError(f"sample_logits: token id {t} is outside the vocabulary of {V}")
                if not seen[t]:
                    seen[t] = 1
                    z[t] = z[t] / repetition_penalty if z[t] > 0 else z[t] * repetition_penalty
        if (frequency_penalty != 0.0 or presence_penalty != 0.0) and len(generated):
            memset(count, 0, V * sizeof(int32_t))
            for t in generated:
                if not 0 <= t < V:
                    raise ValueError(f"sample_logits: token id {t} is outside the vocabulary of {V}")
                count[t] += 1
            for i in range(V):
                if count[i]:
                    z[i] -= frequency_penalty * count[i] + presence_penalty
        with nogil:
            t = _choose(V, temperature, top_k, top_p, u, z, c, best)
        return t
    finally:
        _give_scratch(scratch, nbytes)


# -- many rows at once ----------------------------------------------------------------------------
# A batched decode step has a row of logits for each sequence.  Sampled one after the other, each
# row costs 75-100 us at temperature > 0 (SmolLM2's 49,152 logits), 1.2-1.6 ms of a 16-row step;
# sample_rows samples them in parallel across the kernels' threads, each with its own scratch.

cdef char *_rows_spare = NULL
cdef size_t _rows_spare_bytes = 0


def sample_rows(rows, temperatures, top_ks, top_ps, us):
    """[sample_logits(rows[i], temperatures[i], top_ks[i], top_ps[i], u=us[i]) for each i] (no
    penalties; logits (vocab,) float32, one vocabulary), the rows in parallel: the same tokens."""
    global _rows_spare, _rows_spare_bytes
    cdef Py_ssize_t n = len(rows), r
    if not len(temperatures) == len(top_ks) == len(top_ps) == len(us) == n:
        raise ValueError("sample_rows: one temperature, top_k, top_p and u per row are required")
    if n == 0:
        return []
    cdef const float[::1] view
    cdef list views = []
    cdef int V = -1, threads = edge_team_max(), tid, i
    cdef size_t z_bytes, c_bytes, per_thread, nbytes
    cdef char *scratch
    cdef char *mine
    cdef double *z
    cdef int32_t *tokens
    cdef const float **ptrs = <const float **> malloc(n * sizeof(float *))
    cdef double *params = <double *> malloc(n * 3 * sizeof(double))     # temperature, top_p, u
    cdef int *ks = <int *> malloc(n * sizeof(int))
    if ptrs == NULL or params == NULL or ks == NULL:
        free(ptrs)
        free(params)
        free(ks)
        raise MemoryError("sample_rows: no memory for the rows' parameters")
    try:
        for r in range(n):
            view = rows[r]
            if V < 0:
                V = view.shape[0]
            if view.shape[0] != V or V == 0:
                raise ValueError("sample_rows: the rows must be non-empty and of one vocabulary")
            views.append(view)
            ptrs[r] = &view[0]
            params[3 * r], params[3 * r + 1], params[3 * r + 2], ks[r] = temperatures[r], top_ps[r], us[r], top_ks[r]
            if (params[3 * r] < 0 or not 0.0 < params[3 * r + 1] <= 1.0 or ks[r] < 0
                    or not 0.0 <= params[3 * r + 2] < 1.0):
                raise ValueError("sample_rows: temperature >= 0, top_k >= 0, 0 < top_p <= 1 and 0 <= u < 1 "
                                 "are required")
        z_bytes, c_bytes = edge_lines(V * sizeof(double)), edge_lines(V * sizeof(Cand))
        per_thread = z_bytes + 2 * c_bytes
        nbytes = threads * per_thread + edge_lines(n * sizeof(int32_t))
        if _rows_spare != NULL and _rows_spare_bytes >= nbytes:      # taken with the GIL held
            scratch, _rows_spare = _rows_spare, NULL
            nbytes = _rows_spare_bytes
        else:
            scratch = <char *> malloc(nbytes)
            if scratch == NULL:
                raise MemoryError(f"sample_rows: no memory for the scratch of {n} rows of {V} logits")
        tokens = <int32_t *> (scratch + threads * per_thread)
        try:
            for r in prange(n, nogil=True, schedule="dynamic", chunksize=1, num_threads=threads):
                tid = edge_thread_id()
                if params[3 * r] == 0.0:
                    tokens[r] = edge_argmax_f32(ptrs[r], V)
                else:
                    mine = scratch + tid * per_thread
                    z = <double *> mine
                    for i in range(V):
                        z[i] = ptrs[r][i]
                    tokens[r] = _choose(V, params[3 * r], ks[r], params[3 * r + 1], params[3 * r + 2], z,
                                        <Cand *> (mine + z_bytes), <Cand *> (mine + z_bytes + c_bytes))
            return [tokens[r] for r in range(n)]
        finally:                        # the larger of the two is kept for the next call
            if _rows_spare == NULL or _rows_spare_bytes < nbytes:
                free(_rows_spare)
                _rows_spare, _rows_spare_bytes = scratch, nbytes
            else:
                free(scratch)
    finally:
        free(ptrs)
        free(params)
        free(ks)
