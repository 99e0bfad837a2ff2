"""The project's error hierarchy (defined in goodserve.schemas.errors; re-exported here)."""

from goodserve.schemas.errors import *  # noqa: F403
from goodserve.schemas.errors import (
    BrokerUnavailable,
    ConfigError,
    DuplicateRequest,
    EngineError,
    GoodServeError,
    InvalidInput,
    InvalidReport,
    InvalidRequest,
    MalformedMessage,
    PromptTooLarge,
    RecordTooLarge,
    SchemaError,
    TransportError,
    UnknownInstance,
    UnknownModel,
    Unschedulable,
    UnsupportedSchemaVersion,
)

__all__ = [
    "BrokerUnavailable",
    "ConfigError",
    "DuplicateRequest",
    "EngineError",
    "GoodServeError",
    "InvalidInput",
    "InvalidReport",
    "InvalidRequest",
    "MalformedMessage",
    "PromptTooLarge",
    "RecordTooLarge",
    "SchemaError",
    "TransportError",
    "UnknownInstance",
    "UnknownModel",
    "Unschedulable",
    "UnsupportedSchemaVersion",
]
