cdef void silu_mul_rows(float *out, const float *gate, const float *up, int T, int H) noexcept nogil
