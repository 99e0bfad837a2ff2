"""Kafka transport: typed producers and consumers over aiokafka, topics, dead letters."""

from .consumer import BULK_FETCH_MAX_WAIT_MS, BULK_FETCH_MIN_BYTES, Envelope, TypedConsumer
from .deadletter import DeadLetterSink, make_dead_letter
from .kafka import kafka_client_kwargs, kafka_errors, map_kafka_error, ssl_context
from .producer import Delivery, Sent, TypedProducer, send_fitting
from .topics import (
    TopicSpec,
    delete_topics,
    ensure_topics,
    instance_topic_spec,
    standard_topics,
)

__all__ = [
    "BULK_FETCH_MAX_WAIT_MS",
    "BULK_FETCH_MIN_BYTES",
    "DeadLetterSink",
    "Delivery",
    "Envelope",
    "Sent",
    "TopicSpec",
    "TypedConsumer",
    "TypedProducer",
    "delete_topics",
    "ensure_topics",
    "instance_topic_spec",
    "kafka_client_kwargs",
    "kafka_errors",
    "make_dead_letter",
    "map_kafka_error",
    "send_fitting",
    "ssl_context",
    "standard_topics",
]
