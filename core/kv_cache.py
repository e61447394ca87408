"""Paged KV cache: one pool of fixed-size blocks per model, a block table per sequence.

The pool holds, for every layer, n_blocks * block_size slots of n_kv_heads * head_dim floats for
K and as many for V.  A sequence owns whole blocks, taken from the free list as it grows and given
back when it is released; position p of a sequence lives in slot
block_table[p // block_size] * block_size + p % block_size.  Memory is committed lazily by the OS:
the pool is anonymous zero-filled memory with transparent huge pages turned off (a huge page would
commit 2 MB per layer for the first token of a sequence), so an unused pool costs address space,
not RSS.
"""

from __future__ import annotations

import mmap
from math import prod

import numpy as np

from core.errors import EdgeError


class KVCacheFullError(EdgeError):
    status = 429
    code = "kv_cache_full"
    retry_after = 1


class KVCache:
    def __init__(self, n_layers: int, width: int, n_blocks: int, block_size: int = 16):
        self.block_size = block_size
        self.n_blocks = n_blocks
        self.k = _lazy_zeros((n_layers, n_blocks * block_size, width))
        self.v = _lazy_zeros((n_layers, n_blocks * block_size, width))
        self._free = list(range(n_blocks - 1, -1, -1))

    @property
    def n_free(self) -> int:
        return len(self._free)

    def new_sequence(self) -> "Sequence":
        return Sequence(self)

    def _take(self, n: int) -> list[int]:
        if n > len(self._free):
            raise KVCacheFullError(f"KV cache is full: {n} more blocks needed, {len(self._free)} free")
        return [self._free.pop() for _ in range(n)]

    def _give(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


def _lazy_zeros(shape) -> np.ndarray:
    """float32 zeros in anonymous memory committed page by page as it is written."""
    nbytes = max(prod(shape) * 4, 1)
    mem = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        mem.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(mem, np.float32, count=prod(shape)).reshape(shape)


class Sequence:
    """One sequence's share of the cache: its blocks and how many positions are filled."""

    def __init__(self, cache: KVCache):
        self.cache = cache
        self.blocks: list[int] = []
        self.n_tokens = 0
        self.tokens: list[int] = []     # the ids at positions 0..n_tokens-1 (to recompute after preemption)

    def reserve(self, n_total: int) -> None:
        """Make room for positions 0..n_total-1."""
        need = -(-n_total // self.cache.block_size) - len(self.blocks)
        if need > 0:
            self.blocks += self.cache._take(need)

    def slots(self, positions: np.ndarray) -> np.ndarray:
        table = np.asarray(self.blocks, np.int32)
        bs = self.cache.block_size
        return (table[positions // bs] * bs + positions % bs).astype(np.int32)

    def block_table(self) -> np.ndarray:
        return np.asarray(self.blocks, np.int32)[None, :]

    def release(self) -> None:
        self.cache._give(self.blocks)
        self.blocks = []
        self.n_tokens = 0
        self.tokens = []
