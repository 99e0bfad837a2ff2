"""Approximate index of which instance holds which prompt prefix in its KV cache.

Like llm-d's prefix-cache scorer and SGLang's cache-aware router, the dispatcher
does not ask instances what they cache: it remembers the prompt blocks it sent
to each (chained block hashes, so a block hash stands for the whole prefix up to
it) and evicts them LRU at the instance's KV capacity, mirroring the engine's own
LRU eviction. Memory is bounded by ``max_blocks_per_instance`` per instance.
Lookups walk the request's blocks once with bitmasks of instances, so a match over
hundreds of instances stays cheap.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np


class PrefixIndex:
    """Block hash -> instances holding it, with per-instance LRU capacity."""

    def __init__(self, *, block_size: int = 16, max_blocks_per_instance: int = 200_000) -> None:
        if block_size < 1 or max_blocks_per_instance < 1:
            raise ValueError("block_size and max_blocks_per_instance must be >= 1")
        self.block_size = block_size
        self.max_blocks = max_blocks_per_instance
        self._holders: dict[int, int] = {}  # hash -> bitmask of slots
        self._lru: list[OrderedDict[int, None]] = []
        self._cap: list[int] = []

    def _ensure(self, slot: int) -> None:
        while len(self._lru) <= slot:
            self._lru.append(OrderedDict())
            self._cap.append(self.max_blocks)

    def set_capacity(self, slot: int, blocks: int) -> None:
        """Mirror the instance's KV capacity (from its heartbeats), never above the bound."""
        self._ensure(slot)
        self._cap[slot] = max(1, min(int(blocks), self.max_blocks))
        self._evict(slot)

    def add(self, slot: int, hashes: Sequence[int]) -> None:
        """The instance will hold these prompt blocks once it has prefilled the request."""
        if not hashes:
            return
        self._ensure(slot)
        lru = self._lru[slot]
        bit = 1 << slot
        for h in hashes:
            if h in lru:
                lru.move_to_end(h)
            else:
                lru[h] = None
                self._holders[h] = self._holders.get(h, 0) | bit
        self._evict(slot)

    def _evict(self, slot: int) -> None:
        lru = self._lru[slot]
        bit = 1 << slot
        while len(lru) > self._cap[slot]:
            h, _ = lru.popitem(last=False)
            m = self._holders.get(h, 0) & ~bit
            if m:
                self._holders[h] = m
            else:
                self._holders.pop(h, None)

    def drop_instance(self, slot: int) -> None:
        """Forget everything on an instance (it died or restarted: its cache is gone)."""
        if slot >= len(self._lru):
            return
        lru = self._lru[slot]
        cap = self._cap[slot]
        self._cap[slot] = 0
        self._evict_all(slot)
        lru.clear()
        self._cap[slot] = cap

    def _evict_all(self, slot: int) -> None:
        bit = 1 << slot
        for h in self._lru[slot]:
            m = self._holders.get(h, 0) & ~bit
            if m:
                self._holders[h] = m
            else:
                self._holders.pop(h, None)

    def match(self, hashes: Sequence[int], n: int) -> np.ndarray:
        """Cached prompt tokens per instance slot (longest prefix of ``hashes`` it holds)."""
        out = np.zeros(n)
        if not hashes or not self._holders:
            return out
        mask = (1 << n) - 1
        bs = self.block_size
        for j, h in enumerate(hashes):
            new = mask & self._holders.get(h, 0)
            dropped = mask & ~new
            while dropped:
                low = dropped & -dropped
                out[low.bit_length() - 1] = j * bs
                dropped ^= low
            mask = new
            if not mask:
                return out
        full = len(hashes) * bs
        while mask:
            low = mask & -mask
            out[low.bit_length() - 1] = full
            mask ^= low
        return out

    def blocks(self) -> int:
        """Distinct block hashes held (memory check)."""
        return len(self._holders)

    def entries(self) -> int:
        return sum(len(lru) for lru in self._lru)
