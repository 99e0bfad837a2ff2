"""The dispatcher's pipelined request loop: commits follow acks, in order; a failure rewinds.

No broker: the batches in flight are built by hand around real ``Delivery`` objects whose
futures the test resolves, and the requests consumer is a recorder.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka.errors import KafkaTimeoutError
from aiokafka.structs import RecordMetadata, TopicPartition
from goodserve.dispatcher.service import DispatcherService, _InFlight
from goodserve.schemas import AgentRequest

from goodserve.config import Settings
from goodserve.errors import GoodServeError
from goodserve.transport.consumer import Envelope
from goodserve.transport.producer import Delivery


class _Consumer:
    def __init__(self) -> None:
        self.commits: list[dict[tuple[str, int], int]] = []
        self.rewinds = 0

    async def commit(self, envs: list[Envelope[Any]]) -> None:
        out: dict[tuple[str, int], int] = {}
        for e in envs:
            out[(e.topic, e.partition)] = max(out.get((e.topic, e.partition), -1), e.offset)
        self.commits.append(out)

    async def rewind(self) -> None:
        self.rewinds += 1


def _env(offset: int, partition: int = 0) -> Envelope[AgentRequest]:
    req = AgentRequest(request_id=f"r-{partition}-{offset}", input_tokens=10, max_tokens=10)
    return Envelope(req, "requests", partition, offset, None, 0.0)


def _md() -> RecordMetadata:
    return RecordMetadata("t", 0, TopicPartition("t", 0), 0, 0, -1, 0)


def _service() -> tuple[DispatcherService, _Consumer]:
    d = DispatcherService(settings=Settings(), monitor=False)
    c = _Consumer()
    d._requests = c  # type: ignore[assignment]
    d.commit_interval_s = 0.0
    return d, c


def _batch(envs: list[Envelope[AgentRequest]]) -> tuple[_InFlight, asyncio.Future[Any]]:
    fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    return _InFlight(envs, list(envs), [Delivery(fut, "instance")]), fut


async def test_batches_commit_after_their_acks_in_order() -> None:
    d, c = _service()
    b1, f1 = _batch([_env(0), _env(1)])
    b2, f2 = _batch([_env(2), _env(0, partition=1)])
    d._inflight.extend([b1, b2])
    await d._settle_batches()
    assert c.commits == [] and len(d._inflight) == 2  # nothing acknowledged yet
    f2.set_result(_md())  # the later batch first: it waits for the one before it
    await d._settle_batches()
    await asyncio.sleep(0)
    assert c.commits == [] and len(d._inflight) == 2
    f1.set_result(_md())
    await d._settle_batches(drain=True)
    assert not d._inflight
    merged: dict[tuple[str, int], int] = {}
    for commit in c.commits:
        for k, v in commit.items():
            merged[k] = max(merged.get(k, -1), v)
    assert merged == {("requests", 0): 2, ("requests", 1): 0}
    assert c.rewinds == 0


async def test_block_waits_for_the_oldest_batch_only() -> None:
    d, c = _service()
    b1, f1 = _batch([_env(0)])
    b2, _f2 = _batch([_env(1)])
    d._inflight.extend([b1, b2])
    asyncio.get_running_loop().call_later(0.01, f1.set_result, _md())
    await d._settle_batches(block=True)
    assert list(d._inflight) == [b2]
    await d._commit_flush()
    assert c.commits == [{("requests", 0): 0}]


async def test_an_unacknowledged_record_rewinds_every_batch_in_flight() -> None:
    d, c = _service()
    b1, f1 = _batch([_env(0)])
    b2, f2 = _batch([_env(1)])
    for b in (b1, b2):
        for e in b.envs:
            d.seen.check_and_add(e.msg.request_id)
    d._inflight.extend([b1, b2])
    f2.set_result(_md())
    f1.set_exception(KafkaTimeoutError())
    with pytest.raises(GoodServeError):
        await d._settle_batches()
    assert c.commits == []  # nothing past the failed batch, not even the acknowledged one
    assert c.rewinds == 1 and not d._inflight
    for b in (b1, b2):  # read again: not taken for duplicates
        for e in b.envs:
            d.seen.check_and_add(e.msg.request_id)


async def test_held_requests_floor_the_commit() -> None:
    d, c = _service()
    held = _env(1)
    d.held.append((held, 0.0))
    b1, f1 = _batch([_env(0), _env(2)])
    d._inflight.append(b1)
    f1.set_result(_md())
    await d._settle_batches(drain=True)
    assert c.commits == [{("requests", 0): 0}]  # never past the held request
