"""Run an async service until SIGINT/SIGTERM, then stop it gracefully."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from typing import Any


async def serve_until_signal(start: Callable[[], Awaitable[Any]],
                             stop: Callable[[], Awaitable[Any]],
                             *, timeout_s: float = 30.0) -> None:
    """Start, wait for SIGINT/SIGTERM, then stop within ``timeout_s``."""
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, done.set)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - non-Unix
            pass
    await start()
    try:
        await done.wait()
    finally:
        await asyncio.wait_for(stop(), timeout=timeout_s)
