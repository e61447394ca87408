"""Embedding lookups: out[t] = table[tokens[t]], from an fp32 table or an int8 table with one fp16
scale per group of 32 (a decoder's token embedding, shared with its logits head when tied), whose
rows are in the interleaved layout of the int8 matmul (reference.pack_q8_rows)."""
from cython.parallel cimport prange
from libc.stdint cimport int8_t, int32_t, uint16_t
from libc.string cimport memcpy

cdef extern from "simd.h" nogil:
    void edge_q8_dequantize_row(const int8_t *packed, const uint16_t *scale, int K, float *out)


def _check(out, tokens, table):
    if out.shape[0] != tokens.shape[0] or out.shape[1] != table.shape[1]:
        raise ValueError(f"out has shape {tuple(out.shape)[:2]}, expected ({tokens.shape[0]}, {table.shape[1]})")
    n = table.shape[0]
    for t in tokens:
        if t < 0 or t >= n:
            raise IndexError(f"token id {t} is outside the vocabulary of {n}")


def embed_f32(float[:, ::1] out,           # OUT (T, dim)
              const int32_t[::1] tokens,   # IN  (T,)
              const float[:, ::1] table):  # IN  (vocab, dim)
    """out[t] = table[tokens[t]]"""
    _check(out, tokens, table)
    if tokens.shape[0]:
        with nogil:
            embed_f32_rows(&out[0, 0], &tokens[0], &table[0, 0], tokens.shape[0], table.shape[1])


cdef void embed_f32_rows(float *out, const int32_t *tokens, const float *table, int T, int dim) noexcept nogil:
    cdef int t
    if T == 1:                  # a decode step: no parallel region
        memcpy(out, table + <size_t> tokens[0] * dim, dim * sizeof(float))
        return
    for t in prange(T, schedule="static"):
        memcpy(out + <size_t> t * dim, table + <size_t> tokens[t] * dim, dim * sizeof(float))


def embed_q8(float[:, ::1] out,               # OUT (T, dim)
             const int32_t[::1] tokens,       # IN  (T,)
             const int8_t[:, ::1] table,      # IN  (vocab, dim)
             const uint16_t[:, ::1] scale):   # IN  (vocab, ceil(dim/32)) fp16 bits
    """out[t, j] = unpack(table[tokens[t]])[j] * scale[tokens[t], j // 32]"""
    _check(out, tokens, table)
    if scale.shape[0] != table.shape[0] or scale.shape[1] != (table.shape[1] + 31) // 32:
        raise ValueError("embed_q8: scale must be (vocab, ceil(dim/32))")
    if tokens.shape[0]:
        with nogil:
            embed_q8_rows(&out[0, 0], &tokens[0], &table[0, 0], &scale[0, 0], tokens.shape[0], table.shape[1])


cdef void embed_q8_rows(float *out, const int32_t *tokens, const int8_t *table, const uint16_t *scale,
                        int T, int dim) noexcept nogil:
    cdef int t, G = (dim + 31) // 32
    if T == 1:                  # a decode step: no parallel region
        edge_q8_dequantize_row(table + <size_t> tokens[0] * dim, scale + <size_t> tokens[0] * G, dim, out)
        return
    for t in prange(T, schedule="static"):
        edge_q8_dequantize_row(table + <size_t> tokens[t] * dim, scale + <size_t> tokens[t] * G, dim,
                               out + <size_t> t * dim)
