from libc.stdint cimport int32_t

cdef void rope_rows(float *x, const int32_t *positions, int T, int n_heads, int head_dim, int rot_dim,
                    double base, bint neox) noexcept nogil
cdef void rope_qk_rows(float *q, float *k, const int32_t *positions, int T, int n_q_heads, int n_k_heads,
                       int head_dim, int rot_dim, double base, bint neox) noexcept nogil
