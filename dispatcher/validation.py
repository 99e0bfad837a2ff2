"""Checks an agent request must pass before it is routed (pure; raises typed errors).

Each failure is an ``InvalidInput`` with a code: the service turns it into a
rejected ``Result`` for the client and a ``DeadLetter`` for operators.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from goodserve.dispatcher.router import deadline_of, input_tokens_of
from goodserve.schemas import AgentRequest, Heartbeat, Result

from goodserve.config import is_instance_id, is_topic_name
from goodserve.errors import (
    DuplicateRequest,
    InvalidRequest,
    PromptTooLarge,
    UnknownModel,
)
from goodserve.recent_ids import RecentIds

__all__ = ["ASSIGNMENT_ROOM_BYTES", "Limits", "SeenRequests", "is_topic_name",
           "report_problem", "validate_request"]

ASSIGNMENT_ROOM_BYTES = 4_096
"""What an Assignment adds to the request it carries, at most (ids, times, predictions)."""


@dataclass(slots=True)
class Limits:
    max_prompt_tokens: int = 131072
    max_output_tokens: int = 32768
    max_prompt_chars: int = 1_000_000
    max_slo_s: float = 86400.0
    clock_skew_s: float = 1.0
    """Deadlines this far in the past are still accepted (and then likely missed)."""
    max_request_bytes: int = 1_048_576 - ASSIGNMENT_ROOM_BYTES
    """The request's encoded size: the Assignment that carries it to the worker must fit
    in one Kafka record (``Settings.max_record_bytes``, 1 MiB by default); 4 KiB are left
    for the rest of the Assignment. ``for_records`` sets it from the record limit."""

    @classmethod
    def for_records(cls, max_record_bytes: int) -> Limits:
        """The default limits, for records of at most ``max_record_bytes``."""
        return cls(max_request_bytes=max_record_bytes - ASSIGNMENT_ROOM_BYTES)


def validate_request(req: AgentRequest, now: float, limits: Limits,
                     models: frozenset[str] | None = None, default_slo_s: float = 30.0,
                     size_bytes: int | None = None) -> int:
    """Raise an InvalidInput for a request that can never be served; return its input tokens.
    ``size_bytes``: its encoded size, where known (the record it came in)."""
    if not req.request_id or len(req.request_id) > 256:
        raise InvalidRequest("request_id must be 1-256 characters")
    if req.max_tokens < 1:
        raise InvalidRequest(f"max_tokens must be >= 1, got {req.max_tokens}")
    if req.max_tokens > limits.max_output_tokens:
        raise InvalidRequest(
            f"max_tokens {req.max_tokens} exceeds the limit {limits.max_output_tokens}"
        )
    if req.prompt is None and req.prompt_token_ids is None and req.input_tokens is None:
        raise InvalidRequest("a request needs prompt, prompt_token_ids or input_tokens")
    if req.prompt is not None and len(req.prompt) > limits.max_prompt_chars:
        raise PromptTooLarge(
            f"prompt of {len(req.prompt)} characters exceeds {limits.max_prompt_chars}"
        )
    if size_bytes is not None and size_bytes > limits.max_request_bytes:
        raise PromptTooLarge(
            f"request of {size_bytes} bytes exceeds {limits.max_request_bytes}: the Assignment"
            " that carries it must fit in one Kafka record (max_record_bytes)"
        )
    if req.reply_to is not None and not is_topic_name(req.reply_to):
        raise InvalidRequest(
            f"reply_to {req.reply_to[:100]!r} is not a Kafka topic name"
            " (1-249 of A-Z a-z 0-9 . _ -)"
        )
    if req.input_tokens is not None and req.input_tokens < 1:
        raise InvalidRequest(f"input_tokens must be >= 1, got {req.input_tokens}")
    if req.prompt_token_ids is not None and len(req.prompt_token_ids) == 0:
        raise InvalidRequest("prompt_token_ids is empty")
    n_in = input_tokens_of(req)
    if n_in > limits.max_prompt_tokens:
        raise PromptTooLarge(f"prompt of {n_in} tokens exceeds {limits.max_prompt_tokens}")
    if req.slo_s is not None and (not math.isfinite(req.slo_s) or req.slo_s <= 0):
        raise InvalidRequest(f"slo_s must be a positive number of seconds, got {req.slo_s}")
    if req.slo_s is not None and req.slo_s > limits.max_slo_s:
        raise InvalidRequest(f"slo_s {req.slo_s} exceeds {limits.max_slo_s}")
    for name in ("deadline", "arrival", "workflow_deadline"):
        t = getattr(req, name)
        if t is not None and not math.isfinite(t):  # NaN would poison every deadline sum
            raise InvalidRequest(f"{name} must be a finite Unix time, got {t}")
    for name in ("ttft_slo_s", "tpot_slo_s"):
        s = getattr(req, name)
        if s is not None and (not math.isfinite(s) or s <= 0):
            raise InvalidRequest(f"{name} must be a positive number of seconds, got {s}")
    _check_shape(req, limits)
    deadline = deadline_of(req, now, default_slo_s)
    if deadline < now - limits.clock_skew_s:
        raise InvalidRequest(f"deadline already passed {now - deadline:.3f}s ago")
    if req.priority < -1000 or req.priority > 1000:
        raise InvalidRequest(f"priority must be in [-1000, 1000], got {req.priority}")
    if models is not None and req.model not in ("", "default") and req.model not in models:
        raise UnknownModel(f"no instance serves model {req.model!r} (served: {sorted(models)})")
    return n_in


def _check_shape(req: AgentRequest, limits: Limits) -> None:
    """What the engine or the router would otherwise meet first: a failed run (vLLM's own
    checks) or a plan on a nonsensical hint."""
    hint = req.output_tokens_hint
    if hint is not None and not 0 <= hint <= limits.max_output_tokens:
        raise InvalidRequest(
            f"output_tokens_hint must be in [0, {limits.max_output_tokens}], got {hint}"
        )
    if req.step < 0:
        raise InvalidRequest(f"step must be >= 0, got {req.step}")
    if req.workflow_id is not None and not 1 <= len(req.workflow_id) <= 256:
        raise InvalidRequest("workflow_id must be 1-256 characters")
    sp = req.sampling
    if not (math.isfinite(sp.temperature) and sp.temperature >= 0):
        raise InvalidRequest(f"sampling.temperature must be >= 0, got {sp.temperature}")
    if not (math.isfinite(sp.top_p) and 0 < sp.top_p <= 1):
        raise InvalidRequest(f"sampling.top_p must be in (0, 1], got {sp.top_p}")
    if sp.top_k < -1:
        raise InvalidRequest(f"sampling.top_k must be -1 (off) or >= 0, got {sp.top_k}")
    if sp.stop_token_ids and min(sp.stop_token_ids) < 0:
        raise InvalidRequest("sampling.stop_token_ids must be token ids (>= 0)")
    if req.prompt_token_ids and min(req.prompt_token_ids) < 0:
        raise InvalidRequest("prompt_token_ids must be token ids (>= 0)")


_HEARTBEAT_COUNTS = (
    "seq", "running", "waiting", "max_batch", "kv_used_blocks", "kv_total_blocks",
    "tokens_generated", "prefix_hit_tokens", "prefix_query_tokens",
)
_HEARTBEAT_RATES = ("at", "step_time_s", "tpot_s", "prefill_tokens_per_s")
_RESULT_COUNTS = ("input_tokens", "output_tokens", "cached_tokens", "migrations")
_RESULT_TIMES = ("arrival", "dispatched_at", "first_token_at", "finished_at", "deadline")


def report_problem(msg: Heartbeat | Result) -> str | None:
    """What is impossible in a worker's heartbeat or Result (None: nothing). The estimator
    and the predictor learn from these numbers: a negative batch size would become the
    instance's batch limit, a negative length an answer the predictor learns from, and a
    NaN (possible in process, not through JSON) would stay in a correction for good."""
    if isinstance(msg, Heartbeat):
        if not is_instance_id(msg.instance_id):
            return f"heartbeat instance_id {msg.instance_id[:100]!r} cannot name a topic"
        for f in _HEARTBEAT_COUNTS:
            if getattr(msg, f) < 0:
                return f"heartbeat {f} is negative ({getattr(msg, f)})"
        if msg.kv_block_size < 1:
            return f"heartbeat kv_block_size must be >= 1, got {msg.kv_block_size}"
        for f in _HEARTBEAT_RATES:
            v = getattr(msg, f)
            if not (math.isfinite(v) and v >= 0.0):
                return f"heartbeat {f} must be finite and >= 0, got {v}"
        for p in msg.requests:
            if p.generated < 0 or p.input_tokens < 0 or not math.isfinite(p.deadline):
                return f"heartbeat progress of {p.request_id!r} is impossible"
        return None
    for f in _RESULT_COUNTS:
        if getattr(msg, f) < 0:
            return f"result {f} is negative ({getattr(msg, f)})"
    for f in _RESULT_TIMES:
        v = getattr(msg, f)
        if v is not None and not math.isfinite(v):
            return f"result {f} must be a finite Unix time, got {v}"
    if (
        msg.migrations == 0  # one worker's clock (a resumed request's times span two)
        and msg.first_token_at
        and msg.finished_at
        and msg.finished_at < msg.first_token_at
    ):
        return "result finished before its first token"
    return None


class SeenRequests:
    """Request ids seen in the last ``ttl_s`` seconds (at most ``capacity``): duplicates are
    refused. Bounded by time as well as count so memory stays flat under sustained load: a
    re-delivery (crash, rewind) arrives within seconds, not minutes. Ids are kept in
    ``goodserve.recent_ids``'s fixed-size table: 5.7 MB for 200,000 ids, allocated at
    construction."""

    def __init__(self, capacity: int = 200_000, ttl_s: float = 120.0) -> None:
        self.capacity = capacity
        self.ttl_s = ttl_s
        self._ids = RecentIds(ttl_s=ttl_s, capacity=capacity)

    def check_and_add(self, request_id: str, now: float | None = None) -> None:
        if not self._ids.add(request_id, now, refresh=False):
            raise DuplicateRequest(f"request id {request_id!r} was already accepted")

    def discard(self, request_id: str) -> None:
        self._ids.discard(request_id)

    def __len__(self) -> int:
        return len(self._ids)
