"""aiokafka client arguments from Settings, and the mapping of Kafka errors to ours.

Every producer, consumer and admin client is built from ``kafka_client_kwargs`` so that
SASL/TLS is configured in one place. aiokafka's exceptions never leave the transport
package: ``kafka_errors`` turns them into ``TransportError`` / ``BrokerUnavailable``.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

from aiokafka.errors import (
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    KafkaUnavailableError,
    MessageSizeTooLargeError,
    NodeNotReadyError,
    RequestTimedOutError,
)
from aiokafka.helpers import create_ssl_context

from goodserve.config import Settings
from goodserve.errors import (
    BrokerUnavailable,
    ConfigError,
    GoodServeError,
    RecordTooLarge,
    TransportError,
)

Role = Literal["producer", "consumer", "admin"]

_UNAVAILABLE = (
    KafkaConnectionError,
    KafkaUnavailableError,
    NodeNotReadyError,
    KafkaTimeoutError,
    RequestTimedOutError,
)


def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """A TLS context for SSL / SASL_SSL (CA, client cert and key from settings), else None."""
    if not settings.security_protocol.endswith("SSL"):
        return None
    if bool(settings.ssl_certfile) != bool(settings.ssl_keyfile):
        raise ConfigError("ssl_certfile and ssl_keyfile must be given together")
    try:
        ctx = create_ssl_context(
            cafile=settings.ssl_cafile,
            certfile=settings.ssl_certfile,
            keyfile=settings.ssl_keyfile,
        )
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"cannot build TLS context: {e}") from e
    ctx.check_hostname = settings.ssl_check_hostname
    return ctx


def kafka_client_kwargs(
    settings: Settings, *, role: Role = "producer", client_id: str | None = None
) -> dict[str, Any]:
    """Keyword arguments shared by AIOKafkaProducer / AIOKafkaConsumer / AIOKafkaAdminClient.

    The result holds the SASL password: pass it to aiokafka, never log it (log
    ``settings.redacted()`` instead).
    """
    kw: dict[str, Any] = {
        "bootstrap_servers": [s.strip() for s in settings.bootstrap_servers.split(",") if s],
        "client_id": client_id or f"{settings.client_id}-{role}",
        "request_timeout_ms": settings.request_timeout_ms,
        "security_protocol": settings.security_protocol,
    }
    if role == "producer":
        kw["max_request_size"] = settings.max_record_bytes
    ctx = ssl_context(settings)
    if ctx is not None:
        kw["ssl_context"] = ctx
    if settings.security_protocol.startswith("SASL"):
        kw["sasl_mechanism"] = settings.sasl_mechanism
        kw["sasl_plain_username"] = settings.sasl_username
        kw["sasl_plain_password"] = settings.sasl_password
    return kw


def map_kafka_error(e: BaseException, op: str) -> GoodServeError:
    """The GoodServe error for an aiokafka exception raised during ``op``."""
    if isinstance(e, GoodServeError):
        return e
    name = type(e).__name__
    if isinstance(e, _UNAVAILABLE):
        return BrokerUnavailable(f"{op}: broker unavailable ({name}: {e})")
    if isinstance(e, MessageSizeTooLargeError):
        return RecordTooLarge(f"{op}: {name}: {e}")
    if isinstance(e, KafkaError):
        err = TransportError(f"{op}: {name}: {e}")
        err.retriable = bool(getattr(e, "retriable", True))
        return err
    return TransportError(f"{op}: {name}: {e}")


@contextmanager
def kafka_errors(op: str) -> Iterator[None]:
    """Re-raise aiokafka errors (and connection OSErrors) as GoodServe transport errors."""
    try:
        yield
    except (KafkaError, OSError) as e:
        raise map_kafka_error(e, op) from e
