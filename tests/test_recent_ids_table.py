"""The fixed-size table behind ``RecentIds``: ring wrap-around, expiry, the count bound,
hash collisions and deletions inside probe clusters, compaction, and agreement with the
dict it replaced (kept here as the reference model)."""

from __future__ import annotations

import math
import random
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest

import goodserve.recent_ids as ri
from goodserve.recent_ids import RecentIds, id_key


class DictRecentIds:
    """The former implementation (an insertion-ordered dict of key -> second): the model."""

    def __init__(self, *, ttl_s: float, capacity: int) -> None:
        self.ttl_s, self.capacity = ttl_s, capacity
        self.d: dict[int, int] = {}
        self.cutoff_at: int | None = None

    def add(self, rid: str, now: float, *, refresh: bool = True) -> bool:
        second = math.floor(now)
        if second != self.cutoff_at:
            self.cutoff_at = second
            old = []
            for k, t in self.d.items():
                if t >= second - self.ttl_s:
                    break
                old.append(k)
            for k in old:
                del self.d[k]
        key = id_key(rid)
        if key in self.d:
            if refresh:
                del self.d[key]
                self.d[key] = second
            return False
        self.d[key] = second
        if len(self.d) > self.capacity:
            del self.d[next(iter(self.d))]
        return True

    def __contains__(self, rid: str) -> bool:
        return id_key(rid) in self.d

    def discard(self, rid: str) -> None:
        self.d.pop(id_key(rid), None)

    def __len__(self) -> int:
        return len(self.d)


def check_invariants(ids: RecentIds) -> None:
    """Every live ring slot is in the table exactly once, at the end of its probe from home."""
    table = ids._t
    live = [(ids._head + n) % ids._ring for n in range(ids._used)
            if ids._s[(ids._head + n) % ids._ring] != ri._DEAD]
    assert len(live) == len(ids)
    assert sorted(int(r) for r in table if r >= 0) == sorted(live)
    mask = ids._mask
    for slot, r in enumerate(table):
        if r < 0:
            continue
        i = int(ids._k[r]) & mask
        while i != slot:  # no empty slot between home and where it sits
            assert table[i] >= 0
            i = (i + 1) & mask


@pytest.fixture
def colliding(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Ids named ``h<home>-<n>`` get the key ``n << 20 | home``: same home, distinct keys."""
    real = ri.id_key

    def key(rid: str) -> int:
        if rid.startswith("h"):
            home, n = rid[1:].split("-")
            return (int(n) << 20) | int(home)
        return real(rid)

    monkeypatch.setattr(ri, "id_key", key)
    yield


def test_ring_wraps_around_many_times() -> None:
    ids = RecentIds(ttl_s=2.0, capacity=50)
    for i in range(10 * ids._ring):
        assert ids.add(f"r{i}", now=i / 10.0)
        assert f"r{i}" in ids
    # the window at t ~= 1124.9 holds the ids of the last 3 seconds' buckets
    assert 20 <= len(ids) <= 40 and ids._used == len(ids)
    assert f"r{10 * ids._ring - 25}" in ids and f"r{10 * ids._ring - 45}" not in ids
    check_invariants(ids)


def test_expiry_is_by_second_and_once_a_second() -> None:
    ids = RecentIds(ttl_s=10.0, capacity=100)
    ids.add("a", now=100.9)
    ids.add("b", now=101.0)
    ids.add("c", now=110.5)  # cutoff 100.0: "a" (second 100) kept
    assert "a" in ids
    ids.add("d", now=111.0)  # cutoff 101.0: "a" expires, "b" (101) kept
    assert "a" not in ids and "b" in ids
    ids.add("e", now=112.0)
    assert "b" not in ids and len(ids) == 3
    ids.add("f", now=200.0)  # everything older goes at once
    assert len(ids) == 1 and ids._used == 1
    check_invariants(ids)


def test_count_bound_evicts_oldest_first_and_refresh_makes_newest() -> None:
    ids = RecentIds(ttl_s=1e6, capacity=3)
    for k, rid in enumerate("abc"):
        ids.add(rid, now=float(k))
    assert not ids.add("a", now=3.0)  # refreshed: now the newest
    ids.add("d", now=4.0)  # evicts "b", the oldest
    assert [r in ids for r in "abcd"] == [True, False, True, True]
    assert not ids.add("c", now=5.0, refresh=False)  # kept as it was: the oldest now
    ids.add("e", now=6.0)
    assert [r in ids for r in "abcde"] == [True, False, False, True, True]
    check_invariants(ids)


def test_collisions_share_a_probe_cluster(colliding: None) -> None:
    ids = RecentIds(ttl_s=1e6, capacity=40)
    names = [f"h5-{n}" for n in range(1, 30)]  # 29 keys with the same home slot
    for t, rid in enumerate(names):
        assert ids.add(rid, now=float(t))
    assert all(r in ids for r in names) and "h5-999" not in ids
    check_invariants(ids)


def test_deleting_inside_a_cluster_keeps_the_rest_findable(colliding: None) -> None:
    ids = RecentIds(ttl_s=1e6, capacity=40)
    mask = ids._mask
    # three homes in a row, interleaved, plus one that wraps past the table's end
    names = [f"h{h}-{n}" for n in range(1, 6) for h in (7, 8, 9, mask)]
    for t, rid in enumerate(names):
        ids.add(rid, now=float(t))
    rng = random.Random(3)
    order = names[:]
    rng.shuffle(order)
    for k, rid in enumerate(order):
        ids.discard(rid)
        assert rid not in ids
        assert all(r in ids for r in order[k + 1:])
        check_invariants(ids)
    assert len(ids) == 0 and all(r < 0 for r in ids._t)


def test_refreshes_compact_the_ring_in_place() -> None:
    ids = RecentIds(ttl_s=1e6, capacity=100)
    keys, secs = ids._k, ids._s
    for i in range(60):
        ids.add(f"r{i}", now=0.0)
    for k in range(5 * ids._ring):  # each refresh leaves one dead slot behind
        assert not ids.add(f"r{k % 7}", now=1.0 + k)
    assert ids._k is keys and ids._s is secs  # the same arrays throughout
    assert len(ids) == 60 and all(f"r{i}" in ids for i in range(60))
    check_invariants(ids)
    ids.add("new", now=1e5)
    ids.add("new2", now=1e5)
    assert len(ids) == 62


@pytest.mark.parametrize(("seed", "cap", "ttl", "fits"), [
    (0, 1, 0.5, False), (1, 5, 3.0, False), (2, 37, 20.0, False), (3, 300, 1e6, False),
    (4, 300, 3.0, False), (5, 5, 1e6, True), (6, 37, 1e6, True), (7, 300, 1e6, True)])
def test_agrees_with_the_dict_it_replaced(seed: int, cap: int, ttl: float, fits: bool,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Random adds (with and without refresh), discards and lookups; ``fits``: all ids fit
    (refreshes pile up dead ring slots: compactions), else 3x too many (evictions)."""
    rng = random.Random(seed)
    pool = [f"id-{n}" for n in range(cap - 1 if fits and cap > 1 else 3 * cap + 10)]
    model = DictRecentIds(ttl_s=ttl, capacity=cap)
    ids = RecentIds(ttl_s=ttl, capacity=cap)
    compactions = []
    real_compact = ids._compact
    monkeypatch.setattr(RecentIds, "_compact",
                        lambda self: (compactions.append(1), real_compact()))
    now = 1000.0
    for step in range(6000):
        now += rng.expovariate(40.0)
        rid = rng.choice(pool)
        op = rng.random()
        if op < 0.8:
            refresh = rng.random() < 0.5
            assert ids.add(rid, now=now, refresh=refresh) == model.add(rid, now, refresh=refresh)
        elif op < 0.9:
            ids.discard(rid)
            model.discard(rid)
        else:
            assert (rid in ids) == (rid in model)
        assert len(ids) == len(model), step
        if step % 500 == 0:
            check_invariants(ids)
    assert {r for r in pool if r in ids} == {r for r in pool if r in model}
    if fits:
        assert compactions


def test_bad_capacity_bounds() -> None:
    with pytest.raises(ValueError):
        RecentIds(capacity=(1 << 30) + 1)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_pages_are_resident_from_construction() -> None:
    """The table's memory is resident as soon as it exists, and traffic adds none. Run in a
    fresh interpreter: in a long test session freed pages of earlier tests are reused and
    RSS says nothing about what one object touched."""
    code = textwrap.dedent(
        """
        from goodserve.recent_ids import RecentIds

        def rss():
            with open("/proc/self/status") as f:
                return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmRSS:"))

        before = rss()
        ids = RecentIds(capacity=400_000)
        grown = rss() - before
        assert grown > 0.8 * ids.nbytes, (grown, ids.nbytes)
        for i in range(20_000):
            ids.add(f"x{i}", now=i / 500.0)
        assert rss() - before < ids.nbytes + 2 * 2**20, (rss() - before, ids.nbytes)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
