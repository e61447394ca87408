"""Weights of one layer type, bound to their kernels: a linear layer (int8 or fp32) and an
embedding table (int8 or fp32).  Which kernel runs is decided once, when the file is opened.

An int8 tensor NAME.weight (rows, K) comes with NAME.scale (rows, ceil(K/32)) fp16: one scale per
group of 32 along each row.  The kernels read the fp16 scales as their raw uint16 bits."""

from __future__ import annotations

from core import kernels as K
from core.wfile import WeightsFile


def _scale_bits(wf: WeightsFile, name: str):
    if f"{name}.scale" not in wf:
        return None
    return wf.tensor(f"{name}.scale").view("<u2")


class Linear:
    """y = x @ W.T + b, W stored int8 with group scales (NAME.weight + NAME.scale) or fp32."""

    def __init__(self, wf: WeightsFile, name: str):
        self.weight = wf.tensor(f"{name}.weight")                      # (out, in) int8 or fp32
        self.scale = _scale_bits(wf, name)                             # (out, ceil(in/32)) or None
        self.bias = wf.tensor(f"{name}.bias") if f"{name}.bias" in wf else None      # (out,)
        self.n_out, self.n_in = self.weight.shape
        self.quantized = self.scale is not None

    def __call__(self, out: np.ndarray, x: np.ndarray) -> np.ndarray:
        if self.quantized:
            K.matmul_q8(out, x, self.weight, self.scale, self.bias)
        else:
            K.matmul_f32(out, x, self.weight, self.bias)
        return out


def project(linears: list[Linear], outs: list[np.ndarray], x: np.ndarray) -> list[np.ndarray]:
    """outs[i] = linears[i](x) for layers that read the same x (q, k and v): int8 ones in one
    matmul_q8_shared call, which quantizes x once (the results are those of separate calls)."""
    if all(lin.quantized for lin in linears):
        K.matmul_q8_shared(outs, x, [lin.weight for lin in linears], [lin.scale for lin in linears],
                           [lin.bias for lin in linears])
    else:
        for lin, out in zip(linears, outs):
            lin(out, x)
    return outs


class Embedding:
    """out[t] = table[tokens[t]] from an int8 (+ per-row scale) or fp32 table."""

    def __init__(self, wf: WeightsFile, name: str):
        self.weight = wf.tensor(f"{name}.weight")                      # (vocab, dim)
        self.scale = _scale_bits(wf, name)                             # (vocab, ceil(dim/32)) or None
        self.bias = None
        self.n_out, self.n_in = self.weight.shape

    def __call__(self, out: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        if self.scale is not None:
            K.embed_q8(out, tokens, self.weight, self.scale)
        else:
            K.embed_f32(out, tokens, self.weight)
        return out

    def as_linear(self) -> Linear:
        """The same table used as a logits head (tied embeddings)."""
        head = Linear.__new__(Linear)
        head.weight, head.scale, head.bias = self.weight, self.scale, None
        head.n_out, head.n_in = self.weight.shape
        head.quantized = self.scale is not None
        return head


class Norm:
    """RMSNorm (weight only) or LayerNorm (weight and bias)."""

    def __init__(self, wf: WeightsFile, name: str, eps: float):
        self.weight = wf.tensor(f"{name}.weight")
        self.bias = wf.tensor(f"{name}.bias") if f"{name}.bias" in wf else None
        self.eps = eps

    def __call__(self, out: np.ndarray, x: np.ndarray, residual: np.ndarray | None = None) -> np.ndarray:
        """out = norm(x), or with a residual (LayerNorm only) norm(x + residual): one parallel
        pass for a post-norm block's add and norm (out may be the residual)."""
        if self.bias is None:
            if residual is not None:
                raise ValueError("an RMSNorm takes no residual")
            K.rmsnorm(out, x, self.weight, self.eps)
        else:
            K.layernorm(out, x, self.weight, self.bias, self.eps, residual)
        return out
