"""Keep a long-running service's resident memory at what it actually uses.

Why this exists: in the 10-minute soaks at 500 requests/s the services' RSS climbed for the
first minutes and then stayed at its high-water mark, while their live Python objects hardly
grew (``tracemalloc``). The climb was the C allocator, not a leak:

- **glibc keeps freed memory.** Memory ``free()`` d inside the heap is kept for reuse and only
  the very top of the heap is given back automatically, so one burst (a large fetch, a big
  batch of records, a dict resized while it filled) leaves its pages resident for good.
  ``malloc_trim(0)`` walks every arena and hands the free pages back to the kernel
  (``MADV_DONTNEED``), wherever they are; ``trim_heap`` calls it, and ``heap_trimmer`` does
  so periodically (default every 10 s: a millisecond or two of work on these heaps).
- **glibc raises its mmap threshold on its own.** A block above the threshold (128 KiB at
  start) is its own ``mmap`` and goes back to the kernel when freed; but each time such a
  block is freed glibc *raises* the threshold to its size (up to 32 MiB), so later
  fetch-sized buffers (aiokafka reads up to 1 MiB a partition) land in the heap and stay
  there. Setting ``M_MMAP_THRESHOLD`` explicitly turns that adjustment off.
- **Per-thread arenas.** Every thread that allocates (the default executor behind
  ``asyncio.to_thread``, the metrics server) may get an arena of its own, each with its own
  free lists and high-water mark; ``M_ARENA_MAX`` = 2 caps them, for services whose work is
  one event loop anyway.

``tune_allocator`` sets the two ``mallopt`` knobs (unless the process was started with the
matching ``MALLOC_*`` environment variable, which then wins) and the service runner
(``goodserve.commands._run.serve_until_signal``) calls it and runs ``heap_trimmer`` in every
service process. Everything is a no-op off glibc (macOS, musl): ``malloc_trim`` and
``mallopt`` are looked up in the C library and only used where they exist.

Environment:

- ``GOODSERVE_MALLOC_TRIM_S``: seconds between trims (default 10; 0 turns trimming off);
- ``GOODSERVE_ALLOCATOR_TUNING=0``: leave glibc's knobs alone;
- ``GOODSERVE_TRACEMALLOC=<path prefix>``: trace Python allocations and write a snapshot,
  ``<prefix>-<service>-<pid>-<seconds>.snap``, every ``GOODSERVE_TRACEMALLOC_S`` seconds
  (default 60): how the growth of live objects was looked for (compare two with
  ``tracemalloc.Snapshot.load(a).compare_to(tracemalloc.Snapshot.load(b), "lineno")``).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import json
import os
import sys
import time
import tracemalloc
from functools import lru_cache
from pathlib import Path
from typing import Any

M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
"""``mallopt`` parameters (glibc's ``malloc.h``)."""

DEFAULT_TRIM_PERIOD_S = 10.0
DEFAULT_ARENA_MAX = 2
DEFAULT_MMAP_THRESHOLD = 128 * 1024


@lru_cache(maxsize=1)
def _glibc() -> Any | None:
    """The C library if it is glibc (it has ``gnu_get_libc_version`` and ``malloc_trim``)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    if not all(hasattr(libc, f) for f in ("gnu_get_libc_version", "malloc_trim", "mallopt")):
        return None
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    libc.malloc_trim.restype = ctypes.c_int
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return libc


def glibc_available() -> bool:
    """True where ``malloc_trim`` and ``mallopt`` can be called (Linux with glibc)."""
    return _glibc() is not None


def trim_heap() -> bool:
    """Give the C heap's free pages back to the OS (``malloc_trim(0)``); True if any were.
    False (and nothing done) off glibc."""
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False


def tune_allocator(*, arena_max: int = DEFAULT_ARENA_MAX,
                   mmap_threshold: int = DEFAULT_MMAP_THRESHOLD) -> dict[str, int]:
    """Cap glibc's arenas and fix its mmap threshold (see the module docstring); a knob whose
    ``MALLOC_ARENA_MAX`` / ``MALLOC_MMAP_THRESHOLD_`` variable is set is left to it. Returns
    what was set (empty off glibc or with ``GOODSERVE_ALLOCATOR_TUNING=0``)."""
    libc = _glibc()
    if libc is None or os.environ.get("GOODSERVE_ALLOCATOR_TUNING", "1") in ("0", "false"):
        return {}
    done: dict[str, int] = {}
    if "MALLOC_ARENA_MAX" not in os.environ and arena_max > 0 \
            and libc.mallopt(M_ARENA_MAX, arena_max) == 1:
        done["arena_max"] = arena_max
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ and mmap_threshold > 0 \
            and libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold) == 1:
        done["mmap_threshold"] = mmap_threshold
    return done


def trim_period_s() -> float:
    """``GOODSERVE_MALLOC_TRIM_S`` (default 10 s; 0 or less: no trimming)."""
    raw = os.environ.get("GOODSERVE_MALLOC_TRIM_S", "")
    try:
        return float(raw) if raw.strip() else DEFAULT_TRIM_PERIOD_S
    except ValueError:
        return DEFAULT_TRIM_PERIOD_S


async def heap_trimmer(period_s: float = DEFAULT_TRIM_PERIOD_S) -> None:
    """Every ``period_s``: ``trim_heap``. Returns at once off glibc or for ``period_s <= 0``;
    otherwise runs until cancelled."""
    if period_s <= 0 or not glibc_available():
        return
    while True:
        await asyncio.sleep(period_s)
        trim_heap()


async def tracemalloc_snapshots(prefix: str, period_s: float = 60.0) -> None:
    """Trace Python allocations; every ``period_s`` write ``<prefix>-<service>-<pid>-<t>.snap``
    (``<service>``: the ``goodserve`` sub-command this process runs) and, next to it, a
    ``.json`` of the garbage collector's statistics and the RSS."""
    if not tracemalloc.is_tracing():
        tracemalloc.start(1)
    t0 = time.monotonic()
    pid = os.getpid()
    service = next((a for a in sys.argv[1:] if a.isidentifier()), "proc")
    while True:
        await asyncio.sleep(period_s)
        snap = tracemalloc.take_snapshot()
        path = f"{prefix}-{service}-{pid}-{time.monotonic() - t0:05.0f}"
        stats = {"gc_stats": gc.get_stats(), "gc_count": gc.get_count(),
                 "gc_objects": len(gc.get_objects()), "rss_bytes": _rss_bytes()}
        await asyncio.to_thread(snap.dump, path + ".snap")
        await asyncio.to_thread(Path(path + ".json").write_text, json.dumps(stats))


def _rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0


def service_memory_tasks() -> list[asyncio.Task[None]]:
    """What a service process runs for its memory: allocator knobs set now, the periodic
    trim and (if asked for) tracemalloc snapshots as tasks on the running loop."""
    tune_allocator()
    tasks = [asyncio.create_task(heap_trimmer(trim_period_s()), name="heap-trimmer")]
    prefix = os.environ.get("GOODSERVE_TRACEMALLOC", "")
    if prefix:
        period = float(os.environ.get("GOODSERVE_TRACEMALLOC_S", "60") or 60)
        tasks.append(asyncio.create_task(tracemalloc_snapshots(prefix, period),
                                         name="tracemalloc-snapshots"))
    return tasks
