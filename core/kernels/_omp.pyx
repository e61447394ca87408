"""OpenMP thread control and build facts, for core.threads; and sum_bytes, a parallel streaming
read with which the benchmarks measure the memory bandwidth that bounds decoding."""
from cython.parallel cimport prange
from libc.stdint cimport uint8_t, uint64_t

cdef extern from "simd.h" nogil:
    const char *edge_simd_name()
    uint64_t edge_sum_u8(const uint8_t *p, size_t n)

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    static int edge_has_openmp(void) { return 1; }
    static void edge_set_threads(int n) { omp_set_num_threads(n); }
    static int edge_get_threads(void) { return omp_get_max_threads(); }
    #else
    static int edge_has_openmp(void) { return 0; }
    static void edge_set_threads(int n) { (void)n; }
    static int edge_get_threads(void) { return 1; }
    #endif
    """
    int edge_has_openmp() nogil
    void edge_set_threads(int n) nogil
    int edge_get_threads() nogil


def has_openmp():
    """True when the kernels were built with OpenMP."""
    return bool(edge_has_openmp())


def set_num_threads(int n):
    """Set the OpenMP team size used by every kernel's parallel region."""
    if n < 1:
        raise ValueError(f"thread count must be >= 1, got {n}")
    edge_set_threads(n)


def get_num_threads():
    return edge_get_threads()


def simd_name():
    """The instruction set the kernels were compiled for: avx512-vnni, avx2, neon-dotprod, neon, scalar."""
    return edge_simd_name().decode()


def sum_bytes(const uint8_t[::1] buf):
    """The sum of all bytes of buf, read once by every thread's share in parallel (see
    reference.sum_bytes).  Timing it over a buffer much larger than the caches gives the read
    bandwidth available to the team."""
    cdef size_t n = buf.shape[0], chunk = 1 << 20, i, n_chunks
    cdef uint64_t total = 0
    if n == 0:
        return 0
    n_chunks = (n + chunk - 1) // chunk
    for i in prange(n_chunks, nogil=True, schedule="static"):
        total += edge_sum_u8(&buf[i * chunk], chunk if (i + 1) * chunk <= n else n - i * chunk)
    return total
