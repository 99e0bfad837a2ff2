"""Helpers for the live crash tests (real Kafka, simulated workers, some as OS processes)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

from goodserve.dispatcher.service import DispatcherService
from goodserve.schemas import Result

from goodserve.chaos.load import CountingClient
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


async def collect_results(
    client: CountingClient, rids: list[str], timeout_s: float
) -> dict[str, Result]:
    """Each request's Result, then a pause long enough for a duplicate to show up."""
    got: dict[str, Result] = {}

    async def one(rid: str) -> None:
        got[rid] = await client.result(rid, timeout=timeout_s)

    try:
        await asyncio.gather(*(one(r) for r in rids))
    except Exception as e:
        missing = sorted(r for r in rids if r not in got)
        raise AssertionError(f"no Result for {missing}: lost ({e!r})") from e
    await asyncio.sleep(3.0)  # a duplicate would arrive by now
    return got


def assert_one_result_record_each(client: CountingClient, rids: list[str]) -> None:
    """Exactly one Result record per request on the topic (before the client's de-dup)."""
    assert {r: client.raw_counts[r] for r in rids} == {r: 1 for r in rids}
    assert client.duplicates == 0
