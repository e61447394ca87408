from libc.stdint cimport int8_t, uint16_t

cdef void _matmul_q8(float *out, const float *x, const int8_t *w, const uint16_t *w_scale,
                     const float *bias, int M, int N, int K) noexcept nogil
cdef void _matmul_f32(float *out, const float *x, const float *w, const float *bias,
                      int M, int N, int K) noexcept nogil
