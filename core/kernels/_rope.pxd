from libc.stdint cimport int32_t

cdef void rope_rows(float *x, const int32_t *positions, int T, int n_heads, int head_dim, int rot_dim,
                    double base, bint neox) noexcept nogil
