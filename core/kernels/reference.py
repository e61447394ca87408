"""The numpy twin of every compiled kernel: same names, same arguments, plain numpy, no tricks.

This file is the specification.  The tests compare each kernel in core.kernels against the
function of the same name here; the compiled kernels write into `out` (or in place), these
functions do the same so that the two can be called alike.
"""

import numpy as np

Q8_GROUP = 32


def quantize_q8(x):
    """Per-row, per-32-column symmetric int8: s = max|x|/127, q = rint(x * 127/max|x|).

    Returns (q int8 (M, K), scales float32 (M, ceil(K/32))).
    """
    x = np.asarray(x, dtype=np.float32)
    M, K = x.shape
    n_groups = -(-K // Q8_GROUP)
    q = np.zeros((M, K), dtype=np.int8)
    scales = np.zeros((M, n_groups), dtype=np.float32)
    for g in range(n_groups):
        xg = x[:, g * Q8_GROUP:(g + 1) * Q8_GROUP]
        amax = np.abs(xg).max(axis=1)
        inv = np.where(amax > 0, np.float32(127.0) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
        q[:, g * Q8_GROUP:(g + 1) * Q8_GROUP] = np.clip(np.rint(xg * inv[:, None]), -127, 127)
        scales[:, g] = amax / np.float32(127.0)
    return q, scales


def dequantize_q8(q, scales):
    """Inverse of quantize_q8 (up to rounding)."""
    x = q.astype(np.float32)
    for g in range(scales.shape[1]):
        x[:, g * Q8_GROUP:(g + 1) * Q8_GROUP] *= scales[:, g:g + 1]
    return x


def quantize_weights_q8(w):
    """Weight quantization: one fp16 scale per group of 32 along each row,
    s = max|group| / 127 rounded *up* to a half, q = rint(w / s) (|q| <= 127).

    Rounding the scale up, not to nearest, means no value clips: every value is off by at most half
    a step of its group's scale, also where that scale is a subnormal half (groups whose largest
    value is below 127 * 2**-14, about 0.0078) whose rounding to nearest could be 20% or more too
    small.  Raises ValueError for a group too large for a half scale (max|w| above 127 * 65504).

    Returns (q int8 (N, K), scales float16 (N, ceil(K/32))).
    """
    w = np.asarray(w, dtype=np.float32)
    N, K = w.shape
    n_groups = -(-K // Q8_GROUP)
    q = np.zeros((N, K), dtype=np.int8)
    scales = np.zeros((N, n_groups), dtype=np.float16)
    for g in range(n_groups):
        wg = w[:, g * Q8_GROUP:(g + 1) * Q8_GROUP]
        exact = np.abs(wg).max(axis=1).astype(np.float64) / 127.0
        if (exact > 65504.0).any():
            raise ValueError(f"quantize_weights_q8: a group's largest value exceeds {127 * 65504} "
                             "(its scale does not fit a half)")
        s16 = exact.astype(np.float16)
        s16 = np.where(s16.astype(np.float64) < exact, np.nextafter(s16, np.float16(np.inf)), s16)
        s = s16.astype(np.float32)
        safe = np.where(s > 0, s, 1).astype(np.float32)
        q[:, g * Q8_GROUP:(g + 1) * Q8_GROUP] = np.clip(np.rint(wg / safe[:, None]), -127, 127)
        scales[:, g] = s16
    return q, scales




def q8_blocks(K):
    """The blocks of an int8 row of K values: (first value, groups S) for as many blocks of 8 groups
    as fit, then at most one block each of 4, 2 and 1 groups."""
    n_groups = K // 32
    sizes = [8] * (n_groups // 8) + [s for s in (4, 2, 1) if n_groups & s]
    starts = np.cumsum([0] + sizes[:-1]) * 32
    return list(zip(starts.tolist(), sizes))


def q8_pack_order(K):
    """The interleaved layout of an int8 row of K values as a gather index: packed = natural[order].

    In a block of S groups starting at value b (q8_blocks), the 32-byte vector j holds in its 4-byte
    lane l chunk c = j (8/S) + l // S of group g = l % S:
    packed[b + 32 j + 4 l + i] = natural[b + 32 g + 4 c + i].  The values of a last, partial group
    keep their natural order.  The int8 matmul's weights and activations are both stored this way,
    so that a 32-bit lane of a SIMD sum sees one group only.
    """
    order = np.arange(K)
    for b, S in q8_blocks(K):
        # natural axes (group g, vector j, chunk-in-vector cc, byte i), read as (j, cc, g, i): lane cc S + g
        natural = np.arange(b, b + 32 * S).reshape(S, S, 8 // S, 4)
        order[b:b + 32 * S] = natural.transpose(1, 2, 0, 3).reshape(-1)
    return order


def pack_q8_rows(q):
    """Natural -> interleaved layout for each row of an int8 matrix (N, K)."""
    return np.ascontiguousarray(q[:, q8_pack_order(q.shape[1])])


def unpack_q8_rows(q):
    """Interleaved -> natural layout, the inverse of pack_q8_rows."""
    natural = np.empty_like(q)
    natural[:, q8_pack_order(q.shape[1])] = q
    return natural


def matmul_q8(out, x, w, w_scale, bias=None):
    """w: int8 (N, K) in the interleaved layout, w_scale (N, ceil(K/32)) fp16."""
    q, s = quantize_q8(x)
    xq = dequantize_q8(q, s).astype(np.float64)
    wq = dequantize_q8(unpack_q8_rows(w), w_scale.astype(np.float32)).astype(np.float64)
    out[...] = xq @ wq.T
    if bias is not None:
        out += bias


def matmul_f32(out, x, w, bias=None):
    out[...] = x.astype(np.float64) @ w.astype(np.float64).T
    if bias is not None:
        out += bias


def embed_f32(out, tokens, table):
    out[...] = table[tokens]


def embed_q8(out, tokens, table, scale):
    """table: int8 (vocab, dim) in the interleaved layout, scale (vocab, ceil(dim/32)) fp16."""
    out[...] = dequantize_q8(unpack_q8_rows(table[tokens]), scale[tokens].astype(np.float32))


def rmsnorm(out, x, weight, eps):
    x64 = x.astype(np.float64)
    out[...] = x64 / np.sqrt((x64 * x64).mean(axis=1, keepdims=True) + eps) * weight


def layernorm(out, x, weight, bias, eps, residual=None):
    if residual is not None:
        x = x + residual                # summed in float32, as the kernel
    x64 = x.astype(np.float64)
    mu = x64.mean(axis=1, keepdims=True)
    var = ((x64 - mu) ** 2).mean(axis=1, keepdims=True)
    out[...] = (x64 - mu) / np.sqrt(var + eps) * weight + bias


def rope(x, positions, n_heads, head_dim, rot_dim, base, neox):
    half = rot_dim // 2
    i = np.arange(half, dtype=np.float64)
    angle = positions.astype(np.float64)[:, None] * base ** (-2.0 * i / rot_dim)   # (T, half)
    cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
    v = x.reshape(x.shape[0], n_heads, head_dim).astype(np.float64)
    ia = np.arange(half) if neox else 2 * np.arange(half)
    ib = ia + half if neox else ia + 1
    a, b = v[:, :, ia].copy(), v[:, :, ib].copy()
    v[:, :, ia] = a * cos - b * sin
    v[:, :, ib] = a * sin + b * cos
    x[...] = v.reshape(x.shape)


def silu_mul(out, gate, up):
    g = gate.astype(np.float64)
    out[...] = g / (1.0 + np.exp(-g)) * up


def gelu_tanh(x):
    v = x.astype(np.float64)
    x[...] = 0.5 * v * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (v + 0.044715 * v ** 3)))


def gelu_erf(x):
    from math import erf
    v = x.astype(np.float64)
    x[...] = 0.5 * v * (1.0 + np.vectorize(erf)(v / np.sqrt(2.0)))


def softmax_inplace(x):
    v = x.astype(np.float64)
    e = np.exp(v - v.max(axis=1, keepdims=True))
    x[...] = e / e.sum(axis=1, keepdims=True)


def _attend(q, keys, values, scale):
    """q (hd,), keys/values (n, hd) -> (hd,)"""
    scores = keys.astype(np.float64) @ q.astype(np.float64) * scale
    p = np.exp(scores - scores.max())
    return (p / p.sum()) @ values.astype(np.float64)


def attention_paged(out, q, k_cache, v_cache, block_tables, seq_ids, positions,
                    n_heads, n_kv_heads, block_size, scale):
    hd = q.shape[1] // n_heads
    group = n_heads // n_kv_heads
    for t in range(q.shape[0]):
        j = np.arange(positions[t] + 1)
        slots = block_tables[seq_ids[t], j // block_size] * block_size + j % block_size
        for h in range(n_heads):
            kv = slice((h // group) * hd, (h // group + 1) * hd)
            out[t, h * hd:(h + 1) * hd] = _attend(q[t, h * hd:(h + 1) * hd], k_cache[slots, kv].astype(np.float32),
                                                  v_cache[slots, kv].astype(np.float32), scale)


def attention_varlen(out, q, k, v, key_start, key_end, n_heads, n_kv_heads, scale):
    hd = q.shape[1] // n_heads
    group = n_heads // n_kv_heads
    for t in range(q.shape[0]):
        rows = slice(key_start[t], key_end[t])
        for h in range(n_heads):
            kv = slice((h // group) * hd, (h // group + 1) * hd)
            out[t, h * hd:(h + 1) * hd] = _attend(q[t, h * hd:(h + 1) * hd], k[rows, kv], v[rows, kv], scale)


def kv_write(k_cache, v_cache, k, v, slots):
    """Rounded to the nearest half (even on ties, overflowing to infinity) where the caches are float16."""
    with np.errstate(over="ignore"):
        k_cache[slots] = k
        v_cache[slots] = v


def sum_bytes(buf):
    """The sum of all bytes of a uint8 buffer, as an integer."""
    return int(np.asarray(buf, dtype=np.uint8).sum(dtype=np.uint64))


def sample_logits(logits, temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0, frequency_penalty=0.0,
                  presence_penalty=0.0, history=(), generated=(), u=0.0):
    z = np.asarray(logits).astype(np.float64)
    if repetition_penalty != 1.0 and len(history):
        seen = np.unique(np.asarray(history, np.int64))
        z[seen] = np.where(z[seen] > 0, z[seen] / repetition_penalty, z[seen] * repetition_penalty)
    if (frequency_penalty or presence_penalty) and len(generated):
        ids, counts = np.unique(np.asarray(generated, np.int64), return_counts=True)
        z[ids] -= frequency_penalty * counts + presence_penalty
    if temperature == 0:
        return int(np.argmax(z))
    z = z / temperature
    ids = np.arange(len(z))
    if 0 < top_k < len(z):
        ids = np.lexsort((ids, -z))[:top_k]               # z descending, then index ascending
    e = np.exp(z[ids] - z[ids].max())
    if top_p < 1.0:
        # in candidate order, as the kernel adds: sequential after top_k, else a block at a time
        total = np.cumsum(e)[-1] if len(ids) < len(z) else draw_block_sums(e)[-1]
        order = np.lexsort((ids, -e))
        ids, e = ids[order], e[order]
        keep = min(int(np.searchsorted(np.cumsum(e), top_p * total, "left")) + 1, len(e))
        ids, e = ids[:keep], e[:keep]
    if len(ids) < len(z) or top_p < 1.0:
        cum = np.cumsum(e)                                 # sequential sums, as the kernel adds
        return int(ids[min(int(np.searchsorted(cum, u * cum[-1], "right")), len(ids) - 1)])
    return draw_from_blocks(e, u)


DRAW_BLOCK = 64     # simd.h's EDGE_DRAW_BLOCK


def draw_block_sums(e):
    """The running sums of the blocks of DRAW_BLOCK weights: a whole block adds four lanes (lane j:
    e[j], e[j + 4], ... in order), then (lane 0 + lane 1) + (lane 2 + lane 3); a partial last
    block adds in index order; the blocks' sums add in block order."""
    whole = len(e) // DRAW_BLOCK
    x = e[:whole * DRAW_BLOCK].reshape(whole, DRAW_BLOCK // 4, 4)
    lanes = x[:, 0, :].copy()
    for k in range(1, DRAW_BLOCK // 4):
        lanes = lanes + x[:, k, :]
    blocks = list((lanes[:, 0] + lanes[:, 1]) + (lanes[:, 2] + lanes[:, 3]))
    if len(e) > whole * DRAW_BLOCK:
        blocks.append(np.cumsum(e[whole * DRAW_BLOCK:])[-1])
    return np.cumsum(np.array(blocks, np.float64))


def draw_from_blocks(e, u):
    """The first index at which the running sum passes u * total, the running sum made as the
    sum of the blocks before the index's block then its block's weights one by one; the last
    positive weight if no block's running sum passes (u near 1)."""
    sums = draw_block_sums(e)
    target = u * sums[-1]
    b = int(np.searchsorted(sums, target, "right"))
    if b < len(sums):
        lo, hi = b * DRAW_BLOCK, min((b + 1) * DRAW_BLOCK, len(e))
        cum = np.cumsum(np.concatenate([[sums[b - 1] if b else 0.0], e[lo:hi]]))[1:]
        hits = np.flatnonzero(cum > target)
        if len(hits):
            return lo + int(hits[0])
        positive = np.flatnonzero(e[lo:hi] > 0)
        if len(positive):
            return lo + int(positive[-1])
    positive = np.flatnonzero(e > 0)
    return int(positive[-1]) if len(positive) else len(e) - 1
