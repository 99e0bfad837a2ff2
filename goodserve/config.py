"""One configuration object for every service: defaults < environment < command-line flags.

Environment variables are ``GOODSERVE_<FIELD>`` in upper case (e.g.
``GOODSERVE_BOOTSTRAP_SERVERS``). Secrets (SASL password) are never rendered by
``redacted()``, which is what services log.
"""

from __future__ import annotations

import argparse
import os
import re
from typing import Any, Literal

import msgspec

from goodserve.errors import ConfigError

ENV_PREFIX = "GOODSERVE_"
SECRET_FIELDS = frozenset({"sasl_password"})


_TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")
MAX_INSTANCE_ID = 200
"""Instance ids name topics (``<prefix>.instance.<id>``, at most 249 characters)."""


def is_topic_name(name: str) -> bool:
    """Whether Kafka accepts ``name`` as a topic (1-249 of ``A-Z a-z 0-9 . _ -``)."""
    return _TOPIC_NAME.fullmatch(name) is not None and name not in (".", "..")


def is_instance_id(name: str) -> bool:
    """Whether ``name`` can be an instance id: a topic name of at most ``MAX_INSTANCE_ID``."""
    return len(name) <= MAX_INSTANCE_ID and is_topic_name(name)


DEFAULT_MAX_RECORD_BYTES = 1_048_576
"""aiokafka's ``max_request_size`` and about Kafka's ``message.max.bytes`` (1,048,588)."""
MIN_RECORD_BYTES = 65_536
RECORD_OVERHEAD_BYTES = 4_096
"""Room for a record batch's framing above ``max_record_bytes`` (the topics' limit)."""


class Settings(msgspec.Struct, kw_only=True, frozen=True):
    """Connection and topic settings shared by dispatcher, workers, monitor, gateway, client."""

    bootstrap_servers: str = "localhost:9092"
    topic_prefix: str = "goodserve"
    partitions: int = 4
    replication_factor: int = 1
    client_id: str = "goodserve"
    idempotent_producer: bool = True
    """On for Apache Kafka; off for brokers that reject it (the embedded Tansu)."""
    acks: Literal["all", "1", "0"] = "all"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: str | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_check_hostname: bool = True
    request_timeout_ms: int = 30000
    session_timeout_ms: int = 10000
    """Consumer-group session timeout; small (e.g. 1500) for the embedded broker, whose
    group joins wait about half of it."""
    heartbeat_interval_ms: int = 3000
    log_payloads: bool = False
    """Log prompt and output text. Off by default: prompts are user data."""
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES
    """The largest record GoodServe produces (a request's Assignment carries its prompt):
    the producers' ``max_request_size`` and, above Kafka's default (1 MiB), the
    ``max.message.bytes`` of the topics GoodServe creates; topics that already exist keep
    theirs (``kafka-configs --alter``). Consumers need nothing: Kafka returns a record
    batch larger than the fetch size when it comes first."""

    def __post_init__(self) -> None:
        if not self.bootstrap_servers.strip():
            raise ConfigError("bootstrap_servers must not be empty")
        if self.partitions < 1:
            raise ConfigError(f"partitions must be >= 1, got {self.partitions}")
        if self.max_record_bytes < MIN_RECORD_BYTES:
            raise ConfigError(
                f"max_record_bytes must be >= {MIN_RECORD_BYTES}, got {self.max_record_bytes}"
            )
        if self.replication_factor < 1:
            raise ConfigError(f"replication_factor must be >= 1, got {self.replication_factor}")
        if self.security_protocol.startswith("SASL") and not (
            self.sasl_mechanism and self.sasl_username and self.sasl_password is not None
        ):
            raise ConfigError(
                f"{self.security_protocol} needs sasl_mechanism, sasl_username and sasl_password"
            )

    # --- construction ---------------------------------------------------------------------
    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from GOODSERVE_* variables, then explicit overrides (None means unset)."""
        env = dict(os.environ if env is None else env)
        values: dict[str, Any] = {}
        for name in cls.__struct_fields__:
            key = ENV_PREFIX + name.upper()
            if key in env:
                values[name] = env[key]
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return msgspec.convert(values, cls, strict=False)
        except msgspec.ValidationError as e:
            raise ConfigError(f"invalid setting: {e}") from e

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add the connection flags every service command takes."""
        g = parser.add_argument_group("kafka")
        g.add_argument("--bootstrap-servers", help="Kafka bootstrap servers (host:port,...)")
        g.add_argument("--topic-prefix", help="prefix of every topic name (default goodserve)")
        g.add_argument("--partitions", type=int, help="partitions of created topics")
        g.add_argument(
            "--no-idempotence",
            dest="idempotent_producer",
            action="store_const",
            const=False,
            help="disable the idempotent producer (brokers that reject it)",
        )
        g.add_argument("--security-protocol", help="PLAINTEXT | SSL | SASL_PLAINTEXT | SASL_SSL")
        g.add_argument("--sasl-mechanism", help="PLAIN | SCRAM-SHA-256 | SCRAM-SHA-512")
        g.add_argument("--sasl-username")
        g.add_argument("--ssl-cafile")
        g.add_argument("--ssl-certfile")
        g.add_argument("--ssl-keyfile")
        g.add_argument(
            "--max-record-bytes",
            type=int,
            help="largest record produced (default 1 MiB, Kafka's); raise it for long prompts",
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace, **overrides: Any) -> Settings:
        names = set(cls.__struct_fields__) - SECRET_FIELDS  # passwords only from env
        picked = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
        picked.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_env(**picked)

    def replace(self, **changes: Any) -> Settings:
        return msgspec.structs.replace(self, **changes)

    def redacted(self) -> dict[str, Any]:
        """A loggable view: secrets replaced by '***'."""
        out: dict[str, Any] = msgspec.to_builtins(self)
        for f in SECRET_FIELDS:
            if out.get(f) is not None:
                out[f] = "***"
        return out

    # --- topic names ----------------------------------------------------------------------
    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}.{name}"

    @property
    def requests_topic(self) -> str:
        return self.topic("requests")

    @property
    def results_topic(self) -> str:
        return self.topic("results")

    @property
    def decisions_topic(self) -> str:
        return self.topic("decisions")

    @property
    def heartbeats_topic(self) -> str:
        return self.topic("heartbeats")

    @property
    def migrations_topic(self) -> str:
        return self.topic("migrations")

    @property
    def checkpoints_topic(self) -> str:
        return self.topic("checkpoints")

    @property
    def dead_letters_topic(self) -> str:
        return self.topic("deadletters")

    def instance_topic(self, instance_id: str) -> str:
        return self.topic(f"instance.{instance_id}")
