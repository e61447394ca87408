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

# a decode step's forward pass in one parallel region: every thread quantizes the input rows
# itself (_quantize_rows_q8), then runs its share of the tiles (_matmul_q8_team, no barrier at the end)
cdef enum:
    TEAM_ROWS_MAX = 5           # rows of such a step: a token and its drafts (models.api.DRAFT_TOKENS, 4),
                                # or a few sequences; fewer than pair_rows_min, so that _matmul_q8_shared
                                # also takes their weight rows one at a time
cdef int _q8_row_bytes(int K) noexcept nogil
cdef void _quantize_rows_q8(const float *x, int M, int K, int8_t *q, float *xs) noexcept nogil
cdef void _matmul_q8_team(int n_mats, float **outs, const int8_t **ws_, const uint16_t **scales,
                          const float **biases, const int *Ns, const int8_t *q, const float *xs, int M, int K,
                          int tid, int nthr) noexcept nogil
