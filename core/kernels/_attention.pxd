from libc.stdint cimport int32_t

cdef int check_paged_rows(const int32_t *block_tables, int n_seqs, int max_blocks, int n_blocks,
                          const int32_t *seq_ids, const int32_t *positions, int T, int block_size) noexcept nogil
# 0, or -1 when the scratch memory cannot be had (nothing is computed then)
cdef int attention_paged_rows(float *out, const float *q, const void *k_cache, const void *v_cache, bint f16,
                              const int32_t *block_tables, int max_blocks, const int32_t *seq_ids,
                              const int32_t *positions, int T, int max_pos, int n_heads, int n_kv_heads,
                              int hd, int block_size, float scale) noexcept nogil
cdef void kv_write_rows(void *k_cache, void *v_cache, bint f16, const float *k, const float *v,
                        const int32_t *slots, int T, int W) noexcept nogil
