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


cdef struct PagedPlan:          # the tasks of one attention_paged_rows call and their scratch
    char *runs                  # scratch: starts, task_start, part_start
    char *work                  # scratch: every thread's scores and widened block, then parts
    int32_t *starts             # the runs of rows: run r is rows starts[r] .. starts[r + 1] - 1
    int32_t *task_start         # run r's first task
    size_t *part_start          # run r's first partial result (split runs)
    float *parts                # partial results of split runs (hd + 2 floats each), or NULL
    int n_runs, T, n_heads, n_kv_heads, hd, block_size, group, width, kv_width, chunk_blocks
    bint whole, f16
    float scale
    size_t stride, scores_bytes, thread_bytes
    int next_task               # attention_paged_team: the next task to take

# a forward pass in one parallel region: the plan once per pass (0, or -1 without scratch memory),
# paged_plan_reset before each layer's call (before a barrier), attention_paged_team by every thread
cdef int paged_plan(PagedPlan *p, const int32_t *seq_ids, const int32_t *positions, int T, int max_pos,
                    int n_heads, int n_kv_heads, int hd, int block_size, bint f16, float scale) noexcept nogil
cdef void paged_plan_reset(PagedPlan *p) noexcept nogil
cdef void attention_paged_team(PagedPlan *p, float *out, const float *q, const void *k_cache, const void *v_cache,
                               const int32_t *block_tables, int max_blocks, const int32_t *seq_ids,
                               const int32_t *positions, int tid, int nthr) noexcept nogil
cdef void paged_free(PagedPlan *p) noexcept nogil
