"""models.bpe (flat tables in the weights file) against the `tokenizers` library on the same
tokenizer.json, token for token: real English, CPython's documentation (code), Chinese, Japanese,
emoji, whitespace and digit edge cases, special tokens inside text, random Unicode; and decoding."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.wfile import WeightsFile
from models.bpe import ByteLevelBPE, Unsupported, build_tables
from models.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def pair(converted):
    from tokenizers import Tokenizer as HF
    wf = WeightsFile.open(converted("smollm2", "int8"))
    assert "tokenizer.bpe.merges" in wf, "the converter stored no BPE tables"
    fast = Tokenizer.from_weights(wf)
    assert fast._bpe is not None
    return fast, HF.from_str(wf.raw("tokenizer.json").decode())


def same(pair, text):
    fast, hf = pair
    want = hf.encode(text, add_special_tokens=True).ids
    got = fast.encode(text)
    assert got == want, (text[:60], got[:20], want[:20])
    assert fast.decode(want) == hf.decode(want, skip_special_tokens=True)
    assert fast.decode(want, skip_special_tokens=False) == hf.decode(want, skip_special_tokens=False)


def test_real_english_text(pair, real_text):
    for start in range(0, min(len(real_text), 200_000), 20_000):
        same(pair, real_text[start:start + 20_000])


def test_python_documentation_code(pair):
    from pydoc_data.topics import topics
    text = "\n".join(topics[k] for k in sorted(topics))[:300_000]
    for start in range(0, len(text), 30_000):
        same(pair, text[start:start + 30_000])


@pytest.mark.parametrize("text", [
    "北京是中国的首都。東京は日本の首都です。한국어 텍스트도 있습니다.",
    "Привет, мир! Ελληνικά κείμενα. עברית וערבית: مرحبا بالعالم",
    "émigré naïve café 🙂👍🏽 👨‍👩‍👧‍👦 🇯🇵",
    "for (int i = 0; i < n; ++i) { sum += a[i] * 3.14159; }  // 12345",
    "  leading spaces,\ttabs\n\nand\r\nnewlines  ",
    "a\u00a0b\u3000c\u2028d\u001ce\u0085f\u200bg",          # White_Space and not
    "½ ² Ⅻ ٣٤٥ ๑๒๓ 一二三 1,234.56e-7 0x1F",                    # every kind of number
    "it's I'M we'll they'd you've 'S 're'",
    "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n",
    "x<|endoftext|>y<|im_end|><|im_end|>  <|im_start|>",
    "", " ", "\n", "   \n\n   ", "a", "é", "🙂",
    "tokens " * 300,
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "中" * 400,
])
def test_edge_cases(pair, text):
    same(pair, text)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=80))
def test_random_unicode(pair, text):
    same(pair, text)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 49151), max_size=30))
def test_decode_any_ids(pair, ids):
    """Including byte pieces that do not form whole UTF-8 characters."""
    fast, hf = pair
    assert fast.decode(ids) == hf.decode(ids, skip_special_tokens=True)


def test_tables_are_views_of_the_map(converted):
    """Nothing is copied out of the file but the piece bytes: workers share the tables."""
    wf = WeightsFile.open(converted("smollm2", "int8"))
    bpe = ByteLevelBPE(wf, wf.meta["tokenizer_bpe"])
    assert isinstance(bpe._merges, memoryview) and bpe._merges.readonly


def test_unsupported_tokenizers_are_left_to_the_library():
    doc = {"model": {"type": "WordPiece", "vocab": {"a": 0}}, "normalizer": None}
    with pytest.raises(Unsupported):
        build_tables(doc)
    doc = {"model": {"type": "BPE", "vocab": {}, "merges": []}, "normalizer": {"type": "NFC"}}
    with pytest.raises(Unsupported):
        build_tables(doc)


def test_encoder_keeps_the_library(converted, loaded):
    """BERT's WordPiece is not byte-level BPE: its file has no tables and uses `tokenizers`."""
    wf = WeightsFile.open(converted("minilm", "int8"))
    assert "tokenizer_bpe" not in wf.meta and "tokenizer.bpe.merges" not in wf
    assert json.loads(wf.raw("tokenizer.json"))["model"]["type"] == "WordPiece"
    m = loaded("minilm", "int8")
    assert m.tokenizer._bpe is None
    assert np.asarray(m.tokenize("hello world")).size >= 2


def test_ascii_text_gets_regexes_that_split_it_alike(converted):
    """ASCII text is split with the classes cut to ASCII (fast to compile): for every ASCII
    character they match what the full Unicode classes match, and a mixed text uses the full ones."""
    import re

    from models.bpe import _ascii_ranges, _class_text
    wf = WeightsFile.open(converted("smollm2", "int8"))
    classes = wf.meta["tokenizer_bpe"]["classes"]
    for name, text in classes.items():
        full, cut = re.compile(f"[{text}]"), re.compile(f"[{_class_text(_ascii_ranges(text))}]")
        assert [c for c in map(chr, range(128)) if full.match(c)] == [c for c in map(chr, range(128)) if cut.match(c)]
    bpe = Tokenizer.from_weights(wf)._bpe
    bpe.encode("plain ASCII 123")
    assert set(bpe._regexes) == {True}
    bpe.encode("naïve café 12")
    assert set(bpe._regexes) == {True, False}


def _streamed(tokenizer, ids):
    """Push ids one at a time; check every complete text against decoding all ids so far."""
    stream = tokenizer.stream()
    for n, i in enumerate(ids, 1):
        if stream.push(i):
            assert stream.text == tokenizer.decode(ids[:n]), n
            assert not stream.text.endswith("\ufffd")
    return stream.final()


@pytest.mark.parametrize("text", [
    "Once upon a time, 你好世界 and 🙂🙂 then naïve café — «quotes» 日本語のテキスト.",
    "def f(x):\n    return {'a': [1, 2, 3]}  # 💡 comment\n\n\tprint(f'{x!r:>10}')",
])
def test_text_stream_equals_whole_decode(pair, text):
    """Generation decodes a token at a time (TextStream, O(1) per token): the streamed text is the
    text of all ids decoded at once, including characters split over several byte tokens."""
    fast, _ = pair
    ids = fast.encode(text * 3)
    assert _streamed(fast, ids) == fast.decode(ids) == (text * 3)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 49151), max_size=40))
def test_text_stream_of_any_ids(pair, ids):
    """Ids that end inside a character or never complete one: final() still matches the whole."""
    fast, _ = pair
    assert _streamed(fast, ids) == fast.decode(ids)


def test_text_stream_wordpiece(loaded, real_text):
    """WordPiece (the `tokenizers` library): '##' continuations and cleanup depend on the previous
    token, which the stream keeps as context."""
    tok = loaded("minilm", "int8").tokenizer
    for start in range(0, 3000, 600):
        ids = tok.encode(real_text[start:start + 600])
        assert _streamed(tok, ids) == tok.decode(ids)
