"""Every compiled kernel against its numpy twin in core.kernels.reference, over many shapes."""

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from core import kernels as K
from core.kernels import reference as R

# fp32 kernels vs float64 numpy: relative to the magnitude of the terms summed
TOL = {"f32": 2e-5, "q8": 2e-5}
AWKWARD = [1, 3, 31, 32, 33, 63, 64, 65, 127, 225, 255, 256, 257, 288, 384, 480, 512, 576, 600, 736, 1536]
dims = st.sampled_from(AWKWARD) | st.integers(1, 200)
rows = st.integers(1, 70)
seeds = st.integers(0, 2**32 - 1)


def rand(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


@settings(max_examples=60, deadline=None)
@given(M=rows, K_=dims, seed=seeds)
def test_quantize_q8_matches_reference_and_error_bound(M, K_, seed):
    rng = np.random.default_rng(seed)
    x = rand(rng, M, K_, scale=rng.uniform(1e-3, 100))
    q, s = K.quantize_q8(x)
    q_ref, s_ref = R.quantize_q8(x)
    np.testing.assert_array_equal(q, q_ref)
    np.testing.assert_array_equal(s, s_ref)
    # dequantize(quantize(x)) is within half a scale step of x, up to the float32 rounding of q * s
    # and of the difference (two ulps of x)
    err = np.abs(R.dequantize_q8(q, s) - x)
    bound = np.repeat(s, R.Q8_GROUP, axis=1)[:, :K_] * 0.5 * (1 + 1e-5) + np.abs(x) * 2.0 ** -22 + 1e-30
    assert (err <= bound).all()


@settings(max_examples=60, deadline=None)
@given(M=rows, N=st.integers(1, 100), K_=dims, bias=st.booleans(), seed=seeds)
def test_matmul_q8(M, N, K_, bias, seed):
    rng = np.random.default_rng(seed)
    x = rand(rng, M, K_)
    w_natural, w_scale = R.quantize_weights_q8(rand(rng, N, K_))
    w = R.pack_q8_rows(w_natural)
    b = rand(rng, N) if bias else None
    out, ref = np.empty((M, N), np.float32), np.empty((M, N), np.float64)
    K.matmul_q8(out, x, w, w_scale.view(np.uint16), b)
    R.matmul_q8(ref, x, w, w_scale, b)
    wd = R.dequantize_q8(w_natural, w_scale.astype(np.float32))
    mag = np.abs(x) @ np.abs(wd).T + (np.abs(b) if bias else 0) + 1e-6
    assert (np.abs(out - ref) <= TOL["q8"] * mag + 1e-6).all()


@settings(max_examples=40, deadline=None)
@given(M=rows, N=st.integers(1, 100), K_=dims, bias=st.booleans(), seed=seeds)
def test_matmul_f32(M, N, K_, bias, seed):
    rng = np.random.default_rng(seed)
    x, w = rand(rng, M, K_), rand(rng, N, K_)
    b = rand(rng, N) if bias else None
    out, ref = np.empty((M, N), np.float32), np.empty((M, N), np.float64)
    K.matmul_f32(out, x, w, b)
    R.matmul_f32(ref, x, w, b)
    mag = np.abs(x) @ np.abs(w).T + (np.abs(b) if bias else 0) + 1e-6
    assert (np.abs(out - ref) <= TOL["f32"] * mag).all()


def test_matmul_q8_int8_error_bound_against_fp32():
    """The documented bound: per-group activation rounding error is at most s_g/2 per element."""
    rng = np.random.default_rng(0)
    x, wf = rand(rng, 8, 576), rand(rng, 64, 576)
    w, w_scale = R.quantize_weights_q8(wf)
    wd = R.dequantize_q8(w, w_scale.astype(np.float32)).astype(np.float64)
    out = np.empty((8, 64), np.float32)
    K.matmul_q8(out, x, R.pack_q8_rows(w), w_scale.view(np.uint16))
    _, s = R.quantize_q8(x)
    bound = 0.5 * np.repeat(s, 32, axis=1) @ np.abs(wd).T
    assert (np.abs(out - x.astype(np.float64) @ wd.T) <= bound * 1.001 + 1e-5).all()


def _documented_pack_index(k: int, K: int) -> int:
    """docs/weights-format.md: blocks of 8 groups while 8 remain, then of 4, 2 and 1; in a block of
    S groups at value b, lane l of vector j holds chunk j (8/S) + l // S of group l % S."""
    b, left = 0, K // 32
    while left:
        S = next(s for s in (8, 4, 2, 1) if left >= s)
        if k < b + 32 * S:
            g, c, i = (k - b) // 32, (k - b) % 32 // 4, k % 4
            return b + 32 * (c // (8 // S)) + 4 * (c % (8 // S) * S + g) + i
        b, left = b + 32 * S, left - S
    return k


@pytest.mark.parametrize("K_", [1, 31, 64, 96, 255, 256, 257, 384, 480, 576, 1536, 1600])
def test_q8_interleaved_layout(K_):
    """pack_q8_rows follows the documented formula, unpack inverts it, and the kernel's activation
    quantizer reads back the same values as the reference (through the layout)."""
    rng = np.random.default_rng(K_)
    q = rng.integers(-127, 128, (3, K_)).astype(np.int8)
    packed = R.pack_q8_rows(q)
    for k in range(K_):
        assert packed[:, _documented_pack_index(k, K_)].tolist() == q[:, k].tolist()
    np.testing.assert_array_equal(R.unpack_q8_rows(packed), q)
    x = rand(rng, 2, K_)
    np.testing.assert_array_equal(K.quantize_q8(x)[0], R.quantize_q8(x)[0])


def test_matmul_rejects_bad_shapes():
    x = np.zeros((2, 8), np.float32)
    with pytest.raises(ValueError, match="columns"):
        K.matmul_f32(np.zeros((2, 3), np.float32), x, np.zeros((3, 9), np.float32))
    with pytest.raises(ValueError, match="expected"):
        K.matmul_f32(np.zeros((2, 4), np.float32), x, np.zeros((3, 8), np.float32))
    with pytest.raises(ValueError, match="w_scale"):
        K.matmul_q8(np.zeros((2, 3), np.float32), x, np.zeros((3, 8), np.int8), np.zeros((2, 1), np.uint16))


@settings(max_examples=40, deadline=None)
@given(N=st.integers(1, 20), K_=dims, seed=seeds, magnitude=st.sampled_from([1e-9, 1e-6, 1e-3, 1.0, 1e3]))
def test_weight_quantization_error_bound(N, K_, seed, magnitude):
    """dequantize(quantize(w)) stays within half a scale step: the scale is rounded up to a half, so
    nothing clips, also where it is subnormal (tiny groups) or rounds to nearest far below max|w|/127."""
    rng = np.random.default_rng(seed)
    w = rand(rng, N, K_, scale=magnitude * rng.uniform(1e-2, 10))
    q, s = R.quantize_weights_q8(w)
    assert (np.abs(q) <= 127).all()
    s32 = np.repeat(s.astype(np.float32), R.Q8_GROUP, axis=1)[:, :K_]
    err = np.abs(R.dequantize_q8(q, s.astype(np.float32)) - w)
    assert (err <= s32 * np.float32(0.5 + 2**-20) + 1e-38).all()
    amax = np.abs(np.pad(w, ((0, 0), (0, s.shape[1] * R.Q8_GROUP - K_)))).reshape(N, -1, R.Q8_GROUP).max(axis=2)
    assert (s.astype(np.float64) >= amax / 127.0).all()            # rounded up, never down


def test_weight_quantization_refuses_scales_beyond_a_half():
    with pytest.raises(ValueError, match="does not fit a half"):
        R.quantize_weights_q8(np.full((1, 32), 1e7, np.float32))


@settings(max_examples=30, deadline=None)
@given(T=rows, dim=dims, vocab=st.integers(1, 50), seed=seeds)
def test_embeddings(T, dim, vocab, seed):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, T).astype(np.int32)
    table = rand(rng, vocab, dim)
    out, ref = np.empty((T, dim), np.float32), np.empty((T, dim), np.float32)
    K.embed_f32(out, tokens, table)
    R.embed_f32(ref, tokens, table)
    np.testing.assert_array_equal(out, ref)
    q, s = R.quantize_weights_q8(table)
    K.embed_q8(out, tokens, R.pack_q8_rows(q), s.view(np.uint16))
    R.embed_q8(ref, tokens, R.pack_q8_rows(q), s)
    np.testing.assert_allclose(out, ref, rtol=1e-6)
    np.testing.assert_allclose(out, R.dequantize_q8(q[tokens], s[tokens].astype(np.float32)), rtol=1e-6)
    with pytest.raises(IndexError, match="vocabulary"):
        K.embed_f32(out[:1], np.array([vocab], np.int32), table)


@settings(max_examples=40, deadline=None)
@given(T=rows, dim=dims, seed=seeds)
def test_norms(T, dim, seed):
    rng = np.random.default_rng(seed)
    x, w, b = rand(rng, T, dim, scale=3), rand(rng, dim), rand(rng, dim)
    out, ref = np.empty_like(x), np.empty(x.shape, np.float64)
    K.rmsnorm(out, x, w, 1e-5)
    R.rmsnorm(ref, x, w, 1e-5)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    K.layernorm(out, x, w, b, 1e-12)
    R.layernorm(ref, x, w, b, 1e-12)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


@settings(max_examples=40, deadline=None)
@given(T=rows, dim=dims, seed=seeds, into_residual=st.booleans())
def test_layernorm_adds_a_residual_first(T, dim, seed, into_residual):
    """out = layernorm(x + residual), the sum in fp32 (as numpy adds); out may be the residual
    itself (a post-norm block's x = norm(f(x) + x)); x is left as it was."""
    rng = np.random.default_rng(seed)
    h, r, w, b = rand(rng, T, dim, scale=3), rand(rng, T, dim, scale=3), rand(rng, dim), rand(rng, dim)
    h0, summed, ref = h.copy(), h + r, np.empty(h.shape, np.float64)
    R.layernorm(ref, h, w, b, 1e-12, residual=r)
    plain = np.empty_like(h)
    K.layernorm(plain, summed, w, b, 1e-12)             # the norm of the sum, as without a residual
    out = r if into_residual else np.empty_like(h)
    K.layernorm(out, h, w, b, 1e-12, r)
    np.testing.assert_array_equal(h, h0)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(out, plain)


@settings(max_examples=40, deadline=None)
@given(T=rows, n_heads=st.integers(1, 4), half=st.integers(1, 40), partial=st.booleans(),
       neox=st.booleans(), seed=seeds)
def test_rope(T, n_heads, half, partial, neox, seed):
    rng = np.random.default_rng(seed)
    head_dim = 2 * half + (4 if partial else 0)
    x = rand(rng, T, n_heads * head_dim)
    pos = rng.integers(0, 5000, T).astype(np.int32)
    ref = x.astype(np.float64)
    K.rope(x, pos, n_heads, head_dim, 2 * half, 10000.0, neox)
    R.rope(ref, pos, n_heads, head_dim, 2 * half, 10000.0, neox)
    np.testing.assert_allclose(x, ref, rtol=1e-5, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(T=rows, H=dims, seed=seeds)
def test_activations(T, H, seed):
    rng = np.random.default_rng(seed)
    g, u = rand(rng, T, H, scale=4), rand(rng, T, H)
    out, ref = np.empty_like(g), np.empty(g.shape, np.float64)
    K.silu_mul(out, g, u)
    R.silu_mul(ref, g, u)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    for name in ("gelu_tanh", "gelu_erf", "softmax_inplace"):
        x, xr = g.copy(), g.astype(np.float64)
        getattr(K, name)(x)
        getattr(R, name)(xr)
        np.testing.assert_allclose(x, xr, rtol=1e-5, atol=1e-6, err_msg=name)
    K.softmax_inplace(g)
    np.testing.assert_allclose(g.sum(1), 1.0, rtol=1e-5)


@settings(max_examples=40, deadline=None)
@given(n_kv=st.integers(1, 3), group=st.integers(1, 5), hd=st.sampled_from([1, 4, 8, 17, 24, 32, 64, 128]),
       block_size=st.sampled_from([1, 4, 16]), lens=st.lists(st.integers(1, 40), min_size=1, max_size=3),
       n_new=st.integers(1, 5), seed=seeds, kv_dtype=st.sampled_from([np.float32, np.float16]),
       chunk_blocks=st.sampled_from([1, 3, 16]))
def test_attention_paged(n_kv, group, hd, block_size, lens, n_new, seed, kv_dtype, chunk_blocks):
    """Several sequences in one call, blocks scattered through the pool in random order; the cache
    holds floats or halves; keys in chunks of 1, 3 or 16 blocks (split and combined when a row's
    keys span more than one)."""
    from core.kernels import _attention
    rng = np.random.default_rng(seed)
    n_heads = n_kv * group
    max_blocks = -(-max(lens) // block_size)
    n_blocks = max_blocks * len(lens) + 2
    perm = rng.permutation(n_blocks).astype(np.int32)
    tables = perm[:max_blocks * len(lens)].reshape(len(lens), max_blocks).copy()
    k_cache, v_cache = rand(rng, n_blocks * block_size, n_kv * hd), rand(rng, n_blocks * block_size, n_kv * hd)
    k_cache, v_cache = k_cache.astype(kv_dtype), v_cache.astype(kv_dtype)
    seq_ids, positions = [], []
    for s, n in enumerate(lens):
        for p in range(max(0, n - n_new), n):
            seq_ids.append(s)
            positions.append(p)
    seq_ids, positions = np.array(seq_ids, np.int32), np.array(positions, np.int32)
    q = rand(rng, len(seq_ids), n_heads * hd)
    out, ref = np.empty_like(q), np.empty(q.shape, np.float64)
    scale = 1 / np.sqrt(hd)
    _attention._set_chunk_blocks(chunk_blocks)
    try:
        K.attention_paged(out, q, k_cache, v_cache, tables, seq_ids, positions, n_heads, n_kv, block_size, scale)
    finally:
        _attention._set_chunk_blocks(16)
    R.attention_paged(ref, q, k_cache, v_cache, tables, seq_ids, positions, n_heads, n_kv, block_size, scale)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("steal", [0, 1])
def test_matmul_q8_few_rows_quantized_per_thread(steal):
    """Up to 4 rows, each thread quantizes the rows itself and no thread waits for another: the
    result is bit for bit that of the shared quantization, for every row count around the switch
    and with or without tile stealing."""
    from core.kernels import _matmul
    rng = np.random.default_rng(5)
    K_, N_ = 480, 70                               # blocks of 8, 4, 2 and 1 groups; a last odd row
    w_natural, w_scale = R.quantize_weights_q8(rand(rng, N_, K_))
    w, ws = R.pack_q8_rows(w_natural), w_scale.view(np.uint16)
    bias = rand(rng, N_)
    try:
        _matmul._set_steal_tiles(steal)
        for M in range(1, 7):
            x = rand(rng, M, K_)
            outs = []
            for own in (0, 1):
                _matmul._set_own_rows(own)
                out = np.empty((M, N_), np.float32)
                K.matmul_q8(out, x, w, ws, bias)
                outs.append(out)
            np.testing.assert_array_equal(outs[0], outs[1])
            ref = np.empty((M, N_), np.float64)
            R.matmul_q8(ref, x, w, w_scale, bias)
            mag = np.abs(x) @ np.abs(R.dequantize_q8(w_natural, w_scale.astype(np.float32))).T + np.abs(bias)
            assert (np.abs(outs[1] - ref) <= TOL["q8"] * mag + 1e-6).all()
            # each row alone (a decode step reads one weight row at a time, against four rows at
            # once from 4 rows on (the 4 x 1 tile); 6 rows and more go through the 4 x 2 and 1 x 2
            # tiles): the same bits, whatever it is batched with
            for m in range(M):
                alone = np.empty((1, N_), np.float32)
                K.matmul_q8(alone, x[m:m + 1], w, ws, bias)
                np.testing.assert_array_equal(alone[0], outs[1][m])
    finally:
        _matmul._set_own_rows(1)
        _matmul._set_steal_tiles(1)


@pytest.mark.parametrize("chunk_bytes", [1, 8000, 20000])
def test_matmul_q8_row_chunks_do_not_change_results(chunk_bytes):
    """Rows are split into chunks (tasks: a chunk of rows x a tile of weight rows): with chunks of
    4 rows, of a few rows and a ragged last one, the outputs are bit for bit those of one chunk for
    all rows, for one matrix and for several sharing x, and within the numpy twin's bound."""
    from core.kernels import _matmul
    rng = np.random.default_rng(13)
    M, K_ = 61, 480                                  # 61 rows: 4 x 2 tiles and a 1 x 2 rest per chunk
    naturals = [R.quantize_weights_q8(rand(rng, N_, K_)) for N_ in (70, 33)]
    mats = [(R.pack_q8_rows(w_natural), w_scale, rand(rng, w_natural.shape[0])) for w_natural, w_scale in naturals]
    x = rand(rng, M, K_)

    def run():
        outs = [np.empty((M, w.shape[0]), np.float32) for w, _, _ in mats]
        K.matmul_q8(outs[0], x, mats[0][0], mats[0][1].view(np.uint16), mats[0][2])
        shared = [np.empty_like(o) for o in outs]
        K.matmul_q8_shared(shared, x, [w for w, _, _ in mats], [s.view(np.uint16) for _, s, _ in mats],
                           [b for _, _, b in mats])
        return outs[0], shared

    whole, whole_shared = run()
    try:
        _matmul._set_m_chunk_bytes(chunk_bytes)
        chunked, chunked_shared = run()
    finally:
        _matmul._set_m_chunk_bytes(131072)
    np.testing.assert_array_equal(chunked, whole)
    for a, b in zip(chunked_shared, whole_shared):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(chunked_shared[0], whole)
    ref = np.empty((M, mats[0][0].shape[0]), np.float64)
    R.matmul_q8(ref, x, *mats[0])
    wd = R.dequantize_q8(naturals[0][0], naturals[0][1].astype(np.float32))
    mag = np.abs(x) @ np.abs(wd).T + np.abs(mats[0][2]) + 1e-6
    assert (np.abs(chunked - ref) <= TOL["q8"] * mag + 1e-6).all()


@pytest.mark.parametrize("M", [1, 3, 40])
def test_matmul_q8_shared_equals_separate_calls(M):
    """q, k and v in one call (one quantization of x, one parallel region) give bit for bit the
    outputs of three matmul_q8 calls, biases or not; an empty matrix is skipped, bad input refused."""
    rng = np.random.default_rng(11)
    K_ = 200                                               # a partial last group
    mats = []
    for N_, has_bias in ((48, True), (17, False), (33, True)):
        w_natural, w_scale = R.quantize_weights_q8(rand(rng, N_, K_))
        mats.append((R.pack_q8_rows(w_natural), w_scale.view(np.uint16), rand(rng, N_) if has_bias else None))
    x = rand(rng, M, K_)
    separate = [np.empty((M, w.shape[0]), np.float32) for w, _, _ in mats]
    for out, (w, ws, b) in zip(separate, mats):
        K.matmul_q8(out, x, w, ws, b)
    shared = [np.full((M, w.shape[0]), np.nan, np.float32) for w, _, _ in mats]
    K.matmul_q8_shared(shared, x, *[list(t) for t in zip(*mats)])
    for a, b in zip(shared, separate):
        np.testing.assert_array_equal(a, b)
    empty = np.empty((M, 0), np.float32)
    K.matmul_q8_shared([empty, shared[1]], x, [np.empty((0, K_), np.int8), mats[1][0]],
                       [np.empty((0, (K_ + 31) // 32), np.uint16), mats[1][1]], [None, None])
    np.testing.assert_array_equal(shared[1], separate[1])
    no_rows = np.empty((0, K_), np.float32)
    K.matmul_q8_shared([np.empty((0, w.shape[0]), np.float32) for w, _, _ in mats], no_rows,
                       *[list(t) for t in zip(*mats)])
    with pytest.raises(ValueError, match="1 to 4 matrices"):
        K.matmul_q8_shared(shared * 2, x, [m[0] for m in mats] * 2, [m[1] for m in mats] * 2, [None] * 6)
    with pytest.raises(ValueError, match="expected"):
        K.matmul_q8_shared([np.empty((M, 5), np.float32)], x, [mats[0][0]], [mats[0][1]], [None])
    with pytest.raises(ValueError, match="scales"):
        K.matmul_q8_shared([separate[0]], x, [mats[0][0]], [mats[1][1]], [None])


@settings(max_examples=40, deadline=None)
@given(M=rows, N=st.integers(1, 70), K_=dims, steal=st.booleans(), seed=seeds)
def test_matmul_q8_silu_mul_equals_shared_and_separate_pass(M, N, K_, steal, seed):
    """silu(gate) * up fused into the gate/up matmul (Llama's feed-forward) gives bit for bit the
    shared matmul into two outputs and the silu_mul pass, in every tile shape (few rows, 4 x 2,
    leftover rows, an odd last weight row, a last task of fewer columns) and whichever thread
    takes a task; close to the numpy twins."""
    from core.kernels import _matmul

    rng = np.random.default_rng(seed)
    x = rand(rng, M, K_, scale=rng.uniform(0.1, 3))
    mats = []
    for _ in range(2):
        w_natural, w_scale = R.quantize_weights_q8(rand(rng, N, K_))
        mats.append((R.pack_q8_rows(w_natural), w_scale.view(np.uint16), w_scale))
    _matmul._set_steal_tiles(int(steal))
    try:
        gate, up = np.empty((M, N), np.float32), np.empty((M, N), np.float32)
        K.matmul_q8_shared([gate, up], x, [mats[0][0], mats[1][0]], [mats[0][1], mats[1][1]], [None, None])
        separate = np.empty((M, N), np.float32)
        K.silu_mul(separate, gate, up)
        fused = np.full((M, N), np.nan, np.float32)
        K.matmul_q8_silu_mul(fused, x, mats[0][0], mats[0][1], mats[1][0], mats[1][1])
        np.testing.assert_array_equal(fused, separate)
    finally:
        _matmul._set_steal_tiles(1)
    ref_gate, ref_up = np.empty((M, N), np.float64), np.empty((M, N), np.float64)
    R.matmul_q8(ref_gate, x, mats[0][0], mats[0][2])
    R.matmul_q8(ref_up, x, mats[1][0], mats[1][2])
    ref = np.empty((M, N), np.float64)
    R.silu_mul(ref, ref_gate, ref_up)
    mag = (np.abs(ref_gate) + 1) * (np.abs(ref_up) + 1)
    assert (np.abs(fused - ref) <= 1e-3 * mag).all()


def test_matmul_q8_silu_mul_refuses_bad_input():
    rng = np.random.default_rng(3)
    w_natural, w_scale = R.quantize_weights_q8(rand(rng, 8, 64))
    w, ws = R.pack_q8_rows(w_natural), w_scale.view(np.uint16)
    x = rand(rng, 5, 64)
    w9, ws9 = R.quantize_weights_q8(rand(rng, 9, 64))
    with pytest.raises(ValueError, match="expected"):
        K.matmul_q8_silu_mul(np.empty((5, 8), np.float32), x, w, ws, R.pack_q8_rows(w9), ws9.view(np.uint16))
    with pytest.raises(ValueError, match="s_up"):
        K.matmul_q8_silu_mul(np.empty((5, 8), np.float32), x, w, ws, w, np.zeros((8, 1), np.uint16))
    with pytest.raises(ValueError, match="no columns"):
        K.matmul_q8_silu_mul(np.empty((5, 8), np.float32), np.empty((5, 0), np.float32), w[:, :0], ws[:, :0],
                             w[:, :0], ws[:, :0])


@pytest.mark.parametrize("hd,chunk_blocks", [(24, 16), (64, 16), (64, 1), (24, 2)])
def test_attention_paged_grouping_does_not_change_results(hd, chunk_blocks):
    """A row's output is bit for bit the same whether it is computed alone or in a run of rows, and
    whether its query heads share one KV head or each reads its own copy of it: batching and GQA
    grouping (edge_scores_f32_queries, edge_weighted_sum_f32_queries) must not change a token, nor
    must splitting a long context's keys into chunks (chunk_blocks 1 and 2: 53 keys in 4 to 16)."""
    from core.kernels import _attention
    _attention._set_chunk_blocks(chunk_blocks)
    rng = np.random.default_rng(7)
    group, block_size, n = 5, 16, 53
    k_cache, v_cache = rand(rng, 4 * block_size, hd), rand(rng, 4 * block_size, hd)
    tables = np.array([[2, 0, 3, 1]], np.int32)
    q = rand(rng, n, group * hd)
    seq_ids, positions = np.zeros(n, np.int32), np.arange(n, dtype=np.int32)
    scale = 1 / np.sqrt(hd)

    def attend(q, k_cache, v_cache, n_kv, seq_ids=seq_ids, positions=positions):
        out = np.empty_like(q)
        K.attention_paged(out, q, k_cache, v_cache, tables, seq_ids, positions, group, n_kv, block_size, scale)
        return out

    default = _attention._set_paged_rows_per_task(1)
    try:
        outs = []
        for rows in (1, 3, 4, 16, 32):
            _attention._set_paged_rows_per_task(rows)
            outs.append(attend(q, k_cache, v_cache, 1))
        for other in outs[1:]:
            np.testing.assert_array_equal(other, outs[0])
        alone = np.concatenate([attend(q[t:t + 1], k_cache, v_cache, 1, seq_ids[t:t + 1], positions[t:t + 1])
                                for t in range(n)])
        np.testing.assert_array_equal(alone, outs[0])
        copies = attend(q, np.tile(k_cache, group), np.tile(v_cache, group), group)
        np.testing.assert_array_equal(copies, outs[0])
    finally:
        _attention._set_paged_rows_per_task(default)
        _attention._set_chunk_blocks(16)
    with pytest.raises(ValueError, match=">= 1"):
        _attention._set_paged_rows_per_task(0)
    with pytest.raises(ValueError, match=">= 1"):
        _attention._set_rows_per_task(0)
    with pytest.raises(ValueError, match=">= 1"):
        _attention._set_chunk_blocks(0)


@pytest.fixture(params=[1, 0], ids=["rows-in-lanes", "horizontal-sums"])
def varlen_path(request):
    """attention_varlen with a run's rows in SIMD lanes (where the build has them) and with a
    horizontal sum per score (the path of builds without AVX2)."""
    from core.kernels import _attention
    _attention._set_rows_in_lanes(request.param)
    yield request.param
    _attention._set_rows_in_lanes(1)


def test_attention_varlen_grouping_does_not_change_results(varlen_path):
    """An encoder row's output is bit for bit the same in runs of any length and with its sentence
    alone or packed with others."""
    from core.kernels import _attention
    rng = np.random.default_rng(11)
    lens, n_heads, hd = [7, 19, 1, 12], 4, 32
    T = sum(lens)
    starts = np.repeat(np.cumsum([0] + lens[:-1]), lens).astype(np.int32)
    ends = (starts + np.repeat(lens, lens)).astype(np.int32)
    q, k, v = rand(rng, T, n_heads * hd), rand(rng, T, 2 * hd), rand(rng, T, 2 * hd)

    def attend(q, k, v, starts, ends):
        out = np.empty_like(q)
        K.attention_varlen(out, q, k, v, starts, ends, n_heads, 2, 0.2)
        return out

    try:
        outs = []
        for rows in (1, 3, 4, 9, 16):
            _attention._set_rows_per_task(rows)
            outs.append(attend(q, k, v, starts, ends))
        for other in outs[1:]:
            np.testing.assert_array_equal(other, outs[0])
        a = 0
        for n in lens:
            span = slice(a, a + n)
            alone = attend(q[span], k[span], v[span], starts[span] - a, ends[span] - a)
            np.testing.assert_array_equal(alone, outs[0][span])
            a += n
    finally:
        _attention._set_rows_per_task(16)


@pytest.mark.parametrize("hd,chunk_blocks", [(64, 16), (64, 1), (24, 16), (40, 2), (96, 1)])
def test_attention_paged_over_halves_equals_floats_holding_them(hd, chunk_blocks):
    """A float16 cache gives bit for bit the output of a float32 cache holding the same values
    widened: the halves change what is stored, never how attention computes; whether a block's
    halves are widened into a buffer (runs of several rows) or in register as they are loaded
    (one-row runs: decode steps) does not change a bit either, nor whether a one-row run loads its
    chunk's rows first (_set_touch_chunk)."""
    from core.kernels import _attention
    rng = np.random.default_rng(5)
    n_kv, group, block_size = 3, 3, 16
    k16 = rand(rng, 6 * block_size, n_kv * hd).astype(np.float16)
    v16 = rand(rng, 6 * block_size, n_kv * hd).astype(np.float16)
    tables = np.array([[4, 1, 5], [0, 2, 3], [3, 5, 0]], np.int32)
    seq_ids = np.array([0] * 40 + [1] * 3 + [2] * 2, np.int32)
    positions = np.array(list(range(40)) + [7, 8, 47, 21, 30], np.int32)      # runs of 40, 2, 1, 1, 1
    q = rand(rng, len(seq_ids), n_kv * group * hd)
    outs = {}
    _attention._set_chunk_blocks(chunk_blocks)
    try:
        for name, k, v, in_place, touch in [("f16", k16, v16, 1, 1), ("f16 widened", k16, v16, 0, 1),
                                            ("f16 untouched", k16, v16, 1, 0),
                                            ("f32", k16.astype(np.float32), v16.astype(np.float32), 1, 1)]:
            _attention._set_f16_in_place(in_place)
            _attention._set_touch_chunk(touch)
            outs[name] = np.empty_like(q)
            K.attention_paged(outs[name], q, k, v, tables, seq_ids, positions, n_kv * group, n_kv, block_size, 0.125)
    finally:
        _attention._set_f16_in_place(1)
        _attention._set_touch_chunk(1)
        _attention._set_chunk_blocks(16)
    for name in ("f16", "f16 widened", "f16 untouched"):
        np.testing.assert_array_equal(outs[name], outs["f32"])


@pytest.mark.parametrize("hd,chunk_blocks,group", [(64, 16, 3), (64, 1, 3), (32, 2, 3), (64, 16, 4), (24, 1, 1)])
def test_attention_paged_decode_step_in_sequence_tasks_equals_head_tasks(hd, chunk_blocks, group):
    """A batched decode step (one row per sequence, float16 cache) whose tasks each take all KV
    heads of a sequence gives bit for bit the output of one task per KV head, and both match the
    numpy twin; long contexts split into chunks (chunk_blocks 1 and 2), query heads in groups
    of 3, 4 (3 + 1) and 1, and a prompt's chunk of rows fed in the same call (per-head tasks)
    included."""
    from core.kernels import _attention
    rng = np.random.default_rng(13)
    n_kv, block_size, n_seqs = 3, 16, 10
    n_blocks = 6 * n_seqs
    k16 = rand(rng, n_blocks * block_size, n_kv * hd).astype(np.float16)
    v16 = rand(rng, n_blocks * block_size, n_kv * hd).astype(np.float16)
    tables = rng.permutation(n_blocks).astype(np.int32).reshape(n_seqs, 6)
    seq_ids = np.array(list(range(9)) + [9] * 5, np.int32)
    positions = np.array([0, 15, 16, 40, 95, 3, 77, 50, 64] + list(range(30, 35)), np.int32)
    q = rand(rng, len(seq_ids), n_kv * group * hd)
    args = (tables, seq_ids, positions, n_kv * group, n_kv, block_size, 1 / np.sqrt(hd))
    outs = {}
    _attention._set_chunk_blocks(chunk_blocks)
    try:
        for on in (1, 0):
            _attention._set_sequence_tasks(on, 1)     # on: 9 runs are enough for any thread count here
            outs[on] = np.empty_like(q)
            K.attention_paged(outs[on], q, k16, v16, *args)
    finally:
        _attention._set_sequence_tasks(1)
        _attention._set_chunk_blocks(16)
    np.testing.assert_array_equal(outs[1], outs[0])
    want = np.empty_like(q)
    R.attention_paged(want, q, k16, v16, *args)
    np.testing.assert_allclose(outs[1], want, rtol=1e-4, atol=1e-5)


def test_attention_paged_refuses_caches_of_other_dtypes_or_shapes():
    q, tables, ids = np.zeros((1, 4), np.float32), np.zeros((1, 1), np.int32), np.zeros(1, np.int32)
    k32, k16 = np.zeros((4, 4), np.float32), np.zeros((4, 4), np.float16)
    with pytest.raises(TypeError, match="one dtype"):
        K.attention_paged(np.empty_like(q), q, k32, k16, tables, ids, ids, 1, 1, 4, 1.0)
    with pytest.raises(TypeError, match="float32 or float16"):
        K.attention_paged(np.empty_like(q), q, k32.astype(np.float64), k32, tables, ids, ids, 1, 1, 4, 1.0)
    with pytest.raises(TypeError, match="one dtype"):
        K.kv_write(k16, k32, q, q, ids)
    for k8 in (np.zeros((8, 4), np.float32), np.zeros((4, 8), np.float32)):
        with pytest.raises(ValueError, match="one shape"):
            K.attention_paged(np.empty_like(q), q, k32, k8, tables, ids, ids, 1, 1, 4, 1.0)
        with pytest.raises(ValueError, match="one shape"):
            K.kv_write(k8, k32, q, q, ids)


def test_attention_paged_rejects_bad_tables():
    k = np.zeros((8, 4), np.float32)
    q = np.zeros((1, 4), np.float32)
    with pytest.raises(ValueError, match="outside"):
        K.attention_paged(np.empty_like(q), q, k, k, np.array([[0, 9]], np.int32), np.array([0], np.int32),
                          np.array([5], np.int32), 1, 1, 4, 1.0)
    with pytest.raises(ValueError, match="outside"):
        K.attention_paged(np.empty_like(q), q, k, k, np.array([[0, 1]], np.int32), np.array([0], np.int32),
                          np.array([8], np.int32), 1, 1, 4, 1.0)


@settings(max_examples=40, deadline=None)
@given(n_kv=st.integers(1, 3), group=st.integers(1, 3), hd=st.sampled_from([1, 8, 24, 32, 64, 128]),
       lens=st.lists(st.integers(1, 30), min_size=1, max_size=4), seed=seeds)
@pytest.mark.parametrize("rows_in_lanes", [1, 0])
def test_attention_varlen(n_kv, group, hd, lens, seed, rows_in_lanes):
    from core.kernels import _attention
    _attention._set_rows_in_lanes(rows_in_lanes)
    rng = np.random.default_rng(seed)
    n_heads, T = n_kv * group, sum(lens)
    starts = np.repeat(np.cumsum([0] + lens[:-1]), lens).astype(np.int32)
    ends = (starts + np.repeat(lens, lens)).astype(np.int32)
    q, k, v = rand(rng, T, n_heads * hd), rand(rng, T, n_kv * hd), rand(rng, T, n_kv * hd)
    out, ref = np.empty_like(q), np.empty(q.shape, np.float64)
    try:
        K.attention_varlen(out, q, k, v, starts, ends, n_heads, n_kv, 0.3)
    finally:
        _attention._set_rows_in_lanes(1)
    R.attention_varlen(ref, q, k, v, starts, ends, n_heads, n_kv, 0.3)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kv_dtype", [np.float32, np.float16])
def test_kv_write(kv_dtype):
    """Written as they are, or rounded to halves exactly as numpy rounds them (to nearest, ties to
    even; past 65504 to infinity; below 2^-24 through the subnormals to zero)."""
    rng = np.random.default_rng(1)
    kc, vc = np.zeros((10, 19), kv_dtype), np.zeros((10, 19), kv_dtype)
    k, v = rand(rng, 3, 19), rand(rng, 3, 19) * 1e-5
    k[0, :8] = [65519.0, 65520.0, -1e9, 2.0 ** -25, 3 * 2.0 ** -26, 1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11, np.inf]
    slots = np.array([7, 2, 9], np.int32)
    K.kv_write(kc, vc, k, v, slots)
    kr, vr = np.zeros_like(kc), np.zeros_like(vc)
    R.kv_write(kr, vr, k, v, slots)
    np.testing.assert_array_equal(kc, kr)
    np.testing.assert_array_equal(vc, vr)
    with pytest.raises(ValueError, match="outside"):
        K.kv_write(kc, vc, k, v, np.array([0, 1, 10], np.int32))


@pytest.mark.parametrize("n", [0, 1, 31, 64, 65, (1 << 20) - 1, 1 << 20, (3 << 20) + 17])
def test_sum_bytes(n):
    from core.kernels._omp import sum_bytes
    buf = np.random.default_rng(n).integers(0, 256, n).astype(np.uint8)
    assert sum_bytes(buf) == R.sum_bytes(buf)


SAMPLING = [dict(), dict(temperature=0.7), dict(temperature=1.0, top_k=3), dict(temperature=1.3, top_p=0.9),
            dict(temperature=0.8, top_k=50, top_p=0.5), dict(temperature=2.0, top_p=0.999),
            dict(temperature=1.0, repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.2),
            dict(temperature=0.0, repetition_penalty=0.7, frequency_penalty=-0.5)]


@settings(max_examples=60, deadline=None)
@given(V=st.sampled_from([1, 2, 5, 300, 1500, 49152]), ties=st.sampled_from(["none", "max", "rounded"]),
       kw=st.sampled_from(SAMPLING), seed=seeds)
@example(V=300, ties="rounded", kw=dict(temperature=2.0, top_p=0.999), seed=15134)
def test_sample_logits(V, ties, kw, seed):
    """The same token as the twin for the same uniform draw u: penalties, greedy, temperature,
    top-k, top-p (a narrow nucleus and one wider than the kernel's ranked head), ties.  (The
    example: the last four of 300 weights had gone through libm's exp and the others through the
    kernel's, an ulp apart, so that equal logits ranked out of index order.)"""
    rng = np.random.default_rng(seed)
    logits = rand(rng, V, scale=rng.uniform(0.1, 8))
    if ties == "max":
        logits[rng.integers(0, V, min(V, 50))] = logits.max()
    elif ties == "rounded":
        logits = np.round(logits)
    history = rng.integers(0, V, rng.integers(0, 40)).tolist()
    for u in [0.0, *rng.random(12), np.nextafter(1.0, 0.0)]:
        got = K.sample_logits(logits, history=history, generated=history[-7:], u=float(u), **kw)
        assert got == R.sample_logits(logits, history=history, generated=history[-7:], u=float(u), **kw)


@settings(max_examples=40, deadline=None)
@given(V=st.sampled_from([1, 5, 63, 64, 65, 300, 1500, 49152]), ties=st.sampled_from(["none", "max", "rounded"]),
       spread=st.sampled_from([0.1, 4.0, 2000.0]), seed=seeds)
def test_sample_rows_is_sample_logits_row_by_row(V, ties, spread, seed):
    """Many rows sampled at once (in parallel, each with its own parameters and u): the tokens of
    sample_logits and of its twin; a wide spread of logits leaves most weights at zero (exp's
    libm path), and u just below 1 can pass every block's sum."""
    rng = np.random.default_rng(seed)
    rows = [rand(rng, V, scale=spread) for _ in range(9)]
    if ties == "max":
        rows[0][rng.integers(0, V, min(V, 50))] = rows[0].max()
    elif ties == "rounded":
        rows = [np.round(r) for r in rows]
    kws = [dict(temperature=0.0), dict(temperature=0.3), dict(temperature=1.0), dict(temperature=2.0, top_p=0.999),
           dict(temperature=0.7, top_p=0.9), dict(temperature=1.0, top_k=3), dict(temperature=0.8, top_k=50, top_p=0.5),
           dict(temperature=1.3), dict(temperature=1.0, top_p=0.95)]
    for us in ([0.0] * 9, rng.random(9), [np.nextafter(1.0, 0.0)] * 9, rng.random(9)):
        got = K.sample_rows(rows, [kw["temperature"] for kw in kws], [kw.get("top_k", 0) for kw in kws],
                            [kw.get("top_p", 1.0) for kw in kws], [float(u) for u in us])
        assert got == [K.sample_logits(r, u=float(u), **kw) for r, u, kw in zip(rows, us, kws)]
        assert got == [R.sample_logits(r, u=float(u), **kw) for r, u, kw in zip(rows, us, kws)]


def test_sample_rows_errors():
    rows = [np.zeros(100, np.float32), np.zeros(101, np.float32)]
    with pytest.raises(ValueError, match="one vocabulary"):
        K.sample_rows(rows, [1.0, 1.0], [0, 0], [1.0, 1.0], [0.5, 0.5])
    with pytest.raises(ValueError, match="one temperature, top_k, top_p and u per row"):
        K.sample_rows(rows[:1], [1.0, 1.0], [0], [1.0], [0.5])
    for bad in (dict(t=-1.0), dict(k=-1), dict(p=0.0), dict(p=1.5), dict(u=1.0), dict(u=-0.1)):
        with pytest.raises(ValueError, match="are required"):
            K.sample_rows(rows[:1], [bad.get("t", 1.0)], [bad.get("k", 0)], [bad.get("p", 1.0)], [bad.get("u", 0.5)])
    assert K.sample_rows([], [], [], [], []) == []
    assert K.sample_rows(rows[:1] * 3, [1.0] * 3, [0] * 3, [1.0] * 3, [0.5, 0.0, 0.999]) == [50, 0, 99]


@pytest.mark.parametrize("V", [1, 7, 8, 9, 300, 49152])
def test_greedy_is_the_first_largest_skipping_nans(V):
    """Greedy picks the first index of the largest logit (the vectorised search against a plain
    loop); NaNs are never picked, unless the first logit is one."""
    rng = np.random.default_rng(V)
    for case in range(12):
        x = np.round(rng.standard_normal(V) * 2).astype(np.float32)     # many ties
        if case % 3 == 1:
            x[rng.integers(0, V, max(1, V // 5))] = np.nan
        if case % 4 == 2:
            x[rng.integers(0, V)] = np.inf
        best = 0
        for i in range(1, V):
            if x[i] > x[best]:
                best = i
        assert K.sample_logits(x) == best
    assert K.sample_logits(np.array([np.nan, 1.0, 2.0], np.float32)) == 0


def test_sample_logits_threads_do_not_share_scratch():
    """The kernel keeps one call's scratch for the next; calls in several threads at once (the
    sampling runs without the GIL) must still each have their own."""
    from concurrent.futures import ThreadPoolExecutor
    rng = np.random.default_rng(3)
    rows = [rand(rng, 49152, scale=4.0) for _ in range(4)]
    kws = [dict(temperature=0.8, top_p=0.9), dict(temperature=1.0), dict(temperature=0.5, repetition_penalty=1.2),
           dict(temperature=1.1, top_k=40)]
    jobs = [(rows[i % 4], kws[i % 3 + (i // 12) % 2], float(u)) for i, u in enumerate(rng.random(96))]
    expected = [R.sample_logits(r, history=[1, 2, 3], u=u, **kw) for r, kw, u in jobs]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda job: K.sample_logits(job[0], history=[1, 2, 3], u=job[2], **job[1]), jobs))
    assert got == expected


def test_sample_logits_distribution_and_errors():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))
    us = (np.arange(4000) + 0.5) / 4000                          # evenly spread draws
    counts = np.bincount([K.sample_logits(logits, temperature=1.0, u=float(u)) for u in us], minlength=4)
    np.testing.assert_allclose(counts / 4000, [0.5, 0.3, 0.15, 0.05], atol=1e-3)
    top_p = {K.sample_logits(logits, temperature=1.0, top_p=0.75, u=float(u)) for u in us}
    assert top_p == {0, 1}                                       # 0.5 + 0.3 reach 0.75
    assert {K.sample_logits(logits, temperature=1.0, top_k=1, u=float(u)) for u in us} == {0}
    with pytest.raises(ValueError, match="vocabulary"):
        K.sample_logits(logits, repetition_penalty=1.2, history=[4])
    with pytest.raises(ValueError, match="u < 1"):
        K.sample_logits(logits, temperature=1.0, u=1.0)
    with pytest.raises(ValueError, match="no logits"):
        K.sample_logits(np.zeros(0, np.float32))


def _matmul_case(M):
    rng = np.random.default_rng(M)
    x, (w, s) = rand(rng, M, 576), R.quantize_weights_q8(rand(rng, 40, 576))
    packed, bits = R.pack_q8_rows(w), s.view(np.uint16)

    def call():
        out = np.empty((M, 40), np.float32)
        K.matmul_q8(out, x, packed, bits)
        return out
    return call


def _paged_case(n_keys):
    """One decode row over n_keys keys (more than one chunk: the split path) and a short prefill run."""
    rng = np.random.default_rng(n_keys)
    n_kv, group, hd, bs = 2, 3, 16, 16
    n_blocks = -(-n_keys // bs) + 2
    k, v = rand(rng, n_blocks * bs, n_kv * hd), rand(rng, n_blocks * bs, n_kv * hd)
    tables = np.array([list(range(n_blocks)), list(range(n_blocks))[::-1]], np.int32)
    seq_ids = np.array([0] + [1] * 5, np.int32)
    positions = np.array([n_keys - 1] + list(range(5)), np.int32)
    q = rand(rng, len(seq_ids), n_kv * group * hd)

    def call():
        out = np.empty_like(q)
        K.attention_paged(out, q, k, v, tables, seq_ids, positions, n_kv * group, n_kv, bs, 0.25)
        return out
    return call


def _varlen_case():
    rng = np.random.default_rng(3)
    q, k, v = rand(rng, 12, 64), rand(rng, 12, 32), rand(rng, 12, 32)
    starts, ends = np.array([0] * 5 + [5] * 7, np.int32), np.array([5] * 5 + [12] * 7, np.int32)

    def call():
        out = np.empty_like(q)
        K.attention_varlen(out, q, k, v, starts, ends, 4, 2, 0.2)
        return out
    return call


@pytest.mark.parametrize("module, call, n_allocations", [
    ("_matmul", _matmul_case(3), 1), ("_matmul", _matmul_case(37), 1),
    ("_attention", _paged_case(700), 2), ("_attention", _paged_case(40), 2), ("_attention", _varlen_case(), 2)],
    ids=["matmul-decode", "matmul-prefill", "paged-split", "paged", "varlen"])
def test_a_kernel_without_scratch_memory_raises_and_recovers(module, call, n_allocations):
    """Each scratch allocation of a kernel failing in turn gives MemoryError, not a write through NULL;
    the next call computes the same result as before."""
    import importlib
    knob = importlib.import_module(f"core.kernels.{module}")._fail_scratch_after
    expected = call()
    try:
        for n in range(1, n_allocations + 2):
            knob(n)
            if n <= n_allocations:
                with pytest.raises(MemoryError, match="scratch"):
                    call()
            else:                                   # one past the kernel's allocations: it runs
                np.testing.assert_array_equal(call(), expected)
            knob(0)
            np.testing.assert_array_equal(call(), expected)
    finally:
        knob(0)
