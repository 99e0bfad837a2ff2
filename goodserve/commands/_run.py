"""Run an async service until SIGINT/SIGTERM, then stop it gracefully."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable
from typing import Any

from goodserve.memory import service_memory_tasks

_NO_LOOP_SIGNALS = (NotImplementedError, RuntimeError)
"""What ``loop.add_signal_handler`` raises where the loop cannot take signals (Windows'
event loops; a loop outside the main thread)."""


async def serve_until_signal(start: Callable[[], Awaitable[Any]],
                             stop: Callable[[], Awaitable[Any]],
                             *, timeout_s: float = 30.0) -> None:
    """Start, wait for SIGINT/SIGTERM, then stop within ``timeout_s``.

    While it runs, the process's C heap is kept trimmed (``goodserve.memory``): every
    long-running service goes through here.
    """
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    handled = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        # no loop signal handlers on Windows or in a non-main thread: Ctrl-C still stops it
        with contextlib.suppress(*_NO_LOOP_SIGNALS):
            loop.add_signal_handler(sig, done.set)
            handled.append(sig)
    memory_tasks = service_memory_tasks()
    try:
        await start()
        try:
            await done.wait()
        finally:
            await asyncio.wait_for(stop(), timeout=timeout_s)
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
        for t in memory_tasks:
            t.cancel()
        for t in memory_tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
