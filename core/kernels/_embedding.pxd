from libc.stdint cimport int8_t, int32_t, uint16_t

cdef void embed_f32_rows(float *out, const int32_t *tokens, const float *table, int T, int dim) noexcept nogil
cdef void embed_q8_rows(float *out, const int32_t *tokens, const int8_t *table, const uint16_t *scale,
                        int T, int dim) noexcept nogil
