"""Paged KV cache: one pool of fixed-size blocks per model, a block table per sequence.

The pool holds, for every layer, n_blocks * block_size slots of n_kv_heads * head_dim values for
K and as many for V, stored as float16 (dtype "f16", half the memory and the bandwidth of a long
context; attention widens them to fp32 as it reads a block) or float32 ("f32").  A sequence owns whole blocks, taken from the free list as it grows and given
back when it is released; position p of a sequence lives in slot
block_table[p // block_size] * block_size + p % block_size.  Memory is committed lazily by the OS:
the pool is anonymous zero-filled memory with transparent huge pages turned off (a huge page would
commit 2 MB per layer for the first token of a sequence), so an unused pool costs address space,
not RSS.

Prefix caching: a full block is identified by the hash of its tokens chained with the hash of the
block before it (so equal hashes mean equal prefixes, and the tokens are compared too).  Blocks are
reference counted: a new sequence whose prompt starts with cached full blocks takes them as they
are (refcount + 1) and skips their prefill.  Sequences only append, and a reused prefix covers whole
blocks, so a shared block is never written (no copy-on-write is needed).  A released block whose
content is registered stays cached (least recently released first out) until the free list runs
dry; n_free counts it as free.
"""

from __future__ import annotations

import mmap
from collections import OrderedDict

from core.errors import EdgeError


class KVCacheFullError(EdgeError):
    status = 429
    code = "kv_cache_full"
    retry_after = 1


KV_DTYPES = {"f16": 2, "f32": 4}      # bytes per stored value


def default_kv_dtype(quant: str) -> str:
    """The KV cache's dtype for a model of this weight quantization: halves for an int8 model, floats
    for an fp32 one (kept for exact parity with transformers).  Halves cost SmolLM2 with fp32 weights
    0.002% perplexity (botchan.txt, 1024 tokens: 31.7495 against 31.7488); its int8 twin's perplexity
    moves by up to 0.25% with any change of rounding anywhere (even reassociating attention's sums),
    because its activations are rounded to int8 after every block."""
    return "f16" if quant == "int8" else "f32"


class KVCache:
    def __init__(self, n_layers: int, width: int, n_blocks: int, block_size: int = 16, dtype: str = "f32"):
        if dtype not in KV_DTYPES:
            raise ValueError(f"KV cache dtype {dtype!r}: expected one of {', '.join(KV_DTYPES)}")
        self.block_size = block_size
        self.n_blocks = n_blocks
        self.dtype = dtype
        self.shape = (n_layers, n_blocks * block_size, width)     # of K and of V
        self.block_bytes = 2 * n_layers * block_size * width * KV_DTYPES[dtype]   # K and V of one block
        self.k_memory = _lazy_zeros(n_layers * n_blocks * block_size * width * KV_DTYPES[dtype])
        self.v_memory = _lazy_zeros(n_layers * n_blocks * block_size * width * KV_DTYPES[dtype])
        self._views = None
        self._free = list(range(n_blocks - 1, -1, -1))   # no owner, no cached content
        self._refs = [0] * n_blocks
        self._cached: OrderedDict[int, None] = OrderedDict()   # no owner, content kept (LRU)
        self._key_of: dict[int, tuple] = {}              # block -> (chain hash, its tokens)
        self._by_hash: dict[int, int] = {}               # chain hash -> block
        self.prefix_queried = 0                          # full prompt blocks looked up
        self.prefix_hits = 0                             # ... found and reused

    @property
    def k(self):
        """K of every layer, (n_layers, slots, width) float16 or float32: a numpy view of k_memory."""
        return self._numpy()[0]

    @property
    def v(self):
        return self._numpy()[1]

    def _numpy(self):
        if self._views is None:     # numpy only for the Python forward and tests; the native one reads the memory
            import numpy as np
            dtype = np.float16 if self.dtype == "f16" else np.float32
            self._views = tuple(np.frombuffer(m, dtype).reshape(self.shape)
                                for m in (self.k_memory, self.v_memory))
        return self._views

    @property
    def n_free(self) -> int:
        return len(self._free) + len(self._cached)

    def new_sequence(self) -> "Sequence":
        return Sequence(self)

    def _take(self, n: int) -> list[int]:
        if n > self.n_free:
            raise KVCacheFullError(f"KV cache is full: {n} more blocks needed, {self.n_free} free")
        out = []
        for _ in range(n):
            if self._free:
                b = self._free.pop()
            else:                                        # evict the least recently released
                b, _ = self._cached.popitem(last=False)
                self._forget(b)
            self._refs[b] = 1
            out.append(b)
        return out

    def _give(self, blocks: list[int]) -> None:
        for b in reversed(blocks):
            self._refs[b] -= 1
            if self._refs[b] == 0:
                if b in self._key_of:
                    self._cached[b] = None
                else:
                    self._free.append(b)

    def _forget(self, b: int) -> None:
        h, _ = self._key_of.pop(b)
        if self._by_hash.get(h) == b:
            del self._by_hash[h]

    def _chain(self, tokens: list, n_blocks: int):
        """(hash, tokens) of each of the first n_blocks full blocks of tokens."""
        h, bs = 0, self.block_size
        for i in range(n_blocks):
            block = tuple(tokens[i * bs:(i + 1) * bs])
            h = hash((h, block))
            yield h, block

    def register(self, seq: "Sequence") -> None:
        """Make seq's full blocks findable by later prompts with the same prefix."""
        full = seq.n_tokens // self.block_size
        if full <= seq.registered:
            return
        for i, (h, block) in enumerate(self._chain(seq.tokens, full)):
            if i < seq.registered:
                continue
            b = seq.blocks[i]
            if h not in self._by_hash and b not in self._key_of:
                self._by_hash[h] = b
                self._key_of[b] = (h, block)
        seq.registered = full

    def match_prefix(self, seq: "Sequence", prompt: list) -> int:
        """Give an empty seq the cached blocks that hold a prefix of prompt (whole blocks, leaving
        at least the prompt's last token to compute); returns the number of tokens reused."""
        assert not seq.blocks
        usable = (len(prompt) - 1) // self.block_size
        self.prefix_queried += usable
        taken = []
        for h, block in self._chain(prompt, usable):
            b = self._by_hash.get(h)
            if b is None or self._key_of[b][1] != block:
                break
            if self._refs[b] == 0:
                del self._cached[b]
            self._refs[b] += 1
            taken.append(b)
        self.prefix_hits += len(taken)
        n = len(taken) * self.block_size
        seq.blocks, seq.n_tokens, seq.tokens, seq.registered = taken, n, list(prompt[:n]), len(taken)
        return n

    def clear_prefixes(self) -> None:
        """Forget every cached prefix (blocks in use keep their content but are no longer shared)."""
        for b in list(self._cached):
            self._free.append(b)
        self._cached.clear()
        self._key_of.clear()
        self._by_hash.clear()


def _lazy_zeros(nbytes: int) -> mmap.mmap:
    """Zeros in anonymous memory committed page by page as it is written."""
    mem = mmap.mmap(-1, max(nbytes, 4), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        mem.madvise(mmap.MADV_NOHUGEPAGE)
    return mem


class Sequence:
    """One sequence's share of the cache: its blocks and how many positions are filled."""

    def __init__(self, cache: KVCache):
        self.cache = cache
        self.blocks: list[int] = []
        self.n_tokens = 0
        self.tokens: list[int] = []     # the ids at positions 0..n_tokens-1 (to recompute after preemption)
        self.registered = 0             # leading full blocks registered for prefix sharing

    def reserve(self, n_total: int) -> None:
        """Make room for positions 0..n_total-1."""
        need = -(-n_total // self.cache.block_size) - len(self.blocks)
        if need > 0:
            self.blocks += self.cache._take(need)

    def slots(self, positions) -> list[int]:
        """The KV slot of each position (ints) of this sequence."""
        table, bs = self.blocks, self.cache.block_size
        return [table[p // bs] * bs + p % bs for p in positions]

    def block_table(self) -> list[int]:
        return list(self.blocks)

    def release(self) -> None:
        self.cache._give(self.blocks)
        self.blocks = []
        self.n_tokens = 0
        self.tokens = []
        self.registered = 0
