# Declarations of parallel.h (the OpenMP team, barriers and the kernels' scratch memory) for the
# modules that cimport them: `from core.kernels.parallel cimport edge_barrier, ...`.  Each module
# that uses them compiles the header's static functions (and its scratch fault counter) into itself.

cdef extern from "parallel.h" nogil:
    void edge_barrier()
    int edge_team_size()
    int edge_team_max()
    int edge_thread_id()
    size_t edge_lines(size_t n)
    void *edge_scratch(size_t nbytes)
    void edge_scratch_fail_after(int n)
