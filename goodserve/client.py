"""GoodServeClient: submit AgentRequests to Kafka and await their Results, from asyncio.

    async with GoodServeClient(settings=Settings(bootstrap_servers="kafka:9092")) as c:
        res = await c.request(AgentRequest(request_id="r1", prompt="hi", slo_s=5), timeout=30)

One background task reads the results topic from its end (positions are fixed in
``start()``, so a Result produced after ``start()`` returns is never missed) and hands each
Result to whoever awaits its request id, to the ``results()`` streams, and to a bounded
buffer (so ``result()`` called after the Result arrived still finds it). Results are
de-duplicated by request id here at the edge: the pipeline is at-least-once.

By default the reader uses no consumer group: it is assigned every partition and commits
nothing (a client wants the Results of its own requests from now on, not a share of the
topic). Pass ``group_id`` to read as a member of a group instead; then it only sees the
partitions the group gives it. ``results_topic`` other than the shared one is stamped as
``reply_to`` on submitted requests, so workers answer there.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator

import msgspec

from goodserve.config import Settings
from goodserve.errors import ConfigError, GoodServeError, TransportError
from goodserve.lifecycle import AsyncService
from goodserve.logging import get_logger
from goodserve.schemas import AgentRequest, Result
from goodserve.transport import (
    BULK_FETCH_MAX_WAIT_MS,
    BULK_FETCH_MIN_BYTES,
    TypedConsumer,
    TypedProducer,
    ensure_topics,
)

__all__ = ["GoodServeClient", "ResultTimeout"]

log = get_logger(__name__)


class ResultTimeout(GoodServeError, TimeoutError):
    """No Result arrived for a request within the timeout (the request may still finish)."""

    code = "timeout"
    retriable = True


class GoodServeClient(AsyncService):
    """Async client: ``submit``, ``result``, ``request`` (both) and a ``results()`` stream."""

    def __init__(
        self,
        *,
        settings: Settings,
        results_topic: str | None = None,
        group_id: str | None = None,
        max_buffered: int = 100_000,
        linger_ms: int = 0,
    ) -> None:
        if not isinstance(settings, Settings):
            raise ConfigError("settings must be a goodserve.config.Settings")
        if results_topic is not None and not results_topic.strip():
            raise ConfigError("results_topic must be a non-empty name or None")
        if group_id is not None and not group_id.strip():
            raise ConfigError("group_id must be a non-empty name or None")
        if max_buffered < 1:
            raise ConfigError("max_buffered must be >= 1")
        if not 0 <= linger_ms <= 1000:
            raise ConfigError(f"linger_ms must be in [0, 1000], got {linger_ms}")
        self.settings = settings
        self.results_topic = results_topic or settings.results_topic
        self.group_id = group_id
        self.max_buffered = max_buffered
        self.linger_ms = linger_ms
        """How long a request waits for others to share its produce request. 0 (default):
        an agent waits on every request; records enqueued while a produce is in flight
        still leave together. A load generator or batch pipeline at hundreds per second
        spends a few ms here for far fewer Kafka requests (and less broker CPU)."""
        self._producer: TypedProducer | None = None
        self._consumer: TypedConsumer[Result] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._waiters: dict[str, asyncio.Future[Result]] = {}
        self._buffer: OrderedDict[str, Result] = OrderedDict()
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._streams: set[asyncio.Queue[Result | BaseException]] = set()
        self._failed: BaseException | None = None
        self.duplicates = 0
        self.submitted = 0

    # --- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Create missing topics, connect, and pin the reader to the results topic's end."""
        if self._reader is not None:
            return
        await ensure_topics(self.settings, [self.settings.requests_topic, self.results_topic])
        producer = TypedProducer(
            settings=self.settings,
            client_id=f"{self.settings.client_id}-client",
            linger_ms=self.linger_ms,
        )
        consumer: TypedConsumer[Result] = TypedConsumer(
            settings=self.settings,
            topics=self.results_topic,
            group_id=self.group_id,
            service="client",
            message_type=Result,
            auto_offset_reset="latest",
            # results are off the dispatch path: fewer, fuller fetches (<= 20 ms later)
            fetch_max_wait_ms=BULK_FETCH_MAX_WAIT_MS,
            fetch_min_bytes=BULK_FETCH_MIN_BYTES,
        )
        try:
            await producer.start()
            await consumer.start()
            await self._pin_to_end(consumer)
        except BaseException:
            await consumer.stop()
            await producer.stop()
            raise
        self._producer, self._consumer = producer, consumer
        self._failed = None
        self._reader = asyncio.create_task(self._read(), name="goodserve-client-results")

    @staticmethod
    async def _pin_to_end(consumer: TypedConsumer[Result], timeout_s: float = 30.0) -> None:
        """Resolve every partition's position now ('latest'), not lazily at the first fetch.

        The transport has no position API, so this reaches the aiokafka consumer inside
        ``TypedConsumer`` (its ``_c()`` accessor).
        """
        raw = consumer._c()
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout_s
        while not raw.assignment():
            if loop.time() > end:
                raise TransportError(f"no partitions assigned for {consumer.service} results")
            await asyncio.sleep(0.02)
        for tp in raw.assignment():
            await raw.position(tp)

    async def stop(self) -> None:
        """Stop reading; pending ``result()`` calls fail with TransportError. Idempotent."""
        reader, self._reader = self._reader, None
        if reader is None:
            return
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        self._fail_all(TransportError("client stopped"))
        consumer, producer = self._consumer, self._producer
        self._consumer = self._producer = None
        with contextlib.suppress(GoodServeError):
            if consumer is not None:
                await consumer.stop()
        with contextlib.suppress(GoodServeError):
            if producer is not None:
                await producer.stop()

    # --- sending -------------------------------------------------------------------------------
    async def submit(self, req: AgentRequest) -> AgentRequest:
        """Produce a request (arrival stamped if missing; reply_to set for a private topic).

        Returns the request as sent. Awaits the broker's ack.
        """
        if self._producer is None:
            raise TransportError("client not started (call start() or use async with)")
        changes: dict[str, object] = {}
        if req.arrival is None:
            changes["arrival"] = time.time()
        if req.reply_to is None and self.results_topic != self.settings.results_topic:
            changes["reply_to"] = self.results_topic
        if changes:
            req = msgspec.structs.replace(req, **changes)
        await self._producer.send(
            self.settings.requests_topic, req, key=req.workflow_id or req.request_id
        )
        self.submitted += 1
        return req

    async def result(
        self,
        request_id: str,
        timeout: float | None = 60.0,  # noqa: ASYNC109 - the documented API
    ) -> Result:
        """The Result of a request (raises ResultTimeout after ``timeout`` seconds)."""
        got = self._buffer.get(request_id)
        if got is not None:
            return got
        if self._failed is not None:
            raise TransportError(f"results reader failed: {self._failed}")
        if self._reader is None:
            raise TransportError("client not started (call start() or use async with)")
        fut = self._waiters.get(request_id)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            self._waiters[request_id] = fut
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError:
            raise ResultTimeout(f"no result for {request_id!r} within {timeout}s") from None

    async def request(
        self,
        req: AgentRequest,
        timeout: float | None = 60.0,  # noqa: ASYNC109 - the documented API
    ) -> Result:
        """Submit and await the Result."""
        if self._reader is None:
            raise TransportError("client not started (call start() or use async with)")
        await self.submit(req)
        return await self.result(req.request_id, timeout=timeout)

    async def results(self) -> AsyncGenerator[Result, None]:
        """Every de-duplicated Result that arrives from now on (all requests, not only ours)."""
        q: asyncio.Queue[Result | BaseException] = asyncio.Queue()
        self._streams.add(q)
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    if isinstance(item, TransportError) and self._reader is None:
                        return  # stopped: end of stream
                    raise item
                yield item
        finally:
            self._streams.discard(q)

    # --- the reader ------------------------------------------------------------------------------
    async def _read(self) -> None:
        assert self._consumer is not None
        while True:
            try:
                async for env in self._consumer:
                    self._deliver(env.msg)
                return
            except asyncio.CancelledError:
                raise
            except GoodServeError as e:
                if e.retriable:  # a broker restart: keep reading once it is back
                    log.warning("client.reader_retry", error_code=e.code, error=str(e))
                    await asyncio.sleep(0.5)
                    continue
                log.error("client.reader_failed", error_code=e.code, error=str(e))
                self._failed = e
                self._fail_all(e)
                return

    def _deliver(self, res: Result) -> None:
        rid = res.request_id
        if rid in self._seen:
            self.duplicates += 1
            return
        self._seen[rid] = None
        self._buffer[rid] = res
        while len(self._seen) > self.max_buffered * 4:
            self._seen.popitem(last=False)
        while len(self._buffer) > self.max_buffered:
            self._buffer.popitem(last=False)
        fut = self._waiters.pop(rid, None)
        if fut is not None and not fut.done():
            fut.set_result(res)
        for q in self._streams:
            q.put_nowait(res)

    def _fail_all(self, err: BaseException) -> None:
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_exception(err)
                fut.exception()  # mark retrieved: nobody may be waiting any more
        self._waiters.clear()
        for q in self._streams:
            q.put_nowait(err)
