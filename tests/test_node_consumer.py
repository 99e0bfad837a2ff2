"""NodeConsumer: one consumer for the instance topics of a node's workers, on real Kafka."""

from __future__ import annotations

import asyncio
import time

import pytest
from goodserve.schemas import Assignment, Result
from goodserve.workers.engines.simulated import SimulatedEngine
from goodserve.workers.node_consumer import NodeAssignments, NodeConsumer
from goodserve.workers.service import WorkerService
from test_worker_service import MODEL, Tap, assignment

from goodserve.config import Settings
from goodserve.errors import ConfigError
from goodserve.transport import Envelope, TypedProducer, ensure_topics

S = Settings(bootstrap_servers="127.0.0.1:1", topic_prefix="t")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"node": "", "instance_ids": ["a"]}, "node must be"),
        ({"node": "n 1", "instance_ids": ["a"]}, "node must be"),
        ({"node": "n", "instance_ids": []}, "distinct non-empty"),
        ({"node": "n", "instance_ids": ["a", "a"]}, "distinct non-empty"),
        ({"node": "n", "instance_ids": ["a"], "max_queued": 0}, "max_queued"),
    ],
)
def test_constructor_validates_without_io(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        NodeConsumer(settings=S, **kwargs)  # type: ignore[arg-type]


def test_workers_and_readers_must_belong_to_the_node() -> None:
    node = NodeConsumer(settings=S, node="n", instance_ids=["a", "b"])
    assert node.group_id == "goodserve-node-n" and not node.started
    with pytest.raises(ConfigError, match="must be started"):
        node.assignments("a")
    with pytest.raises(ConfigError, match="not on node"):
        node.assignments("c")
    eng = SimulatedEngine(instance_id="c", gpu="H100", model=MODEL)
    with pytest.raises(ConfigError, match="not on node 'n'"):
        WorkerService(settings=S, instance_id="c", engine=eng, gpu="H100", model=MODEL,
                      node_consumer=node)


async def take(reader: NodeAssignments, n: int, within_s: float = 20.0) -> list[Envelope]:
    out: list[Envelope] = []
    async with asyncio.timeout(within_s):
        async for env in reader:
            out.append(env)
            if len(out) == n:
                break
    return out


def rid(env: Envelope) -> str:
    assert isinstance(env.msg, Assignment)
    return env.msg.request.request_id


@pytest.mark.kafka
@pytest.mark.timeout(120)
async def test_a_stopped_reader_hands_its_unsettled_records_to_the_next(
    kafka_settings: Settings,
) -> None:
    """Reader of n1 takes two records and commits the first, then stops: the next reader of
    n1 gets the second again (and the third), never the first; n2 is not disturbed."""
    s = kafka_settings
    await ensure_topics(s)
    prod = TypedProducer(settings=s)
    await prod.start()
    node = NodeConsumer(settings=s, node="t1", instance_ids=["n1", "n2"])
    try:
        async with node:
            for k in range(3):
                await prod.send(s.instance_topic("n1"), assignment("n1", f"a-{k}", out=1))
            await prod.send(s.instance_topic("n2"), assignment("n2", "b-0", out=1))
            r1, r2 = node.assignments("n1"), node.assignments("n2")
            with pytest.raises(ConfigError, match="already has a reader"):
                node.assignments("n1")
            first = await take(r1, 2)
            assert [rid(e) for e in first] == ["a-0", "a-1"]
            await r1.commit(first[0])
            await r1.stop()
            await r1.stop()  # idempotent
            again = await take(node.assignments("n1"), 2)
            assert [rid(e) for e in again] == ["a-1", "a-2"]
            assert [e.offset for e in again] == [1, 2]
            b = await take(r2, 1)
            assert [rid(e) for e in b] == ["b-0"]
            await r2.commit(b[0])
            committed = node.typed_consumer.committed_offsets()  # type: ignore[union-attr]
            assert committed == {(s.instance_topic("n1"), 0): 1, (s.instance_topic("n2"), 0): 1}
    finally:
        await prod.stop()


@pytest.mark.kafka
@pytest.mark.timeout(120)
async def test_a_full_queue_pauses_its_topic_only(kafka_settings: Settings) -> None:
    """n1's reader does not read: once max_queued records wait for it, n1's topic pauses
    (n2's keeps flowing); reading resumes it, and every record comes exactly once."""
    s = kafka_settings
    await ensure_topics(s)
    prod = TypedProducer(settings=s)
    await prod.start()
    node = NodeConsumer(settings=s, node="t2", instance_ids=["n1", "n2"], max_queued=3,
                        poll_timeout_ms=20)
    try:
        async with node:
            t1 = s.instance_topic("n1")
            for k in range(5):
                await prod.send(t1, assignment("n1", f"a-{k}", out=1))
            r1, r2 = node.assignments("n1"), node.assignments("n2")
            c = node.typed_consumer
            assert c is not None
            end = time.monotonic() + 20
            while t1 not in c.paused():
                assert time.monotonic() < end, "n1's topic never paused"
                await asyncio.sleep(0.02)
            await prod.send(s.instance_topic("n2"), assignment("n2", "b-0", out=1))
            assert [rid(e) for e in await take(r2, 1)] == ["b-0"]
            assert t1 in c.paused()
            got = await take(r1, 5)
            for k in range(5, 8):
                await prod.send(t1, assignment("n1", f"a-{k}", out=1))
            got += await take(r1, 3)
            assert [rid(e) for e in got] == [f"a-{k}" for k in range(8)]
            assert t1 not in c.paused()
    finally:
        await prod.stop()


@pytest.mark.kafka
@pytest.mark.timeout(120)
async def test_workers_of_one_node_share_its_consumer(kafka_settings: Settings) -> None:
    """Two WorkerServices on one NodeConsumer and one producer: each runs what is sent to
    its own topic, their commits go under the node's group; a worker restarted on the
    running node does not re-run what it settled."""
    s = kafka_settings
    await ensure_topics(s)
    prod = TypedProducer(settings=s)
    await prod.start()
    shared = TypedProducer(settings=s, client_id="node-workers")
    node = NodeConsumer(settings=s, node="t3", instance_ids=["n1", "n2"], producer=shared)

    def worker(iid: str) -> WorkerService:
        eng = SimulatedEngine(instance_id=iid, gpu="H100", model=MODEL, time_scale=0.02)
        return WorkerService(settings=s, instance_id=iid, engine=eng, gpu="H100", model=MODEL,
                             heartbeat_period_s=0.1, producer=shared, node_consumer=node)

    ws = [worker("n1"), worker("n2")]
    await shared.start()
    with pytest.raises(ConfigError, match="node consumer must be started"):
        await ws[0].start()  # the owner starts it first
    try:
        async with node, Tap(s, s.results_topic) as results:
            for w in ws:
                await w.start()
            assert {w.group_id for w in ws} == {node.group_id}
            for k in range(6):
                w = ws[k % 2]
                a = assignment(w.instance_id, f"s-{k}", out=5)
                await prod.send(w.topic, a, key=a.request.request_id)
            got = await results.until(lambda seen: len(seen) >= 6)
            assert sorted((r.request_id, r.instance_id) for r in got) == [
                (f"s-{k}", ("n1", "n2")[k % 2]) for k in range(6)]
            await ws[0].stop()
            again = worker("n1")  # same node, same group: what it settled is not re-read
            await again.start()
            await prod.send(ws[0].topic, assignment("n1", "s-new", out=3), key="s-new")
            got = await results.until(lambda seen: any(r.request_id == "s-new" for r in seen))
            got = await results.quiet(0.7)
            ids = [r.request_id for r in got if isinstance(r, Result)]
            assert sorted(ids) == sorted([f"s-{k}" for k in range(6)] + ["s-new"])
            assert again.results_produced == 1
            await again.stop()
            await ws[1].stop()
            committed = node.typed_consumer.committed_offsets()  # type: ignore[union-attr]
            assert committed == {(s.instance_topic("n1"), 0): 4, (s.instance_topic("n2"), 0): 3}
    finally:
        for w in ws:
            await w.stop()
        await shared.stop()
        await prod.stop()
