"""The paged KV cache's block accounting and prefix sharing (core/kv_cache.py), and prefix caching
end to end: shared prompt blocks skip their prefill and change no output."""

import numpy as np
import pytest

from core.kv_cache import KVCache, KVCacheFullError

BS = 4


def fed(cache, tokens):
    """A sequence that took blocks for tokens and registered them (as a forward pass would)."""
    seq = cache.new_sequence()
    seq.reserve(len(tokens))
    seq.n_tokens, seq.tokens = len(tokens), list(tokens)
    cache.register(seq)
    return seq


def test_blocks_are_counted_and_a_full_pool_raises():
    cache = KVCache(n_layers=1, width=2, n_blocks=4, block_size=BS)
    a = fed(cache, range(9))                       # 3 blocks
    assert cache.n_free == 1
    with pytest.raises(KVCacheFullError):
        fed(cache, range(100, 108))
    a.release()
    assert cache.n_free == 4


def test_halves_take_half_the_memory_and_other_dtypes_are_refused():
    f32 = KVCache(n_layers=3, width=8, n_blocks=5, block_size=BS)
    f16 = KVCache(n_layers=3, width=8, n_blocks=5, block_size=BS, dtype="f16")
    assert f32.dtype == "f32" and f16.dtype == "f16"
    assert f16.block_bytes * 2 == f32.block_bytes == 2 * 3 * BS * 8 * 4
    assert len(f16.k_memory) * 2 == len(f32.k_memory) == 3 * 5 * BS * 8 * 4
    assert f16.k.dtype == np.float16 and f16.v.shape == f32.v.shape == (3, 5 * BS, 8)
    with pytest.raises(ValueError, match="bf16"):
        KVCache(n_layers=1, width=2, n_blocks=1, dtype="bf16")


def test_the_kv_dtype_follows_the_weights_unless_asked(converted):
    """auto: an int8 model keeps halves, an fp32 one floats; either can be asked for."""
    from models.api import load_model
    assert load_model(converted("smollm2", "int8"), kv_tokens=64).cache.dtype == "f16"
    assert load_model(converted("smollm2", "f32"), kv_tokens=64).cache.dtype == "f32"
    m = load_model(converted("smollm2", "int8"), kv_tokens=64, kv_dtype="f32")
    assert m.cache.dtype == "f32" and m.cache.k.dtype == np.float32
    with pytest.raises(ValueError, match="dtype"):
        load_model(converted("smollm2", "int8"), kv_tokens=64, kv_dtype="int4")


def test_a_shared_prefix_is_reused_by_reference():
    cache = KVCache(n_layers=1, width=2, n_blocks=8, block_size=BS)
    system = list(range(10, 22))                   # 3 full blocks
    a = fed(cache, system + [1, 2])
    b = cache.new_sequence()
    reused = cache.match_prefix(b, system + [7, 8, 9])
    assert reused == 12 and b.blocks == a.blocks[:3] and b.n_tokens == 12
    assert cache.prefix_hits == 3
    assert cache.n_free == 8 - 4                   # nothing new was taken
    a.release()                                    # b still holds the shared blocks
    assert all(cache._refs[x] == 1 for x in b.blocks)
    b.release()
    assert cache.n_free == 8
    c = cache.new_sequence()                       # released but cached: still found
    assert cache.match_prefix(c, system + [5]) == 12
    c.release()


def test_the_last_prompt_token_is_always_computed_and_mismatches_stop_the_match():
    cache = KVCache(n_layers=1, width=2, n_blocks=8, block_size=BS)
    fed(cache, list(range(8))).release()
    s = cache.new_sequence()
    assert cache.match_prefix(s, list(range(8))) == 4          # not the whole prompt: its logits are needed
    s.release()
    s = cache.new_sequence()
    assert cache.match_prefix(s, [0, 1, 2, 3, 9, 5, 6, 7, 8]) == 4   # second block differs
    s.release()
    s = cache.new_sequence()
    assert cache.match_prefix(s, [1, 0, 2, 3, 4, 5, 6, 7, 8]) == 0
    s.release()


def test_cached_blocks_are_evicted_oldest_first_when_the_pool_runs_dry():
    cache = KVCache(n_layers=1, width=2, n_blocks=4, block_size=BS)
    fed(cache, list(range(0, 4))).release()        # cached first
    fed(cache, list(range(50, 54))).release()
    assert cache.n_free == 4
    fed(cache, list(range(100, 112)))              # needs 3: 2 free ones, then the oldest cached
    s = cache.new_sequence()
    assert cache.match_prefix(s, list(range(0, 4)) + [9]) == 0       # evicted
    s.release()
    s = cache.new_sequence()
    assert cache.match_prefix(s, list(range(50, 54)) + [9]) == 4     # kept
    s.release()


def test_prefix_caching_skips_prefill_and_changes_no_output(loaded):
    """Generations that share a long system prompt reuse its blocks and give exactly the tokens
    they give with prefix caching off."""
    m = loaded("smollm2", "int8")
    system = [{"role": "system", "content": "You are a careful assistant who answers in one short "
                                             "sentence. Think about the question, then answer plainly. " * 3}]
    questions = ["What is the capital of France?", "Name a primary colour.", "What is 2 + 2?"]
    prompts = [m.chat_prompt(system + [{"role": "user", "content": q}]) for q in questions]
    m.cache.clear_prefixes()
    m.prefix_caching = False
    try:
        plain = [m.generate(p, max_tokens=12).token_ids for p in prompts]
    finally:
        m.prefix_caching = True
    hits0 = m.cache.prefix_hits
    shared = [m.generate(p, max_tokens=12).token_ids for p in prompts]
    assert shared == plain
    common = next(i for i in range(min(map(len, prompts))) if len({p[i] for p in prompts}) > 1)
    assert common >= 3 * m.cache.block_size
    assert m.cache.prefix_hits - hits0 >= 2 * (common // m.cache.block_size)   # the 2nd and 3rd reuse it
    assert m.cache.n_free == m.cache.n_blocks


def test_long_prompts_are_fed_in_chunks_between_decode_steps(loaded):
    """While a sequence decodes, a prompt gets at most prefill_rows rows per pass, fewer once it is
    deep (its rows' attention grows); alone it gets every row the state holds."""
    from models.api import ATTENTION_ROW_EQUIVALENT, Feed
    m = loaded("smollm2", "int8")
    rng = np.random.default_rng(3)
    dec, long = m.cache.new_sequence(), m.cache.new_sequence()
    try:
        m._run(dec, rng.integers(100, 30000, 5).tolist(), all_logits=False)
        m._run(long, rng.integers(100, 30000, 300).tolist(), all_logits=False)
        d, p = Feed(m, dec, [7]), Feed(m, long, rng.integers(100, 30000, 40).tolist())
        m.run_feeds([d, p], prefill_rows=16)
        assert d.logits is not None and p.logits is None
        assert p.done == int(16 / (1 + 300 / ATTENTION_ROW_EQUIVALENT)) and long.n_tokens == 300 + p.done
        m.run_feeds([p], prefill_rows=16)                 # alone: the rest at once
        assert p.done == 40 and p.logits is not None
    finally:
        dec.release()
        long.release()


def test_priority_orders_prompts_and_picks_the_preemption_victim(loaded):
    from models.api import Feed, SamplingParams
    from core.errors import InvalidRequestError
    m = loaded("smollm2", "int8")
    rng = np.random.default_rng(4)
    seqs = [m.cache.new_sequence() for _ in range(3)]
    try:
        m._run(seqs[0], rng.integers(100, 30000, 5).tolist(), all_logits=False)
        dec = Feed(m, seqs[0], [7])
        low = Feed(m, seqs[1], rng.integers(100, 30000, 20).tolist(), priority=0)
        high = Feed(m, seqs[2], rng.integers(100, 30000, 20).tolist(), priority=5)
        m.run_feeds([dec, low, high], prefill_rows=16)      # 16 prompt rows: all go to the high one
        assert high.done == 16 and low.done == 0
    finally:
        for s in seqs:
            s.release()
    with pytest.raises(InvalidRequestError, match="priority"):
        SamplingParams(priority=1.5)
