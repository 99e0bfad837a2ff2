"""The simulated engine: a ``SimInstance`` driven in (scaled) real time behind the Engine API.

One asyncio task loops ``step()`` and sleeps ``duration * time_scale`` per iteration, so a
worker, the dispatcher and the monitor can run against a simulated heterogeneous fleet.
Sleeps target absolute times on a virtual clock (advanced by step durations while busy,
resynchronised to the wall clock when idle), so event-loop lateness does not accumulate.
Steps due within ``min_wake_s`` of each other run in one wake-up and their tokens leave as
one update per request: at a small ``time_scale`` a step lasts a fraction of a millisecond,
and waking the loop (and every request's consumer) per step costs more CPU than the fleet
it emulates. The simulated steps, and so every token's virtual time, are the same.

There is no model: token ids are synthesised deterministically from (request id, position),
so a migrated request resumes with exactly the ids an uninterrupted run would produce. A
request generates exactly ``max_tokens`` tokens in total, resume tokens included (there is
no EOS). ``kv_ref`` on a request means its prompt + resume tokens arrive with their KV, so
they are treated as cached instead of recomputed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator
from typing import Any

from goodserve.workers.engine import (
    EngineCheckpoint,
    EngineOutput,
    EngineRequest,
    EngineStatus,
    RequestState,
)

from goodserve.errors import ConfigError, DuplicateRequest, EngineError
from goodserve.perf.catalogue import get_gpu, get_model
from goodserve.sim.instance import SimInstance, SimRequest
from goodserve.sim.kvcache import (
    block_hashes_for_key,
    block_hashes_for_text,
    block_hashes_for_tokens,
)

__all__ = ["SimulatedEngine", "synthetic_token_id"]

MAX_STEPS_PER_WAKE = 64


def synthetic_token_id(request_id: str, position: int, vocab: int = 32000) -> int:
    """Deterministic stand-in for the token a model would produce at ``position``."""
    d = hashlib.blake2b(f"{request_id}\x00{position}".encode(), digest_size=4).digest()
    return int.from_bytes(d, "little") % vocab


class _Stream:
    __slots__ = ("emitted", "first_at", "queue", "req", "resume_ids")

    def __init__(self, req: SimRequest, resume_ids: list[int]) -> None:
        self.req = req
        self.resume_ids = resume_ids
        self.emitted = len(resume_ids)  # positions already streamed (resume included)
        self.first_at: float | None = None
        self.queue: asyncio.Queue[EngineOutput] = asyncio.Queue()


class SimulatedEngine:
    """Engine protocol over a simulated instance; ``time_scale`` < 1 runs faster than real time."""

    name = "simulated"

    def __init__(
        self,
        *,
        instance_id: str,
        gpu: str,
        model: str = "llama-2-7b",
        speed_factor: float = 1.0,
        time_scale: float = 1.0,
        min_wake_s: float = 0.001,
        **instance_kwargs: Any,
    ) -> None:
        if not time_scale > 0:
            raise ConfigError(f"time_scale must be > 0, got {time_scale}")
        if not 0.0 <= min_wake_s <= 1.0:
            raise ConfigError(f"min_wake_s must be in [0, 1], got {min_wake_s}")
        get_gpu(gpu)
        self._vocab = get_model(model).vocab
        self.instance_id = instance_id
        self.time_scale = float(time_scale)
        self.min_wake_s = float(min_wake_s)
        self.instance = SimInstance(
            instance_id=instance_id,
            gpu=gpu,
            model=model,
            speed_factor=speed_factor,
            **instance_kwargs,
        )
        self._streams: dict[str, _Stream] = {}
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._lock: asyncio.Lock | None = None
        self._t0 = 0.0
        self._vclock = 0.0
        self._running_flag = False

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        if self._running_flag:
            return
        loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._t0 = loop.time()
        self._vclock = 0.0
        self._running_flag = True
        self._task = asyncio.create_task(self._run(), name=f"sim-engine-{self.instance_id}")

    async def stop(self) -> None:
        if not self._running_flag:
            return
        self._running_flag = False
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for rid, st in list(self._streams.items()):
            self.instance.abort(rid)
            st.queue.put_nowait(self._final(st, "abort"))
        self._streams.clear()

    async def __aenter__(self) -> SimulatedEngine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- clocks ---------------------------------------------------------------------------
    def virtual_now(self) -> float:
        """Engine time in simulated seconds since start()."""
        return (asyncio.get_running_loop().time() - self._t0) / self.time_scale

    @property
    def speed_factor(self) -> float:
        return self.instance.speed_factor

    @speed_factor.setter
    def speed_factor(self, value: float) -> None:
        self.instance.speed_factor = value

    # -- requests -------------------------------------------------------------------------
    def _hashes(self, r: EngineRequest) -> list[int] | None:
        bs = self.instance.block_size
        if r.prompt_token_ids:
            return block_hashes_for_tokens(r.prompt_token_ids, bs)
        if r.prefix_key:
            return block_hashes_for_key(r.prefix_key, r.input_tokens, bs)
        if r.prompt:
            return block_hashes_for_text(r.prompt, bs)
        return None

    def _ids(self, st: _Stream, upto: int) -> list[int]:
        rid = st.req.request_id
        return [synthetic_token_id(rid, p, self._vocab) for p in range(st.emitted, upto)]

    def _final(self, st: _Stream, reason: str) -> EngineOutput:
        return EngineOutput(
            request_id=st.req.request_id,
            num_generated=st.emitted - len(st.resume_ids),
            finished=True,
            finish_reason=reason,
            first_token_at=st.first_at,
            cached_tokens=st.req.cached_tokens,
        )

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        """Run a request; yields one update per engine step that produced its tokens."""
        if not self._running_flag or self._wake is None:
            raise EngineError("SimulatedEngine.generate() before start()")
        rid = request.request_id
        if rid in self._streams:
            raise DuplicateRequest(f"request {rid!r} already running on {self.instance_id}")
        resume = list(request.resume_token_ids)
        sreq = SimRequest(
            request_id=rid,
            input_tokens=request.input_tokens,
            output_tokens=request.max_tokens,
            arrival=self.virtual_now(),
            deadline=request.deadline if request.deadline is not None else float("inf"),
            block_hashes=self._hashes(request),
            generated=len(resume),
        )
        st = _Stream(sreq, resume)
        if len(resume) >= request.max_tokens:
            yield self._final(st, "length")
            return
        preloaded = request.input_tokens + len(resume) if request.kv_ref else 0
        if not self.instance.has_work():
            self._vclock = max(self._vclock, self.virtual_now())
        self.instance.submit(sreq, self._vclock, preloaded_tokens=preloaded)
        self._streams[rid] = st
        self._wake.set()
        try:
            while True:
                out = await st.queue.get()
                yield out
                if out.finished:
                    return
        finally:
            if self._streams.get(rid) is st:  # consumer left early: free the slot
                del self._streams[rid]
                self.instance.abort(rid)

    async def abort(self, request_id: str) -> None:
        assert self._lock is not None
        async with self._lock:
            st = self._streams.pop(request_id, None)
            self.instance.abort(request_id)
            if st is not None:
                st.queue.put_nowait(self._final(st, "abort"))

    async def checkpoint(self, request_id: str) -> EngineCheckpoint:
        """Stop at the next token boundary (after the in-flight step) and return the tokens."""
        if self._lock is None:
            raise EngineError("SimulatedEngine.checkpoint() before start()")
        async with self._lock:
            st = self._streams.pop(request_id, None)
            if st is None:
                raise EngineError(f"unknown request {request_id!r} on {self.instance_id}")
            self.instance.checkpoint(request_id)
            rid = st.req.request_id
            ids = list(st.resume_ids) + [
                synthetic_token_id(rid, p, self._vocab)
                for p in range(len(st.resume_ids), st.emitted)
            ]
            st.queue.put_nowait(self._final(st, "migrated"))
            return EngineCheckpoint(request_id=request_id, generated_token_ids=ids)

    def status(self) -> EngineStatus:
        s = self.instance.status()
        reqs = self.instance.requests()
        states = [
            RequestState(
                request_id=r.request_id,
                state="running" if i < s.running else "waiting",
                generated=r.generated,
                input_tokens=r.input_tokens,
            )
            for i, r in enumerate(reqs)
        ]
        return EngineStatus(
            running=s.running,
            waiting=s.waiting,
            max_batch=s.max_batch,
            kv_used_blocks=s.kv_used_blocks,
            kv_total_blocks=s.kv_total_blocks,
            kv_block_size=s.block_size,
            step_time_s=s.step_time_s,
            tpot_s=s.tpot_s,
            prefill_tokens_per_s=s.prefill_tokens_per_s,
            tokens_generated=self.instance.tokens_generated,
            prefix_hit_tokens=s.prefix_hit_tokens,
            prefix_query_tokens=s.prefix_query_tokens,
            requests=states,
        )

    # -- the loop -------------------------------------------------------------------------
    def _emit(self, done: set[str]) -> None:
        """One update per stream with new tokens (or finished: ``done``) since the last."""
        wall = time.time()
        for rid, st in list(self._streams.items()):
            g = st.req.generated
            fin = rid in done
            if g <= st.emitted and not fin:
                continue
            ids = self._ids(st, g)
            if ids and st.first_at is None:
                st.first_at = wall
            st.emitted = max(st.emitted, g)
            if fin:
                del self._streams[rid]
            st.queue.put_nowait(
                EngineOutput(
                    request_id=rid,
                    new_token_ids=ids,
                    num_generated=st.emitted - len(st.resume_ids),
                    finished=fin,
                    finish_reason="length" if fin else None,
                    first_token_at=st.first_at,
                    cached_tokens=st.req.cached_tokens,
                )
            )

    async def _run(self) -> None:
        assert self._wake is not None and self._lock is not None
        loop = asyncio.get_running_loop()
        inst = self.instance
        while True:
            if not inst.has_work():
                self._wake.clear()
                await self._wake.wait()
                self._vclock = max(self._vclock, self.virtual_now())
                continue
            async with self._lock:
                res = inst.step(self._vclock)
                if res.duration <= 0.0:
                    await asyncio.sleep(0.001)  # nothing schedulable; cannot happen normally
                    continue
                self._vclock += res.duration
                done = {r.request_id for r in res.finished}
                # further steps due before the wake-up after this one would be: same wake-up
                # (at most MAX_STEPS_PER_WAKE: catching up after a stall keeps the loop responsive)
                horizon = loop.time() + self.min_wake_s
                for _ in range(MAX_STEPS_PER_WAKE - 1):
                    if not inst.has_work() or self._t0 + self._vclock * self.time_scale >= horizon:
                        break
                    res = inst.step(self._vclock)
                    if res.duration <= 0.0:
                        break
                    self._vclock += res.duration
                    done.update(r.request_id for r in res.finished)
                delay = self._t0 + self._vclock * self.time_scale - loop.time()
                await asyncio.sleep(max(0.0, delay))
                self._emit(done)
