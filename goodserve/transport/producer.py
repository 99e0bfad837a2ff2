"""TypedProducer: messages in, JSON records out, with delivery reports mapped to our errors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import Any, NamedTuple, Self, TypeVar

from aiokafka import AIOKafkaProducer
from aiokafka.structs import TopicPartition

from goodserve.config import Settings
from goodserve.errors import ConfigError, RecordTooLarge, TransportError
from goodserve.lifecycle import AsyncService
from goodserve.logging import get_logger
from goodserve.schemas import Message, encode, type_name

from .kafka import kafka_client_kwargs, kafka_errors, map_kafka_error

log = get_logger(__name__)

Key = str | bytes | None


class Sent(NamedTuple):
    """Where a record landed (our own type, so aiokafka's never leaks to callers)."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int


M = TypeVar("M")
R = TypeVar("R")


async def send_fitting(
    send: Callable[[M], Awaitable[R]], msg: M, smaller: Callable[[M, RecordTooLarge], M | None]
) -> tuple[R, M]:
    """``send(msg)``; while its record is too large for the producer or the broker
    (``RecordTooLarge``), send what ``smaller(msg, error)`` makes of it instead, and
    re-raise where that is None (nothing left to take out). Returns what ``send`` returned
    and the message that went: a checkpoint without its progress, a Result without its
    token ids, a decision without the instances' views."""
    while True:
        try:
            return await send(msg), msg
        except RecordTooLarge as e:
            less = smaller(msg, e)
            if less is None:
                raise
            msg = less


def _key_bytes(key: Key) -> bytes | None:
    return key.encode() if isinstance(key, str) else key


def _headers(msg: Message) -> list[tuple[str, bytes]]:
    """Kind and version as record headers: routers/tools can filter without decoding."""
    return [("kind", type_name(msg).encode()), ("v", str(msg.v).encode())]


def retrieve_outcome(fut: asyncio.Future[Any]) -> None:
    """Done-callback for a future nobody may await: mark its exception retrieved (no
    'exception was never retrieved' warnings)."""
    if not fut.cancelled():
        fut.exception()


class Delivery:
    """An enqueued record; ``await`` it for its ``Sent`` (errors arrive as TransportError)."""

    __slots__ = ("_fut", "_topic")

    def __init__(self, fut: asyncio.Future[Any], topic: str) -> None:
        self._fut = fut
        self._topic = topic

    def __await__(self) -> Generator[Any, None, Sent]:
        return self._wait().__await__()

    def done(self) -> bool:
        """Acknowledged or failed (awaiting it then does not wait)."""
        return self._fut.done()

    def discard(self) -> None:
        """Nobody will await this delivery: retrieve its outcome when it comes (no
        'exception was never retrieved' warnings for a batch given up on)."""
        self._fut.add_done_callback(retrieve_outcome)

    async def _wait(self) -> Sent:
        try:
            md = await self._fut
        except Exception as e:
            raise map_kafka_error(e, f"deliver to {self._topic}") from e
        return Sent(md.topic, md.partition, md.offset, md.timestamp)


class TypedProducer(AsyncService):
    """Produces GoodServe messages; idempotent (and optionally transactional) per settings.

    ``send`` waits for the broker's ack; ``send_nowait`` only enqueues (aiokafka batches
    records per partition for ``linger_ms``), returning a ``Delivery`` to await later;
    ``send_batch`` enqueues many and waits for all of them.
    """

    def __init__(
        self,
        *,
        settings: Settings,
        client_id: str | None = None,
        transactional_id: str | None = None,
        linger_ms: int = 2,
        max_batch_size: int = 256 * 1024,
        compression_type: str | None = None,
    ) -> None:
        if transactional_id is not None and not settings.idempotent_producer:
            raise ConfigError("a transactional producer needs idempotent_producer=True")
        if settings.idempotent_producer and settings.acks != "all":
            raise ConfigError(f"idempotent_producer needs acks='all', got {settings.acks!r}")
        if linger_ms < 0 or max_batch_size < 1024:
            raise ConfigError("linger_ms must be >= 0 and max_batch_size >= 1024")
        self.settings = settings
        self.transactional_id = transactional_id
        acks: str | int = "all" if settings.acks == "all" else int(settings.acks)
        self._kwargs: dict[str, Any] = kafka_client_kwargs(
            settings, role="producer", client_id=client_id
        )
        self._kwargs.update(
            acks=acks,
            enable_idempotence=settings.idempotent_producer,
            linger_ms=linger_ms,
            max_batch_size=max_batch_size,
            compression_type=compression_type,
        )
        if transactional_id is not None:
            self._kwargs["transactional_id"] = transactional_id
        self._producer: AIOKafkaProducer | None = None

    @property
    def idempotent(self) -> bool:
        return bool(self._kwargs["enable_idempotence"])

    @property
    def started(self) -> bool:
        return self._producer is not None

    def _p(self) -> AIOKafkaProducer:
        if self._producer is None:
            raise TransportError("producer not started (call start() or use async with)")
        return self._producer

    async def start(self) -> None:
        if self._producer is not None:
            return
        producer = AIOKafkaProducer(**self._kwargs)
        try:
            with kafka_errors(f"start producer ({self.settings.bootstrap_servers})"):
                await producer.start()
        except BaseException:
            await producer.stop()
            raise
        self._producer = producer
        log.debug(
            "producer.started",
            client_id=self._kwargs["client_id"],
            transactional=self.transactional_id is not None,
        )

    async def stop(self) -> None:
        """Flush what is enqueued and close; safe to call twice."""
        producer, self._producer = self._producer, None
        if producer is not None:
            with kafka_errors("stop producer"):
                await producer.stop()

    # --- sending ---------------------------------------------------------------------------
    async def send_nowait(
        self,
        topic: str,
        msg: Message,
        *,
        key: Key = None,
        partition: int | None = None,
    ) -> Delivery:
        """Enqueue one record (waits only when the buffer is full); await the result later."""
        with kafka_errors(f"send to {topic}"):
            fut = await self._p().send(
                topic,
                encode(msg),
                key=_key_bytes(key),
                partition=partition,
                headers=_headers(msg),
            )
        return Delivery(fut, topic)

    async def send(
        self, topic: str, msg: Message, *, key: Key = None, partition: int | None = None
    ) -> Sent:
        """Produce one record and wait until the broker acknowledged it."""
        return await (await self.send_nowait(topic, msg, key=key, partition=partition))

    async def send_raw(self, topic: str, value: bytes | None, *, key: Key = None) -> Sent:
        """Produce bytes as they are (tools and tests; services send Messages)."""
        with kafka_errors(f"send to {topic}"):
            fut = await self._p().send(topic, value, key=_key_bytes(key))
        return await Delivery(fut, topic)

    async def send_batch(self, topic: str, items: Iterable[tuple[Key, Message]]) -> list[Sent]:
        """Enqueue every (key, message) and wait for all acks (the fast path for bulk loads)."""
        deliveries = [await self.send_nowait(topic, m, key=k) for k, m in items]
        return [await d for d in deliveries]

    async def flush(self) -> None:
        with kafka_errors("flush"):
            await self._p().flush()

    # --- transactions ----------------------------------------------------------------------
    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Self]:
        """Everything sent inside commits atomically, or aborts if the block raises."""
        if self.transactional_id is None:
            raise ConfigError("transaction() needs a producer built with transactional_id")
        p = self._p()
        with kafka_errors("begin transaction"):
            await p.begin_transaction()
        try:
            yield self
        except BaseException:
            with kafka_errors("abort transaction"):
                await p.abort_transaction()
            raise
        with kafka_errors("commit transaction"):
            await p.commit_transaction()

    async def send_offsets_to_transaction(
        self, offsets: Mapping[tuple[str, int], int], group_id: str
    ) -> None:
        """Commit consumer offsets ((topic, partition) -> next offset) inside the transaction."""
        tp_offsets = {TopicPartition(t, p): o for (t, p), o in offsets.items()}
        with kafka_errors("send offsets to transaction"):
            await self._p().send_offsets_to_transaction(tp_offsets, group_id)
