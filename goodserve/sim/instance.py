"""A simulated vLLM instance: continuous batching, chunked prefill, paged KV, prefix cache.

Pure and synchronous: the caller owns time. ``step(now)`` runs one engine iteration that
starts at ``now`` and lasts ``result.duration`` (from the performance model, divided by
``speed_factor``); its tokens and events take effect at ``now + duration``. The
discrete-event simulator and the real-time ``SimulatedEngine`` both drive this class.

Scheduling follows vLLM v1: running requests first (one decode token each, or the next chunk
of an unfinished prefill), then waiting requests FCFS while the batch, the token budget
(``max_batched_tokens``) and free KV blocks allow. A request's prefill covers
``input_tokens + generated - cached`` tokens (recompute after preemption or resume). When a
running request cannot get a KV block, the most recently admitted running request is
preempted by recomputation: its blocks are freed and it goes back to the front of the
waiting queue keeping ``generated``. No request is ever dropped.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from goodserve.errors import ConfigError, DuplicateRequest, PromptTooLarge
from goodserve.perf.latency import PerfModel
from goodserve.sim.kvcache import KVCacheManager

__all__ = ["InstanceStatus", "SimInstance", "SimRequest", "StepResult"]

_EMA = 0.2


@dataclass(slots=True)
class SimRequest:
    """A request as the simulated instance sees it (mutable: the instance records progress)."""

    request_id: str
    input_tokens: int
    output_tokens: int
    """Ground-truth output length: the engine stops after producing it (or max_tokens)."""
    max_tokens: int | None = None
    arrival: float = 0.0
    deadline: float = math.inf
    block_hashes: list[int] | None = None
    """Chained prefix-cache hashes of the prompt's full blocks; None = a unique prompt."""
    generated: int = 0
    """Tokens generated so far (a resumed request starts > 0 and recomputes prompt+generated)."""
    cached_tokens: int = 0
    """Prompt tokens served from the prefix cache at the (last) admission."""
    first_token_at: float | None = None
    finished_at: float | None = None
    preemptions: int = 0
    tag: object = None


@dataclass(slots=True)
class StepResult:
    start: float
    duration: float
    prefill_tokens: int
    decode_batch: int
    first_tokens: list[SimRequest] = field(default_factory=list)
    finished: list[SimRequest] = field(default_factory=list)
    preempted: list[SimRequest] = field(default_factory=list)


@dataclass(slots=True)
class InstanceStatus:
    running: int
    waiting: int
    kv_used_blocks: int
    kv_total_blocks: int
    block_size: int
    max_batch: int
    step_time_s: float
    """EMA of recent step durations."""
    tpot_s: float
    """EMA of recent decode-carrying step durations (time per output token)."""
    prefill_tokens_per_s: float
    prefix_hit_tokens: int
    prefix_query_tokens: int


class _Seq:
    """Internal per-request scheduling state."""

    __slots__ = (
        "admitted",
        "blocks",
        "computed",
        "limit",
        "n_registered",
        "preloaded",
        "req",
        "target",
    )

    def __init__(self, req: SimRequest, limit: int, preloaded: int) -> None:
        self.req = req
        self.limit = limit
        self.preloaded = preloaded
        self.blocks: list[int] = []
        self.computed = 0
        self.target = 0
        self.n_registered = 0
        self.admitted = False

    def remaining_prefill(self) -> int:
        if self.admitted:
            return max(0, self.target - self.computed)
        return self.req.input_tokens + self.req.generated


class SimInstance:
    """One simulated inference instance (a GPU, or a tensor-parallel group, running one model)."""

    def __init__(
        self,
        *,
        instance_id: str,
        gpu: str,
        model: str = "llama-2-7b",
        perf: PerfModel | None = None,
        max_batch: int = 256,
        max_batched_tokens: int = 8192,
        block_size: int = 16,
        gpu_memory_utilization: float = 0.9,
        kv_capacity_tokens: int | None = None,
        enable_prefix_cache: bool = True,
        speed_factor: float = 1.0,
    ) -> None:
        if max_batch < 1 or max_batched_tokens < 1 or block_size < 1:
            raise ConfigError("max_batch, max_batched_tokens and block_size must be >= 1")
        if not 0.0 < gpu_memory_utilization <= 1.0:
            raise ConfigError(
                f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}"
            )
        self.instance_id = instance_id
        self.perf: PerfModel = perf if perf is not None else PerfModel(gpu, model)
        self.gpu = gpu
        self.model = model
        self.max_batch = max_batch
        self.max_batched_tokens = max_batched_tokens
        self.block_size = block_size
        cap = (
            kv_capacity_tokens
            if kv_capacity_tokens is not None
            else self.perf.kv_capacity_tokens(gpu_memory_utilization)
        )
        num_blocks = cap // block_size
        if num_blocks < 1:
            raise ConfigError(
                f"{model} does not fit on {gpu} (KV capacity {cap} tokens < one block)"
            )
        self.kv = KVCacheManager(num_blocks, block_size, enable_prefix_cache=enable_prefix_cache)
        self.capacity_tokens = num_blocks * block_size
        self.speed_factor = speed_factor
        self._running: list[_Seq] = []
        self._waiting: deque[_Seq] = deque()
        self._seqs: dict[str, _Seq] = {}
        self._pending_prefill = 0
        self.tokens_generated = 0
        self.prefix_hit_tokens = 0
        self.prefix_query_tokens = 0
        self._ema_step = self.perf.tpot(1, 512)
        self._ema_tpot = self._ema_step
        self._ema_prefill_rate = 1024 / self.perf.prefill_time(1024)

    # -- runtime knobs ------------------------------------------------------------------
    @property
    def speed_factor(self) -> float:
        """Relative speed: step durations are multiplied by 1/speed_factor (0.5 = half speed)."""
        return self._speed

    @speed_factor.setter
    def speed_factor(self, value: float) -> None:
        if not value > 0:
            raise ConfigError(f"speed_factor must be > 0, got {value}")
        self._speed = float(value)

    # -- requests -------------------------------------------------------------------------
    def submit(self, req: SimRequest, now: float, *, preloaded_tokens: int = 0) -> None:
        """Queue a request. ``preloaded_tokens`` (extension): KV imported with the request
        (migration with exported KV) -- that many prompt+generated tokens skip prefill."""
        del now  # arrival is the caller's business; kept for API symmetry
        if req.request_id in self._seqs:
            raise DuplicateRequest(f"request {req.request_id!r} already on {self.instance_id}")
        inp = max(1, req.input_tokens)
        if inp + req.generated + 1 > self.capacity_tokens:
            raise PromptTooLarge(
                f"request {req.request_id!r}: {inp + req.generated} tokens exceed the KV "
                f"capacity of {self.instance_id} ({self.capacity_tokens} tokens)"
            )
        limit = req.output_tokens
        if req.max_tokens is not None:
            limit = min(limit, req.max_tokens)
        # like vLLM's max_model_len: a sequence never outgrows the KV capacity
        limit = max(1, min(limit, self.capacity_tokens - inp))
        s = _Seq(req, limit, max(0, preloaded_tokens))
        self._seqs[req.request_id] = s
        self._waiting.append(s)
        self._pending_prefill += s.remaining_prefill()

    def _remove(self, request_id: str) -> SimRequest | None:
        s = self._seqs.pop(request_id, None)
        if s is None:
            return None
        self._pending_prefill -= s.remaining_prefill()
        if s.admitted:
            self._running.remove(s)
            self.kv.free(s.blocks)
        else:
            self._waiting.remove(s)
        s.blocks = []
        s.admitted = False
        return s.req

    def abort(self, request_id: str) -> SimRequest | None:
        """Drop a request (waiting or running); returns it, or None if unknown."""
        return self._remove(request_id)

    def checkpoint(self, request_id: str) -> SimRequest | None:
        """Remove a request at a token boundary keeping ``generated`` (for migration)."""
        return self._remove(request_id)

    def has_work(self) -> bool:
        return bool(self._running or self._waiting)

    def requests(self) -> list[SimRequest]:
        return [s.req for s in self._running] + [s.req for s in self._waiting]

    def load_tokens(self) -> int:
        """Outstanding prefill tokens over all requests (kept incrementally: O(1))."""
        return self._pending_prefill

    def status(self) -> InstanceStatus:
        return InstanceStatus(
            running=len(self._running),
            waiting=len(self._waiting),
            kv_used_blocks=self.kv.num_used,
            kv_total_blocks=self.kv.num_blocks,
            block_size=self.block_size,
            max_batch=self.max_batch,
            step_time_s=self._ema_step,
            tpot_s=self._ema_tpot,
            prefill_tokens_per_s=self._ema_prefill_rate,
            prefix_hit_tokens=self.prefix_hit_tokens,
            prefix_query_tokens=self.prefix_query_tokens,
        )

    # -- the engine iteration ---------------------------------------------------------------
    def _preempt(self, s: _Seq) -> None:
        self._pending_prefill -= s.remaining_prefill()
        self.kv.free(s.blocks)
        s.blocks = []
        s.admitted = False
        s.computed = 0
        s.preloaded = 0  # imported KV is gone with the blocks
        s.req.preemptions += 1
        self._waiting.appendleft(s)
        self._pending_prefill += s.remaining_prefill()

    def step(self, now: float) -> StepResult:
        """Schedule and run one iteration starting at ``now`` (see the module docstring)."""
        kv = self.kv
        bs = self.block_size
        budget = self.max_batched_tokens
        running = self._running
        chunks: list[tuple[_Seq, int]] = []
        decodes: list[_Seq] = []
        preempted: list[SimRequest] = []

        i = 0
        while i < len(running) and budget > 0:
            s = running[i]
            n = min(s.target - s.computed, budget) if s.computed < s.target else 1
            need = -(-(s.computed + n) // bs) - len(s.blocks)
            self_preempted = False
            while need > 0:
                got = kv.allocate(need)
                if got is not None:
                    s.blocks.extend(got)
                    break
                victim = running.pop()
                self._preempt(victim)
                preempted.append(victim.req)
                if victim is s:
                    self_preempted = True
                    break
            if self_preempted:
                break
            budget -= n
            if s.computed < s.target:
                chunks.append((s, n))
            else:
                decodes.append(s)
            i += 1

        if not preempted:
            waiting = self._waiting
            max_batch = self.max_batch
            while waiting and budget > 0 and len(running) < max_batch:
                s = waiting[0]
                req = s.req
                target = max(1, req.input_tokens) + req.generated
                hashes = req.block_hashes
                hit = 0
                if hashes and kv.enable_prefix_cache:
                    hit = kv.lookup(hashes[: (target - 1) // bs])
                cached = hit * bs
                start = max(cached, min(s.preloaded, target - 1))
                n = min(target - start, budget)
                blocks = kv.acquire_cached(hashes[:hit]) if hit and hashes else []
                new = kv.allocate(-(-(start + n) // bs) - hit)
                if new is None:
                    kv.free(blocks)
                    break
                waiting.popleft()
                self._pending_prefill -= s.remaining_prefill()
                s.blocks = blocks + new
                s.admitted = True
                s.target = target
                s.computed = start
                s.n_registered = hit
                req.cached_tokens = start
                self.prefix_hit_tokens += cached
                self.prefix_query_tokens += req.input_tokens
                self._pending_prefill += target - start
                running.append(s)
                chunks.append((s, n))
                budget -= n

        prefill_tokens = 0
        pairs = 0.0
        for s, n in chunks:
            prefill_tokens += n
            pairs += n * (s.computed + n * 0.5)
        ctx = 0
        for s in decodes:
            ctx += s.computed
        nd = len(decodes)
        base = self.perf.step_time(
            prefill_tokens, nd, ctx, prefill_seqs=len(chunks), prefill_attn_pairs=pairs
        )
        duration = base / self._speed
        result = StepResult(now, duration, prefill_tokens, nd, [], [], preempted)
        if duration <= 0.0:
            return result
        end = now + duration

        finished = result.finished
        generated = 0
        for s, n in chunks:
            s.computed += n
            self._pending_prefill -= n
            req = s.req
            hashes = req.block_hashes
            if hashes:
                full = min(s.computed, req.input_tokens) // bs
                if full > len(hashes):
                    full = len(hashes)
                for j in range(s.n_registered, full):
                    kv.register(s.blocks[j], hashes[j])
                if full > s.n_registered:
                    s.n_registered = full
            if s.computed >= s.target:
                if req.generated < s.limit:
                    req.generated += 1
                    generated += 1
                if req.first_token_at is None:
                    req.first_token_at = end
                    result.first_tokens.append(req)
                if req.generated >= s.limit:
                    finished.append(req)
        for s in decodes:
            s.computed += 1
            req = s.req
            req.generated += 1
            generated += 1
            if req.generated >= s.limit:
                finished.append(req)
        self.tokens_generated += generated
        if finished:
            seqs = self._seqs
            for req in finished:
                req.finished_at = end
                s = seqs.pop(req.request_id)
                kv.free(s.blocks)
                s.blocks = []
                s.admitted = False
            self._running = [s for s in running if s.admitted]

        a = _EMA
        self._ema_step += a * (duration - self._ema_step)
        if nd:
            self._ema_tpot += a * (duration - self._ema_tpot)
        if prefill_tokens:
            self._ema_prefill_rate += a * (prefill_tokens / duration - self._ema_prefill_rate)
        return result
