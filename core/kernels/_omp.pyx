"""OpenMP thread control and build facts, for core.threads."""

cdef extern from "simd.h" nogil:
    const char *edge_simd_name()

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
