"""Helpers for the live crash tests (real Kafka, simulated workers, some as OS processes)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

from goodserve.dispatcher.service import DispatcherService

from goodserve.chaos.procs import ServiceProc
from goodserve.config import Settings
from goodserve.transport import TypedConsumer


async def wait_for(cond: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    end = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.05)


async def read_all(settings: Settings, topic: str, kind: type) -> list[Any]:
    """Every record of ``kind`` on a topic, from the start to its current end."""
    got: list[Any] = []
    c: TypedConsumer[Any] = TypedConsumer(
        settings=settings,
        topics=[topic],
        group_id=None,
        service="test-reader",
        auto_offset_reset="earliest",
    )
    async with c:
        idle = 0
        while idle < 5:  # 5 empty polls of 200 ms in a row: the end
            envs = await c.getmany(timeout_ms=200)
            idle = 0 if envs else idle + 1
            got.extend(e.msg for e in envs if isinstance(e.msg, kind))
    return got


def log_events(proc: ServiceProc, event: str) -> list[dict[str, Any]]:
    """The JSON log lines of ``event`` a service process wrote."""
    out = []
    for line in proc.log_text().splitlines():
        if line.startswith("{") and f'"{event}"' in line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def usable(d: DispatcherService, iid: str) -> bool:
    """Whether the dispatcher would place work on ``iid`` now (alive, fresh heartbeat)."""
    i = d.est.index.get(iid)
    return i is not None and bool(d.est.usable(time.time())[i])
