"""``goodserve.memory``: the service processes give freed heap back to the OS."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import pytest

from goodserve import memory
from goodserve.commands._run import serve_until_signal

glibc = pytest.mark.skipif(not memory.glibc_available(), reason="needs glibc")


@glibc
def test_trim_gives_a_fragmented_heap_back() -> None:
    """80 MB of 1 kB blocks, 99% freed: glibc keeps the pages (one live block in a hundred
    pins each stretch of heap) until ``malloc_trim``. In a fresh interpreter: a long test
    session's free heap would absorb the blocks and RSS would show nothing."""
    code = textwrap.dedent(
        """
        from goodserve import memory

        def rss_mb():
            with open("/proc/self/status") as f:
                return next(int(ln.split()[1]) / 1024 for ln in f if ln.startswith("VmRSS:"))

        before = rss_mb()
        blocks = [bytearray(1000) for _ in range(80_000)]
        keep = blocks[::100]
        del blocks
        held = rss_mb()
        assert memory.trim_heap()
        after = rss_mb()
        assert held - before > 40, (before, held)
        assert after < held - 30, (before, held, after)
        assert len(keep) == 800
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_off_glibc_everything_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "_glibc", lambda: None)
    assert memory.trim_heap() is False
    assert memory.tune_allocator() == {}
    assert asyncio.run(asyncio.wait_for(memory.heap_trimmer(0.01), 1.0)) is None


@glibc
def test_tuning_leaves_knobs_set_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert memory.tune_allocator() == {"arena_max": 2, "mmap_threshold": 128 * 1024}
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert memory.tune_allocator() == {"mmap_threshold": 128 * 1024}
    monkeypatch.setenv("GOODSERVE_ALLOCATOR_TUNING", "0")
    assert memory.tune_allocator() == {}


@pytest.mark.parametrize(("raw", "want"), [("", 10.0), ("2.5", 2.5), ("0", 0.0), ("x", 10.0)])
def test_trim_period_from_the_environment(raw: str, want: float,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GOODSERVE_MALLOC_TRIM_S", raw)
    assert memory.trim_period_s() == want


@glibc
async def test_trimmer_trims_periodically(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(memory, "trim_heap", lambda: calls.append(1) or True)
    task = asyncio.create_task(memory.heap_trimmer(0.01))
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(calls) >= 3
    assert await memory.heap_trimmer(0.0) is None  # 0: off


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
async def test_the_service_runner_runs_the_memory_tasks_and_ends_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GOODSERVE_MALLOC_TRIM_S", "0.02")
    monkeypatch.setenv("GOODSERVE_TRACEMALLOC", str(tmp_path / "snap"))
    monkeypatch.setenv("GOODSERVE_TRACEMALLOC_S", "0.05")
    trims = []
    monkeypatch.setattr(memory, "trim_heap", lambda: trims.append(1) or True)
    seen: list[set[str]] = []

    async def start() -> None:
        asyncio.get_running_loop().call_later(0.4, os.kill, os.getpid(), signal.SIGTERM)

    async def stop() -> None:
        seen.append({t.get_name() for t in asyncio.all_tasks()})

    was_tracing = tracemalloc.is_tracing()
    try:
        await serve_until_signal(start, stop)
    finally:
        if not was_tracing:
            tracemalloc.stop()
    names = {t.get_name() for t in asyncio.all_tasks()}
    assert "tracemalloc-snapshots" in seen[0]
    assert "heap-trimmer" not in names and "tracemalloc-snapshots" not in names
    written = os.listdir(tmp_path)
    assert any(p.endswith(".snap") for p in written)
    assert any(p.endswith(".json") for p in written)  # gc statistics and RSS alongside
    if memory.glibc_available():
        assert trims
    # the runner's signal handlers are gone again
    assert not asyncio.get_running_loop().remove_signal_handler(signal.SIGTERM)
