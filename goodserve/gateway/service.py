"""GatewayService: an OpenAI-compatible HTTP front (FastAPI + uvicorn) over Kafka.

Each ``POST /v1/completions`` or ``/v1/chat/completions`` becomes an ``AgentRequest`` on the
requests topic; the answer is its ``Result`` from the results topic, or, when streaming,
the ``TokenChunk``s its worker produces to the ``stream`` topic followed by the Result
(which is authoritative: whatever chunks missed is sent from it at the end). The gateway
reads results, stream and decisions without a consumer group, from their end, so several
gateways can run side by side. Decisions tell it which instance holds a request; a client
that disconnects gets an ``AbortCommand`` sent to that instance.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from goodserve.client import GoodServeClient
from goodserve.config import Settings
from goodserve.errors import ConfigError, GoodServeError, InvalidInput
from goodserve.lifecycle import AsyncService
from goodserve.logging import get_logger
from goodserve.schemas import AbortCommand, AgentRequest, Decision, Result, TokenChunk
from goodserve.transport import TypedConsumer, TypedProducer, ensure_topics

from .config import GatewayConfig
from .openai_format import (
    BadParam,
    ParsedCall,
    completion_body,
    error_body,
    estimate_tokens,
    finish_of,
    goodserve_info,
    parse_call,
    parse_headers,
    stream_event,
)

__all__ = ["GatewayService"]

log = get_logger(__name__)

H_REQUEST_ID = "x-goodserve-request-id"
H_INSTANCE = "x-goodserve-instance"
H_MET = "x-goodserve-deadline-met"


def _err(status: int, message: str, *, type_: str = "invalid_request_error",
         param: str | None = None, code: str | None = None,
         headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_=type_, param=param, code=code),
                        status_code=status, headers=headers)


class _BodyLimit:
    """ASGI middleware: 413 for bodies over the limit (declared or streamed)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for k, v in scope.get("headers", []):
            if k == b"content-length" and v.isdigit() and int(v) > self.limit:
                await self._reject(scope, receive, send)
                return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge
            return msg

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._reject(scope, receive, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        resp = _err(413, f"request body exceeds {self.limit} bytes", code="body_too_large")
        await resp(scope, receive, send)


class _TooLarge(Exception):
    pass


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the command owns SIGINT/SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class GatewayService(AsyncService):
    """The OpenAI-compatible HTTP gateway: start/stop, or ``async with``."""

    def __init__(self, *, settings: Settings, config: GatewayConfig | None = None) -> None:
        if not isinstance(settings, Settings):
            raise ConfigError("settings must be a goodserve.config.Settings")
        config = config or GatewayConfig()
        if not isinstance(config, GatewayConfig):
            raise ConfigError("config must be a GatewayConfig")
        self.settings = settings
        self.config = config
        self.body_limit = config.max_body_bytes or settings.max_record_bytes
        """The largest request body taken (413 above it)."""
        self.stream_topic = settings.topic("stream")
        self.app = self._build_app()
        self._client: GoodServeClient | None = None
        self._producer: TypedProducer | None = None
        self._stream_c: TypedConsumer[TokenChunk] | None = None
        self._decision_c: TypedConsumer[Decision] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._server: _Server | None = None
        self._serve_task: asyncio.Task[None] | None = None
        self._chunks: dict[str, asyncio.Queue[TokenChunk]] = {}
        self._instance_of: OrderedDict[str, str] = OrderedDict()
        self._pending_abort: dict[str, float] = {}
        self._inflight: dict[str, int] = {}
        self._bg: set[asyncio.Task[Any]] = set()
        self._tokenizer: Any = None
        self.port = config.port
        self.aborts_sent = 0
        reg = self.registry = CollectorRegistry()
        self._m_requests = Counter("goodserve_gateway_requests", "HTTP calls by route and status",
                                   ["route", "status"], registry=reg)
        self._m_latency = Histogram("goodserve_gateway_latency_seconds",
                                    "time to the full answer", ["route"], registry=reg,
                                    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120))
        self._m_inflight = Gauge("goodserve_gateway_inflight", "requests awaiting answers",
                                 registry=reg)
        self._m_met = Counter("goodserve_gateway_deadline", "answered requests by deadline met",
                              ["met"], registry=reg)
        self._m_aborts = Counter("goodserve_gateway_aborts", "aborts sent (client gone)",
                                 registry=reg)

    # --- lifecycle -------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        host = self.config.host if self.config.host not in ("0.0.0.0", "::") else "127.0.0.1"
        return f"http://{host}:{self.port}/v1"

    async def start(self) -> None:
        """Connect to Kafka (results, stream, decisions), load the tokenizer, then listen."""
        if self._serve_task is not None:
            return
        s = self.settings
        if self.config.tokenizer:
            self._tokenizer = await asyncio.to_thread(self._load_tokenizer, self.config.tokenizer)
        await ensure_topics(s, [s.requests_topic, s.results_topic, self.stream_topic,
                                s.decisions_topic])
        client = GoodServeClient(settings=s)
        producer = TypedProducer(settings=s, client_id=f"{s.client_id}-gateway")
        stream_c: TypedConsumer[TokenChunk] = TypedConsumer(
            settings=s, topics=self.stream_topic, group_id=None, service="gateway-stream",
            message_type=TokenChunk, auto_offset_reset="latest")
        decision_c: TypedConsumer[Decision] = TypedConsumer(
            settings=s, topics=s.decisions_topic, group_id=None, service="gateway-decisions",
            message_type=Decision, auto_offset_reset="latest")
        started: list[Any] = []
        try:
            for c in (client, producer, stream_c, decision_c):
                await c.start()
                started.append(c)
            await GoodServeClient._pin_to_end(stream_c)
            await GoodServeClient._pin_to_end(decision_c)
        except BaseException:
            for c in reversed(started):
                with contextlib.suppress(Exception):
                    await c.stop()
            raise
        self._client, self._producer = client, producer
        self._stream_c, self._decision_c = stream_c, decision_c
        self._tasks = [asyncio.create_task(self._read_stream(), name="gateway-stream"),
                       asyncio.create_task(self._read_decisions(), name="gateway-decisions")]
        cfg = uvicorn.Config(self.app, host=self.config.host, port=self.config.port,
                             log_level="warning", lifespan="off", access_log=False,
                             timeout_graceful_shutdown=5)
        server = _Server(cfg)
        self._server = server
        self._serve_task = asyncio.create_task(server.serve(), name="gateway-http")
        while not server.started:
            if self._serve_task.done():
                exc = self._serve_task.exception()
                await self._close_kafka()
                self._serve_task = None
                raise ConfigError(f"gateway could not listen on {self.config.host}:"
                                  f"{self.config.port}: {exc or 'exited'}")
            await asyncio.sleep(0.02)
        for srv in server.servers:
            for sock in srv.sockets:
                self.port = sock.getsockname()[1]
                break
        if self.config.open_access:
            log.warning("gateway.open_access", host=self.config.host,
                        why="no API keys configured: anyone who can reach it may call it")
        log.info("gateway.started", url=self.base_url, auth=not self.config.open_access)

    async def stop(self) -> None:
        """Stop listening (in-flight calls get up to 5 s), then disconnect. Idempotent."""
        task, self._serve_task = self._serve_task, None
        if task is None:
            return
        if self._server is not None:
            self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(task, timeout=10.0)
        await self._close_kafka()

    async def _close_kafka(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks = []
        if self._bg:
            await asyncio.wait(self._bg, timeout=5.0)
        for c in (self._stream_c, self._decision_c, self._client, self._producer):
            if c is not None:
                with contextlib.suppress(GoodServeError):
                    await c.stop()
        self._stream_c = self._decision_c = None
        self._client = None
        self._producer = None

    # --- tokenizer -------------------------------------------------------------------------
    @staticmethod
    def _load_tokenizer(name: str) -> Any:
        try:
            from transformers import AutoTokenizer
        except ImportError as e:
            raise ConfigError("--tokenizer needs the transformers package") from e
        try:
            return AutoTokenizer.from_pretrained(name)
        except Exception as e:
            raise ConfigError(f"cannot load tokenizer {name!r}: {e}") from e

    def _template(self) -> Callable[[list[dict[str, str]]], str] | None:
        tok = self._tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            return None

        def render(msgs: list[dict[str, str]]) -> str:
            return str(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))

        return render

    def _count(self, call: ParsedCall) -> int:
        if call.prompt_token_ids is not None:
            return len(call.prompt_token_ids)
        text = call.prompt or ""
        if self._tokenizer is not None:
            return max(1, len(self._tokenizer.encode(text, add_special_tokens=False)))
        return estimate_tokens(text)

    def _text(self, ids: list[int], text: str) -> str:
        if text or not ids or self._tokenizer is None:
            return text
        return str(self._tokenizer.decode(ids, skip_special_tokens=True))

    # --- Kafka readers ---------------------------------------------------------------------
    def _learn_instance(self, rid: str, instance: str) -> None:
        self._instance_of[rid] = instance
        self._instance_of.move_to_end(rid)
        while len(self._instance_of) > 100_000:
            self._instance_of.popitem(last=False)
        if rid in self._pending_abort:
            self._pending_abort.pop(rid, None)
            self._spawn(self._send_abort(rid, instance, "client disconnected"))

    async def _read_stream(self) -> None:
        assert self._stream_c is not None
        async for env in self._stream_c:
            ch = env.msg
            if ch.instance_id:
                self._learn_instance(ch.request_id, ch.instance_id)
            q = self._chunks.get(ch.request_id)
            if q is not None:
                q.put_nowait(ch)

    async def _read_decisions(self) -> None:
        assert self._decision_c is not None
        async for env in self._decision_c:
            d = env.msg
            if d.chosen and d.outcome in ("assigned", "migrated"):
                self._learn_instance(d.request_id, d.chosen)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        t = asyncio.ensure_future(coro)
        self._bg.add(t)
        t.add_done_callback(self._bg.discard)

    async def _send_abort(self, rid: str, instance: str, reason: str) -> None:
        if self._producer is None:
            return
        try:
            await self._producer.send(
                self.settings.instance_topic(instance),
                AbortCommand(request_id=rid, instance_id=instance, at=time.time(),
                             reason=reason), key=rid)
            self.aborts_sent += 1
            self._m_aborts.inc()
            log.info("gateway.abort_sent", request_id=rid, instance_id=instance)
        except GoodServeError as e:
            log.warning("gateway.abort_failed", request_id=rid, error=str(e))

    def _abort(self, rid: str, reason: str) -> None:
        """Abort on its instance now, or as soon as the gateway learns which one it is."""
        inst = self._instance_of.get(rid)
        if inst is not None:
            self._spawn(self._send_abort(rid, inst, reason))
        else:
            now = time.time()
            self._pending_abort[rid] = now
            for k, t in list(self._pending_abort.items()):
                if now - t > 600:
                    del self._pending_abort[k]

    # --- HTTP ------------------------------------------------------------------------------
    def _build_app(self) -> FastAPI:
        app = FastAPI(title="GoodServe gateway", docs_url=None, redoc_url=None,
                      openapi_url=None)
        app.add_middleware(_BodyLimit, limit=self.body_limit)

        @app.get("/health")
        async def health() -> JSONResponse:
            ok = self._client is not None and not any(t.done() for t in self._tasks)
            return JSONResponse({"status": "ok" if ok else "unavailable",
                                 "auth": not self.config.open_access},
                                status_code=200 if ok else 503)

        @app.get("/metrics")
        async def metrics() -> Response:
            return Response(generate_latest(self.registry),
                            media_type="text/plain; version=0.0.4")

        @app.get("/v1/models")
        async def models(request: Request) -> Response:
            if (bad := self._auth(request)) is not None:
                return bad
            names = self.config.models or ("default",)
            return JSONResponse({"object": "list", "data": [
                {"id": m, "object": "model", "created": 0, "owned_by": "goodserve"}
                for m in names]})

        @app.post("/v1/completions")
        async def completions(request: Request) -> Response:
            return await self._call(request, "completion")

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Response:
            return await self._call(request, "chat")

        return app

    def _auth(self, request: Request) -> JSONResponse | None:
        if self.config.open_access:
            return None
        got = request.headers.get("authorization", "")
        scheme, _, token = got.partition(" ")
        if scheme.lower() == "bearer" and token:
            tok = token.strip().encode()
            for key in self.config.api_keys:
                if hmac.compare_digest(tok, key.encode()):
                    return None
        return _err(401, "missing or invalid API key (Authorization: Bearer <key>)",
                    type_="authentication_error", code="invalid_api_key")

    def _key_of(self, request: Request) -> str:
        return request.headers.get("authorization", "").partition(" ")[2].strip() or "-"

    async def _call(self, request: Request, kind: str) -> Response:
        route = "chat" if kind == "chat" else "completions"
        resp = await self._call_inner(request, kind)
        self._m_requests.labels(route, str(resp.status_code)).inc()
        return resp

    async def _call_inner(self, request: Request, kind: str) -> Response:
        if (bad := self._auth(request)) is not None:
            return bad
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return _err(400, f"the body is not valid JSON: {e}", code="invalid_json")
        try:
            call = parse_call(body, kind=kind, default_max_tokens=self.config.default_max_tokens,
                              max_max_tokens=self.config.max_max_tokens,
                              template=self._template())
            hdr = parse_headers(request.headers)
        except BadParam as e:
            return _err(400, str(e), param=e.param)
        except InvalidInput as e:
            return _err(400, str(e))
        if self.config.models and call.model not in self.config.models \
                and call.model != "default":
            return _err(404, f"model {call.model!r} is not served here "
                        f"(served: {', '.join(self.config.models)})", code="model_not_found")
        if self._client is None:
            return _err(503, "gateway not connected", type_="server_error",
                        headers={"Retry-After": str(self.config.retry_after_s)})
        key = self._key_of(request)
        if self._inflight.get(key, 0) >= self.config.max_inflight_per_key:
            return _err(429, f"more than {self.config.max_inflight_per_key} requests in flight "
                        "for this key", type_="rate_limit_error", code="too_many_inflight",
                        headers={"Retry-After": str(self.config.retry_after_s)})
        now = time.time()
        deadline = hdr.deadline if hdr.deadline is not None else now + (
            hdr.slo_s if hdr.slo_s is not None else self.config.default_slo_s)
        if deadline <= now:
            return _err(400, "the deadline has already passed", param="x-goodserve-deadline")
        rid = f"gs-{uuid.uuid4().hex}"
        meta = {"gateway": "openai", "api": kind}
        if call.stream:
            meta["stream"] = "1"
        if not self.config.max_tokens_bound:
            meta["max_tokens_bound"] = "0"
        req = AgentRequest(
            request_id=rid, model=call.model, task=hdr.task, workflow_id=hdr.workflow_id,
            step=hdr.step, prompt=call.prompt, prompt_token_ids=call.prompt_token_ids,
            input_tokens=self._count(call), max_tokens=call.max_tokens, sampling=call.sampling,
            arrival=now, deadline=deadline, ttft_slo_s=hdr.ttft_s, priority=hdr.priority,
            output_tokens_hint=hdr.output_tokens_hint, metadata=meta,
        )
        self._inflight[key] = self._inflight.get(key, 0) + 1
        self._m_inflight.inc()
        release = True
        try:
            if call.stream:
                self._chunks[rid] = asyncio.Queue()
                resp = await self._start_stream(request, call, req, key)
                release = not isinstance(resp, StreamingResponse)
                return resp
            return await self._unary(request, call, req)
        finally:
            if release:
                self._release(rid, key)

    def _release(self, rid: str, key: str) -> None:
        self._chunks.pop(rid, None)
        n = self._inflight.get(key, 1) - 1
        if n <= 0:
            self._inflight.pop(key, None)
        else:
            self._inflight[key] = n
        self._m_inflight.dec()

    def _wait_budget(self, req: AgentRequest) -> float:
        assert req.deadline is not None
        return req.deadline + self.config.deadline_grace_s - time.time()

    def _refused(self, res: Result) -> Response | None:
        """The HTTP answer for a Result that is not a success (None when it is one)."""
        hdrs = {H_REQUEST_ID: res.request_id}
        if res.status == "ok":
            return None
        msg = res.error.message if res.error else res.status
        if res.status == "rejected":
            code = res.error.code if res.error else "rejected"
            if code in ("invalid_request", "invalid_input", "prompt_too_large"):
                return _err(400, msg, code=code, headers=hdrs)
            hdrs["Retry-After"] = str(self.config.retry_after_s)
            return _err(503, f"request refused: {msg}", type_="server_error", code=code,
                        headers=hdrs)
        if res.status == "aborted":
            hdrs["Retry-After"] = str(self.config.retry_after_s)
            return _err(503, "request aborted on its instance", type_="server_error",
                        code="aborted", headers=hdrs)
        return _err(502, f"the instance failed: {msg}", type_="server_error",
                    code=res.error.code if res.error else "engine_error", headers=hdrs)

    def _headers(self, res: Result) -> dict[str, str]:
        h = {H_REQUEST_ID: res.request_id, H_INSTANCE: res.instance_id or ""}
        if res.met_deadline is not None:
            h[H_MET] = "true" if res.met_deadline else "false"
        return h

    async def _await_result(self, request: Request, req: AgentRequest) -> Result | None:
        """The Result, or None when the client left (aborted) or the deadline+grace passed."""
        assert self._client is not None
        rid = req.request_id
        while True:
            budget = self._wait_budget(req)
            if budget <= 0:
                return None
            try:
                return await self._client.result(rid, timeout=min(0.25, budget))
            except TimeoutError:
                pass
            if await request.is_disconnected():
                self._abort(rid, "client disconnected")
                raise _Gone

    async def _unary(self, request: Request, call: ParsedCall, req: AgentRequest) -> Response:
        assert self._client is not None
        await self._client.submit(req)
        try:
            res = await self._await_result(request, req)
        except _Gone:
            return _err(499, "client closed the request", code="client_closed")
        if res is None:
            self._abort(req.request_id, "deadline passed")
            return _err(504, "the request's deadline passed unanswered", type_="timeout_error",
                        code="deadline_exceeded", headers={H_REQUEST_ID: req.request_id})
        if (bad := self._refused(res)) is not None:
            return bad
        self._observe(call, res)
        text = self._text(res.output_token_ids, res.text)
        return JSONResponse(completion_body(call, res, text), headers=self._headers(res))

    def _observe(self, call: ParsedCall, res: Result) -> None:
        if res.arrival and res.finished_at:
            self._m_latency.labels(call.kind).observe(max(0.0, res.finished_at - res.arrival))
        self._m_met.labels(str(bool(res.met_deadline)).lower()).inc()

    async def _start_stream(self, request: Request, call: ParsedCall, req: AgentRequest,
                            key: str) -> Response:
        """Wait for the first chunk (it names the instance: a header), then stream SSE."""
        assert self._client is not None
        rid = req.request_id
        q = self._chunks[rid]
        await self._client.submit(req)
        first: TokenChunk | None = None
        res: Result | None = None
        while first is None and res is None:
            budget = self._wait_budget(req)
            if budget <= 0:
                self._abort(rid, "deadline passed")
                return _err(504, "the request's deadline passed unanswered",
                            type_="timeout_error", code="deadline_exceeded",
                            headers={H_REQUEST_ID: rid})
            with contextlib.suppress(TimeoutError):
                first = await asyncio.wait_for(q.get(), timeout=min(0.25, budget))
                break
            with contextlib.suppress(TimeoutError):
                res = await self._client.result(rid, timeout=0.0001)
            if res is None and await request.is_disconnected():
                self._abort(rid, "client disconnected")
                return _err(499, "client closed the request", code="client_closed")
        if res is not None and (bad := self._refused(res)) is not None:
            return bad
        instance = (first.instance_id if first else None) or (res.instance_id if res else "")
        headers = {H_REQUEST_ID: rid, H_INSTANCE: instance or "", "Cache-Control": "no-cache"}
        return StreamingResponse(self._sse(call, req, key, first, res),
                                 media_type="text/event-stream", headers=headers)

    async def _sse(self, call: ParsedCall, req: AgentRequest, key: str,
                   first: TokenChunk | None, res: Result | None) -> AsyncIterator[bytes]:
        assert self._client is not None
        rid = req.request_id
        q = self._chunks.get(rid) or asyncio.Queue()
        created = int(req.arrival or time.time())
        sent_ids: list[int] = []
        sent_text = ""
        seen: set[tuple[str | None, int]] = set()
        done = False
        is_first = True

        def ev(obj: dict[str, Any]) -> bytes:
            return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"

        try:
            pending = first
            while res is None:
                if pending is None:
                    budget = self._wait_budget(req)
                    if budget <= 0:
                        self._abort(rid, "deadline passed")
                        yield ev(error_body("the request's deadline passed unanswered",
                                            type_="timeout_error", code="deadline_exceeded"))
                        done = True
                        return
                    with contextlib.suppress(TimeoutError):
                        pending = await asyncio.wait_for(q.get(), timeout=min(0.2, budget))
                    if pending is None:
                        with contextlib.suppress(TimeoutError):
                            res = await self._client.result(rid, timeout=0.0001)
                        continue
                ch, pending = pending, None
                if (ch.instance_id, ch.index) in seen:
                    continue
                seen.add((ch.instance_id, ch.index))
                if ch.token_ids or ch.text:
                    text = self._text(ch.token_ids, ch.text)
                    sent_ids += ch.token_ids
                    sent_text += text
                    yield ev(stream_event(call, rid, created, text, first=is_first,
                                          token_ids=ch.token_ids))
                    is_first = False
                if ch.finished and ch.finish_reason not in ("migrated",):
                    res = await self._client.result(rid, timeout=max(0.1, self._wait_budget(req)))
            # the Result is the authority: send what the chunks missed, then the end
            if res.status != "ok":
                bad = self._refused(res)
                msg = json.loads(bytes(bad.body)) if bad is not None else error_body(res.status)
                yield ev(msg)
                done = True
                return
            self._observe(call, res)
            full = self._text(res.output_token_ids, res.text)
            rest_ids = res.output_token_ids[len(sent_ids):]
            rest_text = full[len(sent_text):] if full.startswith(sent_text) else ""
            if rest_ids or rest_text:
                yield ev(stream_event(call, rid, created, rest_text, first=is_first,
                                      token_ids=rest_ids))
            last = stream_event(call, rid, created, "", finish_reason=finish_of(res))
            last["goodserve"] = goodserve_info(res)
            yield ev(last)
            if call.include_usage:
                yield ev({"id": last["id"], "object": last["object"], "created": created,
                          "model": call.model, "choices": [],
                          "usage": {"prompt_tokens": res.input_tokens,
                                    "completion_tokens": res.output_tokens,
                                    "total_tokens": res.input_tokens + res.output_tokens}})
            yield b"data: [DONE]\n\n"
            done = True
        except TimeoutError:
            yield ev(error_body("no result in time", type_="timeout_error",
                                code="deadline_exceeded"))
            done = True
        finally:
            if not done:  # the client went away mid-stream
                self._abort(rid, "client disconnected")
            self._release(rid, key)


class _Gone(Exception):
    """The HTTP client disconnected."""

