"""The native forward (models/_llama_native.pyx) against its twin, models.llama.forward with
LlamaWeights.output: the same kernels in the same order, so hidden states, logits and KV cache
agree bit for bit, for prefill chunks, decode steps and batches that mix sequences; and bad batches
are refused before any work."""

import weakref

import numpy as np
import pytest

from core.kernels.reference import pack_q8_rows, quantize_weights_q8
from core.wfile import write_weights
from models import llama
from models.api import Batch, load_model
from byte_level import byte_level_tokenizer_json

VOCAB = 300


def random_llama(path, quant: str, bias: bool, dim=480, hidden=560, n_layers=2, n_heads=6, n_kv_heads=2):
    """A Llama (Qwen2 when bias) weights file with random weights; dim and hidden are chosen so that
    int8 rows hold every kind of interleaved block (dim 480: 8 + 4 + 2 + 1 groups; hidden 560:
    8 + 8 + 1 groups and a partial group of 16 values)."""
    rng = np.random.default_rng(7 + bias)
    hd = dim // n_heads
    shapes = {"token_embd.weight": (VOCAB, dim), "output_norm.weight": (dim,), "output.weight": (VOCAB, dim)}
    for l in range(n_layers):
        p = f"blk.{l}"
        shapes.update({f"{p}.attn_norm.weight": (dim,), f"{p}.ffn_norm.weight": (dim,),
                       f"{p}.attn_q.weight": (dim, dim), f"{p}.attn_k.weight": (n_kv_heads * hd, dim),
                       f"{p}.attn_v.weight": (n_kv_heads * hd, dim), f"{p}.attn_output.weight": (dim, dim),
                       f"{p}.ffn_gate.weight": (hidden, dim), f"{p}.ffn_up.weight": (hidden, dim),
                       f"{p}.ffn_down.weight": (dim, hidden)})
        if bias:
            shapes.update({f"{p}.attn_{x}.bias": (n,) for x, n in
                           [("q", dim), ("k", n_kv_heads * hd), ("v", n_kv_heads * hd)]})
    tensors = []
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            a = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            a = (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)
        if quant == "int8" and len(shape) == 2:
            q, s = quantize_weights_q8(a)
            tensors += [(name, pack_q8_rows(q)), (name.replace(".weight", ".scale"), s)]
        else:
            tensors.append((name, a))
    tensors.append(("tokenizer.json", np.frombuffer(byte_level_tokenizer_json(VOCAB).encode(), np.uint8)))
    config = dict(dim=dim, hidden_dim=hidden, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                  head_dim=hd, vocab_size=VOCAB, seq_len=512, norm_eps=1e-5, rope_base=10000.0, rope_dim=hd,
                  rope_style="neox", attn_bias=bias, tied_embeddings=False)
    meta = dict(arch="llama", config=config, quant={"name": quant}, eos_token_id=VOCAB - 1)
    write_weights(path, meta, tensors)
    return path


@pytest.fixture(scope="module", params=[("int8", False, "f32"), ("int8", True, "f32"), ("f32", True, "f32"),
                                        ("int8", False, "f16")],
                ids=["int8", "int8-bias", "f32-bias", "int8-f16kv"])
def model(request, tmp_path_factory):
    quant, bias, kv_dtype = request.param
    path = random_llama(str(tmp_path_factory.mktemp("native") / "m.edge"), quant, bias)
    m = load_model(path, kv_dtype=kv_dtype)
    assert m.cache.dtype == kv_dtype
    from models._llama_native import LlamaNative
    assert isinstance(m._native, LlamaNative)           # the model runs the native pass by default
    return m


def run_both(m, batch):
    """Python forward, then native forward, on the same batch: (hidden, logits, k, v) of each."""
    touched = np.unique(np.asarray(batch.slots))
    py = llama.forward(m.config, m.weights, m.state, m.cache, batch.numpy()).copy()
    T = len(py)
    py_logits = m.weights.output(m.state.logits[:T], py).copy()
    py_k, py_v = m.cache.k[:, touched].copy(), m.cache.v[:, touched].copy()
    m.cache.k[:, touched] = np.nan                      # the native pass must write them again
    m.cache.v[:, touched] = np.nan
    nat = np.asarray(m._native(batch)).copy()
    rows = list(range(T))[::-1]                         # any rows, in any order
    nat_logits = np.stack([np.frombuffer(r, np.float32) for r in m._native.logits(rows)])[::-1]
    return (py, py_logits, py_k, py_v), (nat, nat_logits, m.cache.k[:, touched].copy(), m.cache.v[:, touched].copy())


def assert_same(a, b):
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_prefill_then_decode_bit_for_bit(model):
    m = model
    rng = np.random.default_rng(0)
    seq = m.cache.new_sequence()
    try:
        for T in [37, 64, 1, 1, 5, 1]:           # prefill chunks, then decode steps
            tokens = rng.integers(0, VOCAB, T).astype(np.int32)
            positions = np.arange(seq.n_tokens, seq.n_tokens + T, dtype=np.int32)
            seq.reserve(seq.n_tokens + T)
            batch = Batch(tokens, positions, np.zeros(T, np.int32), np.array(seq.slots(positions), np.int32),
                          np.array([seq.block_table()], np.int32), m.cache.block_size)
            py, nat = run_both(m, batch)
            assert np.isfinite(nat[0]).all()
            assert_same(py, nat)
            seq.n_tokens += T
    finally:
        seq.release()


@pytest.mark.parametrize("split_keys", [False, True], ids=["keys-in-one-chunk", "keys-split"])
def test_decode_steps_in_one_region_bit_for_bit(model, split_keys):
    """Steps of up to TEAM_ROWS_MAX (8) rows run in one parallel region (_forward_team): one sequence
    with drafted rows, and several sequences, against the Python forward; with chunks of
    one KV block, the keys of every row past the first block are split into chunks that are
    combined after a barrier (flash-decoding)."""
    from core.kernels import _attention
    from models import _llama_native

    m = model
    rng = np.random.default_rng(5)
    seqs = [m.cache.new_sequence() for _ in range(4)]
    try:
        _llama_native._set_team_forward(1)
        if split_keys:
            _attention._set_chunk_blocks(1)
        for seq, n in zip(seqs, [40, 17, 3, 33]):
            m._run(seq, rng.integers(0, VOCAB, n).tolist(), all_logits=False)
        for rows in [[0], [0, 0], [0, 0, 0, 0], [1, 2], [3, 0, 2], [0, 1, 2, 3], [2, 2, 3], [1] * 5, [0, 0, 1, 2, 3],
                     [0, 0, 1, 1, 2, 3], [0, 1, 2, 3, 0, 1, 2], [1] * 4 + [2] * 4]:
            news = {i: rows.count(i) for i in set(rows)}
            for i, new in news.items():
                seqs[i].reserve(seqs[i].n_tokens + new)
            tokens, positions, seq_ids, slots = [], [], [], []
            for i, new in news.items():
                pos = range(seqs[i].n_tokens, seqs[i].n_tokens + new)
                tokens += rng.integers(0, VOCAB, new).tolist()
                positions += pos
                seq_ids += [i] * new
                slots += seqs[i].slots(pos)
            tables = [seq.block_table() + [0] * (8 - len(seq.block_table())) for seq in seqs]
            batch = Batch.of(tokens, positions, seq_ids, slots, tables, m.cache.block_size)
            py, nat = run_both(m, batch)
            assert np.isfinite(nat[0]).all()
            assert_same(py, nat)
            for i, new in news.items():
                seqs[i].n_tokens += new
    finally:
        _attention._set_chunk_blocks(16)
        for seq in seqs:
            seq.release()


def test_mixed_batch_of_sequences_bit_for_bit(model):
    """One call decodes three sequences at different positions (and prefills a fourth)."""
    m = model
    rng = np.random.default_rng(1)
    seqs = [m.cache.new_sequence() for _ in range(4)]
    try:
        for seq, n in zip(seqs, [20, 3, 45, 0]):
            if n:
                ids = rng.integers(0, VOCAB, n).tolist()
                m._run(seq, ids, all_logits=False)
        news = [1, 1, 1, 6]
        for seq, new in zip(seqs, news):
            seq.reserve(seq.n_tokens + new)
        tokens, positions, seq_ids, slots = [], [], [], []
        for i, (seq, new) in enumerate(zip(seqs, news)):
            pos = range(seq.n_tokens, seq.n_tokens + new)
            tokens += rng.integers(0, VOCAB, new).tolist()
            positions += pos
            seq_ids += [i] * new
            slots += seq.slots(pos)
        tables = [seq.block_table() + [0] * 4 for seq in seqs]
        batch = Batch.of(tokens, positions, seq_ids, slots, tables, m.cache.block_size)   # array('i') buffers
        py, nat = run_both(m, batch)
        assert_same(py, nat)
    finally:
        for seq in seqs:
            seq.release()


def test_bad_batches_are_refused(model):
    m = model
    seq = m.cache.new_sequence()
    try:
        seq.reserve(4)
        pos = np.arange(4, dtype=np.int32)

        def batch(**kw):
            args = dict(tokens=np.array([1, 2, 3, 4], np.int32), positions=pos, seq_ids=np.zeros(4, np.int32),
                        slots=np.array(seq.slots(pos), np.int32), block_tables=np.array([seq.block_table()], np.int32),
                        block_size=m.cache.block_size)
            args.update(kw)
            return Batch(**args)

        call = m._native
        with pytest.raises(IndexError, match="vocabulary"):
            call(batch(tokens=np.array([1, 2, VOCAB, 4], np.int32)))
        with pytest.raises(ValueError, match="slot"):
            call(batch(slots=np.array([0, 1, 2, 10**6], np.int32)))
        with pytest.raises(ValueError, match="outside the cache"):
            call(batch(positions=np.array([0, 1, 2, 400], np.int32)))
        with pytest.raises(ValueError, match="outside the cache"):
            call(batch(seq_ids=np.array([0, 0, 1, 0], np.int32)))
        with pytest.raises(ValueError, match="rows"):
            call(batch(tokens=np.zeros(m.max_rows + 1, np.int32)))
        with pytest.raises(ValueError):
            call(batch(tokens=np.array([1, 2, 3, 4], np.int64)))
        call(batch())
        with pytest.raises(IndexError, match="row 4"):       # logits of a row the last call did not have
            m._native.logits([0, 4])
        with pytest.raises(ValueError, match="logits rows"):
            m._native.logits([])
    finally:
        seq.release()


def test_logits_rows_are_recycled_only_once_released(model):
    """logits() refills an array it handed out only when nothing else references it: rows (and views
    of them) that a caller keeps are never overwritten, dropped ones are reused."""
    m = model
    seq = m.cache.new_sequence()
    try:
        first = m._run(seq, [5, 6, 7], all_logits=True)           # 3 rows, kept
        view = np.frombuffer(first[2], np.float32)                # a view keeps its array busy
        kept = [np.frombuffer(r, np.float32).copy() for r in first]
        refs = [weakref.ref(r) for r in first]
        del first
        assert all(r() is not None for r in refs)                 # the pool keeps them
        second = m._run(seq, [8, 9], all_logits=True)             # only rows 0 and 1 came free
        assert second[0] is refs[0]() and second[1] is refs[1]()
        assert np.array_equal(view, kept[2])                      # the viewed row was not refilled
        expected = m.logits([5, 6, 7, 8, 9])                      # a fresh sequence, its own rows
        assert np.array_equal(np.stack([np.frombuffer(r, np.float32) for r in second]), expected[3:])
        assert np.array_equal(np.stack([kept[0], kept[1], view]), expected[:3])
        third = m._run(seq, [10], all_logits=True)                # second is still held: a new row
        assert id(third[0]) not in {id(r) for r in second}
    finally:
        seq.release()


def test_logits_of_many_rows_come_in_slices_of_logit_rows(model, monkeypatch):
    """A chunk's logits are computed LOGIT_ROWS rows at a time (the logits block held at once stays
    that size whatever max_rows is): sliced finer, every row and its order are the same, in the
    native pass and in the Python one, and in perplexity's windows."""
    import models.api as api

    m = model
    ids = np.random.default_rng(4).integers(0, VOCAB, 23).tolist()
    whole = m.logits(ids)
    ppl = m.perplexity(ids)
    monkeypatch.setattr(api, "LOGIT_ROWS", 5)
    np.testing.assert_array_equal(m.logits(ids), whole)
    assert m.perplexity(ids) == pytest.approx(ppl, rel=1e-12)       # summed per slice: float64 order
    monkeypatch.setattr(m, "_native", None)                  # the Python forward, the same bits
    np.testing.assert_array_equal(m.logits(ids), whole)


@pytest.mark.parametrize("module", ["_matmul", "_attention"])
def test_a_forward_without_scratch_memory_raises_and_the_model_goes_on(model, module):
    """Each scratch allocation of a prefill and its logits failing in turn (every layer's, the head's)
    stops the native forward with MemoryError, not a crash; the sequence is then fed again and gives
    the same logits."""
    import importlib
    knob = importlib.import_module(f"core.kernels.{module}")._fail_scratch_after
    m = model
    ids = list(range(3, 3 + 40))
    seq = m.cache.new_sequence()
    try:
        expected = np.frombuffer(m._run(seq, ids, all_logits=False), np.float32).copy()
    finally:
        seq.release()
    failures = 0
    for n in range(1, 100):
        seq = m.cache.new_sequence()
        try:
            knob(n)
            try:
                got = np.frombuffer(m._run(seq, ids, all_logits=False), np.float32).copy()
                failed = False
            except MemoryError as e:
                assert "scratch" in str(e)
                failures += 1
                failed = True
                knob(0)
                seq.release()
                seq = m.cache.new_sequence()
                got = np.frombuffer(m._run(seq, ids, all_logits=False), np.float32).copy()
            np.testing.assert_array_equal(got, expected)
        finally:
            knob(0)
            seq.release()
        if not failed:                      # the n-th allocation is past the pass's last one
            break
    int8 = m.meta["quant"]["name"] == "int8"
    # per layer: two attention allocations; four matmuls (int8 only), and the head's
    expected_failures = 2 * m.config.n_layers if module == "_attention" else 4 * m.config.n_layers + 1 if int8 else 0
    assert failures == expected_failures


@pytest.mark.parametrize("module", ["core.kernels._attention", "models._llama_native"])
def test_a_decode_step_in_one_region_without_scratch_memory_raises_and_the_model_goes_on(model, module):
    """The one-region decode step takes its scratch before the region: the attention plan's two
    allocations and the threads' own rows.  Each failing stops the step with MemoryError; the
    token is fed again and gives the logits of a step that never failed."""
    import importlib
    knob = importlib.import_module(module)._fail_scratch_after
    m = model
    prompt, step = list(range(3, 3 + 20)), [77, 78]
    seq = m.cache.new_sequence()
    try:
        m._run(seq, prompt, all_logits=False)
        expected = np.frombuffer(m._run(seq, step, all_logits=False), np.float32).copy()
    finally:
        seq.release()
    int8 = m.meta["quant"]["name"] == "int8"
    failures = 0
    for n in range(1, 10):
        seq = m.cache.new_sequence()
        try:
            m._run(seq, prompt, all_logits=False)
            knob(n)
            try:
                got = np.frombuffer(m._run(seq, step, all_logits=False), np.float32).copy()
            except MemoryError as e:
                assert "scratch" in str(e)
                failures += 1
                knob(0)
                got = np.frombuffer(m._run(seq, step, all_logits=False), np.float32).copy()
            else:
                break
            finally:
                knob(0)
            np.testing.assert_array_equal(got, expected)
        finally:
            seq.release()
    if module.endswith("_attention"):       # the plan's runs and work, once for every layer (f32: per layer)
        assert failures == (2 if int8 else 2 * m.config.n_layers)
    else:
        assert failures == (1 if int8 else 0)
