"""OpenAI request bodies and routing headers -> one validated call; results -> OpenAI JSON.

Pure functions (no I/O): every malformed input raises ``InvalidInput`` with the offending
parameter, which the gateway answers as an OpenAI-style 400.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from goodserve.errors import InvalidInput
from goodserve.schemas import Result, SamplingParams

__all__ = [
    "ParsedCall",
    "RoutingHeaders",
    "chat_to_prompt",
    "completion_body",
    "error_body",
    "estimate_tokens",
    "parse_call",
    "parse_headers",
]

H_SLO = "x-goodserve-slo-s"
H_DEADLINE = "x-goodserve-deadline"
H_TTFT = "x-goodserve-ttft-s"
H_TASK = "x-goodserve-task"
H_WORKFLOW = "x-goodserve-workflow-id"
H_STEP = "x-goodserve-step"
H_PRIORITY = "x-goodserve-priority"
H_HINT = "x-goodserve-output-tokens"


class BadParam(InvalidInput):
    """A 400 naming the parameter at fault."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def estimate_tokens(text: str) -> int:
    """The documented estimate without a tokenizer: ceil(characters / 4), at least 1."""
    return max(1, math.ceil(len(text) / 4))


@dataclass(slots=True)
class RoutingHeaders:
    slo_s: float | None = None
    deadline: float | None = None
    ttft_s: float | None = None
    task: str = "chat"
    workflow_id: str | None = None
    step: int = 0
    priority: int = 0
    output_tokens_hint: int | None = None


def _num(headers: Mapping[str, str], name: str, *, positive: bool = True) -> float | None:
    raw = headers.get(name)
    if raw is None or raw == "":
        return None
    try:
        v = float(raw)
    except ValueError:
        raise BadParam(f"header {name} must be a number, got {raw!r}", name) from None
    if not math.isfinite(v) or (positive and v <= 0):
        raise BadParam(f"header {name} must be a positive number, got {raw!r}", name)
    return v


def _int(headers: Mapping[str, str], name: str, lo: int, hi: int) -> int | None:
    raw = headers.get(name)
    if raw is None or raw == "":
        return None
    try:
        v = int(raw)
    except ValueError:
        raise BadParam(f"header {name} must be an integer, got {raw!r}", name) from None
    if not lo <= v <= hi:
        raise BadParam(f"header {name} must be in [{lo}, {hi}], got {v}", name)
    return v


def parse_headers(headers: Mapping[str, str]) -> RoutingHeaders:
    """The ``x-goodserve-*`` routing headers (case-insensitive mapping expected)."""
    h = RoutingHeaders()
    h.slo_s = _num(headers, H_SLO)
    h.deadline = _num(headers, H_DEADLINE)
    if h.slo_s is not None and h.deadline is not None:
        raise BadParam(f"give {H_SLO} or {H_DEADLINE}, not both", H_SLO)
    h.ttft_s = _num(headers, H_TTFT)
    task = headers.get(H_TASK)
    if task:
        if len(task) > 64 or not task.replace("-", "").replace("_", "").isalnum():
            raise BadParam(f"header {H_TASK} must be a short name, got {task!r}", H_TASK)
        h.task = task
    wf = headers.get(H_WORKFLOW)
    if wf:
        if len(wf) > 256:
            raise BadParam(f"header {H_WORKFLOW} is longer than 256 characters", H_WORKFLOW)
        h.workflow_id = wf
    h.step = _int(headers, H_STEP, 0, 1_000_000) or 0
    h.priority = _int(headers, H_PRIORITY, -1000, 1000) or 0
    h.output_tokens_hint = _int(headers, H_HINT, 1, 1_000_000)
    return h


@dataclass(slots=True)
class ParsedCall:
    """One validated OpenAI call, ready to become an AgentRequest."""

    kind: str
    """'completion' | 'chat'"""
    model: str
    prompt: str | None
    prompt_token_ids: list[int] | None
    max_tokens: int
    sampling: SamplingParams
    stream: bool = False
    include_usage: bool = False
    messages: list[dict[str, str]] = field(default_factory=list)


def _opt_float(body: Mapping[str, Any], name: str, lo: float, hi: float, default: float) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int | float) or not lo <= float(v) <= hi:
        raise BadParam(f"{name} must be a number in [{lo}, {hi}]", name)
    return float(v)


def _opt_int(body: Mapping[str, Any], name: str, lo: int, hi: int) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise BadParam(f"{name} must be an integer in [{lo}, {hi}]", name)
    return v


def _token_ids(v: Any, param: str) -> list[int] | None:
    if isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool)
                                         for t in v):
        if any(t < 0 or t >= 1 << 31 for t in v):
            raise BadParam("token ids must be in [0, 2^31)", param)
        return list(v)
    return None


def _messages(v: Any) -> list[dict[str, str]]:
    if not isinstance(v, list) or not v:
        raise BadParam("messages must be a non-empty list", "messages")
    out: list[dict[str, str]] = []
    for i, m in enumerate(v):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadParam(f"messages[{i}] must be an object with a role", "messages")
        c = m.get("content")
        if isinstance(c, list):  # content parts: text only
            texts = []
            for p in c:
                if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(
                        p.get("text"), str):
                    raise BadParam(f"messages[{i}].content: only text parts are supported",
                                   "messages")
                texts.append(p["text"])
            c = "".join(texts)
        if c is None:
            c = ""
        if not isinstance(c, str):
            raise BadParam(f"messages[{i}].content must be a string", "messages")
        out.append({"role": m["role"], "content": c})
    return out


def chat_to_prompt(messages: list[dict[str, str]],
                   template: Callable[[list[dict[str, str]]], str] | None = None) -> str:
    """The tokenizer's chat template where configured, else ``role: content`` lines."""
    if template is not None:
        return template(messages)
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def parse_call(body: Any, *, kind: str, default_max_tokens: int, max_max_tokens: int,
               template: Callable[[list[dict[str, str]]], str] | None = None) -> ParsedCall:
    """Validate an OpenAI completions/chat body (``kind`` 'completion' or 'chat')."""
    if not isinstance(body, dict):
        raise BadParam("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadParam("model must be a non-empty string", "model")
    prompt: str | None = None
    ids: list[int] | None = None
    messages: list[dict[str, str]] = []
    if kind == "chat":
        messages = _messages(body.get("messages"))
        prompt = chat_to_prompt(messages, template)
    else:
        p = body.get("prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str | list):
            p = p[0]  # a batch of one
        if isinstance(p, str):
            if not p:
                raise BadParam("prompt must not be empty", "prompt")
            prompt = p
        else:
            ids = _token_ids(p, "prompt")
            if ids is None:
                raise BadParam("prompt must be a string or a non-empty list of token ids "
                               "(one prompt per request)", "prompt")
    n = body.get("n")
    if n not in (None, 1):
        raise BadParam("only n=1 is supported", "n")
    if body.get("best_of") not in (None, 1):
        raise BadParam("best_of is not supported", "best_of")
    if body.get("stop") not in (None, [], ""):
        raise BadParam("stop strings are not supported; use stop_token_ids", "stop")
    if body.get("echo"):
        raise BadParam("echo is not supported", "echo")
    mt_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None \
        else "max_tokens"
    mt = _opt_int(body, mt_name, 1, max_max_tokens)
    if mt is None:
        mt = 16 if kind == "completion" else default_max_tokens
    stop_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(isinstance(t, int) for t in stop_ids):
        raise BadParam("stop_token_ids must be a list of integers", "stop_token_ids")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise BadParam("ignore_eos must be a boolean", "ignore_eos")
    top_k = _opt_int(body, "top_k", -1, 1_000_000)
    sampling = SamplingParams(
        temperature=_opt_float(body, "temperature", 0.0, 2.0, 1.0),
        top_p=_opt_float(body, "top_p", 0.0, 1.0, 1.0),
        top_k=-1 if top_k is None or top_k == 0 else top_k,
        seed=_opt_int(body, "seed", -(1 << 63), (1 << 63) - 1),
        stop_token_ids=list(stop_ids),
        ignore_eos=ignore_eos,
    )
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadParam("stream must be a boolean", "stream")
    so = body.get("stream_options") or {}
    if not isinstance(so, dict):
        raise BadParam("stream_options must be an object", "stream_options")
    return ParsedCall(kind=kind, model=model, prompt=prompt, prompt_token_ids=ids,
                      max_tokens=mt, sampling=sampling, stream=stream,
                      include_usage=bool(so.get("include_usage")), messages=messages)


def error_body(message: str, *, type_: str = "invalid_request_error",
               param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """The OpenAI error object."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


_FINISH = {"length": "length", "stop": "stop", "abort": "stop", "error": "stop"}


def goodserve_info(res: Result) -> dict[str, Any]:
    """The ``goodserve`` extension object of a response (ignored by OpenAI clients)."""
    return {
        "request_id": res.request_id,
        "instance_id": res.instance_id,
        "met_deadline": res.met_deadline,
        "deadline": res.deadline,
        "migrations": res.migrations,
        "ttft_s": (res.first_token_at - res.arrival)
        if res.first_token_at and res.arrival else None,
        "latency_s": (res.finished_at - res.arrival) if res.finished_at and res.arrival else None,
        "predicted_output_tokens": res.predicted_output_tokens,
    }


def completion_body(call: ParsedCall, res: Result, text: str) -> dict[str, Any]:
    """A non-streaming OpenAI response for a finished Result."""
    usage = {"prompt_tokens": res.input_tokens, "completion_tokens": res.output_tokens,
             "total_tokens": res.input_tokens + res.output_tokens}
    finish = _FINISH.get(res.finish_reason or "length", "stop")
    created = int(res.arrival or time.time())
    if call.kind == "chat":
        return {"id": f"chatcmpl-{res.request_id}", "object": "chat.completion",
                "created": created, "model": call.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": None, "finish_reason": finish}],
                "usage": usage, "goodserve": goodserve_info(res)}
    return {"id": f"cmpl-{res.request_id}", "object": "text_completion", "created": created,
            "model": call.model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish,
                         "token_ids": res.output_token_ids}],
            "usage": usage, "goodserve": goodserve_info(res)}


def stream_event(call: ParsedCall, rid: str, created: int, text: str, *,
                 token_ids: list[int] | None = None, first: bool = False,
                 finish_reason: str | None = None) -> dict[str, Any]:
    """One SSE chunk object (chat: ``delta``; completions: ``text``)."""
    if call.kind == "chat":
        delta: dict[str, Any] = {"content": text}
        if first:
            delta["role"] = "assistant"
        return {"id": f"chatcmpl-{rid}", "object": "chat.completion.chunk", "created": created,
                "model": call.model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None,
                             "finish_reason": finish_reason}]}
    choice: dict[str, Any] = {"index": 0, "text": text, "logprobs": None,
                              "finish_reason": finish_reason}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return {"id": f"cmpl-{rid}", "object": "text_completion", "created": created,
            "model": call.model, "choices": [choice]}


def finish_of(res: Result) -> str:
    return _FINISH.get(res.finish_reason or "length", "stop")
