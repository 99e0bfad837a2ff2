"""TypedConsumer: decoded messages with manual commits; bad records go to dead letters.

Offsets are committed only by the caller (``await consumer.commit(env)``) after it has
processed a record, so a crash re-delivers unfinished work (at-least-once). A record that
cannot be decoded (malformed bytes, unknown schema version, unexpected kind) is logged,
produced to the dead-letters topic with its original bytes, and committed past as soon as
no earlier record of its partition is still being processed; consumption continues.
"""

from __future__ import annotations

import asyncio
import re
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, Self, TypeVar, cast

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener
from aiokafka.errors import ConsumerStoppedError
from aiokafka.structs import ConsumerRecord, TopicPartition

from goodserve.config import Settings
from goodserve.errors import ConfigError, MalformedMessage, SchemaError, TransportError
from goodserve.lifecycle import AsyncService
from goodserve.logging import get_logger
from goodserve.schemas import Message, decode, type_name

from .deadletter import DeadLetterSink
from .kafka import kafka_client_kwargs, kafka_errors

log = get_logger(__name__)

M = TypeVar("M", bound=Message)

BULK_FETCH_MAX_WAIT_MS = 20
BULK_FETCH_MIN_BYTES = 64 * 1024
"""Fetch settings of consumers off the dispatch path (results, fleet state): at most ~50
fetches/s each at any rate, a record at most 20 ms later than with the defaults."""


@dataclass(frozen=True, slots=True)
class Envelope(Generic[M]):
    """A decoded message and where it came from."""

    msg: M
    topic: str
    partition: int
    offset: int
    key: bytes | None
    timestamp: float
    """Record timestamp, Unix seconds."""
    raw: bytes = field(repr=False, default=b"")
    """The original bytes (for dead-lettering a message that fails later in processing)."""

    @property
    def key_str(self) -> str | None:
        return None if self.key is None else self.key.decode(errors="replace")


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, owner: TypedConsumer[Any]) -> None:
        self._owner = owner

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self._owner._on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        log.debug("consumer.assigned", partitions=len(assigned), group=self._owner.group_id)


class TypedConsumer(Generic[M], AsyncService):
    """Async iterator of ``Envelope``s from topics (or a regex pattern) of one group.

    ``dead_letters=None`` makes the consumer own a sink built from ``settings``; pass a
    shared ``DeadLetterSink`` to reuse a service's producer. Without a ``group_id`` the
    consumer reads every partition and ``commit`` is a no-op (tools, tails, replays).

    ``on_revoke(partitions)``: awaited when the group takes partitions away, before their
    state is forgotten: the place to finish and commit work from them (Kafka's
    ``onPartitionsRevoked``), so that the next owner starts where this one stopped.

    ``fetch_max_wait_ms`` / ``fetch_min_bytes`` (Kafka's fetch.max.wait.ms / fetch.min.bytes):
    the defaults (500 ms, 1 byte) answer a fetch as soon as one record is there, which is
    what a latency-critical hop wants. A consumer off the critical path at high rates
    (results, fleet state) can trade a bounded delay for far fewer fetches: e.g. 64 KiB
    and 20 ms answer at most 50 fetches/s whatever the rate, each at most 20 ms late.
    """

    def __init__(
        self,
        *,
        settings: Settings,
        topics: Sequence[str] | str | re.Pattern[str],
        group_id: str | None,
        service: str,
        message_type: type[M] | None = None,
        dead_letters: DeadLetterSink | None = None,
        auto_offset_reset: Literal["earliest", "latest"] = "earliest",
        isolation_level: Literal["read_committed", "read_uncommitted"] = "read_committed",
        client_id: str | None = None,
        max_poll_records: int = 500,
        poll_timeout_ms: int = 200,
        session_timeout_ms: int | None = None,
        heartbeat_interval_ms: int | None = None,
        fetch_max_wait_ms: int = 500,
        fetch_min_bytes: int = 1,
        on_revoke: Callable[[frozenset[tuple[str, int]]], Awaitable[None]] | None = None,
    ) -> None:
        if not service:
            raise ConfigError("service must name the consuming component")
        self._pattern: str | None = None
        self._topics: list[str] = []
        if isinstance(topics, re.Pattern):
            self._pattern = topics.pattern
        elif isinstance(topics, str):
            self._topics = [topics]
        else:
            self._topics = list(topics)
            if not self._topics or not all(isinstance(t, str) and t for t in self._topics):
                raise ConfigError(f"topics must be non-empty names, got {topics!r}")
        if auto_offset_reset not in ("earliest", "latest"):
            raise ConfigError(f"auto_offset_reset must be earliest|latest: {auto_offset_reset}")
        if max_poll_records < 1 or poll_timeout_ms < 1:
            raise ConfigError("max_poll_records and poll_timeout_ms must be >= 1")
        if fetch_max_wait_ms < 0 or fetch_min_bytes < 1:
            raise ConfigError("fetch_max_wait_ms must be >= 0 and fetch_min_bytes >= 1")
        self.settings = settings
        self.group_id = group_id
        self.service = service
        self.message_type = message_type
        self.max_poll_records = max_poll_records
        self.poll_timeout_ms = poll_timeout_ms
        self._own_sink = dead_letters is None
        self.dead_letters = dead_letters or DeadLetterSink(settings=settings, service=service)
        kw = kafka_client_kwargs(
            settings, role="consumer", client_id=client_id or f"{settings.client_id}-{service}"
        )
        kw.update(
            group_id=group_id,
            enable_auto_commit=False,
            auto_offset_reset=auto_offset_reset,
            isolation_level=isolation_level,
            max_poll_records=max_poll_records,
            session_timeout_ms=session_timeout_ms or settings.session_timeout_ms,
            heartbeat_interval_ms=heartbeat_interval_ms or settings.heartbeat_interval_ms,
            fetch_max_wait_ms=fetch_max_wait_ms,
            fetch_min_bytes=fetch_min_bytes,
        )
        self._kwargs = kw
        self._consumer: AIOKafkaConsumer | None = None
        self._buffer: deque[ConsumerRecord[bytes, bytes]] = deque()
        self._last_yielded: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int] = {}
        self._dl_floor: dict[TopicPartition, int] = {}
        self._drained = asyncio.Event()
        self._drained.set()
        self._closing = False
        self.dead_lettered = 0
        self._on_revoke = on_revoke

    # --- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        if self._consumer is not None:
            return
        self._closing = False
        await self.dead_letters.start()
        consumer = AIOKafkaConsumer(**self._kwargs)
        listener = _Rebalance(self)
        try:
            with kafka_errors(f"start consumer ({self.settings.bootstrap_servers})"):
                if self._pattern is not None:
                    consumer.subscribe(pattern=self._pattern, listener=listener)
                else:
                    consumer.subscribe(topics=self._topics, listener=listener)
                await consumer.start()
        except BaseException:
            await consumer.stop()
            raise
        self._consumer = consumer
        log.debug("consumer.started", service=self.service, group=self.group_id)

    async def stop(self, *, drain_timeout_s: float = 5.0) -> None:
        """Stop handing out records, wait for handed-out ones to be committed, close.

        Idempotent. Records handed out but not committed within ``drain_timeout_s`` are
        not committed: the group re-delivers them.
        """
        consumer = self._consumer
        if consumer is None:
            return
        self._closing = True
        if not self._drained.is_set():
            try:
                await asyncio.wait_for(self._drained.wait(), drain_timeout_s)
            except TimeoutError:
                log.warning("consumer.drain_timeout", service=self.service)
        try:
            await self._flush_floors()
        except TransportError as e:
            log.warning("consumer.final_commit_failed", error=str(e))
        self._consumer = None
        self._buffer.clear()
        with kafka_errors("stop consumer"):
            await consumer.stop()
        if self._own_sink:
            await self.dead_letters.stop()
        log.debug("consumer.stopped", service=self.service, dead_lettered=self.dead_lettered)

    def _c(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            raise TransportError("consumer not started (call start() or use async with)")
        return self._consumer

    # --- reading ---------------------------------------------------------------------------
    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Envelope[M]:
        while not self._closing:
            while self._buffer:
                env = await self._take_next()
                if env is not None:
                    return env
            if self._consumer is None:
                break
            records = await self._fetch(self.poll_timeout_ms, self.max_poll_records)
            self._buffer.extend(records)
        raise StopAsyncIteration

    async def getmany(
        self, *, timeout_ms: int | None = None, max_records: int | None = None
    ) -> list[Envelope[M]]:
        """One poll: up to ``max_records`` decoded envelopes (bad ones dead-lettered)."""
        limit = max_records or self.max_poll_records
        out: list[Envelope[M]] = []
        if not self._buffer and not self._closing:
            # fetch first, then look _buffer up: a rebalance during the fetch filters it
            records = await self._fetch(timeout_ms or self.poll_timeout_ms, limit)
            self._buffer.extend(records)
        while self._buffer and len(out) < limit:
            env = await self._take_next()
            if env is not None:
                out.append(env)
        await self._flush_floors()
        return out

    async def _fetch(self, timeout_ms: int, max_records: int) -> list[ConsumerRecord[Any, Any]]:
        await self._flush_floors()
        consumer = self._c()
        try:
            with kafka_errors("poll"):
                batch = await consumer.getmany(timeout_ms=timeout_ms, max_records=max_records)
        except TransportError as e:
            if isinstance(e.__cause__, ConsumerStoppedError):
                return []
            raise
        return [r for recs in batch.values() for r in recs]

    def _decode(self, rec: ConsumerRecord[Any, Any]) -> M:
        if rec.value is None:
            raise MalformedMessage("empty record (tombstone) where a message was expected")
        msg = decode(rec.value)
        if self.message_type is not None and not isinstance(msg, self.message_type):
            raise MalformedMessage(
                f"expected {self.message_type.__name__}, got kind {type_name(msg)!r}",
                code="wrong_kind",
            )
        return cast(M, msg)

    async def _take_next(self) -> Envelope[M] | None:
        """Decode the next buffered record; if dead-lettering it fails, keep it for a retry."""
        rec = self._buffer.popleft()
        try:
            return await self._take(rec)
        except BaseException:
            self._buffer.appendleft(rec)
            raise

    async def _take(self, rec: ConsumerRecord[Any, Any]) -> Envelope[M] | None:
        tp = TopicPartition(rec.topic, rec.partition)
        try:
            msg = self._decode(rec)
        except SchemaError as e:
            await self._dead_letter_record(rec, e)
            if self.group_id is not None:
                self._dl_floor[tp] = rec.offset + 1
            return None
        if self.group_id is not None:
            self._last_yielded[tp] = rec.offset
            self._drained.clear()
        return Envelope(
            msg=msg,
            topic=rec.topic,
            partition=rec.partition,
            offset=rec.offset,
            key=rec.key,
            timestamp=rec.timestamp / 1000.0,
            raw=rec.value,
        )

    async def _dead_letter_record(self, rec: ConsumerRecord[Any, Any], err: Exception) -> None:
        log.warning(
            "consumer.bad_record",
            service=self.service,
            topic=rec.topic,
            partition=rec.partition,
            offset=rec.offset,
            error_code=getattr(err, "code", type(err).__name__),
            error=str(err)[:200],
        )
        await self.dead_letters.send_error(
            topic=rec.topic,
            partition=rec.partition,
            offset=rec.offset,
            key=rec.key,
            payload=rec.value,
            error=err,
        )
        self.dead_lettered += 1

    async def dead_letter(self, env: Envelope[Any], error: BaseException) -> None:
        """Dead-letter a record that decoded but cannot be processed (caller still commits)."""
        await self.dead_letters.send_error(
            topic=env.topic,
            partition=env.partition,
            offset=env.offset,
            key=env.key,
            payload=env.raw,
            error=error,
        )
        self.dead_lettered += 1

    # --- committing ------------------------------------------------------------------------
    async def commit(self, envs: Envelope[Any] | Sequence[Envelope[Any]] | None = None) -> None:
        """Commit past the given envelope(s) (per partition: the highest); None: all handed out.

        A no-op without a group. Dead-lettered records right after a committed envelope are
        committed past too.
        """
        if self.group_id is None:
            return
        if envs is None:
            targets = {tp: off for tp, off in self._last_yielded.items()}
        else:
            items = [envs] if isinstance(envs, Envelope) else list(envs)
            targets = {}
            for e in items:
                tp = TopicPartition(e.topic, e.partition)
                targets[tp] = max(targets.get(tp, -1), e.offset)
        offsets: dict[TopicPartition, int] = {}
        for tp, off in targets.items():
            nxt = off + 1
            if self._last_yielded.get(tp) == off:
                nxt = max(nxt, self._dl_floor.get(tp, 0))
            if nxt > self._committed.get(tp, -1):
                offsets[tp] = nxt
        await self._commit_offsets(offsets)

    async def _flush_floors(self) -> None:
        """Commit past dead-lettered records where nothing handed out before them is pending."""
        if self.group_id is None or self._consumer is None or not self._dl_floor:
            return
        offsets: dict[TopicPartition, int] = {}
        for tp, floor in self._dl_floor.items():
            last = self._last_yielded.get(tp)
            done = last is None or self._committed.get(tp, -1) > last
            if done and floor > self._committed.get(tp, -1):
                offsets[tp] = floor
        await self._commit_offsets(offsets)

    async def _commit_offsets(self, offsets: dict[TopicPartition, int]) -> None:
        if offsets:
            with kafka_errors("commit"):
                await self._c().commit(offsets)
            for tp, off in offsets.items():
                self._committed[tp] = off
                if self._dl_floor.get(tp, 0) <= off:
                    self._dl_floor.pop(tp, None)
        if all(self._committed.get(tp, -1) > last for tp, last in self._last_yielded.items()):
            self._drained.set()

    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        """Before partitions move: let the owner finish and commit what it handed out
        (``on_revoke``), commit safe dead-letter floors, forget their state."""
        if self._on_revoke is not None and revoked:
            try:
                await self._on_revoke(frozenset((tp.topic, tp.partition) for tp in revoked))
            except Exception:  # the group must move on; the next owner re-reads the rest
                log.exception("consumer.on_revoke_failed", service=self.service)
        try:
            await self._flush_floors()
        except TransportError as e:
            log.warning("consumer.commit_on_revoke_failed", error=str(e))
        self._drop_buffered(lambda r: TopicPartition(r.topic, r.partition) in revoked)
        for tp in revoked:
            self._last_yielded.pop(tp, None)
            self._committed.pop(tp, None)
            self._dl_floor.pop(tp, None)
        if not self._last_yielded:
            self._drained.set()

    def _drop_buffered(self, drop: Callable[[ConsumerRecord[Any, Any]], bool]) -> None:
        """Forget buffered records ``drop`` picks. In place: a poll in progress appends what
        it fetched to this very deque (rebinding it once lost such records: never handed
        out, their offsets passed by the next commit)."""
        kept = [r for r in self._buffer if not drop(r)]
        self._buffer.clear()
        self._buffer.extend(kept)

    async def rewind(self, topics: Collection[str] | None = None) -> None:
        """Forget what was handed out but not committed and read it again from the committed
        offsets (after a batch whose outputs could not be produced: nothing is skipped).

        ``topics``: only these topics' partitions (records of others stay buffered)."""
        if self.group_id is None:
            return
        consumer = self._c()
        tps = [tp for tp in consumer.assignment() if topics is None or tp.topic in topics]
        if topics is None:
            self._buffer.clear()
            self._last_yielded.clear()
        else:
            self._drop_buffered(lambda r: r.topic in topics)
            for tp in tps:
                self._last_yielded.pop(tp, None)
        if all(self._committed.get(tp, -1) > last for tp, last in self._last_yielded.items()):
            self._drained.set()
        with kafka_errors("rewind to committed offsets"):
            for tp in tps:
                off = await consumer.committed(tp)
                if off is None or off < 0:
                    await consumer.seek_to_beginning(tp)
                else:
                    consumer.seek(tp, off)
        if topics is None:
            log.warning("consumer.rewound", service=self.service)
        else:  # one reader of a shared consumer stopped: routine
            log.info("consumer.rewound", service=self.service, topics=sorted(topics))

    def pause(self, topics: Collection[str]) -> None:
        """Stop fetching these topics' partitions (records already fetched still come)."""
        c = self._c()
        c.pause(*(tp for tp in c.assignment() if tp.topic in topics))

    def resume(self, topics: Collection[str]) -> None:
        """Fetch these topics' partitions again (see ``pause``)."""
        c = self._c()
        c.resume(*(tp for tp in c.assignment() if tp.topic in topics))

    def paused(self) -> frozenset[str]:
        """Topics with a paused partition (a rebalance resumes them all)."""
        c = self._consumer
        return frozenset(tp.topic for tp in c.paused()) if c is not None else frozenset()

    def assigned(self) -> frozenset[tuple[str, int]]:
        """The (topic, partition)s this consumer owns now (none before start)."""
        c = self._consumer
        if c is None:
            return frozenset()
        return frozenset((tp.topic, tp.partition) for tp in c.assignment())

    def committed_offsets(self) -> dict[tuple[str, int], int]:
        """What this consumer committed so far ((topic, partition) -> next offset)."""
        return {(tp.topic, tp.partition): o for tp, o in self._committed.items()}
