"""Ids seen recently, in a fixed amount of memory: the de-duplication memories of the services.

The dispatcher refuses a request id it accepted in the last two minutes and a worker one it
finished; under sustained load those memories hold tens of thousands of ids. Kept in a dict
they grew with traffic for the first two minutes of a run (the TTL) and with them the
process's heap high-water mark, which the allocator does not give back: the RSS climb of the
early soak runs. Here the memory is allocated, and its pages written, when the structure is
built, and never grows: three preallocated ``array.array`` s (a ring of keys, a ring of
seconds, a hash table), sized from ``capacity``.

Layout (``capacity`` = C):

- a **ring** of ``C + C/8`` slots, in arrival order: the 64-bit key of the id (a BLAKE2b
  hash; two ids collide with probability ~n^2 / 2^65: nil at these sizes) and the second it
  arrived in. The oldest entry sits at ``head``; expiry and the count bound pop from there.
  A slot whose id was discarded or refreshed is marked dead (its second set to ``_DEAD``)
  and skipped when it reaches the head; when the ring runs out of slots because of dead ones
  it is compacted in place (only refreshes and discards create dead slots, and the ring
  only fills when the count bound, not the TTL, is what binds: rare);
- an **open-addressing hash table** (linear probing, a power of two >= 2 C slots, so at most
  half full) of ring indices, -1 for an empty slot. A key's home slot is its low bits (the key
  is already a uniform hash). Removal uses backward-shift deletion, so the table never holds
  tombstones and lookups stay short however much the set churns.

Memory (``nbytes``): 16 bytes a ring slot (the key and the second) plus 4 bytes a table slot:
5.7 MB for the dispatcher's 200,000 ids and 2.9 MB for a worker's 100,000, the same from the
first request to the last. Indexing an ``array.array`` from Python costs about what a dict
lookup does; the standard library's arrays rather than numpy because a worker process does
not otherwise import numpy (~14 MB of RSS).
"""

from __future__ import annotations

import hashlib
import math
import time
from array import array

_EMPTY = -1
"""A table slot that holds no ring index."""
_DEAD = -(1 << 63)
"""The second of a ring slot that holds no live id (older than any cutoff)."""
_MAX_CAPACITY = 1 << 30


def id_key(request_id: str) -> int:
    """The 64-bit key of an id."""
    return int.from_bytes(hashlib.blake2b(request_id.encode(), digest_size=8).digest(), "little")


def _table_size(capacity: int) -> int:
    """The smallest power of two >= 2 * capacity (and >= 16): the table is at most half full."""
    return 1 << max(4, (2 * capacity - 1).bit_length())


class RecentIds:
    """Ids seen in the last ``ttl_s`` seconds, at most ``capacity`` of them (oldest go first).

    Times are kept to the second they fell in, so an id may be kept up to a second longer
    than ``ttl_s``. ``now`` defaults to ``time.monotonic()``. Expired ids are dropped by the
    first ``add`` of each new second. Memory is fixed at construction (``nbytes``).
    """

    __slots__ = ("_cutoff_at", "_head", "_k", "_live", "_mask", "_ring", "_s", "_t", "_used",
                 "capacity", "ttl_s")

    def __init__(self, *, ttl_s: float = 120.0, capacity: int = 200_000) -> None:
        if not ttl_s > 0 or not math.isfinite(ttl_s):
            raise ValueError(f"ttl_s must be a positive number of seconds, got {ttl_s}")
        if capacity < 1 or capacity > _MAX_CAPACITY:
            raise ValueError(f"capacity must be in [1, {_MAX_CAPACITY}], got {capacity}")
        self.ttl_s = ttl_s
        self.capacity = capacity
        self._ring = capacity + max(16, capacity // 8)
        """Ring slots: the capacity plus room for dead slots before a compaction."""
        # array * n writes every element: the pages are resident from construction, not
        # faulted in under load (and no numpy: a worker process does not import it otherwise)
        self._k = array("Q", [0]) * self._ring
        self._s = array("q", [_DEAD]) * self._ring
        self._t = array("i", [_EMPTY]) * _table_size(capacity)
        self._mask = len(self._t) - 1
        self._head = 0
        """Ring index of the oldest slot in use."""
        self._used = 0
        """Ring slots in use from ``_head`` on (live and dead)."""
        self._live = 0
        self._cutoff_at: int | None = None

    # --- public API ----------------------------------------------------------------------
    def add(self, request_id: str, now: float | None = None, *, refresh: bool = True) -> bool:
        """Remember an id as seen now; True if it was not remembered already. With
        ``refresh=False`` an id already remembered keeps its first time."""
        second = math.floor(time.monotonic() if now is None else now)
        if second != self._cutoff_at:
            self._expire(second)
        key = id_key(request_id)
        slot, r = self._find(key)
        if r >= 0:
            if not refresh:
                return False
            self._remove(slot, r)  # and append it again below, as the newest
            new = False
        else:
            new = True
        self._make_room()
        self._insert(key, second)
        return new

    def __contains__(self, request_id: object) -> bool:
        return isinstance(request_id, str) and self._find(id_key(request_id))[1] >= 0

    def discard(self, request_id: str) -> None:
        slot, r = self._find(id_key(request_id))
        if r >= 0:
            self._remove(slot, r)

    def __len__(self) -> int:
        return self._live

    @property
    def nbytes(self) -> int:
        """Bytes of the preallocated arrays: the whole memory of the set, fixed."""
        return sum(a.itemsize * len(a) for a in (self._k, self._s, self._t))

    # --- internals -----------------------------------------------------------------------
    def _find(self, key: int) -> tuple[int, int]:
        """(table slot, ring index) of ``key``; (the empty slot that ends its probe, -1)
        when it is absent."""
        t, k, mask = self._t, self._k, self._mask
        i = key & mask
        while True:
            r = t[i]
            if r < 0 or k[r] == key:
                return i, r
            i = (i + 1) & mask

    def _insert(self, key: int, second: int) -> None:
        """Append an absent key as the newest entry (room was made)."""
        slot, _ = self._find(key)
        pos = self._head + self._used
        if pos >= self._ring:
            pos -= self._ring
        self._k[pos] = key
        self._s[pos] = second
        self._t[slot] = pos
        self._used += 1
        self._live += 1

    def _remove(self, slot: int, r: int) -> None:
        """Forget the live entry at ring index ``r`` (table slot ``slot``): its ring slot
        goes dead, its table slot is freed by backward-shift deletion."""
        self._s[r] = _DEAD
        self._live -= 1
        t, k, mask = self._t, self._k, self._mask
        hole = slot
        j = slot
        while True:
            j = (j + 1) & mask
            rj = t[j]
            if rj < 0:
                break
            home = k[rj] & mask
            # the entry at j may fill the hole unless its home lies cyclically in (hole, j]
            if ((j - home) & mask) >= ((j - hole) & mask):
                t[hole] = rj
                hole = j
        t[hole] = _EMPTY

    def _slot_of(self, r: int) -> int:
        """The table slot that holds ring index ``r`` (a live entry)."""
        t, mask = self._t, self._mask
        i = self._k[r] & mask
        while t[i] != r:
            i = (i + 1) & mask
        return i

    def _pop_oldest(self) -> None:
        """Drop the oldest ring slot (forgetting its id if it is live)."""
        r = self._head
        if self._s[r] != _DEAD:
            self._remove(self._slot_of(r), r)
        self._head = r + 1 if r + 1 < self._ring else 0
        self._used -= 1

    def _expire(self, second: int) -> None:
        """Drop ids older than ``ttl_s``: once a second, from the oldest on."""
        self._cutoff_at = second
        cutoff = second - self.ttl_s
        s = self._s
        while self._used and s[self._head] < cutoff:
            self._pop_oldest()

    def _make_room(self) -> None:
        """Before an append: evict the oldest ids over the capacity, compact if the ring's
        free slots were all used up by dead ones."""
        while self._live >= self.capacity:
            self._pop_oldest()
        while self._used and self._s[self._head] == _DEAD:
            self._pop_oldest()
        if self._used >= self._ring:
            self._compact()

    def _compact(self) -> None:
        """Move the live entries together, in order, from ``head`` on, and renumber their
        table slots; in place. Reading runs ahead of (or with) writing in ring order, so
        nothing is overwritten before it is read. O(ring) in Python (~0.2 s for the
        dispatcher's 225,000 slots), and only reached when the count bound binds while
        refreshes or discards left dead slots: rare."""
        k, s, t, ring = self._k, self._s, self._t, self._ring
        r = w = self._head
        for _ in range(self._used):
            sec = s[r]
            if sec != _DEAD:
                if r != w:
                    t[self._slot_of(r)] = w
                    k[w] = k[r]
                    s[w] = sec
                w = w + 1 if w + 1 < ring else 0
            r = r + 1 if r + 1 < ring else 0
        n = self._live
        free = w
        for _ in range(self._used - n):
            s[free] = _DEAD
            free = free + 1 if free + 1 < ring else 0
        self._used = n
