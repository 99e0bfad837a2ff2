"""The services' de-duplication memory: bounded by time and count, small per id."""

from __future__ import annotations

import tracemalloc

import pytest
from goodserve.dispatcher.validation import SeenRequests

from goodserve.errors import DuplicateRequest
from goodserve.recent_ids import RecentIds


def test_remembers_and_forgets_by_time() -> None:
    ids = RecentIds(ttl_s=10.0)
    assert ids.add("a", now=100.0) and "a" in ids
    assert not ids.add("a", now=105.0)  # still remembered
    assert ids.add("b", now=112.0)  # "a" was refreshed at 105: kept until ~115
    assert "a" in ids
    assert ids.add("c", now=117.0)
    assert "a" not in ids and "b" in ids and "c" in ids
    ids.discard("b")
    assert "b" not in ids and len(ids) == 1


def test_first_time_kept_without_refresh() -> None:
    ids = RecentIds(ttl_s=10.0)
    ids.add("a", now=100.0)
    assert not ids.add("a", now=108.0, refresh=False)
    ids.add("z", now=111.5)
    assert "a" not in ids  # its first time (100) is past the window


def test_bounded_by_count_oldest_first() -> None:
    ids = RecentIds(ttl_s=1e6, capacity=3)
    for k, rid in enumerate("abcde"):
        ids.add(rid, now=float(k))
    assert len(ids) == 3 and [r in ids for r in "abcde"] == [False, False, True, True, True]


@pytest.mark.parametrize(("ttl", "cap"), [(0.0, 10), (-1.0, 10), (float("inf"), 10), (1.0, 0)])
def test_bad_settings(ttl: float, cap: int) -> None:
    with pytest.raises(ValueError):
        RecentIds(ttl_s=ttl, capacity=cap)


def test_memory_is_fixed_at_construction() -> None:
    """Two minutes at 500/s (the dispatcher's load in the soak) and then three more of churn
    allocate nothing: the arrays were sized, and their pages written, up front."""
    names = [f"soak-3f9a1c-{i:08d}" for i in range(150_000)]
    ids = RecentIds(ttl_s=120.0)
    assert ids.nbytes < 6 * 2**20  # the dispatcher's 200,000 ids in under 6 MB
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for i, rid in enumerate(names):
        ids.add(rid, now=i / 500.0)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    used = sum(s.size_diff for s in after.compare_to(before, "filename"))
    assert len(ids) == 60_500  # 121 one-second buckets of 500
    assert used < 64 * 1024, used


def test_dispatcher_refuses_a_duplicate_within_the_window_only() -> None:
    seen = SeenRequests(ttl_s=60.0)
    seen.check_and_add("r1", now=0.0)
    with pytest.raises(DuplicateRequest):
        seen.check_and_add("r1", now=30.0)
    seen.check_and_add("other", now=62.0)  # the window moves on
    seen.check_and_add("r1", now=62.5)
