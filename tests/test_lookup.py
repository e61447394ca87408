"""Prompt-lookup drafts (models/lookup.py) in greedy generation on the real int8 SmolLM2: the tokens
are those of decoding one at a time, alone and batched, in fewer forward passes; the prefix cache
never keeps a rejected draft; a pass with no room for a draft checks the token alone."""

import pytest

from models.api import DRAFT_TOKENS, Feed, SamplingParams
from models.lookup import DraftLength, PromptLookup


def test_lookup_finds_the_latest_earlier_occurrence_of_the_longest_suffix():
    seq = [1, 2, 3, 9, 1, 2, 3, 8, 5, 2, 3]
    lookup = PromptLookup(seq, n_min=1, n_max=3)
    assert lookup.draft(2) == [8, 5]               # "2 3" last followed by 8 (index 7), not by 9
    lookup.extend([8])                              # ... 2 3 8: "3 8" seen before, then 5 2
    assert lookup.draft(3) == [5, 2, 3]
    assert PromptLookup(seq + [8], n_min=1, n_max=3).draft(3) == [5, 2, 3]    # extend == build at once
    assert lookup.draft(0) == [] and PromptLookup([4, 5, 6]).draft(3) == []   # nothing seen before
    assert PromptLookup([7, 7]).draft(2) == []       # the suffix never matches itself (n_min 2)
    assert PromptLookup([7, 7], n_min=1).draft(2) == [7]
    assert PromptLookup([1, 2, 9, 2], n_min=2).draft(2) == []   # only a 1-gram matches
    assert PromptLookup([1, 2, 9, 1, 2], n_min=2).draft(5) == [9, 1, 2]      # runs to the end
    with pytest.raises(ValueError, match="n_min"):
        PromptLookup([], n_min=0)
    with pytest.raises(ValueError, match="n_min"):
        PromptLookup([], n_min=3, n_max=2)


def test_a_draft_grows_while_it_holds_falls_back_to_what_held_and_pauses_after_misses():
    d = DraftLength(2, 4)
    assert d.next() == 2
    d.checked(2, 2)
    assert d.next() == 3                    # held to its end: one more
    d.checked(3, 3)
    d.checked(4, 4)
    assert d.next() == 4                    # ... up to the longest
    d.checked(4, 2)
    assert d.next() == 3                    # two held: three next
    d.checked(1, 1)
    assert d.next() == 4                    # a draft cut short that held grows too
    d.checked(0, 0)
    assert d.next() == 4                    # nothing checked: unchanged
    d.checked(4, 1)
    assert d.next() == 2                    # one held: two next (the shortest)
    d.checked(2, 0)
    assert d.next() == 2                    # a first miss: no pause
    d.checked(2, 0)                         # a second miss in a row: pause 1 pass, then 2, 4, ...
    assert [d.next() for _ in range(2)] == [0, 2]
    d.checked(2, 0)
    assert [d.next() for _ in range(3)] == [0, 0, 2]
    for _ in range(10):
        d.checked(2, 0)
    assert [d.next() for _ in range(17)] == [0] * DraftLength.PAUSE_MAX + [2]     # at most PAUSE_MAX
    d.checked(2, 1)                         # something held: no pause, misses start over
    d.checked(2, 0)
    assert d.next() == 2
    one = DraftLength(2, 1)                 # draft_tokens 1: always one
    one.checked(1, 1)
    assert one.next() == 1


@pytest.fixture(scope="module")
def model(loaded):
    m = loaded("smollm2", "int8")
    yield m
    m.draft_tokens = DRAFT_TOKENS


@pytest.fixture(scope="module")
def prompts(model, real_text):
    ids = model.tokenize(real_text)
    passage = model.detokenize(ids[200:600])
    chat = lambda text: model.chat_prompt([{"role": "user", "content": text}])   # noqa: E731
    return {"summary": chat("Summarize this passage:\n\n" + passage),
            "story": chat("Write a short story about a robot who learns to paint."),
            "text": ids[:16]}


def _generate(model, ids, k, **kw):
    model.draft_tokens = k
    passes = model.forward_passes
    out = list(model.generate_ids(ids, SamplingParams(**kw)))
    return out, model.forward_passes - passes


def test_drafts_change_no_greedy_token_and_save_passes(model, prompts):
    for name, ids in prompts.items():
        plain, plain_passes = _generate(model, ids, 0, max_tokens=80, ignore_eos=True)
        assert plain_passes == len(plain)          # the prompt, then one pass per token after the first
        for k in (1, 2, 3, 4, 8):
            accepted = model.accepted_tokens
            out, passes = _generate(model, ids, k, max_tokens=80, ignore_eos=True)
            assert out == plain, (name, k)
            assert passes == len(out) - (model.accepted_tokens - accepted)      # each accepted token saved one
            if name == "summary":                  # a summary quotes its passage: many are accepted
                assert passes < 0.9 * len(out), (k, passes)
    for kw in ({"max_tokens": 1}, {"max_tokens": 2}, {"max_tokens": 3}, {"max_tokens": 60}):
        assert _generate(model, prompts["summary"], 2, **kw)[0] == _generate(model, prompts["summary"], 0, **kw)[0]


def test_drafts_start_at_two_tokens_and_grow_while_they_hold(model, prompts, monkeypatch):
    lengths = []                        # drafted tokens fed in each decode pass

    def run(seq, ids, all_logits, tail=0):
        lengths.append(tail - 1)
        return type(model)._run(model, seq, ids, all_logits, tail)

    monkeypatch.setattr(model, "_run", run)
    for k in (2, 3, 4):
        lengths.clear()
        _generate(model, prompts["summary"], k, max_tokens=80, ignore_eos=True)
        drafts = [n for n in lengths[1:] if n > 0]          # after the prompt's pass
        assert drafts[0] == 2 and max(drafts) == k, (k, drafts)    # a summary quotes: drafts grow


def test_text_and_stop_strings_are_the_same_with_drafts(model, prompts):
    for kw in ({"max_tokens": 120}, {"max_tokens": 120, "stop": ["."]}, {"max_tokens": 120, "stop": ["robot"]}):
        model.draft_tokens = 0
        plain = model.generate(prompts["story"], **kw)
        model.draft_tokens = DRAFT_TOKENS
        assert model.generate(prompts["story"], **kw) == plain


def test_penalties_draft_nothing(model, prompts):
    for kw in ({"repetition_penalty": 1.3}, {"frequency_penalty": 0.5}, {"presence_penalty": 0.5},
               {"temperature": 0.8, "seed": 3, "presence_penalty": 0.5}):
        drafted = model.drafted_tokens
        out, passes = _generate(model, prompts["summary"], DRAFT_TOKENS, max_tokens=30, ignore_eos=True, **kw)
        assert model.drafted_tokens == drafted and passes == len(out)
        assert out == _generate(model, prompts["summary"], 0, max_tokens=30, ignore_eos=True, **kw)[0]


def test_a_seeded_sample_is_the_same_with_drafts(model, prompts):
    """A sampled token takes one uniform draw whether or not a draft was checked, from the same
    logits: a seed gives the same tokens with drafts or without, and a drafted token holds with
    the probability the model gives it."""
    saved = 0
    for name, ids in prompts.items():
        for kw in ({"temperature": 0.3, "seed": 1}, {"temperature": 0.7, "seed": 2, "top_p": 0.9},
                   {"temperature": 1.0, "seed": 3, "top_k": 40}):
            plain, plain_passes = _generate(model, ids, 0, max_tokens=60, ignore_eos=True, **kw)
            accepted = model.accepted_tokens
            out, passes = _generate(model, ids, DRAFT_TOKENS, max_tokens=60, ignore_eos=True, **kw)
            assert out == plain, (name, kw)
            assert passes == len(out) - (model.accepted_tokens - accepted)
            saved += plain_passes - passes
    assert saved > 0                        # at a low temperature a summary still quotes


def test_the_prefix_cache_keeps_only_accepted_tokens(model, prompts):
    """Rejected drafts' rows are written to the cache and overwritten later: no block registered
    for prefix sharing may hold one.  A prompt that continues a drafted generation reuses its
    blocks and gives the tokens it gives without prefix caching."""
    ids = prompts["summary"]
    model.cache.clear_prefixes()
    rejected = model.drafted_tokens - model.accepted_tokens
    first, _ = _generate(model, ids, 2, max_tokens=64, ignore_eos=True)
    assert model.drafted_tokens - model.accepted_tokens > rejected          # some drafts were rejected
    follow = ids + first + model.tokenize(" In short,", add_special_tokens=False)
    hits = model.cache.prefix_hits
    reused, _ = _generate(model, follow, 2, max_tokens=24, ignore_eos=True)
    assert model.cache.prefix_hits - hits >= (len(ids) + len(first)) // model.cache.block_size - 1
    model.cache.clear_prefixes()
    model.prefix_caching = False
    try:
        assert reused == _generate(model, follow, 0, max_tokens=24, ignore_eos=True)[0]
    finally:
        model.prefix_caching = True
    assert model.cache.n_free == model.cache.n_blocks


def _drive(model, gens):
    """Run batched generators the way the engine does: advance each to its Feed, one run_feeds
    pass over the waiting feeds, repeat.  Returns each generator's tokens and the rows of each
    pass that were decoding feeds' (a token and its draft)."""
    outs, feeds, decode_rows = [[] for _ in gens], [None] * len(gens), []

    def advance(i, value=None):
        try:
            item = gens[i].send(value) if feeds[i] is not None else next(gens[i])
            while not isinstance(item, Feed):
                outs[i].append(item)
                item = next(gens[i])
            feeds[i] = item
        except StopIteration:
            feeds[i] = False
        except Exception as e:  # noqa: BLE001 - the generator failed: its output is the error
            outs[i], feeds[i] = e, False

    for i in range(len(gens)):
        advance(i)
    while any(feeds):
        pending = [f for f in feeds if f and not f.ready]
        model.run_feeds(pending, prefill_rows=16)
        decode_rows.append(sum(f.rows for f in pending if len(f.ids) == f.rows))
        for i, f in enumerate(feeds):
            if f and f.ready:
                advance(i)
    return outs, decode_rows


@pytest.mark.parametrize("n_seqs", [1, 2, 3])
@pytest.mark.parametrize("draft_tokens", [2, DRAFT_TOKENS])
def test_batched_drafts_give_each_sequence_its_own_tokens(model, prompts, n_seqs, draft_tokens):
    """A batched pass gives drafts the rows left after every decoding sequence's own: up to
    1 + draft_tokens rows for a lone sequence, 3 in all when several decode (two: part of a draft;
    three: none)."""
    ids = list(prompts.values())[:n_seqs]
    params = SamplingParams(max_tokens=48, ignore_eos=True)
    model.draft_tokens = 0
    alone = [list(model.generate_ids(p, params)) for p in ids]
    model.draft_tokens = draft_tokens
    accepted = model.accepted_tokens
    outs, decode_rows = _drive(model, [model.generate_ids(p, params, batched=True) for p in ids])
    assert outs == alone
    passes = len(decode_rows)
    if n_seqs == 1:
        assert max(decode_rows) == 1 + draft_tokens        # the summary's drafts grow to the longest
    else:
        assert max(decode_rows) == 3
    if n_seqs < 3:
        assert model.accepted_tokens > accepted and passes < 48
    else:
        assert passes >= 48 and model.accepted_tokens == accepted
    assert model.cache.n_free == model.cache.n_blocks


def test_batched_seeded_samples_are_those_of_each_sequence_alone(model, prompts, monkeypatch):
    """Batched, the rows of sequences that decode a token each (no draft) and have no penalties are
    sampled together (sample_rows), each with the draw it would have made alone: the tokens are
    still each sequence's own, alone and unbatched, greedy, at a temperature, with top_p or top_k."""
    import models.api as api
    batches = []

    def counting(rows, temperatures, top_ks, top_ps, us):
        batches.append(list(zip(temperatures, top_ks, top_ps)))
        return sample_rows(rows, temperatures, top_ks, top_ps, us)

    sample_rows = api.sample_rows
    monkeypatch.setattr(api, "sample_rows", counting)
    ids = list(prompts.values()) + [prompts["summary"], prompts["story"]]
    params = [SamplingParams(max_tokens=40, ignore_eos=True, temperature=t, seed=s, top_p=p, top_k=k,
                             presence_penalty=pp)
              for t, s, p, k, pp in ((0.3, 5, 1.0, 0, 0), (0.7, 6, 1.0, 0, 0), (0, None, 1.0, 0, 0),
                                     (1.0, 7, 0.9, 0, 0), (0.8, 8, 1.0, 40, 0.5))]
    model.draft_tokens = 0
    alone = [list(model.generate_ids(p, q)) for p, q in zip(ids, params)]
    model.draft_tokens = DRAFT_TOKENS
    for n in (1, 2, 3, 5):
        batches.clear()
        outs, _ = _drive(model, [model.generate_ids(p, q, batched=True) for p, q in zip(ids[:n], params[:n])])
        assert outs == alone[:n]
        if n >= 3:            # three or more decode a token each, the last (penalties) alone
            assert len(batches) >= 30
            assert all(len(b) >= 2 and (0.8, 40, 1.0) not in b for b in batches)
            assert any(len(b) == min(n, 4) for b in batches)
    assert model.cache.n_free == model.cache.n_blocks


def test_batched_sampling_without_memory_fails_its_feeds_alone(model, prompts, monkeypatch):
    """If sample_rows cannot have its scratch, the feeds it was to sample fail with MemoryError
    (their draws are spent: sampling them again would change their tokens); the others go on."""
    import models.api as api

    def no_memory(*args):
        raise MemoryError("sample_rows: no memory (test)")

    monkeypatch.setattr(api, "sample_rows", no_memory)
    ids = list(prompts.values())
    params = [SamplingParams(max_tokens=8, ignore_eos=True, temperature=0.7, seed=s, presence_penalty=pp)
              for s, pp in ((1, 0.0), (2, 0.0), (3, 0.5))]
    alone = list(model.generate_ids(ids[2], params[2]))
    outs, _ = _drive(model, [model.generate_ids(p, q, batched=True) for p, q in zip(ids, params)])
    assert isinstance(outs[0], MemoryError) and isinstance(outs[1], MemoryError)
    assert outs[2] == alone
    assert model.cache.n_free == model.cache.n_blocks


def test_a_draft_is_cut_when_the_pass_has_no_room_and_dropped_on_preemption(model, prompts):
    model.draft_tokens = 2
    seq = model.cache.new_sequence()
    try:
        model._run(seq, prompts["text"], all_logits=False)
        feed = Feed(model, seq, [11, 12, 13, 14], rows=4)
        model.run_feeds([feed])                     # alone: 1 + draft_tokens = 3 rows at most
        assert feed.rows == 3 and feed.ids == [11, 12, 13] and len(feed.logits) == 3
        assert seq.n_tokens == len(prompts["text"]) + 3 and seq.tokens[-3:] == [11, 12, 13]
        before = list(seq.tokens)
        preempted = Feed(model, seq, [21, 22, 23], rows=3)
        model._preempt(preempted)                   # its history is fed again, the draft dropped
        assert preempted.rows == 1 and preempted.ids == before + [21] and seq.n_tokens == 0
        model.run_feeds([preempted])
        assert len(preempted.logits) == 1 and seq.tokens == before + [21]
    finally:
        seq.release()
