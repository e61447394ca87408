"""Rotary position embedding, in place on rows of concatenated heads.

For head vector v (head_dim) at position p and pair i < rot_dim/2, with
theta_i = p * base^(-2i/rot_dim):
  neox pairing (Hugging Face Llama, Qwen2):  (v[i], v[i + rot_dim/2])
  interleaved pairing (GGUF Llama, Meta):     (v[2i], v[2i + 1])
each pair (a, b) becomes (a cos - b sin, a sin + b cos).  Angles are computed in double.
"""
from cython.parallel cimport prange
from libc.math cimport cos, sin, pow
from libc.stdint cimport int32_t


def rope(float[:, ::1] x,                 # IN/OUT (T, n_heads * head_dim)
         const int32_t[::1] positions,    # IN     (T,)
         int n_heads, int head_dim, int rot_dim, double base, bint neox):
    if x.shape[1] != n_heads * head_dim or positions.shape[0] != x.shape[0]:
        raise ValueError("rope: x must be (T, n_heads * head_dim) and positions (T,)")
    if rot_dim % 2 or rot_dim > head_dim or rot_dim <= 0 or rot_dim > ROPE_MAX_DIM:
        raise ValueError(f"rope: rot_dim {rot_dim} must be even and within head_dim {head_dim} "
                         f"(and {ROPE_MAX_DIM})")
    if x.shape[0]:
        with nogil:
            rope_rows(&x[0, 0], &positions[0], x.shape[0], n_heads, head_dim, rot_dim, base, neox)


cdef void rope_rows(float *x, const int32_t *positions, int T, int n_heads, int head_dim, int rot_dim,
                    double base, bint neox) noexcept nogil:
    rope_qk_rows(x, NULL, positions, T, n_heads, 0, head_dim, rot_dim, base, neox)


cdef void rope_qk_rows(float *q, float *k, const int32_t *positions, int T, int n_q_heads, int n_k_heads,
                       int head_dim, int rot_dim, double base, bint neox) noexcept nogil:
    """rope on the rows of q (n_q_heads heads) and of k (n_k_heads heads; k may be NULL) at the same
    positions: each angle's cosine and sine are computed once for all heads of both, and the
    frequencies base^(-2i/rot_dim) once per call (rot_dim <= ROPE_MAX_DIM, checked by the callers)."""
    cdef int t, half = rot_dim // 2
    cdef double inv_freq[ROPE_MAX_PAIRS]
    rope_frequencies(inv_freq, rot_dim, base)
    if T == 1:                  # a decode step: no parallel region (even an inactive one costs ~0.5 us)
        rope_qk_row(q, k, positions[0], n_q_heads, n_k_heads, head_dim, half, inv_freq, neox)
    else:
        for t in prange(T, schedule="static"):
            rope_qk_row(q + <size_t> t * n_q_heads * head_dim,
                        k + <size_t> t * n_k_heads * head_dim if k != NULL else NULL,
                        positions[t], n_q_heads, n_k_heads, head_dim, half, inv_freq, neox)


cdef void rope_angles(float *cs, const int32_t *positions, int T, int rot_dim, double base) noexcept nogil:
    """The cosines and sines of rows at the given positions, cs[t * rot_dim + 2 i] = cos(theta_i)
    and cs[t * rot_dim + 2 i + 1] = sin(theta_i), for rope_qk_rows_at: a forward pass computes them
    once per step for all its layers (the same floats that rope_qk_rows computes per call)."""
    cdef int t, half = rot_dim // 2
    cdef double inv_freq[ROPE_MAX_PAIRS]
    rope_frequencies(inv_freq, rot_dim, base)
    for t in range(T):
        rope_angles_row(cs + <size_t> t * rot_dim, positions[t], half, inv_freq)


cdef void rope_qk_rows_at(float *q, float *k, const float *cs, int T, int n_q_heads, int n_k_heads, int head_dim,
                          int rot_dim, bint neox) noexcept nogil:
    """rope_qk_rows with the angles' cosines and sines given (rope_angles): the same floats."""
    cdef int t, half = rot_dim // 2
    if T == 1:
        rope_qk_row_at(q, k, cs, n_q_heads, n_k_heads, head_dim, half, neox)
    else:
        for t in prange(T, schedule="static"):
            rope_qk_row_at(q + <size_t> t * n_q_heads * head_dim,
                           k + <size_t> t * n_k_heads * head_dim if k != NULL else NULL,
                           cs + <size_t> t * rot_dim, n_q_heads, n_k_heads, head_dim, half, neox)


cdef inline void rope_frequencies(double *inv_freq, int rot_dim, double base) noexcept nogil:
    cdef int i
    for i in range(rot_dim // 2):
        inv_freq[i] = pow(base, -2.0 * i / rot_dim)


cdef inline void rope_angles_row(float *cs, int position, int half, const double *inv_freq) noexcept nogil:
    cdef int i
    cdef double angle
    for i in range(half):
        angle = position * inv_freq[i]
        cs[2 * i] = <float> cos(angle)
        cs[2 * i + 1] = <float> sin(angle)


cdef inline void rope_qk_row(float *q, float *k, int position, int n_q_heads, int n_k_heads, int head_dim, int half,
                             const double *inv_freq, bint neox) noexcept nogil:
    cdef float cs[ROPE_MAX_DIM]            # this call's own (a thread's, under prange)
    rope_angles_row(cs, position, half, inv_freq)
    rope_qk_row_at(q, k, cs, n_q_heads, n_k_heads, head_dim, half, neox)


cdef inline void rope_qk_row_at(float *q, float *k, const float *cs, int n_q_heads, int n_k_heads, int head_dim,
                                int half, bint neox) noexcept nogil:
    cdef int i
    for i in range(half):
        rotate_pair(q, n_q_heads, head_dim, i, half, neox, cs[2 * i], cs[2 * i + 1])
        if k != NULL:
            rotate_pair(k, n_k_heads, head_dim, i, half, neox, cs[2 * i], cs[2 * i + 1])


cdef inline void rotate_pair(float *row, int n_heads, int head_dim, int i, int half, bint neox, float c,
                             float s) noexcept nogil:
    """Pair i of every head of row: (a, b) -> (a cos - b sin, a sin + b cos)."""
    cdef int h, ia, ib
    cdef float a, b
    if neox:
        ia = i
        ib = i + half
    else:
        ia = 2 * i
        ib = 2 * i + 1
    for h in range(n_heads):
        a = row[h * head_dim + ia]
        b = row[h * head_dim + ib]
        row[h * head_dim + ia] = a * c - b * s
        row[h * head_dim + ib] = a * s + b * c
