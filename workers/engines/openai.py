"""The OpenAI-backend engine: forward requests to an existing OpenAI-compatible server.

An instance of the fleet with an ``endpoint`` is a server someone else runs (``vllm serve``,
llm-d's inference simulator, ...). This engine streams each request to its
``/v1/completions`` and measures TTFT and TPOT itself from the arrival of the streamed
chunks, so the dispatcher learns the instance's real speed from heartbeats.

Token ids: the request asks for them (``return_token_ids``, vLLM >= 0.10.2; older vLLM
and other servers ignore it). When the server returns ids, ``checkpoint()`` can hand the
request to another instance and ``resume_token_ids`` are continued by sending
``prompt + generated`` as a token-id prompt; greedy output is then identical to an
uninterrupted run. What it cannot do: export KV (``kv_ref`` is always None: the target
recomputes the prefix), resume a text prompt on a server without token ids, or stop a
server-side request other than by closing the HTTP stream (vLLM aborts on disconnect).

Load: ``status()`` combines its own counts (requests in flight, measured TPOT) with the
server's Prometheus gauges when it exposes vLLM's ``vllm:num_requests_running``,
``vllm:num_requests_waiting`` and ``vllm:kv_cache_usage_perc`` (polled every
``metrics_period_s``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
from goodserve.workers.engine import (
    EngineCheckpoint,
    EngineOutput,
    EngineRequest,
    EngineStatus,
    RequestState,
)

from goodserve.errors import ConfigError, DuplicateRequest, EngineError
from goodserve.logging import get_logger

__all__ = ["OpenAIEngine", "parse_vllm_metrics"]

log = get_logger(__name__)

KV_SCALE_BLOCKS = 10_000
"""The KV gauge is a fraction; heartbeats carry blocks, so it is reported out of this many."""

_GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
           "vllm:gpu_cache_usage_perc")


def parse_vllm_metrics(text: str) -> dict[str, float]:
    """Sum vLLM's gauges over label sets from a Prometheus text exposition."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in _GAUGES:
            try:
                out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
            except (ValueError, IndexError):
                continue
    if "vllm:kv_cache_usage_perc" not in out and "vllm:gpu_cache_usage_perc" in out:
        out["vllm:kv_cache_usage_perc"] = out["vllm:gpu_cache_usage_perc"]
    return out


class _Run:
    """One request being streamed from the server."""

    __slots__ = ("generated", "ids", "ids_known", "input_tokens", "queue", "stop_reason", "task")

    def __init__(self, input_tokens: int, resume: list[int]) -> None:
        self.queue: asyncio.Queue[EngineOutput | EngineError] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None
        self.ids: list[int] = list(resume)
        self.ids_known = True
        self.generated = 0
        self.input_tokens = input_tokens
        self.stop_reason: str | None = None


class OpenAIEngine:
    """Engine protocol over an OpenAI-compatible HTTP server (streaming completions)."""

    name = "openai"

    def __init__(
        self,
        *,
        endpoint: str,
        model: str,
        instance_id: str = "openai",
        api_key: str | None = None,
        max_batch: int = 256,
        timeout_s: float = 600.0,
        metrics_period_s: float = 1.0,
        request_token_ids: bool = True,
    ) -> None:
        if not endpoint.startswith(("http://", "https://")):
            raise ConfigError(f"endpoint must be an http(s) URL, got {endpoint!r}")
        if not model:
            raise ConfigError("model (the served model name) must be non-empty")
        if max_batch < 1 or timeout_s <= 0 or metrics_period_s <= 0:
            raise ConfigError("max_batch >= 1, timeout_s > 0 and metrics_period_s > 0 required")
        base = endpoint.rstrip("/")
        self.base_url = base[: -len("/v1")] if base.endswith("/v1") else base
        self.model = model
        self.instance_id = instance_id
        self.api_key = api_key
        self.max_batch = max_batch
        self.timeout_s = timeout_s
        self.metrics_period_s = metrics_period_s
        self.request_token_ids = request_token_ids
        self._client: httpx.AsyncClient | None = None
        self._poller: asyncio.Task[None] | None = None
        self._runs: dict[str, _Run] = {}
        self._server: dict[str, float] = {}
        self.server_metrics = False
        self._tpot_ema = 0.0
        self._tokens = 0
        self._prefill_rate = 0.0

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        if self._client is not None:
            return
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(self.timeout_s, connect=10.0),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
        )
        self._poller = asyncio.create_task(
            self._poll_metrics(), name=f"openai-metrics-{self.instance_id}"
        )

    async def stop(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        for rid in list(self._runs):
            await self._halt(rid, "abort")
        await client.aclose()

    async def __aenter__(self) -> OpenAIEngine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- requests ---------------------------------------------------------------------------
    def _body(self, r: EngineRequest) -> dict[str, Any]:
        resume = list(r.resume_token_ids)
        prompt: str | list[int]
        if r.prompt_token_ids:
            prompt = [*r.prompt_token_ids, *resume]
        elif resume:
            raise EngineError(
                "cannot resume a text prompt by token ids (no prompt_token_ids); "
                "send token-id prompts to migrate between OpenAI-backend instances"
            )
        else:
            prompt = r.prompt or ""
        sp = r.sampling
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": max(1, r.max_tokens - len(resume)),
            "temperature": sp.temperature,
            "top_p": sp.top_p,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if sp.seed is not None:
            body["seed"] = sp.seed
        if sp.top_k > 0:
            body["top_k"] = sp.top_k
        if sp.stop_token_ids:
            body["stop_token_ids"] = sp.stop_token_ids
        if sp.ignore_eos:
            body["ignore_eos"] = True
        if self.request_token_ids:
            body["return_token_ids"] = True
        return body

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        """Stream one request from the server; yields per chunk, last has ``finished``."""
        if self._client is None:
            raise EngineError("OpenAIEngine.generate() before start()")
        rid = request.request_id
        if rid in self._runs:
            raise DuplicateRequest(f"request {rid!r} already running on {self.instance_id}")
        resume = list(request.resume_token_ids)
        if len(resume) >= request.max_tokens:
            yield EngineOutput(request_id=rid, finished=True, finish_reason="length")
            return
        body = self._body(request)
        run = _Run(request.input_tokens, resume)
        self._runs[rid] = run
        run.task = asyncio.create_task(self._stream(rid, run, body), name=f"openai-{rid}")
        try:
            while True:
                out = await run.queue.get()
                if isinstance(out, EngineError):
                    raise out
                yield out
                if out.finished:
                    return
        finally:
            if self._runs.get(rid) is run:  # consumer left early: close the server stream
                await self._halt(rid, "abort")

    async def _stream(self, rid: str, run: _Run, body: dict[str, Any]) -> None:
        assert self._client is not None
        t0 = time.time()
        first_at: float | None = None
        last_at = t0
        reason: str | None = None
        try:
            async with self._client.stream("POST", "/v1/completions", json=body) as resp:
                if resp.status_code >= 400:
                    detail = (await resp.aread()).decode(errors="replace")[:500]
                    raise EngineError(f"{self.base_url} answered {resp.status_code}: {detail}")
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    try:
                        obj = json.loads(data)
                    except json.JSONDecodeError:
                        continue
                    usage = obj.get("usage") or {}
                    choices = obj.get("choices") or []
                    if not choices:
                        n = int(usage.get("completion_tokens") or 0)
                        if n > run.generated and not run.ids_known:
                            run.generated = n
                        continue
                    ch = choices[0]
                    text = ch.get("text") or ""
                    ids = ch.get("token_ids")
                    if isinstance(ids, list):
                        new = [int(i) for i in ids]
                    else:
                        run.ids_known = False
                        new = []
                    n_new = len(new) if ids is not None else (1 if text else 0)
                    now = time.time()
                    if n_new:
                        if first_at is None:
                            first_at = now
                            if run.input_tokens and now > t0:
                                rate = run.input_tokens / (now - t0)
                                self._prefill_rate = rate if not self._prefill_rate else (
                                    0.8 * self._prefill_rate + 0.2 * rate)
                        else:
                            tpot = (now - last_at) / n_new
                            self._tpot_ema = tpot if not self._tpot_ema else (
                                0.9 * self._tpot_ema + 0.1 * tpot)
                        last_at = now
                        run.ids.extend(new)
                        run.generated += n_new
                        self._tokens += n_new
                    if ch.get("finish_reason"):
                        reason = str(ch["finish_reason"])
                    if n_new or text:
                        run.queue.put_nowait(EngineOutput(
                            request_id=rid, new_token_ids=new, new_text=text,
                            num_generated=run.generated, first_token_at=first_at))
            final = EngineOutput(request_id=rid, num_generated=run.generated, finished=True,
                                 finish_reason=reason or "stop", first_token_at=first_at)
        except asyncio.CancelledError:
            return  # halted: _halt() queued the final output
        except (httpx.HTTPError, EngineError) as e:
            log.warning("openai_engine.request_failed", request_id=rid, error=str(e))
            if self._runs.get(rid) is run:
                del self._runs[rid]
            run.queue.put_nowait(e if isinstance(e, EngineError) else EngineError(
                f"{self.base_url}: {type(e).__name__}: {e}"))
            return
        if self._runs.get(rid) is run:
            del self._runs[rid]
        run.queue.put_nowait(final)

    async def _halt(self, rid: str, reason: str) -> _Run | None:
        """Cancel the HTTP stream (the server aborts the request) and end the output stream."""
        run = self._runs.pop(rid, None)
        if run is None:
            return None
        if run.task is not None and not run.task.done():
            run.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await run.task
        run.stop_reason = reason
        run.queue.put_nowait(EngineOutput(request_id=rid, num_generated=run.generated,
                                          finished=True, finish_reason=reason))
        return run

    async def abort(self, request_id: str) -> None:
        await self._halt(request_id, "abort")

    async def checkpoint(self, request_id: str) -> EngineCheckpoint:
        """Stop at the last received token; needs the server's token ids (no KV export)."""
        run = self._runs.get(request_id)
        if run is None:
            raise EngineError(f"unknown request {request_id!r} on {self.instance_id}")
        if not run.ids_known:
            raise EngineError(f"{self.base_url} returns no token ids: cannot checkpoint")
        await self._halt(request_id, "migrated")
        return EngineCheckpoint(request_id=request_id, generated_token_ids=list(run.ids))

    # -- status -----------------------------------------------------------------------------
    def status(self) -> EngineStatus:
        own = len(self._runs)
        running, waiting = own, 0
        kv_used = 0
        if self.server_metrics:
            running = int(self._server.get("vllm:num_requests_running", own))
            waiting = int(self._server.get("vllm:num_requests_waiting", 0))
            kv_used = round(self._server.get("vllm:kv_cache_usage_perc", 0.0) * KV_SCALE_BLOCKS)
        return EngineStatus(
            running=running,
            waiting=waiting,
            max_batch=self.max_batch,
            kv_used_blocks=kv_used,
            kv_total_blocks=KV_SCALE_BLOCKS if self.server_metrics else 0,
            tpot_s=self._tpot_ema,
            step_time_s=self._tpot_ema,
            prefill_tokens_per_s=self._prefill_rate,
            tokens_generated=self._tokens,
            requests=[RequestState(request_id=rid, state="running", generated=r.generated,
                                   input_tokens=r.input_tokens)
                      for rid, r in self._runs.items()],
        )

    async def _poll_metrics(self) -> None:
        """Scrape the server's /metrics; a server without vLLM's gauges is polled no more."""
        misses = 0
        while self._client is not None and misses < 3:
            try:
                resp = await self._client.get("/metrics", timeout=5.0)
                got = parse_vllm_metrics(resp.text) if resp.status_code == 200 else {}
            except httpx.HTTPError:
                got = {}
            if got:
                self._server, self.server_metrics, misses = got, True, 0
            else:
                misses += 1
                self.server_metrics = False
            await asyncio.sleep(self.metrics_period_s)
