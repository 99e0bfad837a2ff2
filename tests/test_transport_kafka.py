"""The Kafka transport against a real Apache Kafka (KRaft) broker: no mocks."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import pytest
from goodserve.schemas import AgentRequest, DeadLetter, Result, encode
from test_schemas import SAMPLES

from goodserve.broker.apache import ApacheKafkaBroker
from goodserve.config import Settings
from goodserve.errors import BrokerUnavailable, ConfigError, TransportError
from goodserve.transport import (
    Envelope,
    TypedConsumer,
    TypedProducer,
    ensure_topics,
    standard_topics,
)
from goodserve.transport.topics import TopicSpec

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(180)]


async def take(
    consumer: TypedConsumer[Any], n: int, *, within_s: float = 30.0, commit: bool = True
) -> list[Envelope[Any]]:
    """Read n envelopes (committing each after 'processing'), failing after ``within_s``."""
    out: list[Envelope[Any]] = []

    async def run() -> None:
        async for env in consumer:
            out.append(env)
            if commit:
                await consumer.commit(env)
            if len(out) >= n:
                return

    await asyncio.wait_for(run(), within_s)
    return out


async def drain(consumer: TypedConsumer[Any], *, quiet_s: float = 2.0) -> list[Envelope[Any]]:
    """Everything until nothing arrives for ``quiet_s`` (proves that nothing more comes)."""
    out: list[Envelope[Any]] = []
    deadline = time.monotonic() + quiet_s
    while time.monotonic() < deadline:
        batch = await consumer.getmany(timeout_ms=300)
        if batch:
            out += batch
            await consumer.commit(batch)
            deadline = time.monotonic() + quiet_s
    return out


def consumer(settings: Settings, topic: str, group: str | None, **kw: Any) -> TypedConsumer[Any]:
    return TypedConsumer(settings=settings, topics=[topic], group_id=group, service="test", **kw)


async def test_ensure_topics_is_idempotent(kafka_settings: Settings) -> None:
    created = await ensure_topics(kafka_settings)
    assert set(created) == {s.name for s in standard_topics(kafka_settings)}
    assert await ensure_topics(kafka_settings) == []
    inst = kafka_settings.instance_topic("a100-0")
    assert await ensure_topics(kafka_settings, [TopicSpec(inst, 1), kafka_settings.requests_topic])
    assert await ensure_topics(kafka_settings, [inst]) == []


async def test_every_message_type_round_trips_through_kafka(kafka_settings: Settings) -> None:
    topic = kafka_settings.topic("all")
    await ensure_topics(kafka_settings, [TopicSpec(topic, 1)])
    async with TypedProducer(settings=kafka_settings) as producer:
        assert producer.idempotent
        for i, msg in enumerate(SAMPLES):
            sent = await producer.send(topic, msg, key=f"k{i}")
            assert (sent.topic, sent.partition, sent.offset) == (topic, 0, i)
    async with consumer(kafka_settings, topic, "g-all") as c:
        got = await take(c, len(SAMPLES))
    assert [e.msg for e in got] == SAMPLES
    assert [e.key_str for e in got] == [f"k{i}" for i in range(len(SAMPLES))]
    assert [e.offset for e in got] == list(range(len(SAMPLES)))
    assert all(e.raw == encode(e.msg) for e in got)
    assert all(abs(e.timestamp - time.time()) < 120 for e in got)


async def test_committed_offsets_survive_consumer_restart(kafka_settings: Settings) -> None:
    topic = kafka_settings.requests_topic
    await ensure_topics(kafka_settings, [topic])
    reqs = [AgentRequest(request_id=f"r{i}") for i in range(40)]
    async with TypedProducer(settings=kafka_settings) as p:
        await p.send_batch(topic, [(r.request_id, r) for r in reqs])

    seen: list[str] = []
    async with consumer(kafka_settings, topic, "g-restart", message_type=AgentRequest) as c:
        seen += [e.msg.request_id for e in await take(c, 15)]
        # one more handed out but never committed: must come back after the restart
        uncommitted = await take(c, 1, commit=False)
        await c.stop(drain_timeout_s=0.2)
    async with consumer(kafka_settings, topic, "g-restart", message_type=AgentRequest) as c:
        rest = await drain(c)
    again = [e.msg.request_id for e in rest]
    assert uncommitted[0].msg.request_id in again, "uncommitted record was lost"
    assert not set(seen) & set(again), "committed records were reprocessed"
    assert sorted(seen + again) == sorted(r.request_id for r in reqs)


async def test_bad_records_are_dead_lettered_and_consumption_continues(
    kafka_settings: Settings,
) -> None:
    s = kafka_settings
    await ensure_topics(s, [TopicSpec(s.requests_topic, 1), TopicSpec(s.dead_letters_topic, 1)])
    future = json.loads(encode(AgentRequest(request_id="future")))
    future["v"] = 99
    bad: list[tuple[bytes | None, str]] = [
        (b"\x00\x01garbage\xff", "malformed"),
        (json.dumps(future).encode(), "unsupported_version"),
        (encode(Result(request_id="wrong", status="ok")), "wrong_kind"),
        (encode(AgentRequest(request_id="trunc"))[:-7], "malformed"),
        (None, "malformed"),
    ]
    async with TypedProducer(settings=s) as p:
        await p.send(s.requests_topic, AgentRequest(request_id="good-0"))
        for value, _ in bad:
            await p.send_raw(s.requests_topic, value, key="bad")
        await p.send(s.requests_topic, AgentRequest(request_id="good-1"))

    async with consumer(s, s.requests_topic, "g-dl", message_type=AgentRequest) as c:
        good = await take(c, 2)
        assert c.dead_lettered == len(bad)
    assert [e.msg.request_id for e in good] == ["good-0", "good-1"]

    async with consumer(s, s.dead_letters_topic, None, message_type=DeadLetter) as dlc:
        dls = [e.msg for e in await take(dlc, len(bad))]
    assert [d.error_code for d in dls] == [code for _, code in bad]
    assert [d.payload for d in dls] == [v or b"" for v, _ in bad]
    assert [d.offset for d in dls] == list(range(1, 1 + len(bad)))
    assert all(d.topic == s.requests_topic and d.service == "test" and d.reason for d in dls)
    assert dls[1].request_id == "future"
    assert all(d.key == b"bad" for d in dls)

    # bad records were committed past: a restarted group sees nothing again
    async with consumer(s, s.requests_topic, "g-dl", message_type=AgentRequest) as c:
        assert await drain(c, quiet_s=1.5) == []
        assert c.dead_lettered == 0


async def test_trailing_bad_records_are_committed(kafka_settings: Settings) -> None:
    """Bad records after the last good one are committed once the good one is committed."""
    s = kafka_settings
    await ensure_topics(s, [TopicSpec(s.requests_topic, 1)])
    async with TypedProducer(settings=s) as p:
        await p.send(s.requests_topic, AgentRequest(request_id="ok"))
        await p.send_raw(s.requests_topic, b"nope")
        await p.send_raw(s.requests_topic, b"nope either")
    async with consumer(s, s.requests_topic, "g-tail") as c:
        await take(c, 1)
        await asyncio.wait_for(_until(lambda: c.dead_lettered == 2, c), 20)
        await c.getmany(timeout_ms=100)
        assert c.committed_offsets()[(s.requests_topic, 0)] == 3


async def _until(cond: Callable[[], bool], c: TypedConsumer[Any]) -> None:
    while not cond():
        await c.getmany(timeout_ms=200)


async def test_transactions_commit_and_abort(kafka_settings: Settings) -> None:
    s = kafka_settings
    topic = s.results_topic
    await ensure_topics(s, [TopicSpec(topic, 1)])
    tid = f"{s.topic_prefix}-tx"
    async with TypedProducer(settings=s, transactional_id=tid) as p:
        async with p.transaction():
            await p.send(topic, Result(request_id="a", status="ok"), key="a")
            await p.send(topic, Result(request_id="b", status="ok"), key="b")
        with pytest.raises(RuntimeError):
            async with p.transaction():
                await p.send(topic, Result(request_id="aborted", status="ok"))
                raise RuntimeError("abort me")
        async with p.transaction():
            await p.send(topic, Result(request_id="c", status="ok"), key="c")
    async with consumer(s, topic, "g-tx", message_type=Result) as c:
        got = [e.msg.request_id for e in await drain(c)]
    assert got == ["a", "b", "c"]


async def test_consume_transform_produce_in_one_transaction(kafka_settings: Settings) -> None:
    """Offsets committed inside the producer's transaction (exactly-once hand-off)."""
    s = kafka_settings
    await ensure_topics(s, [TopicSpec(s.requests_topic, 1), TopicSpec(s.results_topic, 1)])
    async with TypedProducer(settings=s) as p:
        await p.send_batch(
            s.requests_topic, [(None, AgentRequest(request_id=f"q{i}")) for i in range(5)]
        )
    group = "g-eos"
    async with (
        TypedProducer(settings=s, transactional_id=f"{s.topic_prefix}-eos") as tp,
        consumer(s, s.requests_topic, group, message_type=AgentRequest) as c,
    ):
        envs = await take(c, 5, commit=False)
        async with tp.transaction():
            for e in envs:
                await tp.send(s.results_topic, Result(request_id=e.msg.request_id, status="ok"))
            offsets = {(s.requests_topic, 0): envs[-1].offset + 1}
            await tp.send_offsets_to_transaction(offsets, group)
    async with consumer(s, s.requests_topic, group) as c:
        assert await drain(c, quiet_s=1.5) == []
    async with consumer(s, s.results_topic, None, message_type=Result) as c:
        assert len(await take(c, 5)) == 5


async def test_batch_api_and_throughput(kafka_settings: Settings) -> None:
    s = kafka_settings
    n = 5000
    await ensure_topics(s, [s.requests_topic])
    msgs = [(f"r{i}", AgentRequest(request_id=f"r{i}", prompt="x" * 200)) for i in range(n)]
    async with TypedProducer(settings=s) as p:
        t0 = time.perf_counter()
        sent = await p.send_batch(s.requests_topic, msgs)
        produce_s = time.perf_counter() - t0
    assert len({(x.partition, x.offset) for x in sent}) == n
    got: list[Envelope[AgentRequest]] = []
    async with consumer(s, s.requests_topic, "g-batch", message_type=AgentRequest) as c:
        t0 = time.perf_counter()
        while len(got) < n:
            batch = await asyncio.wait_for(c.getmany(timeout_ms=500, max_records=1000), 30)
            got += batch
            await c.commit(batch)
        consume_s = time.perf_counter() - t0
    assert sorted(e.msg.request_id for e in got) == sorted(k for k, _ in msgs)
    print(f"\nproduce {n / produce_s:,.0f} msg/s, consume {n / consume_s:,.0f} msg/s")
    # same key, same partition: per-request ordering holds
    by_key = {e.key_str: e.partition for e in got}
    assert all(by_key[x] == y.partition for x, y in zip((k for k, _ in msgs), sent, strict=True))


async def test_unreachable_broker_maps_to_broker_unavailable() -> None:
    from goodserve.broker.apache import free_port

    s = Settings(bootstrap_servers=f"127.0.0.1:{free_port()}", request_timeout_ms=2000)
    with pytest.raises(BrokerUnavailable) as ei:
        async with TypedProducer(settings=s):
            pass
    assert ei.value.retriable and isinstance(ei.value, TransportError)
    with pytest.raises(BrokerUnavailable):
        await ensure_topics(s)


async def test_constructors_validate_before_io(kafka_settings: Settings) -> None:
    with pytest.raises(ConfigError):
        TypedProducer(settings=kafka_settings.replace(acks="1"))
    with pytest.raises(ConfigError):
        no_idem = kafka_settings.replace(idempotent_producer=False)
        TypedProducer(settings=no_idem, transactional_id="x")
    with pytest.raises(ConfigError):
        TypedConsumer(settings=kafka_settings, topics=[], group_id="g", service="s")
    with pytest.raises(ConfigError):
        TypedConsumer(settings=kafka_settings, topics=["t"], group_id="g", service="")
    p = TypedProducer(settings=kafka_settings)
    with pytest.raises(TransportError):
        await p.send("t", AgentRequest(request_id="x"))
    await p.stop()  # idempotent, even unstarted
    with pytest.raises(ConfigError):
        async with TypedProducer(settings=kafka_settings) as p2, p2.transaction():
            pass


@pytest.mark.slow
async def test_commits_and_data_survive_broker_restart(
    kafka_broker_factory: Callable[..., ApacheKafkaBroker],
) -> None:
    broker = kafka_broker_factory()
    s = Settings(bootstrap_servers=broker.bootstrap_servers, topic_prefix="restart", partitions=1)
    await ensure_topics(s, [s.requests_topic])
    async with TypedProducer(settings=s) as p:
        await p.send_batch(
            s.requests_topic, [(None, AgentRequest(request_id=f"r{i}")) for i in range(10)]
        )
    async with consumer(s, s.requests_topic, "g") as c:
        first = await take(c, 4)
    t0 = time.monotonic()
    await asyncio.to_thread(broker.restart, kill=True)
    print(f"\nbroker restart after kill: {time.monotonic() - t0:.1f}s")
    assert broker.bootstrap_servers == s.bootstrap_servers
    async with consumer(s, s.requests_topic, "g") as c:
        rest = await drain(c)
    print(f"consumed after restart: {time.monotonic() - t0:.1f}s")
    assert [e.offset for e in first] == [0, 1, 2, 3]
    assert [e.offset for e in rest] == list(range(4, 10))
    assert [e.msg.request_id for e in rest] == [f"r{i}" for i in range(4, 10)]


@pytest.mark.slow
async def test_sasl_plain_listener(
    kafka_broker_factory: Callable[..., ApacheKafkaBroker],
) -> None:
    """SASL settings reach the broker: right password works, a wrong one is refused."""
    from goodserve.broker.apache import Listener

    jaas = (
        "org.apache.kafka.common.security.plain.PlainLoginModule required "
        'username="admin" password="admin-pw" user_admin="admin-pw" user_alice="alice-pw";'
    )
    broker = kafka_broker_factory(
        extra_listeners=[Listener("SASL", "SASL_PLAINTEXT")],
        extra_config={
            "sasl.enabled.mechanisms": "PLAIN",
            "listener.name.sasl.plain.sasl.jaas.config": jaas,
        },
    )
    s = Settings(
        bootstrap_servers=broker.listener_address("SASL"),
        topic_prefix="sasl",
        partitions=1,
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="PLAIN",
        sasl_username="alice",
        sasl_password="alice-pw",
        request_timeout_ms=5000,
    )
    await ensure_topics(s, [s.requests_topic])
    async with TypedProducer(settings=s) as p:
        await p.send(s.requests_topic, AgentRequest(request_id="secure"))
    async with consumer(s, s.requests_topic, None) as c:
        (env,) = await take(c, 1)
    assert env.msg.request_id == "secure"
    with pytest.raises(TransportError) as ei:
        async with TypedProducer(settings=s.replace(sasl_password="wrong")):
            pass
    assert "wrong" not in str(ei.value)


async def test_pattern_subscription_and_graceful_stop(kafka_settings: Settings) -> None:
    """A regex reads every instance topic; stop() from another task lets the handler finish."""
    import re

    s = kafka_settings
    topics = [s.instance_topic(i) for i in ("h100-0", "a100-0")]
    await ensure_topics(s, [TopicSpec(t, 1) for t in topics])
    async with TypedProducer(settings=s) as p:
        for t in topics:
            for i in range(3):
                await p.send(t, AgentRequest(request_id=f"{t}-{i}"))
    pattern = re.compile(re.escape(s.topic("instance.")) + ".*")
    c = TypedConsumer(settings=s, topics=pattern, group_id="g-pat", service="test")
    await c.start()
    handled: list[str] = []
    first = asyncio.Event()

    async def handler() -> None:
        async for env in c:
            first.set()
            await asyncio.sleep(0.3)  # slow processing: stop() must wait for it
            handled.append(env.msg.request_id)
            await c.commit(env)

    task = asyncio.create_task(handler())
    await asyncio.wait_for(first.wait(), 30)
    await c.stop(drain_timeout_s=5)
    await asyncio.wait_for(task, 5)
    assert handled, "the in-flight record was not finished"
    committed = sum(c.committed_offsets().values())
    assert committed == len(handled)
    await c.stop()  # idempotent
    async with TypedConsumer(settings=s, topics=pattern, group_id="g-pat", service="t") as c2:
        rest = await drain(c2)
    assert sorted(handled + [e.msg.request_id for e in rest]) == sorted(
        f"{t}-{i}" for t in topics for i in range(3)
    )
