cdef void rmsnorm_rows(float *out, const float *x, const float *weight, int T, int dim, float eps) noexcept nogil
