"""Every message that crosses Kafka, as tagged msgspec Structs.

Rules (msgspec's schema-evolution rules): every message carries ``v``, the schema
version; new fields get defaults; a field's type never changes; a removed field's
name is never reused. The tag field ``kind`` names the message type on the wire.
Times are Unix seconds (float) unless a name says otherwise.
"""

from __future__ import annotations

from typing import Literal

import msgspec

SCHEMA_VERSION = 1
"""The version this build writes. Readers accept ``SUPPORTED_VERSIONS``."""

SUPPORTED_VERSIONS = frozenset({1})

TASKS = ("chat", "code", "math", "sql", "tool", "agent")
"""Known task names. Unknown names are accepted and treated as their own task."""


class Message(msgspec.Struct, tag_field="kind", kw_only=True, omit_defaults=False):
    """Base of all wire messages."""

    v: int = SCHEMA_VERSION


class SamplingParams(msgspec.Struct, kw_only=True):
    """The subset of vLLM's SamplingParams that GoodServe carries end to end."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop_token_ids: list[int] = msgspec.field(default_factory=list)
    ignore_eos: bool = False


class AgentRequest(Message, tag="agent_request", kw_only=True):
    """An LLM call from an agent, as produced to the requests topic.

    The deadline is ``deadline`` (absolute) when set, else ``arrival + slo_s``.
    """

    request_id: str
    model: str = "default"
    task: str = "chat"
    workflow_id: str | None = None
    step: int = 0
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    input_tokens: int | None = None
    """Prompt length in tokens, if the producer knows it; else derived (ceil(chars/4))."""
    max_tokens: int = 1024
    sampling: SamplingParams = msgspec.field(default_factory=SamplingParams)
    arrival: float | None = None
    """When the request entered the system (stamped by the client/gateway, else the dispatcher)."""
    deadline: float | None = None
    slo_s: float | None = None
    ttft_slo_s: float | None = None
    tpot_slo_s: float | None = None
    workflow_deadline: float | None = None
    """Absolute deadline of the whole workflow this call belongs to (optional)."""
    priority: int = 0
    output_tokens_hint: int | None = None
    reply_to: str | None = None
    """Results topic override (default: the shared results topic)."""
    metadata: dict[str, str] = msgspec.field(default_factory=dict)


class Checkpoint(Message, tag="checkpoint", kw_only=True):
    """State of a request stopped at a token boundary, enough to resume it elsewhere."""

    request_id: str
    migration_id: str
    source: str
    target: str | None = None
    request: AgentRequest
    generated_token_ids: list[int] = msgspec.field(default_factory=list)
    generated_text: str = ""
    kv_ref: str | None = None
    """Reference to exported KV in a shared store (engine-specific); None means recompute."""
    kv_tokens: int = 0
    first_token_at: float | None = None
    dispatched_at: float | None = None
    created_at: float = 0.0
    migrations: int = 0
    progress_dropped: bool = False
    """The generated tokens and KV were dropped (``without_progress``): the request restarts
    from its prompt."""

    def without_progress(self) -> Checkpoint:
        """This checkpoint without its generated tokens and KV, for when a record carrying
        them would pass the broker's size limit: a restart from the prompt, not a loss."""
        return msgspec.structs.replace(
            self,
            generated_token_ids=[],
            generated_text="",
            kv_ref=None,
            kv_tokens=0,
            first_token_at=None,
            progress_dropped=True,
        )

    def for_assignment(self) -> Checkpoint:
        """This checkpoint as an Assignment's ``resume`` carries it: its ``request`` without
        the prompt and metadata, which the Assignment's own ``request`` holds (twice, a
        long prompt would make the resuming record pass the size limit when the first one
        did not)."""
        r = self.request
        if r.prompt is None and r.prompt_token_ids is None and not r.metadata:
            return self
        slim = msgspec.structs.replace(r, prompt=None, prompt_token_ids=None, metadata={})
        return msgspec.structs.replace(self, request=slim)


class Assignment(Message, tag="assignment", kw_only=True):
    """A request routed to one instance, produced to that instance's topic."""

    request: AgentRequest
    instance_id: str
    decision_id: str
    dispatched_at: float
    deadline: float
    predicted_output_tokens: int = 0
    predicted_output_p90: int = 0
    attempt: int = 0
    resume: Checkpoint | None = None
    """Set when this assignment resumes a migrated or reissued request. Its ``request`` has
    no prompt and no metadata (``Checkpoint.for_assignment``): run this Assignment's
    ``request``."""


class Candidate(msgspec.Struct, kw_only=True, array_like=False):
    """One instance as the policy saw it when deciding."""

    instance_id: str
    gpu: str
    eligible: bool
    est_queue_s: float
    est_prefill_s: float
    est_tpot_s: float
    est_finish_s: float
    """Estimated completion time, seconds from the decision."""
    slack_s: float
    """Deadline minus estimated finish (negative: late)."""
    score: float = 0.0
    cached_tokens: int = 0
    reason: str = ""


class InstanceView(msgspec.Struct, kw_only=True):
    """The estimator's state of one instance at decision time (recorded for replay).

    Raw model coefficients and their learned corrections are kept apart so that a
    replay repeats the very same float operations (bit-for-bit decisions).
    TPOT(B, C) = (tpot_base_s + tpot_slope_s * B + tpot_ctx_s * C) * tpot_corr
    / (1 - min(prefill_busy, 0.8)) for a batch of B sequences attending to C KV tokens
    (C = min(kv_used_tokens, kv_total_tokens)) on an instance spending ``prefill_busy`` of
    its time on prompts;
    prefill(n after c cached) = (prefill_base_s + prefill_s_per_token * n
    + prefill_quad_s * n * (2c + n)) * prefill_corr. Records written before the context
    terms existed have them at 0, which replays those records as they were decided.
    """

    instance_id: str
    gpu: str
    model: str
    alive: bool
    running: int
    waiting: int
    max_batch: int
    kv_used_tokens: float
    kv_total_tokens: float
    queue_s: float
    prefill_base_s: float
    prefill_s_per_token: float
    prefill_corr: float = 1.0
    tpot_base_s: float
    tpot_slope_s: float
    tpot_corr: float = 1.0
    speed: float = 1.0
    outstanding: int = 0
    rem_tokens: float = 0.0
    pending_prefill_tokens: float = 0.0
    min_slack_s: float | None = None
    rem_at_min: float = 0.0
    cached_tokens: int = 0
    ctx_tokens: float = 0.0
    finish_corr: float = 1.0
    tpot_ctx_s: float = 0.0
    prefill_quad_s: float = 0.0
    prefill_busy: float = 0.0
    finish_err: float = 0.0
    """RMS log error of the instance's finish estimates (0 in records made before it)."""
    budget_load: float = 0.0
    """Sum over the requests on the instance that are not yet late of 1 / (seconds left to
    their deadline, at least 0.05): how much a stall of one second there costs them, as
    shares of their remaining time (0 in records made before it)."""


class Decision(Message, tag="decision", kw_only=True):
    """Audit record of one routing decision: everything needed to replay it bit for bit
    (unless ``config["views_omitted"]``: a dispatcher with ``decision_views_every`` > 1
    leaves the instances' views out of all but one record in N)."""

    decision_id: str
    request_id: str
    at: float
    policy: str
    policy_version: str
    predictor_version: str
    config: dict[str, float | int | str | bool] = msgspec.field(default_factory=dict)
    seed: int = 0
    request: AgentRequest
    input_tokens: int
    features: list[float] = msgspec.field(default_factory=list)
    predicted_output_p50: float = 0.0
    predicted_output_p90: float = 0.0
    planned_output_tokens: float = 0.0
    deadline: float = 0.0
    instances: list[InstanceView] = msgspec.field(default_factory=list)
    candidates: list[Candidate] = msgspec.field(default_factory=list)
    chosen: str | None = None
    outcome: Literal["assigned", "rejected", "held", "migrated"] = "assigned"
    reason: str = ""


class RequestProgress(msgspec.Struct, kw_only=True, array_like=True):
    """One running/waiting request inside a heartbeat (array-encoded: heartbeats are hot)."""

    request_id: str
    state: str
    """'waiting' | 'running' | 'preempted'"""
    generated: int
    input_tokens: int
    deadline: float
    started_at: float | None = None


class Heartbeat(Message, tag="heartbeat", kw_only=True):
    """Periodic status of one instance, published by its worker."""

    instance_id: str
    gpu: str
    model: str
    engine: str
    at: float
    seq: int = 0
    running: int = 0
    waiting: int = 0
    max_batch: int = 0
    kv_used_blocks: int = 0
    kv_total_blocks: int = 0
    kv_block_size: int = 16
    step_time_s: float = 0.0
    """Mean engine step time over the last period."""
    tpot_s: float = 0.0
    """Mean time per output token seen by running requests over the last period."""
    prefill_tokens_per_s: float = 0.0
    tokens_generated: int = 0
    """Tokens generated in the last period."""
    prefix_hit_tokens: int = 0
    prefix_query_tokens: int = 0
    requests: list[RequestProgress] = msgspec.field(default_factory=list)
    draining: bool = False


class ErrorInfo(msgspec.Struct, kw_only=True):
    code: str
    message: str
    retriable: bool = False


class Result(Message, tag="result", kw_only=True):
    """The outcome of one request, exactly one delivered per request id."""

    request_id: str
    status: Literal["ok", "error", "aborted", "rejected"]
    instance_id: str | None = None
    decision_id: str | None = None
    workflow_id: str | None = None
    output_token_ids: list[int] = msgspec.field(default_factory=list)
    text: str = ""
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    finish_reason: str | None = None
    arrival: float | None = None
    dispatched_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    deadline: float | None = None
    met_deadline: bool | None = None
    predicted_output_tokens: int | None = None
    migrations: int = 0
    error: ErrorInfo | None = None
    output_token_ids_omitted: bool = False
    """The ids were left out: with them the record would pass the size limit (``text``
    holds the output)."""


class MigrationCommand(Message, tag="migration", kw_only=True):
    """Tell a source worker to stop a request at a token boundary and checkpoint it."""

    migration_id: str
    request_id: str
    source: str
    target: str
    at: float
    reason: str = ""
    risk: float = 0.0
    deadline: float = 0.0


class DeadLetter(Message, tag="dead_letter", kw_only=True):
    """A record that could not be processed, with why and the original bytes."""

    service: str
    topic: str
    partition: int = -1
    offset: int = -1
    key: bytes | None = None
    payload: bytes = b""
    error_code: str
    reason: str
    at: float
    request_id: str | None = None


class TokenChunk(Message, tag="token_chunk", kw_only=True):
    """Streaming progress of one request (only for requests with ``metadata["stream"] == "1"``).

    Produced by the worker to the ``stream`` topic, keyed by request id; the gateway turns
    chunks into server-sent events. ``index`` counts chunks per request from 0 on one
    instance (a migrated request restarts at 0 on its target, with ``resumed`` set).
    The final Result stays the authority; the last chunk has ``finished`` set.
    """

    request_id: str
    index: int
    instance_id: str | None = None
    token_ids: list[int] = msgspec.field(default_factory=list)
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None
    resumed: bool = False
    at: float = 0.0


class AbortCommand(Message, tag="abort", kw_only=True):
    """Stop a request (its client went away): produced to ``instance.<id>`` of its instance.

    The worker answers with a Result of status "aborted"; a request not running there
    is ignored.
    """

    request_id: str
    instance_id: str | None = None
    at: float
    reason: str = ""


AnyMessage = (
    AgentRequest
    | Assignment
    | Decision
    | Heartbeat
    | Result
    | MigrationCommand
    | Checkpoint
    | DeadLetter
    | TokenChunk
    | AbortCommand
)

MESSAGE_TYPES: tuple[type[Message], ...] = (
    AgentRequest,
    Assignment,
    Decision,
    Heartbeat,
    Result,
    MigrationCommand,
    Checkpoint,
    DeadLetter,
    TokenChunk,
    AbortCommand,
)
