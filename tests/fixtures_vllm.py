"""vLLM fixtures (shared engines, tiny random-weight Llama). Owned by the vLLM work.

An engine takes 40-100 s to start on the 2-core CI machine, so the whole session shares
two: ``vllm_engine_a`` and ``vllm_engine_b``, started together, sharing one KV store
directory (so they can migrate requests with KV). Tests must use unique prompts (see
``unique_prompt``) so prefix caches and the KV store never leak between tests. vLLM that
cannot start fails the tests that need it, loudly: no skips.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import pytest_asyncio

from goodserve.testing.tiny_llama import TINY_LLAMA_CONFIG, build_tiny_llama

VOCAB = int(TINY_LLAMA_CONFIG["vocab_size"])


@pytest.fixture(scope="session")
def tiny_llama_dir() -> Path:
    """The tiny random-weight Llama (built once, cached under ~/.cache/goodserve)."""
    return build_tiny_llama()


@pytest.fixture(scope="session")
def vllm_kv_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vllm-kv")


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def vllm_engines(tiny_llama_dir: Path, vllm_kv_dir: Path) -> AsyncIterator[tuple]:  # type: ignore[type-arg]
    """Two VllmEngines (float32, 64 MiB KV each, shared KV store), started concurrently."""
    from goodserve.workers.engines.vllm import VllmEngine

    engines = [
        VllmEngine(
            model=str(tiny_llama_dir),
            instance_id=name,
            dtype="float32",
            max_model_len=2048,
            kv_shared_dir=str(vllm_kv_dir),
        )
        for name in ("vllm-a", "vllm-b")
    ]
    try:
        await asyncio.gather(*(e.start() for e in engines))
        yield tuple(engines)
    finally:
        await asyncio.gather(*(e.stop() for e in engines), return_exceptions=True)


@pytest.fixture
def vllm_engine_a(vllm_engines: tuple) -> object:  # type: ignore[type-arg]
    return vllm_engines[0]


@pytest.fixture
def vllm_engine_b(vllm_engines: tuple) -> object:  # type: ignore[type-arg]
    return vllm_engines[1]


_counter = itertools.count()


@pytest.fixture
def unique_prompt() -> Callable[[int], list[int]]:
    """Fresh random token ids (never seen by the session's engines) of a given length."""

    def make(n: int) -> list[int]:
        rng = random.Random(f"prompt-{next(_counter)}-{random.random()}")
        return [rng.randrange(3, VOCAB) for _ in range(n)]

    return make
