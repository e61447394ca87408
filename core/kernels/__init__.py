"""Compiled kernels (Cython + OpenMP).  reference.py holds the numpy twin of each one."""
from core.kernels._activations import gelu_erf, gelu_tanh, silu_mul, softmax_inplace
from core.kernels._attention import attention_paged, attention_varlen, kv_write
from core.kernels._embedding import embed_f32, embed_q8
from core.kernels._matmul import matmul_f32, matmul_q8, matmul_q8_shared, matmul_q8_silu_mul, quantize_q8
from core.kernels._norms import layernorm, rmsnorm
from core.kernels._rope import rope
from core.kernels._sampling import sample_logits, sample_rows

__all__ = [
    "attention_paged", "attention_varlen", "embed_f32", "embed_q8", "gelu_erf", "gelu_tanh",
    "kv_write", "layernorm", "matmul_f32", "matmul_q8", "matmul_q8_shared", "matmul_q8_silu_mul",
    "quantize_q8", "rmsnorm", "rope",
    "silu_mul", "softmax_inplace",
]
