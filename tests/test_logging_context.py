"""bound_context binds per-message keys and restores exactly what was there before."""

from __future__ import annotations

import asyncio

import pytest
from structlog.contextvars import bind_contextvars, clear_contextvars, get_contextvars

from goodserve.logging import bound_context


@pytest.fixture(autouse=True)
def _clean() -> None:
    clear_contextvars()


def test_binds_and_restores_outer_values_and_unbinds_new_keys() -> None:
    bind_contextvars(request_id="outer", service="w")
    with bound_context(request_id="inner", instance_id="i1"):
        assert get_contextvars() == {"request_id": "inner", "service": "w", "instance_id": "i1"}
        with bound_context(instance_id="i2"):
            assert get_contextvars()["instance_id"] == "i2"
        assert get_contextvars()["instance_id"] == "i1"
    assert get_contextvars() == {"request_id": "outer", "service": "w"}


def test_restores_after_an_exception() -> None:
    with pytest.raises(RuntimeError), bound_context(request_id="r"):
        raise RuntimeError("boom")
    assert get_contextvars() == {}


async def test_each_task_sees_its_own_binding() -> None:
    seen: dict[str, str] = {}

    async def handle(rid: str) -> None:
        with bound_context(request_id=rid):
            await asyncio.sleep(0.01)
            seen[rid] = get_contextvars()["request_id"]

    await asyncio.gather(*(handle(f"r{k}") for k in range(5)))
    assert seen == {f"r{k}": f"r{k}" for k in range(5)}
    assert get_contextvars() == {}


def test_logs_follow_stderr_when_it_is_replaced_and_closed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A command run under a replaced stderr (pytest's capture) configures logging; once
    that stream is closed, later log calls (an atexit clean-up's) must still work."""
    import io
    import sys

    from goodserve.logging import configure_logging, get_logger

    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    configure_logging(level="INFO", json=True)
    log = get_logger("test.stderr")
    log.info("one")
    first.close()
    second = io.StringIO()
    monkeypatch.setattr(sys, "stderr", second)
    log.info("two")  # raised "I/O operation on closed file" before
    assert '"event": "two"' in second.getvalue()
