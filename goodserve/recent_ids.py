"""Ids seen recently, in little memory: the de-duplication memories of the services.

The dispatcher refuses a request id it accepted in the last two minutes and a worker one it
finished; under sustained load those memories hold tens of thousands of ids, so their size
per id decides how far a service's memory climbs before it levels off. Each id is kept as a
64-bit BLAKE2b hash (two ids collide with probability ~n^2 / 2^65: nil at these sizes), with
the second it arrived in as a value object shared by every id of that second: about 70-100
bytes an id, a third of an ordered dict of strings and float times.
"""

from __future__ import annotations

import hashlib
import math
import time


def id_key(request_id: str) -> int:
    """The 64-bit key of an id."""
    return int.from_bytes(hashlib.blake2b(request_id.encode(), digest_size=8).digest(), "little")


class RecentIds:
    """Ids seen in the last ``ttl_s`` seconds, at most ``capacity`` of them (oldest go first).

    Times are kept to the second they fell in, so an id may be kept up to a second longer
    than ``ttl_s``. ``now`` defaults to ``time.monotonic()``.
    """

    __slots__ = ("_cutoff_at", "_d", "_second", "capacity", "ttl_s")

    def __init__(self, *, ttl_s: float = 120.0, capacity: int = 200_000) -> None:
        if not ttl_s > 0 or not math.isfinite(ttl_s):
            raise ValueError(f"ttl_s must be a positive number of seconds, got {ttl_s}")
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.ttl_s = ttl_s
        self.capacity = capacity
        self._d: dict[int, int] = {}  # key -> second it arrived in (insertion = time order)
        self._second = -(1 << 62)
        """The current second: one int object, shared by every id that arrives in it."""
        self._cutoff_at = -(1 << 62)

    def _now_second(self, now: float | None) -> int:
        s = math.floor(time.monotonic() if now is None else now)
        if s != self._second:
            self._second = s
        return self._second

    def _expire(self, second: int) -> None:
        """Drop ids older than ``ttl_s``: once a second, one pass over the oldest entries
        (``add`` keeps the count bound)."""
        d = self._d
        if second != self._cutoff_at:
            self._cutoff_at = second
            cutoff = second - self.ttl_s
            old = []
            for k, t in d.items():
                if t >= cutoff:
                    break
                old.append(k)
            for k in old:
                del d[k]

    def add(self, request_id: str, now: float | None = None, *, refresh: bool = True) -> bool:
        """Remember an id as seen now; True if it was not remembered already. With
        ``refresh=False`` an id already remembered keeps its first time."""
        second = self._now_second(now)
        self._expire(second)
        key = id_key(request_id)
        d = self._d
        if key in d:
            if refresh:
                del d[key]
                d[key] = second
            return False
        d[key] = second
        if len(d) > self.capacity:
            del d[next(iter(d))]
        return True

    def __contains__(self, request_id: object) -> bool:
        return isinstance(request_id, str) and id_key(request_id) in self._d

    def discard(self, request_id: str) -> None:
        self._d.pop(id_key(request_id), None)

    def __len__(self) -> int:
        return len(self._d)
