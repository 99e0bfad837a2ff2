"""The interface every inference engine behind a worker implements.

vLLM's async engine, the simulated instance (performance model in real time) and the
OpenAI-backend forwarder all look like this to the worker service, so the worker's
Kafka logic (assignments in; progress, heartbeats, results, checkpoints out) is
written once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol, runtime_checkable

import msgspec
from goodserve.schemas import SamplingParams


class EngineRequest(msgspec.Struct, kw_only=True):
    """One request as an engine sees it."""

    request_id: str
    input_tokens: int
    prompt_token_ids: list[int] | None = None
    prompt: str | None = None
    max_tokens: int = 256
    sampling: SamplingParams = msgspec.field(default_factory=SamplingParams)
    resume_token_ids: list[int] = msgspec.field(default_factory=list)
    """Tokens already generated elsewhere (migration): the engine continues after them."""
    kv_ref: str | None = None
    """Engine-specific reference to exported KV for prompt + resume tokens (None: recompute)."""
    deadline: float | None = None
    arrival: float | None = None
    prefix_key: str | None = None
    """Optional cache key of the prompt (simulated prefix caching without token ids)."""


class EngineOutput(msgspec.Struct, kw_only=True):
    """A streamed progress update: tokens produced since the last update."""

    request_id: str
    new_token_ids: list[int] = msgspec.field(default_factory=list)
    new_text: str = ""
    num_generated: int = 0
    """Total tokens generated for this request on this engine, resume tokens excluded."""
    finished: bool = False
    finish_reason: str | None = None
    """'length' | 'stop' | 'abort' | 'migrated' | 'error'"""
    first_token_at: float | None = None
    cached_tokens: int = 0


class EngineCheckpoint(msgspec.Struct, kw_only=True):
    """State of a request stopped at a token boundary."""

    request_id: str
    generated_token_ids: list[int]
    """All tokens generated so far (resume tokens included)."""
    kv_ref: str | None = None
    kv_tokens: int = 0


class RequestState(msgspec.Struct, kw_only=True):
    request_id: str
    state: str
    generated: int
    input_tokens: int


class EngineStatus(msgspec.Struct, kw_only=True):
    """What a heartbeat reports about the engine."""

    running: int = 0
    waiting: int = 0
    max_batch: int = 0
    kv_used_blocks: int = 0
    kv_total_blocks: int = 0
    kv_block_size: int = 16
    step_time_s: float = 0.0
    tpot_s: float = 0.0
    prefill_tokens_per_s: float = 0.0
    tokens_generated: int = 0
    prefix_hit_tokens: int = 0
    prefix_query_tokens: int = 0
    requests: list[RequestState] = msgspec.field(default_factory=list)


@runtime_checkable
class Engine(Protocol):
    """An inference engine driven by a worker. Implementations own no Kafka I/O."""

    name: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        """Run a request, yielding progress; the last output has ``finished=True``."""
        ...

    async def abort(self, request_id: str) -> None:
        """Stop a request; its stream ends with finish_reason 'abort'."""
        ...

    async def checkpoint(self, request_id: str) -> EngineCheckpoint:
        """Stop a request at a token boundary and return its state (stream ends 'migrated')."""
        ...

    def status(self) -> EngineStatus: ...
