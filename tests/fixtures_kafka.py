"""Kafka fixtures: one real Apache Kafka per test session, the embedded Tansu on demand.

``GOODSERVE_KAFKA_BOOTSTRAP=host:port`` points the session at an existing Kafka instead
of starting one. A broker that cannot start fails the tests that need it, loudly: no skips.
Each test gets its own topic prefix, so tests never see each other's records.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from goodserve.broker.apache import ApacheKafkaBroker
from goodserve.broker.embedded import EmbeddedBroker
from goodserve.config import Settings


def _prefix(request: pytest.FixtureRequest) -> str:
    name = "".join(c if c.isalnum() else "-" for c in request.node.name)[:40].strip("-")
    return f"t-{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def kafka_broker(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ApacheKafkaBroker | None]:
    """The session's Apache Kafka (None when GOODSERVE_KAFKA_BOOTSTRAP names an external one)."""
    if os.environ.get("GOODSERVE_KAFKA_BOOTSTRAP"):
        yield None
        return
    broker = ApacheKafkaBroker(workdir=tmp_path_factory.mktemp("kafka"))
    broker.start()  # raises BrokerUnavailable with the log tail: the tests fail, never skip
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_broker: ApacheKafkaBroker | None) -> str:
    """bootstrap_servers of the session's Kafka."""
    external = os.environ.get("GOODSERVE_KAFKA_BOOTSTRAP")
    if external:
        return external
    assert kafka_broker is not None
    return kafka_broker.bootstrap_servers


@pytest.fixture
def kafka_settings(kafka_bootstrap: str, request: pytest.FixtureRequest) -> Settings:
    """Settings for the session Kafka with a topic prefix unique to this test."""
    return Settings(bootstrap_servers=kafka_bootstrap, topic_prefix=_prefix(request), partitions=2)


@pytest.fixture
def kafka_broker_factory(
    tmp_path: Path,
) -> Iterator[Callable[..., ApacheKafkaBroker]]:
    """Private brokers a test may kill and restart; all stopped when the test ends."""
    made: list[ApacheKafkaBroker] = []

    def make(**kwargs: object) -> ApacheKafkaBroker:
        workdir = tmp_path / f"kafka-{len(made)}"
        broker = ApacheKafkaBroker(workdir=workdir, **kwargs)  # type: ignore[arg-type]
        made.append(broker)
        broker.start()
        return broker

    try:
        yield make
    finally:
        for b in made:
            b.stop(kill=True)


@pytest.fixture(scope="session")
def embedded_broker() -> Iterator[EmbeddedBroker]:
    """One Tansu broker for the session (memory storage)."""
    broker = EmbeddedBroker()
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def embedded_settings(embedded_broker: EmbeddedBroker, request: pytest.FixtureRequest) -> Settings:
    """Settings for the embedded broker: idempotence off, unique topic prefix."""
    return embedded_broker.settings(topic_prefix=_prefix(request), partitions=2)
