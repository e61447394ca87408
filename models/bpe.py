"""Byte-level BPE (GPT-2 family: SmolLM2, Qwen2, Llama 3) that loads in milliseconds.

The `tokenizers` library is the reference, but loading a 49k-token tokenizer.json into it takes
0.1-0.2 s and some 40 MB of private memory in every worker process.  At convert time, build_tables
turns the tokenizer.json into flat tables that are stored in the weights file, so that at run time
they are mmapped views shared by every process, and nothing is parsed:

    tokenizer.bpe.pieces   u8   every token's bytes, concatenated
    tokenizer.bpe.offsets  i32  (n_tokens + 1,): token i is pieces[offsets[i]:offsets[i + 1]]
    tokenizer.bpe.byte_ids i32  (256,): the token of each single byte (-1: none, the byte is dropped)
    tokenizer.bpe.merges   i32  (n_slots, 4): an open-addressing hash table (linear probing) of
                                (left id, right id) -> (rank, merged id); left = -1 marks a free slot
    meta "tokenizer_bpe"        the pre-tokenizer (character classes, digits split) and the added
                                tokens

Encoding follows tokenizers exactly for this family: split on added tokens; split the rest with the
pre-tokenizers (Digits(individual_digits) when present, then ByteLevel's regex, whose \\p{L}, \\p{N}
and \\s classes are spelled out at convert time from the Unicode database); then merge each piece's
bytes, always the lowest-ranked adjacent pair, leftmost first.  tests/test_bpe.py checks it token for
token against `tokenizers` on real text (English, Chinese, Japanese, code, emoji).
"""

from __future__ import annotations

import heapq
import re

FORMAT = 1
# ByteLevel's split, with \p{L} \p{N} \s as placeholders for classes stored in the file
_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?[{L}]+| ?[{N}]+| ?[^{S}{L}{N}]+|[{S}]+(?![^{S}])|[{S}]+"""
# Unicode White_Space (what \s means to the regex engines of tokenizers), as code point ranges
_WHITE_SPACE = [(0x09, 0x0D), (0x20, 0x20), (0x85, 0x85), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A),
                (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000)]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte as a printable character."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _class_text(ranges) -> str:
    def one(cp):
        return re.escape(chr(cp))
    return "".join(one(a) if a == b else f"{one(a)}-{one(b)}" for a, b in ranges)


def _ascii_ranges(class_text: str) -> list[tuple[int, int]]:
    """The ASCII part of a character class written by _class_text, as code point ranges.  There
    every item is a character (escaped by re.escape, which escapes "-") or two joined by a bare "-"."""
    items, i = [], 0                            # (character, escaped)
    while i < len(class_text):
        escaped = class_text[i] == "\\"
        i += escaped
        items.append((class_text[i], escaped))
        i += 1
    out, i = [], 0
    while i < len(items):
        a = b = ord(items[i][0])
        if i + 2 < len(items) and items[i + 1] == ("-", False):
            b = ord(items[i + 2][0])
            i += 3
        else:
            i += 1
        if a < 128:
            out.append((a, min(b, 127)))
    return out


def _category_ranges(first_letter: str) -> list[tuple[int, int]]:
    import unicodedata
    out, start = [], None
    for cp in range(0x110000):
        ok = unicodedata.category(chr(cp))[0] == first_letter
        if ok and start is None:
            start = cp
        elif not ok and start is not None:
            out.append((start, cp - 1))
            start = None
    if start is not None:
        out.append((start, 0x10FFFF))
    return out


class Unsupported(Exception):
    """The tokenizer.json is not a plain byte-level BPE: keep using `tokenizers` for it."""


def build_tables(doc: dict):
    """tokenizer.json (parsed) -> (tensors {name: numpy array}, meta dict).  Raises Unsupported for
    anything but the byte-level BPE this module reproduces exactly."""
    import numpy as np

    model = doc.get("model") or {}
    if model.get("type") != "BPE" or doc.get("normalizer") is not None:
        raise Unsupported("not a BPE without normalizer")
    if model.get("dropout") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix") \
            or model.get("byte_fallback") or model.get("ignore_merges"):
        raise Unsupported("BPE options this module does not implement")
    post = doc.get("post_processor")
    if post is not None and not (post.get("type") == "ByteLevel"):
        raise Unsupported("post-processor")
    pre = doc.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    digits = False
    if len(steps) == 2 and steps[0].get("type") == "Digits" and steps[0].get("individual_digits"):
        digits, steps = True, steps[1:]
    if len(steps) != 1 or steps[0].get("type") != "ByteLevel" or not steps[0].get("use_regex", True) \
            or steps[0].get("add_prefix_space"):
        raise Unsupported("pre-tokenizer other than [Digits,] ByteLevel(use_regex)")
    if (doc.get("decoder") or {}).get("type") != "ByteLevel":
        raise Unsupported("decoder other than ByteLevel")

    byte_char = bytes_to_unicode()
    char_byte = {c: b for b, c in byte_char.items()}
    vocab: dict[str, int] = model["vocab"]
    added = doc.get("added_tokens") or []
    for a in added:
        if a.get("lstrip") or a.get("rstrip") or a.get("single_word") or a.get("normalized"):
            raise Unsupported("added tokens with lstrip/rstrip/single_word/normalized")
    n = max([*vocab.values(), *(a["id"] for a in added)]) + 1
    pieces: list[bytes] = [b""] * n
    for tok, i in vocab.items():
        try:
            pieces[i] = bytes(char_byte[c] for c in tok)
        except KeyError:
            raise Unsupported(f"vocabulary entry {tok!r} is not byte-level") from None
    for a in added:
        pieces[a["id"]] = a["content"].encode()
    offsets = np.zeros(n + 1, np.int32)
    offsets[1:] = np.cumsum([len(p) for p in pieces])
    byte_ids = np.array([vocab.get(byte_char[b], -1) for b in range(256)], np.int32)   # -1: dropped, as tokenizers does

    merges = model["merges"]
    n_slots = 1 << max(4, (2 * len(merges)).bit_length())
    table = np.full((n_slots, 4), -1, np.int32)
    for rank, m in enumerate(merges):
        left, right = m.split(" ", 1) if isinstance(m, str) else m
        a, b, new = vocab[left], vocab[right], vocab[left + right]
        slot = _hash(a, b, n_slots - 1)
        while table[slot, 0] != -1:
            if table[slot, 0] == a and table[slot, 1] == b:
                break                                   # a repeated merge keeps its first rank
            slot = (slot + 1) & (n_slots - 1)
        else:
            table[slot] = (a, b, rank, new)
    meta = {
        "format": FORMAT,
        "digits": digits,
        "classes": {"L": _class_text(_category_ranges("L")), "N": _class_text(_category_ranges("N")),
                    "S": _class_text(_WHITE_SPACE)},
        "added": [[a["content"], a["id"], bool(a.get("special"))] for a in added],
    }
    tensors = {"tokenizer.bpe.pieces": np.frombuffer(b"".join(pieces), np.uint8) if offsets[-1] else
               np.zeros(1, np.uint8),
               "tokenizer.bpe.offsets": offsets, "tokenizer.bpe.byte_ids": byte_ids,
               "tokenizer.bpe.merges": table}
    return tensors, meta


def _hash(a: int, b: int, mask: int) -> int:
    return ((a * 0x9E3779B1) ^ (b * 0x85EBCA77)) & mask


class ByteLevelBPE:
    """encode / decode over the tables of a weights file (read through memoryviews of the map)."""

    def __init__(self, wf, meta: dict):
        if meta.get("format") != FORMAT:
            raise Unsupported(f"tokenizer tables of format {meta.get('format')}")

        def ints(name):
            return memoryview(wf.buffer(name)).cast("i")
        self._pieces = wf.buffer("tokenizer.bpe.pieces")          # views of the map: nothing copied
        self._offsets = ints("tokenizer.bpe.offsets")
        self._byte_ids = list(ints("tokenizer.bpe.byte_ids"))
        self._merges = ints("tokenizer.bpe.merges")
        self._mask = len(self._merges) // 4 - 1
        self.vocab_size = len(self._offsets) - 1
        self._classes, self._digits = meta["classes"], bool(meta["digits"])
        self._regexes = {}       # compiled on first use: ASCII-only ones for ASCII text (milliseconds)
        self.added = {content: i for content, i, _ in meta["added"]}
        self.special_ids = frozenset(i for _, i, special in meta["added"] if special)
        self._added_split = re.compile("(" + "|".join(re.escape(t) for t in sorted(self.added, key=len, reverse=True))
                                       + ")") if self.added else None
        self._cache: dict[str, list[int]] = {}

    # -- encode ---------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        parts = self._added_split.split(text) if self._added_split else [text]
        for k, part in enumerate(parts):
            if k % 2:                                   # an added token, matched literally
                ids.append(self.added[part])
            elif part:
                for piece in self._pieces_of(part):
                    ids += self._word(piece)
        return ids

    def _split_regexes(self, ascii_only: bool):
        """(split, digit or None): the pre-tokenizer's regexes.  Compiling the full Unicode classes
        takes some 40 ms, so ASCII text gets the same regexes with the classes cut to ASCII, which
        match ASCII text exactly as the full ones do."""
        hit = self._regexes.get(ascii_only)
        if hit is None:
            c = self._classes
            if ascii_only:
                c = {k: _class_text(_ascii_ranges(v)) for k, v in c.items()}
            split = re.compile(_PATTERN.format(L=c["L"], N=c["N"], S=c["S"]))
            hit = self._regexes[ascii_only] = (split, re.compile(f"[{c['N']}]") if self._digits else None)
        return hit

    def _pieces_of(self, text: str):
        split, digit = self._split_regexes(text.isascii())
        if digit is None:
            yield from split.findall(text)
            return
        start = 0
        for m in digit.finditer(text):
            if m.start() > start:
                yield from split.findall(text[start:m.start()])
            yield m.group()
            start = m.end()
        if start < len(text):
            yield from split.findall(text[start:])

    def _merge(self, a: int, b: int):
        t, mask = self._merges, self._mask
        slot = _hash(a, b, mask)
        while True:
            left = t[4 * slot]
            if left == -1:
                return None
            if left == a and t[4 * slot + 1] == b:
                return t[4 * slot + 2], t[4 * slot + 3]
            slot = (slot + 1) & mask

    def _word(self, piece: str) -> list[int]:
        hit = self._cache.get(piece)
        if hit is not None:
            return hit
        byte_ids = self._byte_ids
        sym = [byte_ids[b] for b in piece.encode() if byte_ids[b] >= 0]
        n = len(sym)
        if n > 1:
            nxt = list(range(1, n + 1))
            prv = list(range(-1, n - 1))
            heap = []
            for i in range(n - 1):
                m = self._merge(sym[i], sym[i + 1])
                if m:
                    heap.append((m[0], i, m[1]))
            heapq.heapify(heap)
            while heap:
                rank, i, new = heapq.heappop(heap)
                j = nxt[i]
                if sym[i] < 0 or j >= n:
                    continue
                m = self._merge(sym[i], sym[j])
                if m is None or m[0] != rank or m[1] != new:
                    continue                            # stale: one side has merged since
                sym[i], sym[j] = new, -1
                nxt[i] = nxt[j]
                if nxt[j] < n:
                    prv[nxt[j]] = i
                if prv[i] >= 0:
                    m = self._merge(sym[prv[i]], new)
                    if m:
                        heapq.heappush(heap, (m[0], prv[i], m[1]))
                if nxt[i] < n:
                    m = self._merge(new, sym[nxt[i]])
                    if m:
                        heapq.heappush(heap, (m[0], i, m[1]))
            sym = [s for s in sym if s >= 0]
        if len(self._cache) < 50000:
            self._cache[piece] = sym
        return sym

    # -- decode ---------------------------------------------------------------------------
    def token_bytes(self, i: int) -> bytes:
        return bytes(self._pieces[self._offsets[i]:self._offsets[i + 1]])

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        special = self.special_ids if skip_special_tokens else ()
        pieces, offsets = self._pieces, self._offsets
        return b"".join(pieces[offsets[i]:offsets[i + 1]] for i in ids if i not in special).decode("utf-8", "replace")

    def token_to_id(self, token: str):
        return self.added.get(token)
