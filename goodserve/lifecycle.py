"""AsyncService: ``async with`` for GoodServe's I/O components.

Every service, client and broker handle follows aiokafka's shape: a keyword-only
constructor that does no I/O, ``async start()``, an idempotent ``async stop()``. This mixin
adds ``async with`` on top: start on entry, stop on exit, whatever the exit.
"""

from __future__ import annotations

from types import TracebackType
from typing import Protocol, TypeVar


class _Startable(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


_S = TypeVar("_S", bound=_Startable)


class AsyncService:
    """``async with component:`` = ``await component.start()`` ... ``await component.stop()``."""

    async def __aenter__(self: _S) -> _S:
        await self.start()
        return self

    async def __aexit__(
        self: _Startable,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
