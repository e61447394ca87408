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
    TEAM_ROWS_MAX = 8           # rows of such a step: a token and its drafts (models.api.DRAFT_TOKENS, 4),
                                # or a few sequences.  Its weight rows are read one at a time (against
                                # four activation rows at once, edge_dot_q8_4x1), where a step of 6-8
                                # rows in a region per call takes them in pairs (4 x 2 tiles): SmolLM2
                                # on Zen 4, alternating, 6 / 7 / 8 rows 1.22x / 1.13x / 1.07x in one
                                # region; 10 / 12 / 16 rows 0.84x / 0.79x / 0.71x
cdef int _q8_row_bytes(int K) noexcept nogil
cdef void _quantize_rows_q8(const float *x, int M, int K, int8_t *q, float *xs) noexcept nogil
cdef void _matmul_q8_team(int n_mats, float **outs, const int8_t **ws_, const uint16_t **scales,
                          const float **biases, const int *Ns, const int8_t *q, const float *xs, int M, int K,
                          int tid, int nthr) noexcept nogil
