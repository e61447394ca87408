"""Next-token sampling from one row of logits, in C, so that generating needs no numpy.

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
from cpython cimport array
from cython.parallel cimport prange
from libc.math cimport exp
from libc.stdint cimport int32_t, uint8_t, uint64_t
from libc.stdlib cimport free, malloc, qsort
from libc.string cimport memcpy, memset

import array as _array

cdef extern from "parallel.h" nogil:
    size_t edge_lines(size_t n)

cdef extern from "simd.h" nogil:
    int edge_argmax_f32(const float *x, int n)
    double edge_max_f64(const double *x, int n)
    int edge_indices_at_least_f64(const double *x, int n, double tau, int32_t *idx)
    void edge_exp_keys_f64(const double *z, int n, double temperature, double zmax, double *e)
    double edge_exp_keys_blocks_f64(const double *z, int n, double temperature, double zmax, double *e,
                                    double *sums)
    double edge_exp_logits_blocks_f32(const float *logits, int n, double temperature, double zmax, double *sums)
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


cdef int _top(const Cand *items, int n, int k, Cand *out) noexcept nogil:
    """The k best of items, best first, into out (k <= n)."""
    cdef int i, j
    cdef Cand tmp
    for i in range(k):
        out[i] = items[i]
    for i in range(k // 2 - 1, -1, -1):
        _sift_down(out, k, i)
    for i in range(k, n):
        if _before(&items[i], &out[0]):
            out[0] = items[i]
            _sift_down(out, k, 0)
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
        for i in range(V):
            c[i].key = z[i] / temperature
            c[i].id = i
        n = _top(c, V, top_k, best)
        for i in range(n):
            c[i] = best[i]
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


# -- draws prepared for many rows at once --------------------------------------------------------
# A batched decode step samples a row for each sequence.  Most of a draw without top_k, top_p or
# penalties is the same work for any u (the maximum, the weights' exps, the blocks' running sums):
# prepare_draws does it for all of a step's rows in parallel, and each sequence's draw(row,
# prepared, u) then finds its block and walks it alone.  The token is sample_logits(row,
# temperature, u=u)'s, the same bits.

assert EDGE_DRAW_BLOCK == 64


cdef void _block_weights(const float *logits, int m, double temperature, double zt, double *e) noexcept nogil:
    """The weights of one block of m logits (m <= 64) into e, as sample_logits makes them."""
    cdef int j
    for j in range(m):
        e[j] = logits[j]
    edge_exp_keys_f64(e, m, temperature, zt, e)


cdef int _draw_prepared(const float *logits, int n, double temperature, double zt, const double *sums,
                        double u) noexcept nogil:
    """_draw_from_blocks with each block's weights made again from the logits where it is walked."""
    cdef double e[64]
    cdef int nb = (n + EDGE_DRAW_BLOCK - 1) // EDGE_DRAW_BLOCK, b, i, at, m
    cdef double target = u * sums[nb - 1]
    b = _first_block_above(sums, nb, target)
    if b >= 0:
        at = b * EDGE_DRAW_BLOCK
        m = min(EDGE_DRAW_BLOCK, n - at)
        _block_weights(logits + at, m, temperature, zt, e)
        i = _walk_block(e, m, sums[b - 1] if b > 0 else 0.0, target)
        if i >= 0:
            return at + i
    for b in range(nb - 1, -1, -1):
        at = b * EDGE_DRAW_BLOCK
        m = min(EDGE_DRAW_BLOCK, n - at)
        _block_weights(logits + at, m, temperature, zt, e)
        for i in range(m - 1, -1, -1):
            if e[i] > 0:
                return at + i
    return n - 1


def prepare_draws(rows, temperatures):
    """What draw needs, besides the row, to sample each of rows (logits (vocab,) float32, one
    vocabulary) at its temperature (> 0) with no top_k, top_p or penalties: a float64 view of
    [vocabulary size, temperature, max / temperature, the blocks' running sums].  The rows are
    prepared in parallel across the kernels' threads."""
    cdef Py_ssize_t n = len(rows), r
    if len(temperatures) != n:
        raise ValueError("prepare_draws: one temperature per row is required")
    if n == 0:
        return []
    cdef const float[::1] view
    cdef list views = []
    cdef const float **ptrs = <const float **> malloc(n * sizeof(float *))
    cdef double *temps = <double *> malloc(n * sizeof(double))
    cdef int V = -1, nb, width, best
    cdef double *out
    cdef double zt
    cdef array.array prepared
    if ptrs == NULL or temps == NULL:
        free(ptrs)
        free(temps)
        raise MemoryError("prepare_draws: no memory for the rows' pointers")
    try:
        for r in range(n):
            view = rows[r]
            if V < 0:
                V = view.shape[0]
            if view.shape[0] != V or V == 0:
                raise ValueError("prepare_draws: the rows must be non-empty and of one vocabulary")
            views.append(view)
            ptrs[r] = &view[0]
            temps[r] = temperatures[r]
            if not temps[r] > 0.0:
                raise ValueError("prepare_draws: the temperatures must be > 0")
        nb = (V + EDGE_DRAW_BLOCK - 1) // EDGE_DRAW_BLOCK
        width = nb + 3
        prepared = array.clone(array.array("d"), n * width, zero=False)
        out = prepared.data.as_doubles
        for r in prange(n, nogil=True, schedule="dynamic"):
            best = edge_argmax_f32(ptrs[r], V)
            zt = (<double> ptrs[r][best]) / temps[r]
            out[r * width] = V
            out[r * width + 1] = temps[r]
            out[r * width + 2] = zt
            edge_exp_logits_blocks_f32(ptrs[r], V, temps[r], zt, out + r * width + 3)
    finally:
        free(ptrs)
        free(temps)
    whole = memoryview(prepared)
    return [whole[r * width:(r + 1) * width] for r in range(n)]


def draw(const float[::1] logits, const double[::1] prepared, double u):
    """The token for uniform u in [0, 1) from logits prepared by prepare_draws: sample_logits(
    logits, temperature, u=u) for the temperature it was prepared at."""
    cdef int V = logits.shape[0], t
    if V == 0 or prepared.shape[0] != (V + EDGE_DRAW_BLOCK - 1) // EDGE_DRAW_BLOCK + 3 or prepared[0] != V:
        raise ValueError("draw: the row is not the one prepared (another vocabulary)")
    if not 0.0 <= u < 1.0:
        raise ValueError("draw: 0 <= u < 1 is required")
    with nogil:
        t = _draw_prepared(&logits[0], V, prepared[1], prepared[2], &prepared[3], u)
    return t
