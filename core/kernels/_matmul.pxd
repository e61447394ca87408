from libc.stdint cimport int8_t, uint16_t

cdef enum:
    MAX_SHARED = 4

# 0, or -1 when the scratch memory cannot be had (nothing is computed then)
cdef int _matmul_q8(float *out, const float *x, const int8_t *w, const uint16_t *w_scale,
                    const float *bias, int M, int N, int K) noexcept nogil
cdef int _matmul_q8_shared(int n_mats, float **outs, const int8_t **ws_, const uint16_t **scales,
                           const float **biases, const int *Ns, const float *x, int M, int K) noexcept nogil
cdef int _matmul_q8_silu_mul(float *out, const float *x, const int8_t *w_gate, const uint16_t *s_gate,
                             const int8_t *w_up, const uint16_t *s_up, int M, int N, int K) noexcept nogil
cdef void _matmul_f32(float *out, const float *x, const float *w, const float *bias,
                      int M, int N, int K) noexcept nogil
