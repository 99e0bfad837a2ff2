"""structlog set-up: JSON lines in production, pretty output in a terminal.

Per-message context (request_id, instance_id, decision_id) is bound with
``bound_context`` (structlog's contextvars) around the handling of each message.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from types import TracebackType
from typing import Any

import structlog
from structlog.contextvars import bind_contextvars, reset_contextvars

_configured = False


class _CurrentStderr:
    """Writes to whatever ``sys.stderr`` is at the time of the write. structlog's print
    logger keeps the stream it was given; if that stream is replaced and closed (pytest's
    capture around a command, a process that redirects its stderr), every later log
    call - an atexit clean-up's included - would raise on the closed stream."""

    def write(self, s: str) -> int:
        return sys.stderr.write(s)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(*, level: str | None = None, json: bool | None = None) -> None:
    """Configure structlog once; GOODSERVE_LOG_LEVEL / GOODSERVE_LOG_JSON override defaults."""
    global _configured
    level = (level or os.environ.get("GOODSERVE_LOG_LEVEL", "INFO")).upper()
    if json is None:
        env = os.environ.get("GOODSERVE_LOG_JSON")
        json = (env.lower() in ("1", "true", "yes")) if env else not sys.stderr.isatty()
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.PrintLoggerFactory(file=_CurrentStderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    _configured = True


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    logger: structlog.stdlib.BoundLogger = structlog.get_logger(name)
    return logger


class bound_context:
    """``structlog.contextvars.bound_contextvars`` for per-message hot paths: binds ``kw``
    and on exit restores what each key held before from the ContextVar tokens, without
    copying the whole context on entry (1.8 us instead of 4.5 us for three keys)."""

    __slots__ = ("_kw", "_tokens")

    def __init__(self, **kw: Any) -> None:
        self._kw = kw
        self._tokens: Mapping[str, Any] = {}

    def __enter__(self) -> None:
        self._tokens = bind_contextvars(**self._kw)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        reset_contextvars(**self._tokens)
