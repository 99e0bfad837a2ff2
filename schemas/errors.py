"""The error vocabulary of GoodServe.

One base class, families with a ``retriable`` flag (as httpx does). It lives in
``schemas`` because error codes cross the wire in dead-letter records and error
results; everything else in the project imports it from here (``goodserve.errors``
re-exports it).
"""

from __future__ import annotations


class GoodServeError(Exception):
    """Base class of every error GoodServe raises on purpose."""

    retriable: bool = False
    code: str = "error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return self.message


# --- bad input: never retriable, dead-lettered --------------------------------------------
class InvalidInput(GoodServeError):
    """Input that can never be processed as sent."""

    code = "invalid_input"


class SchemaError(InvalidInput):
    """A payload that cannot be decoded into a known message."""

    code = "schema_error"


class MalformedMessage(SchemaError):
    """Bytes that are not valid JSON/msgpack, or fields of the wrong type."""

    code = "malformed"


class UnsupportedSchemaVersion(SchemaError):
    """A message whose schema version this build cannot read."""

    code = "unsupported_version"


class InvalidRequest(InvalidInput):
    """A well-formed request that breaks a rule (deadline in the past, zero tokens, ...)."""

    code = "invalid_request"


class InvalidReport(InvalidInput):
    """A worker's heartbeat or Result with numbers no engine produces (negative counts,
    non-finite times): learnt from, it would corrupt every estimate of that instance."""

    code = "invalid_report"


class UnknownInstance(InvalidInput):
    code = "unknown_instance"


class UnknownModel(InvalidInput):
    code = "unknown_model"


class PromptTooLarge(InvalidInput):
    code = "prompt_too_large"


class DuplicateRequest(InvalidInput):
    code = "duplicate_request"


class Unschedulable(GoodServeError):
    """No instance can take the request (none alive, or rejected as hopeless)."""

    code = "unschedulable"
    retriable = True


# --- transport and infrastructure: retriable ----------------------------------------------
class TransportError(GoodServeError):
    """The broker or network failed; the operation may succeed if retried."""

    code = "transport"
    retriable = True


class BrokerUnavailable(TransportError):
    code = "broker_unavailable"


class RecordTooLarge(TransportError):
    """A record larger than the producer or the topic accepts: sending it again fails again."""

    code = "record_too_large"
    retriable = False


class EngineError(GoodServeError):
    """The inference engine failed a request."""

    code = "engine"
    retriable = True


class ConfigError(GoodServeError):
    """A setting is missing or wrong; raised at construction, before any I/O."""

    code = "config"
