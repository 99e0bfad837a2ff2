"""The OpenAI-compatible gateway, end to end: the official ``openai`` client against a real
``goodserve up`` process (embedded broker, dispatcher, monitor, simulated fleet, gateway)."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from goodserve.client import GoodServeClient
from goodserve.config import Settings

pytestmark = [pytest.mark.embedded, pytest.mark.timeout(180)]

KEY = "test-key-0123456789"


class Up:
    def __init__(self, proc: subprocess.Popen[str], base_url: str, bootstrap: str) -> None:
        self.proc, self.base_url, self.bootstrap = proc, base_url, bootstrap
        self.root = base_url.removesuffix("/v1")

    def settings(self) -> Settings:
        return Settings(bootstrap_servers=self.bootstrap, idempotent_producer=False,
                        session_timeout_ms=1500, heartbeat_interval_ms=300)


@pytest.fixture(scope="module")
def up() -> Iterator[Up]:
    """``goodserve up --port 0`` with one API key; stopped with SIGTERM (clean exit checked)."""
    env = dict(os.environ, GOODSERVE_API_KEYS=KEY, GOODSERVE_LOG_LEVEL="warning")
    proc = subprocess.Popen(
        [sys.executable, "-m", "goodserve.cli", "up", "--port", "0", "--max-body-bytes", "65536"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
        start_new_session=True,
    )
    assert proc.stdout is not None
    url = bootstrap = None
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and url is None:
        line = proc.stdout.readline()
        if not line:
            break
        if m := re.search(r"broker (\S+)", line):
            bootstrap = m.group(1).rstrip(",")
        if line.startswith("OPENAI_BASE_URL="):
            url = line.strip().split("=", 1)[1]
    if url is None or bootstrap is None:
        proc.kill()
        pytest.fail("goodserve up did not print its base URL")
    lines: list[str] = []
    out = proc.stdout
    drain = threading.Thread(target=lambda: lines.extend(out), daemon=True)
    drain.start()  # a full pipe would block the server
    try:
        yield Up(proc, url, bootstrap)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        drain.join(timeout=5)
        rest = "".join(lines)
        assert proc.returncode == 0, rest[-2000:]
        assert "goodserve up: stopped" in rest


def client(up: Up, key: str = KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=up.base_url, api_key=key, max_retries=0, timeout=60)


async def test_completion_and_chat_not_streaming(up: Up) -> None:
    c = client(up)
    raw = await c.completions.with_raw_response.create(
        model="llama-2-7b", prompt="Write a haiku about GPUs", max_tokens=12,
        extra_headers={"x-goodserve-slo-s": "20", "x-goodserve-task": "chat"})
    assert raw.headers["x-goodserve-instance"]
    assert raw.headers["x-goodserve-request-id"].startswith("gs-")
    assert raw.headers["x-goodserve-deadline-met"] in ("true", "false")
    comp = raw.parse()
    assert comp.usage is not None and comp.usage.completion_tokens == 12
    assert comp.choices[0].finish_reason == "length"
    # token-id prompt on the completions API
    comp2 = await c.completions.create(model="llama-2-7b", prompt=[1, 15043, 3186], max_tokens=4)
    assert comp2.usage is not None and comp2.usage.prompt_tokens == 3
    raw = await c.chat.completions.with_raw_response.create(
        model="llama-2-7b", messages=[{"role": "user", "content": "hi"}], max_tokens=6,
        extra_headers={"x-goodserve-deadline": str(time.time() + 20),
                       "x-goodserve-workflow-id": "wf-1", "x-goodserve-step": "2"})
    assert raw.headers["x-goodserve-instance"]
    chat = raw.parse()
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage is not None and chat.usage.completion_tokens == 6
    models = await c.models.list()
    assert [m.id for m in models.data] == ["llama-2-7b"]


async def test_streaming_completion_and_chat(up: Up) -> None:
    c = client(up)
    raw = await c.completions.with_raw_response.create(
        model="llama-2-7b", prompt="count", max_tokens=10, stream=True,
        stream_options={"include_usage": True})
    assert raw.headers["x-goodserve-instance"]
    events = [e async for e in raw.parse()]
    ids = [t for e in events if e.choices for t in (e.choices[0].model_extra or {}).get(
        "token_ids") or []]
    assert len(ids) == 10
    assert [e.choices[0].finish_reason for e in events if e.choices][-1] == "length"
    assert events[-1].usage is not None and events[-1].usage.completion_tokens == 10
    stream = await c.chat.completions.create(
        model="llama-2-7b", messages=[{"role": "user", "content": "hello"}], max_tokens=8,
        stream=True)
    chunks = [e async for e in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    final = chunks[-1]
    assert final.choices[0].finish_reason == "length"
    assert (final.model_extra or {})["goodserve"]["instance_id"]


async def test_fifty_concurrent_requests_all_answered(up: Up) -> None:
    c = client(up)

    async def one(i: int) -> str:
        raw = await c.completions.with_raw_response.create(
            model="llama-2-7b", prompt=f"request {i} " * (1 + i % 7), max_tokens=8 + i % 9,
            extra_headers={"x-goodserve-slo-s": str(5 + i % 4)})
        comp = raw.parse()
        assert comp.usage is not None and comp.usage.completion_tokens == 8 + i % 9
        return raw.headers["x-goodserve-instance"]

    instances = await asyncio.gather(*(one(i) for i in range(50)))
    split = collections.Counter(instances)
    print("per-instance split of 50 concurrent requests:", dict(split))
    assert all(instances) and sum(split.values()) == 50


async def test_errors_in_openai_format(up: Up) -> None:
    async with httpx.AsyncClient(base_url=up.root, timeout=30) as h:
        auth = {"Authorization": f"Bearer {KEY}"}
        r = await h.post("/v1/completions", content=b"{not json", headers=auth)
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
        r = await h.post("/v1/completions", json={"model": "llama-2-7b", "prompt": "x",
                                                  "max_tokens": 0}, headers=auth)
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
        r = await h.post("/v1/completions", json={"model": "llama-2-7b", "prompt": "x"},
                         headers={**auth, "x-goodserve-slo-s": "soon"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "x-goodserve-slo-s"
        r = await h.post("/v1/completions", json={"model": "llama-2-7b", "prompt": "x"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        big = {"model": "llama-2-7b", "prompt": "x" * 100_000}
        r = await h.post("/v1/completions", content=json.dumps(big), headers=auth)
        assert r.status_code == 413 and "error" in r.json()
        assert (await h.get("/health")).json()["status"] == "ok"
        assert "goodserve_gateway_requests" in (await h.get("/metrics")).text
    with pytest.raises(openai.AuthenticationError):
        await client(up, key="wrong-key-000000").completions.create(
            model="llama-2-7b", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        await client(up).chat.completions.create(model="llama-2-7b", messages=[], max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        await client(up).completions.create(model="gpt-4o", prompt="x", max_tokens=2)


async def test_disconnect_mid_stream_aborts_on_the_worker(up: Up) -> None:
    async with GoodServeClient(settings=up.settings()) as watch:
        async with httpx.AsyncClient(base_url=up.root, timeout=30) as h:
            body = {"model": "llama-2-7b", "prompt": "a long story", "max_tokens": 3000,
                    "stream": True}
            async with h.stream("POST", "/v1/completions", json=body,
                                headers={"Authorization": f"Bearer {KEY}",
                                         "x-goodserve-slo-s": "600"}) as r:
                assert r.status_code == 200
                rid = r.headers["x-goodserve-request-id"]
                got = 0
                async for line in r.aiter_lines():
                    got += line.startswith("data:")
                    if got >= 3:
                        break  # leave mid-stream: the connection closes here
        res = await watch.result(rid, timeout=20)
        assert res.status == "aborted"
        assert res.output_tokens < 3000


async def test_inflight_limit_429_and_deadline_504(embedded_settings: Settings) -> None:
    """No dispatcher behind it: the first call waits out its deadline (504);
    a second one from the same key meanwhile is over the in-flight limit (429)."""
    from goodserve.gateway import GatewayConfig, GatewayService

    cfg = GatewayConfig(port=0, max_inflight_per_key=1, deadline_grace_s=0.0)
    async with GatewayService(settings=embedded_settings, config=cfg) as gw:
        c = openai.AsyncOpenAI(base_url=gw.base_url, api_key="open", max_retries=0)
        first = asyncio.create_task(c.completions.create(
            model="m", prompt="x", max_tokens=2, extra_headers={"x-goodserve-slo-s": "1.5"}))
        await asyncio.sleep(0.5)
        with pytest.raises(openai.RateLimitError) as rl:
            await c.completions.create(model="m", prompt="y", max_tokens=2)
        assert rl.value.response.headers["retry-after"] == "1"
        with pytest.raises(openai.APIStatusError) as late:
            await first
        assert late.value.status_code == 504
        assert late.value.response.json()["error"]["code"] == "deadline_exceeded"


def test_refuses_open_access_off_loopback() -> None:
    from goodserve.errors import ConfigError
    from goodserve.gateway import GatewayConfig

    with pytest.raises(ConfigError, match="without API keys"):
        GatewayConfig(host="0.0.0.0")
    assert GatewayConfig(host="0.0.0.0", no_auth=True).open_access
    assert not GatewayConfig(host="0.0.0.0", api_keys=("k" * 16,)).open_access
    assert GatewayConfig(host="::1").open_access


def test_the_body_limit_follows_the_record_limit() -> None:
    from goodserve.gateway import GatewayConfig, GatewayService

    big = Settings(max_record_bytes=4 << 20)
    assert GatewayService(settings=big).body_limit == 4 << 20
    assert GatewayService(settings=Settings()).body_limit == 1 << 20
    assert GatewayService(settings=big, config=GatewayConfig(max_body_bytes=65536)).body_limit \
        == 65536
