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
