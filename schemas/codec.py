"""Encoding and decoding of wire messages, with encoders/decoders built once.

The wire format is JSON (agents in any language can produce requests). Decoding
checks the schema version and maps msgspec's errors to typed GoodServe errors.
"""

from __future__ import annotations

import inspect
import json
from typing import Any, TypeVar

import msgspec

from .errors import MalformedMessage, UnsupportedSchemaVersion
from .messages import MESSAGE_TYPES, SUPPORTED_VERSIONS, AnyMessage, Message

M = TypeVar("M", bound=Message)

_encoder = msgspec.json.Encoder()
_any_decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder(AnyMessage)
_typed_decoders: dict[type[Message], msgspec.json.Decoder[Any]] = {
    t: msgspec.json.Decoder(t) for t in MESSAGE_TYPES
}
_version_probe = msgspec.json.Decoder(dict[str, Any])


def encode(msg: Message) -> bytes:
    """Serialize a message to JSON bytes."""
    return _encoder.encode(msg)


def _check_version(data: bytes, err: Exception | None) -> None:
    """Raise UnsupportedSchemaVersion when the payload names a version we cannot read."""
    try:
        raw = _version_probe.decode(data)
    except msgspec.DecodeError:
        return
    v = raw.get("v")
    if isinstance(v, int) and v not in SUPPORTED_VERSIONS:
        raise UnsupportedSchemaVersion(
            f"schema version {v} of {raw.get('kind')!r} is not supported "
            f"(this build reads {sorted(SUPPORTED_VERSIONS)})"
        ) from err


def decode(data: bytes, type: type[M] | None = None) -> M:
    """Decode bytes into a message (of ``type`` if given, else any known kind).

    Raises MalformedMessage or UnsupportedSchemaVersion; never msgspec's own errors.
    """
    decoder = _any_decoder if type is None else _typed_decoders[type]
    try:
        msg = decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        _check_version(data, e)
        raise MalformedMessage(f"cannot decode message: {e}") from e
    except Exception as e:  # pragma: no cover - defensive: msgspec raises only the above
        raise MalformedMessage(f"cannot decode message: {e}") from e
    if msg.v not in SUPPORTED_VERSIONS:
        raise UnsupportedSchemaVersion(
            f"schema version {msg.v} of {type_name(msg)!r} is not supported "
            f"(this build reads {sorted(SUPPORTED_VERSIONS)})"
        )
    return msg  # type: ignore[no-any-return,unused-ignore]


def type_name(msg: Message) -> str:
    """The wire tag of a message (its ``kind``)."""
    return str(msg.__struct_config__.tag)


def to_builtins(msg: Message) -> dict[str, Any]:
    """A message as plain JSON-compatible Python objects (for files and reports)."""
    out: dict[str, Any] = msgspec.to_builtins(msg)
    return out


def _clean_descriptions(node: Any) -> Any:
    """Docstring-derived descriptions without their source indentation: msgspec releases
    differ on whether they dedent them, and the checked-in schema must not depend on that."""
    if isinstance(node, dict):
        return {
            k: inspect.cleandoc(v)
            if k == "description" and isinstance(v, str)
            else _clean_descriptions(v)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_clean_descriptions(v) for v in node]
    return node


def json_schemas() -> dict[str, Any]:
    """JSON Schema of every message (one document with $defs), for producers in other languages."""
    _, raw = msgspec.json.schema_components(MESSAGE_TYPES)
    components = _clean_descriptions(raw)
    schema: dict[str, Any] = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "GoodServe wire messages",
        "description": "Kafka message payloads (JSON). Tag field 'kind', version field 'v'.",
        "anyOf": [{"$ref": f"#/$defs/{t.__name__}"} for t in MESSAGE_TYPES],
        "$defs": components,
    }
    return schema


def json_schemas_text() -> str:
    return json.dumps(json_schemas(), indent=2, sort_keys=True) + "\n"
