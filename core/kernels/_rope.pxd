from libc.stdint cimport int32_t

cdef enum:
    ROPE_MAX_DIM = 1024      # rotated dimensions per head at most (the frequencies live on the stack)
    ROPE_MAX_PAIRS = 512     # ROPE_MAX_DIM / 2

cdef void rope_rows(float *x, const int32_t *positions, int T, int n_heads, int head_dim, int rot_dim,
                    double base, bint neox) noexcept nogil
cdef void rope_qk_rows(float *q, float *k, const int32_t *positions, int T, int n_q_heads, int n_k_heads,
                       int head_dim, int rot_dim, double base, bint neox) noexcept nogil
cdef void rope_angles(float *cs, const int32_t *positions, int T, int rot_dim, double base) noexcept nogil
cdef void rope_qk_rows_at(float *q, float *k, const float *cs, int T, int n_q_heads, int n_k_heads, int head_dim,
                          int rot_dim, bint neox) noexcept nogil
