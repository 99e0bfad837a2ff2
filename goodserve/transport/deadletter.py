"""Dead letters: records that cannot be processed, kept with the reason and original bytes.

A consumer never stops on a bad record: it produces a ``DeadLetter`` to
``settings.dead_letters_topic`` (and waits for the ack) before committing past the record.
"""

from __future__ import annotations

import time

import msgspec

from goodserve.config import Settings
from goodserve.errors import GoodServeError, RecordTooLarge
from goodserve.lifecycle import AsyncService
from goodserve.logging import get_logger
from goodserve.schemas import DeadLetter

from .producer import Sent, TypedProducer, send_fitting

log = get_logger(__name__)

_probe = msgspec.json.Decoder(dict[str, object])


def _request_id(payload: bytes) -> str | None:
    """The request_id of a payload if it is JSON that names one (for tracing dead letters)."""
    try:
        obj = _probe.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    rid = obj.get("request_id")
    inner = obj.get("request")
    if rid is None and isinstance(inner, dict):
        rid = inner.get("request_id")
    return rid if isinstance(rid, str) else None


def make_dead_letter(
    *,
    service: str,
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    payload: bytes | None,
    error: BaseException,
) -> DeadLetter:
    code = error.code if isinstance(error, GoodServeError) else type(error).__name__
    raw = payload or b""
    return DeadLetter(
        service=service,
        topic=topic,
        partition=partition,
        offset=offset,
        key=key,
        payload=raw,
        error_code=code,
        reason=str(error)[:2000],
        at=time.time(),
        request_id=_request_id(raw),
    )


TRUNCATED_PAYLOAD = 256 * 1024
"""Bytes of the payload a dead letter keeps when the whole would not fit in a record."""


class DeadLetterSink(AsyncService):
    """Produces DeadLetter records; uses a shared producer or owns one built from settings."""

    def __init__(
        self, *, settings: Settings, service: str, producer: TypedProducer | None = None
    ) -> None:
        if not service:
            raise ValueError("service must name the component that dead-letters")
        self.settings = settings
        self.service = service
        self.topic = settings.dead_letters_topic
        self._own = producer is None
        self._producer = producer or TypedProducer(
            settings=settings, client_id=f"{settings.client_id}-{service}-deadletters"
        )
        self.count = 0

    async def start(self) -> None:
        """Nothing to do: an owned producer connects on the first dead letter (most never)."""

    async def stop(self) -> None:
        if self._own:
            await self._producer.stop()

    async def send(self, record: DeadLetter) -> Sent:
        """Produce one dead letter and wait for the ack (so committing past it is safe).

        A dead letter carries the record's bytes (base64 in JSON: a third more), so one for
        a record of more than about 780 KB is more than the producer takes: its copy of
        the payload is then cut to ``TRUNCATED_PAYLOAD`` bytes, and the reason says so and
        where the whole record is (its topic, partition and offset)."""
        if not self._producer.started:
            await self._producer.start()
        producer = self._producer

        def truncated(r: DeadLetter, e: RecordTooLarge) -> DeadLetter | None:
            if len(r.payload) <= TRUNCATED_PAYLOAD:
                return None
            return msgspec.structs.replace(
                r,
                payload=r.payload[:TRUNCATED_PAYLOAD],
                reason=f"{r.reason} (payload truncated from {len(r.payload)} to "
                f"{TRUNCATED_PAYLOAD} bytes; the record: {r.topic} partition "
                f"{r.partition} offset {r.offset})",
            )

        sent, record = await send_fitting(
            lambda r: producer.send(self.topic, r, key=r.topic), record, truncated
        )
        self.count += 1
        log.warning(
            "deadletter.sent",
            service=record.service,
            source_topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            error_code=record.error_code,
            reason=record.reason[:200],
            request_id=record.request_id,
        )
        return sent

    async def send_error(
        self,
        *,
        topic: str,
        partition: int,
        offset: int,
        key: bytes | None,
        payload: bytes | None,
        error: BaseException,
    ) -> Sent:
        return await self.send(
            make_dead_letter(
                service=self.service,
                topic=topic,
                partition=partition,
                offset=offset,
                key=key,
                payload=payload,
                error=error,
            )
        )
