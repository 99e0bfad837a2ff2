"""The real-time SimulatedEngine agrees with the virtual-time SimInstance and resumes exactly."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
from goodserve.workers.engine import Engine, EngineOutput, EngineRequest
from goodserve.workers.engines.simulated import SimulatedEngine, synthetic_token_id

from goodserve.errors import ConfigError, EngineError
from goodserve.sim.instance import SimInstance, SimRequest

# (request id, arrival s, input tokens, output tokens)
TRACE = [
    ("a", 0.00, 800, 40),
    ("b", 0.05, 200, 12),
    ("c", 0.10, 1500, 25),
    ("d", 0.30, 300, 60),
    ("e", 0.32, 100, 8),
    ("f", 0.90, 2500, 20),
    ("g", 1.50, 400, 30),
]
GPU = "V100"  # ~26 ms decode steps: a few ms of wall time per step at the scale below
SCALE = 0.1


def virtual_run() -> dict[str, float]:
    inst = SimInstance(instance_id="v", gpu=GPU)
    reqs = [SimRequest(rid, i, o, arrival=a) for rid, a, i, o in TRACE]
    t, k = 0.0, 0
    while k < len(reqs) or inst.has_work():
        while k < len(reqs) and reqs[k].arrival <= t:
            inst.submit(reqs[k], t)
            k += 1
        if not inst.has_work():
            t = reqs[k].arrival
            continue
        t += inst.step(t).duration
    return {r.request_id: r.finished_at or 0.0 for r in reqs}


async def realtime_run() -> tuple[dict[str, float], dict[str, list[int]]]:
    done: dict[str, float] = {}
    tokens: dict[str, list[int]] = {}
    async with SimulatedEngine(instance_id="rt", gpu=GPU, time_scale=SCALE) as eng:
        assert isinstance(eng, Engine)
        t0 = asyncio.get_running_loop().time()

        async def client(rid: str, arrival: float, inp: int, out: int) -> None:
            await asyncio.sleep(arrival * SCALE)
            ids: list[int] = []
            last: EngineOutput | None = None
            async for o in eng.generate(
                EngineRequest(request_id=rid, input_tokens=inp, max_tokens=out)
            ):
                ids.extend(o.new_token_ids)
                last = o
            assert last is not None and last.finished and last.finish_reason == "length"
            assert last.num_generated == out
            done[rid] = (asyncio.get_running_loop().time() - t0) / SCALE
            tokens[rid] = ids

        await asyncio.gather(*(client(*row) for row in TRACE))
    return done, tokens


async def test_realtime_agrees_with_virtual_time() -> None:
    virt = virtual_run()
    real, tokens = await realtime_run()
    step = 0.03  # about one decode step on the V100
    for rid, _, _, out in TRACE:
        assert len(tokens[rid]) == out
        assert tokens[rid] == [synthetic_token_id(rid, p) for p in range(out)]
        assert real[rid] == pytest.approx(virt[rid], rel=0.10, abs=3 * step), rid
    # completion order agrees wherever the virtual run separates two requests clearly
    for x in virt:
        for y in virt:
            if virt[x] + 2 * step < virt[y]:
                assert real[x] < real[y], (x, y)


async def until(cond: Callable[[], bool], limit_s: float = 10.0) -> None:
    for _ in range(int(limit_s / 0.002)):
        if cond():
            return
        await asyncio.sleep(0.002)
    raise AssertionError("condition not reached")


async def collect(eng: SimulatedEngine, req: EngineRequest) -> tuple[list[int], EngineOutput]:
    ids: list[int] = []
    last = None
    async for o in eng.generate(req):
        ids.extend(o.new_token_ids)
        last = o
    assert last is not None
    return ids, last


async def test_checkpoint_resume_identical_tokens() -> None:
    async with (
        SimulatedEngine(instance_id="src", gpu="A40", time_scale=0.05) as src,
        SimulatedEngine(instance_id="dst", gpu="H100", time_scale=0.05) as dst,
    ):

        def req() -> EngineRequest:
            return EngineRequest(request_id="m", input_tokens=600, max_tokens=80, prompt="p" * 2400)

        full, _ = await collect(dst, req())  # the uninterrupted run
        task = asyncio.create_task(collect(src, req()))
        await until(lambda: src.instance.tokens_generated >= 20)
        ck = await src.checkpoint("m")
        head, last = await task
        assert last.finish_reason == "migrated" and head == ck.generated_token_ids
        assert 20 <= len(ck.generated_token_ids) < 80
        assert not src.instance.has_work()
        resumed = EngineRequest(
            request_id="m", input_tokens=600, max_tokens=80, resume_token_ids=ck.generated_token_ids
        )
        tail, last = await collect(dst, resumed)
        assert last.finish_reason == "length" and last.num_generated == 80 - len(head)
        assert head + tail == full
        with pytest.raises(EngineError):
            await src.checkpoint("nope")


async def test_kv_ref_resume_skips_recompute() -> None:
    async with SimulatedEngine(instance_id="k", gpu="H100", time_scale=0.01) as eng:
        resume = [synthetic_token_id("x", p) for p in range(10)]
        req = EngineRequest(
            request_id="x",
            input_tokens=3000,
            max_tokens=12,
            resume_token_ids=resume,
            kv_ref="sim://elsewhere/x",
        )
        ids, last = await collect(eng, req)
        assert last.cached_tokens == 3009 and len(ids) == 2


async def test_abort_and_status() -> None:
    async with SimulatedEngine(instance_id="s", gpu="A10", time_scale=0.05, max_batch=2) as eng:
        streams = [
            asyncio.create_task(
                collect(eng, EngineRequest(request_id=f"r{i}", input_tokens=100, max_tokens=500))
            )
            for i in range(3)
        ]
        await until(lambda: eng.instance.tokens_generated >= 4)
        st = eng.status()
        assert (st.running, st.waiting, st.max_batch) == (2, 1, 2)
        assert {r.state for r in st.requests} == {"running", "waiting"}
        assert st.tpot_s > 0 and st.kv_used_blocks > 0
        for i in range(3):
            await eng.abort(f"r{i}")
        for t in streams:
            _, last = await t
            assert last.finish_reason == "abort"
        assert eng.status().kv_used_blocks == 0


async def _outputs(min_wake_s: float) -> tuple[dict[str, list[int]], dict[str, int], int]:
    """Eight requests at once: token ids, updates per request, simulated steps."""
    async with SimulatedEngine(instance_id="c", gpu="H100", time_scale=0.05,
                               min_wake_s=min_wake_s) as eng:
        steps = [0]
        step = eng.instance.step

        def counted(now: float) -> object:
            steps[0] += 1
            return step(now)

        eng.instance.step = counted  # type: ignore[method-assign]
        reqs = [EngineRequest(request_id=f"q{i}", input_tokens=100 + 50 * i, max_tokens=30 + i)
                for i in range(8)]
        outs = await asyncio.gather(*(_updates(eng, r) for r in reqs))
    ids = {r.request_id: o[0] for r, o in zip(reqs, outs, strict=True)}
    updates = {r.request_id: o[1] for r, o in zip(reqs, outs, strict=True)}
    return ids, updates, steps[0]


async def _updates(eng: SimulatedEngine, req: EngineRequest) -> tuple[list[int], int]:
    ids: list[int] = []
    n = 0
    async for o in eng.generate(req):
        ids.extend(o.new_token_ids)
        n += 1
        if o.finished:
            assert o.num_generated == req.max_tokens
    return ids, n


async def test_steps_due_together_leave_as_one_update() -> None:
    # a ~10 ms H100 step lasts ~0.5 ms at this scale: 5 ms wake-ups take ~10 steps each
    each_ids, each_updates, each_steps = await _outputs(0.0)
    ids, updates, steps = await _outputs(0.005)
    assert ids == each_ids  # the same tokens, in order, for every request
    for rid, got in ids.items():
        assert got == [synthetic_token_id(rid, p) for p in range(len(got))]
    assert steps == each_steps  # the same simulated steps
    assert sum(updates.values()) < sum(each_updates.values()) / 3
    with pytest.raises(ConfigError):
        SimulatedEngine(instance_id="x", gpu="H100", min_wake_s=-0.001)


async def test_idle_engine_does_not_spin() -> None:
    eng = SimulatedEngine(instance_id="idle", gpu="H100")
    await eng.start()
    cpu = time.process_time()
    await asyncio.sleep(0.3)
    assert time.process_time() - cpu < 0.1
    await eng.stop()
    await eng.stop()  # idempotent


async def test_constructor_validates() -> None:
    with pytest.raises(ConfigError):
        SimulatedEngine(instance_id="x", gpu="H100", time_scale=0)
    with pytest.raises(ConfigError):
        SimulatedEngine(instance_id="x", gpu="Voodoo2")
    eng = SimulatedEngine(instance_id="x", gpu="H100")
    with pytest.raises(EngineError):
        await collect(eng, EngineRequest(request_id="r", input_tokens=1))
