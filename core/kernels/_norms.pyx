"""Row normalisations in fp32 (statistics accumulated in double).

rmsnorm:   out = x / sqrt(mean(x^2) + eps) * weight                 (Llama)
layernorm: out = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias  (GPT-2, BERT); with a
           residual, of x + residual (summed in fp32 into out first), as a post-norm block's
           x = layernorm(f(x) + x) needs
"""
from cython.parallel cimport prange
from libc.math cimport sqrt

cdef extern from "simd.h" nogil:
    double edge_sumsq_f64(const float *x, int n)
    double edge_sum_f64(const float *x, int n)
    double edge_sumsq_centered_f64(const float *x, int n, double mean)


def rmsnorm(float[:, ::1] out,            # OUT (T, dim)
            const float[:, ::1] x,        # IN  (T, dim)
            const float[::1] weight,      # IN  (dim,)
            float eps):
    if x.shape[1] != weight.shape[0] or out.shape[0] != x.shape[0] or out.shape[1] != x.shape[1]:
        raise ValueError("rmsnorm: shapes of out, x and weight disagree")
    if x.shape[0] and x.shape[1]:
        with nogil:
            rmsnorm_rows(&out[0, 0], &x[0, 0], &weight[0], x.shape[0], x.shape[1], eps)


cdef void rmsnorm_rows(float *out, const float *x, const float *weight, int T, int dim, float eps) noexcept nogil:
    cdef int t
    if T == 1:                  # a decode step: no parallel region (even an inactive one costs ~0.5 us)
        rmsnorm_row(out, x, weight, dim, eps)
        return
    for t in prange(T, schedule="static"):
        rmsnorm_row(out + <size_t> t * dim, x + <size_t> t * dim, weight, dim, eps)


cdef inline void rmsnorm_row(float *out, const float *row, const float *weight, int dim, float eps) noexcept nogil:
    cdef int j
    cdef float inv = <float> (1.0 / sqrt(edge_sumsq_f64(row, dim) / dim + eps))
    for j in range(dim):
        out[j] = (row[j] * inv) * weight[j]


def layernorm(float[:, ::1] out,          # OUT (T, dim)
              const float[:, ::1] x,      # IN  (T, dim)
              const float[::1] weight,    # IN  (dim,)
              const float[::1] bias,      # IN  (dim,)
              float eps,
              const float[:, ::1] residual=None):   # IN (T, dim) or None; out may be it (or x)
    if (x.shape[1] != weight.shape[0] or x.shape[1] != bias.shape[0]
            or out.shape[0] != x.shape[0] or out.shape[1] != x.shape[1]):
        raise ValueError("layernorm: shapes of out, x, weight and bias disagree")
    if residual is not None and (residual.shape[0] != x.shape[0] or residual.shape[1] != x.shape[1]):
        raise ValueError("layernorm: the residual's shape is not x's")
    cdef Py_ssize_t t, j, T = x.shape[0], dim = x.shape[1]
    cdef bint add = residual is not None
    if T and dim:
        with nogil:
            for t in prange(T, schedule="static"):
                if add:         # the row's sum into out, then its norm in place
                    for j in range(dim):
                        out[t, j] = x[t, j] + residual[t, j]
                    layernorm_row(&out[t, 0], &out[t, 0], &weight[0], &bias[0], dim, eps)
                else:
                    layernorm_row(&out[t, 0], &x[t, 0], &weight[0], &bias[0], dim, eps)


cdef inline void layernorm_row(float *out, const float *row, const float *weight, const float *bias, int dim,
                               float eps) noexcept nogil:
    """The mean and the variance about it in double, summed four lanes by four (edge_sum_f64).
    out may be row: each out[j] is written after the row's statistics, from row[j] alone."""
    cdef int j
    cdef double mean = edge_sum_f64(row, dim) / dim
    cdef float inv = <float> (1.0 / sqrt(edge_sumsq_centered_f64(row, dim, mean) / dim + eps))
    cdef float mu = <float> mean
    for j in range(dim):
        out[j] = (row[j] - mu) * inv * weight[j] + bias[j]
