/* The OpenMP team and the kernels' scratch memory.
 *
 * A kernel takes all the scratch it needs (its own and every thread's) in one allocation, before its
 * parallel region: a failure is then seen in one place, serially, and turned into an error (the
 * kernel returns -1, its Python wrapper raises MemoryError, the native forward stops and raises)
 * instead of a write through NULL in some thread.  A thread's part of the scratch is indexed by
 * edge_thread_id() and starts on its own cache line.
 *
 * Fault injection, for tests: edge_scratch_fail_after(n) makes the n-th scratch allocation from
 * then on fail (n <= 0: none fails).  The counter is static, so each extension module that
 * includes this header has its own (each has a `_fail_scratch_after` knob). */
#ifndef EDGE_PARALLEL_H
#define EDGE_PARALLEL_H

#include <stddef.h>
#include <stdlib.h>

#ifdef _OPENMP
#include <omp.h>
static inline int edge_team_size(void) { return omp_get_num_threads(); }
static inline int edge_team_max(void) { return omp_get_max_threads(); }
static inline int edge_thread_id(void) { return omp_get_thread_num(); }
#else
static inline int edge_team_size(void) { return 1; }
static inline int edge_team_max(void) { return 1; }
static inline int edge_thread_id(void) { return 0; }
#endif

/* A barrier of the enclosing parallel region, in code that every thread of the team runs (Cython's
 * prange inside `with parallel()` is `omp for nowait`, which ends without one; a barrier in a
 * function called from a region binds to that region). */
#ifdef _OPENMP
#define edge_barrier() _Pragma("omp barrier")
#else
#define edge_barrier() ((void)0)
#endif

/* n rounded up to a whole number of 64-byte cache lines */
static inline size_t edge_lines(size_t n) { return (n + 63) & ~(size_t)63; }

static int edge_scratch_countdown = 0;

static inline void edge_scratch_fail_after(int n) { edge_scratch_countdown = n > 0 ? n : 0; }

/* bytes of 64-byte aligned memory (free() it), or NULL */
static inline void *edge_scratch(size_t bytes) {
    if (edge_scratch_countdown > 0 && --edge_scratch_countdown == 0) return NULL;
    return aligned_alloc(64, edge_lines(bytes ? bytes : 1));
}

#endif
