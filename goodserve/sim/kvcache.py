"""Paged KV-cache block manager with vLLM-style automatic prefix caching.

Blocks hold ``block_size`` tokens. A full block of prompt tokens is keyed by a *chained*
hash (the hash of the block's tokens and of the previous block's hash), so equal hashes mean
equal prefixes. Blocks are ref-counted; a cached block nobody references stays in an LRU
list and is evicted only when a fresh block is needed. Everything is O(1) per block.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Iterable, Sequence

__all__ = [
    "KVCacheManager",
    "block_hashes_for_key",
    "block_hashes_for_text",
    "block_hashes_for_tokens",
]

_ROOT = 0x9E3779B97F4A7C15


def _h(prev: int, payload: bytes) -> int:
    """Stable 64-bit chained hash (blake2b; identical across processes and machines)."""
    d = hashlib.blake2b(struct.pack("<Q", prev) + payload, digest_size=8).digest()
    return int.from_bytes(d, "little")


def block_hashes_for_tokens(token_ids: Sequence[int], block_size: int = 16) -> list[int]:
    """Chained hashes of the full ``block_size`` blocks of ``token_ids`` (partial tail skipped)."""
    out: list[int] = []
    prev = _ROOT
    for i in range(len(token_ids) // block_size):
        blk = token_ids[i * block_size : (i + 1) * block_size]
        prev = _h(prev, struct.pack(f"<{block_size}q", *blk))
        out.append(prev)
    return out


def block_hashes_for_text(text: str, block_size: int = 16, chars_per_token: int = 4) -> list[int]:
    """Chained block hashes of a text without a tokenizer (``chars_per_token`` chars a token)."""
    span = block_size * chars_per_token
    data = text.encode("utf-8", "surrogatepass")
    # hash characters, not bytes, so the block boundaries follow the documented ratio
    out: list[int] = []
    prev = _ROOT
    n_full = len(text) // span
    if len(data) == len(text):  # ASCII fast path
        for i in range(n_full):
            prev = _h(prev, data[i * span : (i + 1) * span])
            out.append(prev)
        return out
    for i in range(n_full):
        prev = _h(prev, text[i * span : (i + 1) * span].encode("utf-8", "surrogatepass"))
        out.append(prev)
    return out


def block_hashes_for_key(key: str, num_tokens: int, block_size: int = 16) -> list[int]:
    """Block hashes of a prompt known only by a cache key (all prompts with the key share them)."""
    out: list[int] = []
    prev = _h(_ROOT, key.encode())
    for i in range(num_tokens // block_size):
        prev = _h(prev, struct.pack("<q", i))
        out.append(prev)
    return out


class KVCacheManager:
    """Fixed pool of KV blocks; free list + LRU of unreferenced cached blocks."""

    __slots__ = (
        "_block_hash",
        "_cached",
        "_evictable",
        "_free",
        "_ref",
        "block_size",
        "enable_prefix_cache",
        "num_blocks",
    )

    def __init__(self, num_blocks: int, block_size: int = 16, *, enable_prefix_cache: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_cache = enable_prefix_cache
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() gives 0, 1, ...
        self._ref: list[int] = [0] * num_blocks
        self._block_hash: list[int | None] = [None] * num_blocks
        self._cached: dict[int, int] = {}  # hash -> block id
        self._evictable: OrderedDict[int, None] = OrderedDict()  # block ids, LRU first

    @property
    def num_free(self) -> int:
        """Blocks obtainable now (free + evictable cached)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        """Blocks referenced by running requests."""
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    def lookup(self, hashes: Sequence[int]) -> int:
        """Number of leading blocks of ``hashes`` present in the cache (no side effects)."""
        if not self.enable_prefix_cache:
            return 0
        n = 0
        cached = self._cached
        for h in hashes:
            if h not in cached:
                break
            n += 1
        return n

    def acquire_cached(self, hashes: Iterable[int]) -> list[int]:
        """Reference the cached blocks of ``hashes`` (all must be present, see ``lookup``)."""
        out = []
        for h in hashes:
            b = self._cached[h]
            if self._ref[b] == 0:
                self._evictable.pop(b, None)
            self._ref[b] += 1
            out.append(b)
        return out

    def allocate(self, n: int) -> list[int] | None:
        """``n`` fresh blocks, evicting LRU cached blocks as needed; None if not enough."""
        if n <= 0:
            return []
        if n > len(self._free) + len(self._evictable):
            return None
        out = []
        for _ in range(n):
            if self._free:
                b = self._free.pop()
            else:
                b, _ = self._evictable.popitem(last=False)
                h = self._block_hash[b]
                if h is not None and self._cached.get(h) == b:
                    del self._cached[h]
                self._block_hash[b] = None
            self._ref[b] = 1
            out.append(b)
        return out

    def register(self, block: int, h: int) -> None:
        """Mark a full prompt block as holding the prefix with chained hash ``h``."""
        if not self.enable_prefix_cache or self._block_hash[block] is not None:
            return
        if h in self._cached:
            return  # an identical block exists already; this one stays private
        self._block_hash[block] = h
        self._cached[h] = block

    def free(self, blocks: Sequence[int]) -> None:
        """Drop one reference of each block; tail blocks first so they are evicted first."""
        ref = self._ref
        for b in reversed(blocks):
            ref[b] -= 1
            if ref[b] == 0:
                if self._block_hash[b] is not None:
                    self._evictable[b] = None
                else:
                    self._free.append(b)
