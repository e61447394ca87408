"""Elementwise activations and row softmax, in fp32.

silu_mul:        out = silu(gate) * up, silu(g) = g / (1 + exp(-g))   (Llama's gated FFN)
gelu_tanh:       x = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))    (GPT-2, in place)
gelu_erf:        x = 0.5 x (1 + erf(x / sqrt(2)))                        (BERT, in place)
softmax_inplace: each row becomes exp(x - max) / sum(exp(x - max))
"""
from cython.parallel cimport prange
from libc.math cimport expf, tanhf

cdef extern from "simd.h" nogil:
    void edge_silu_mul_f32(float *out, const float *gate, const float *up, int n)
    void edge_gelu_erf_f32(float *x, int n)


def silu_mul(float[:, ::1] out,           # OUT (T, hidden)
             const float[:, ::1] gate,    # IN  (T, hidden)
             const float[:, ::1] up):     # IN  (T, hidden)
    if not (out.shape[0] == gate.shape[0] == up.shape[0] and out.shape[1] == gate.shape[1] == up.shape[1]):
        raise ValueError("silu_mul: out, gate and up must have one shape")
    if gate.shape[0] and gate.shape[1]:
        with nogil:
            silu_mul_rows(&out[0, 0], &gate[0, 0], &up[0, 0], gate.shape[0], gate.shape[1])


cdef void silu_mul_rows(float *out, const float *gate, const float *up, int T, int H) noexcept nogil:
    cdef int t
    if T == 1:                  # a decode step: no parallel region (even an inactive one costs ~0.5 us)
        edge_silu_mul_f32(out, gate, up, H)
        return
    for t in prange(T, schedule="static"):
        edge_silu_mul_f32(out + <size_t> t * H, gate + <size_t> t * H, up + <size_t> t * H, H)


def gelu_tanh(float[:, ::1] x):           # IN/OUT (T, hidden)
    cdef Py_ssize_t t, j, T = x.shape[0], H = x.shape[1]
    cdef float v
    for t in prange(T, nogil=True, schedule="static"):
        for j in range(H):
            v = x[t, j]
            x[t, j] = 0.5 * v * (1.0 + tanhf(0.7978845608028654 * (v + 0.044715 * v * v * v)))


def gelu_erf(float[:, ::1] x):            # IN/OUT (T, hidden)
    cdef Py_ssize_t t, T = x.shape[0], H = x.shape[1]
    if H == 0:
        return
    for t in prange(T, nogil=True, schedule="static"):
        edge_gelu_erf_f32(&x[t, 0], H)


def softmax_inplace(float[:, ::1] x):     # IN/OUT (T, n)
    cdef Py_ssize_t t, j, T = x.shape[0], n = x.shape[1]
    cdef float mx
    cdef double total
    if n == 0:
        return
    for t in prange(T, nogil=True, schedule="static"):
        mx = x[t, 0]
        for j in range(1, n):
            if x[t, j] > mx:
                mx = x[t, j]
        total = 0.0
        for j in range(n):
            x[t, j] = expf(x[t, j] - mx)
            total = total + x[t, j]
        for j in range(n):
            x[t, j] = <float> (x[t, j] / total)
