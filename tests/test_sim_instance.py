"""The simulated vLLM instance: batching, chunked prefill, KV pressure, prefix cache, migration."""

from __future__ import annotations

import random
import time

import pytest

from goodserve.errors import ConfigError, DuplicateRequest, PromptTooLarge
from goodserve.perf.latency import PerfModel
from goodserve.sim.instance import SimInstance, SimRequest
from goodserve.sim.kvcache import (
    KVCacheManager,
    block_hashes_for_key,
    block_hashes_for_text,
    block_hashes_for_tokens,
)


def run(inst: SimInstance, reqs: list[SimRequest], t: float = 0.0, max_steps: int = 1_000_000):
    """Drive an instance in virtual time; return (end time, steps, preemptions seen)."""
    pending = sorted(reqs, key=lambda r: r.arrival)
    k = steps = preempted = 0
    while k < len(pending) or inst.has_work():
        while k < len(pending) and pending[k].arrival <= t:
            inst.submit(pending[k], t)
            k += 1
        if not inst.has_work():
            t = pending[k].arrival
            continue
        res = inst.step(t)
        assert res.duration > 0
        t += res.duration
        steps += 1
        preempted += len(res.preempted)
        assert steps < max_steps
    return t, steps, preempted


def test_single_request_timing_matches_perf_model() -> None:
    inst = SimInstance(instance_id="i", gpu="A100")
    pm = PerfModel("A100")
    r = SimRequest("r", input_tokens=1000, output_tokens=50)
    end, steps, _ = run(inst, [r])
    assert steps == 50  # one prefill step (which yields the first token) + 49 decode steps
    assert r.generated == 50 and r.finished_at == pytest.approx(end)
    assert r.first_token_at == pytest.approx(pm.prefill_time(1000))
    assert end == pytest.approx(pm.isolated_latency(1000, 50), rel=0.01)
    assert inst.status().kv_used_blocks == 0 and not inst.requests()


@pytest.mark.parametrize(("max_tokens", "expected"), [(None, 30), (10, 10), (0, 1)])
def test_output_length_and_max_tokens(max_tokens: int | None, expected: int) -> None:
    inst = SimInstance(instance_id="i", gpu="H100")
    r = SimRequest("r", input_tokens=20, output_tokens=30, max_tokens=max_tokens)
    run(inst, [r])
    assert r.generated == expected


def test_chunked_prefill_over_token_budget() -> None:
    inst = SimInstance(instance_id="i", gpu="H100", max_batched_tokens=512)
    r = SimRequest("r", input_tokens=2000, output_tokens=3)
    inst.submit(r, 0.0)
    t, tokens = 0.0, []
    while r.first_token_at is None:
        res = inst.step(t)
        t += res.duration
        tokens.append(res.prefill_tokens)
    assert tokens == [512, 512, 512, 464]


def test_max_batch_and_continuous_batching() -> None:
    inst = SimInstance(instance_id="i", gpu="H100", max_batch=4)
    reqs = [SimRequest(f"r{i}", 100, 20) for i in range(10)]
    for r in reqs:
        inst.submit(r, 0.0)
    res = inst.step(0.0)
    assert inst.status().running == 4 and inst.status().waiting == 6
    assert len(res.first_tokens) == 4
    run(inst, [], t=res.duration)
    assert all(r.generated == 20 for r in reqs)
    # FCFS: earlier requests finish no later
    fin = [r.finished_at or 0.0 for r in reqs]
    assert fin == sorted(fin)


def test_larger_batch_longer_steps() -> None:
    durations = []
    for n in (1, 16, 64):
        inst = SimInstance(instance_id="i", gpu="A40")
        for i in range(n):
            inst.submit(SimRequest(f"r{i}", 200, 100), 0.0)
        t = inst.step(0.0).duration
        durations.append(inst.step(t).duration)  # a pure decode step of n sequences
    assert durations[0] < durations[1] < durations[2]


@pytest.mark.parametrize("kv_tokens", [1024, 3000, 6000])
def test_kv_exhaustion_preempts_and_loses_nothing(kv_tokens: int) -> None:
    inst = SimInstance(instance_id="i", gpu="A100", kv_capacity_tokens=kv_tokens, block_size=16)
    rng = random.Random(kv_tokens)
    reqs = [
        SimRequest(f"r{i}", rng.randint(50, 400), rng.randint(50, 600), arrival=i * 0.01)
        for i in range(40)
    ]
    _, _, preempted = run(inst, reqs)
    assert preempted > 0
    assert sum(r.preemptions for r in reqs) == preempted
    for r in reqs:
        assert r.finished_at is not None and r.generated == r.output_tokens, r
    st = inst.status()
    assert st.kv_used_blocks == 0 and st.running == 0 and st.waiting == 0
    assert inst.load_tokens() == 0


def test_requests_wait_when_kv_is_full() -> None:
    inst = SimInstance(instance_id="i", gpu="A100", kv_capacity_tokens=1600)  # 100 blocks
    for i in range(3):
        inst.submit(SimRequest(f"r{i}", 700, 5), 0.0)
    inst.step(0.0)
    st = inst.status()
    assert (st.running, st.waiting) == (2, 1)
    assert st.kv_used_blocks == 88


def test_prefix_hit_reduces_ttft_and_is_counted() -> None:
    inst = SimInstance(instance_id="i", gpu="A40")
    hashes = block_hashes_for_key("system-prompt", 2000)
    a = SimRequest("a", 2000, 2, block_hashes=hashes)
    run(inst, [a])
    b = SimRequest("b", 2000, 2, block_hashes=hashes, arrival=10.0)
    run(inst, [b], t=10.0)
    c = SimRequest("c", 2000, 2, arrival=20.0)  # unique prompt
    run(inst, [c], t=20.0)
    ttft = {r.request_id: (r.first_token_at or 0) - r.arrival for r in (a, b, c)}
    assert b.cached_tokens == 1984 and a.cached_tokens == 0 == c.cached_tokens
    assert ttft["b"] < 0.2 * ttft["a"]
    assert ttft["c"] == pytest.approx(ttft["a"])
    st = inst.status()
    assert st.prefix_hit_tokens == 1984 and st.prefix_query_tokens == 6000
    off = SimInstance(instance_id="j", gpu="A40", enable_prefix_cache=False)
    run(off, [SimRequest("a", 2000, 2, block_hashes=hashes)])
    d = SimRequest("d", 2000, 2, block_hashes=hashes, arrival=10.0)
    run(off, [d], t=10.0)
    assert d.cached_tokens == 0


def test_checkpoint_and_resume_elsewhere() -> None:
    src = SimInstance(instance_id="src", gpu="V100")
    dst = SimInstance(instance_id="dst", gpu="H100")
    r = SimRequest("r", 500, 100)
    src.submit(r, 0.0)
    t = 0.0
    while r.generated < 40:
        t += src.step(t).duration
    assert src.checkpoint("r") is r and r.generated == 40
    assert src.checkpoint("r") is None and not src.has_work()
    assert src.status().kv_used_blocks == 0
    dst.submit(r, t)
    first = dst.step(t)
    assert first.prefill_tokens == 540  # recompute prompt + generated
    run(dst, [], t=t + first.duration)
    assert r.generated == 100 and r.finished_at is not None


def test_preloaded_kv_skips_recompute() -> None:
    inst = SimInstance(instance_id="i", gpu="H100")
    r = SimRequest("r", 500, 100, generated=40)
    inst.submit(r, 0.0, preloaded_tokens=540)
    assert inst.step(0.0).prefill_tokens == 1 and r.cached_tokens == 539


def test_abort_frees_blocks_and_load() -> None:
    inst = SimInstance(instance_id="i", gpu="H100", max_batched_tokens=256)
    inst.submit(SimRequest("a", 1000, 10), 0.0)
    inst.submit(SimRequest("b", 300, 10), 0.0)
    assert inst.load_tokens() == 1300
    inst.step(0.0)
    assert inst.load_tokens() == 1300 - 256
    assert inst.abort("a") is not None and inst.abort("zzz") is None
    assert inst.load_tokens() == 300
    inst.abort("b")
    assert inst.status().kv_used_blocks == 0 and inst.load_tokens() == 0


def test_speed_factor_scales_durations() -> None:
    durs = []
    for sf in (1.0, 0.5):
        inst = SimInstance(instance_id="i", gpu="L40S", speed_factor=sf)
        inst.submit(SimRequest("r", 300, 10), 0.0)
        durs.append(inst.step(0.0).duration)
    assert durs[1] == pytest.approx(2 * durs[0])
    inst.speed_factor = 2.0
    with pytest.raises(ConfigError):
        inst.speed_factor = 0.0


def test_errors() -> None:
    inst = SimInstance(instance_id="i", gpu="H100", kv_capacity_tokens=1000)
    inst.submit(SimRequest("a", 10, 10), 0.0)
    with pytest.raises(DuplicateRequest):
        inst.submit(SimRequest("a", 10, 10), 0.0)
    with pytest.raises(PromptTooLarge):
        inst.submit(SimRequest("big", 5000, 10), 0.0)
    with pytest.raises(ConfigError):
        SimInstance(instance_id="t4", gpu="T4")  # llama-2-7b does not fit
    # a sequence never outgrows the KV: capped like max_model_len
    r = SimRequest("long", 900, 5000)
    inst.abort("a")
    run(inst, [r])
    assert r.generated == 992 - 900


def test_load_tokens_matches_brute_force() -> None:
    inst = SimInstance(instance_id="i", gpu="A10", max_batched_tokens=512, kv_capacity_tokens=4000)
    rng = random.Random(7)
    t, n = 0.0, 0
    for _ in range(400):
        op = rng.random()
        if op < 0.3:
            inst.submit(SimRequest(f"r{n}", rng.randint(1, 900), rng.randint(1, 50)), t)
            n += 1
        elif op < 0.35 and inst.requests():
            inst.checkpoint(rng.choice(inst.requests()).request_id)
        elif inst.has_work():
            t += inst.step(t).duration
        brute = 0
        for s in list(inst._running) + list(inst._waiting):
            brute += s.remaining_prefill()
        assert inst.load_tokens() == brute


def test_kv_manager_lru_eviction() -> None:
    kv = KVCacheManager(4, 16)
    a = kv.allocate(2)
    assert a is not None
    kv.register(a[0], 111)
    kv.register(a[1], 222)
    kv.free(a)
    assert kv.num_free == 4 and kv.num_cached == 2
    assert kv.lookup([111, 222, 333]) == 2
    b = kv.allocate(3)  # 2 free + evicts the LRU cached block: the tail (222) first
    assert b is not None and kv.lookup([111, 222]) == 1
    assert kv.allocate(2) is None
    got = kv.acquire_cached([111])
    assert got == [a[0]] and kv.num_free == 0


def test_block_hashes_are_chained_and_stable() -> None:
    toks = list(range(100))
    h = block_hashes_for_tokens(toks, 16)
    assert len(h) == 6 and h == block_hashes_for_tokens([*toks[:96], 7, 7], 16)
    assert block_hashes_for_tokens([5, *toks[1:]], 16)[3] != h[3]  # chained: prefix matters
    text = "x" * 200
    assert len(block_hashes_for_text(text, 16)) == 3
    assert block_hashes_for_text(text + "yy", 16) == block_hashes_for_text(text, 16)
    assert block_hashes_for_text("é" * 64, 16) != block_hashes_for_text("e" * 64, 16)
    assert block_hashes_for_tokens([1] * 16, 16) == [block_hashes_for_tokens([1] * 32, 16)[0]]
    assert h[0] == 16579874173296452017  # blake2b: the same in every process


def test_simulator_speed() -> None:
    inst = SimInstance(instance_id="i", gpu="H100")
    rng = random.Random(0)
    reqs = [
        SimRequest(f"r{i}", rng.randint(50, 1500), rng.randint(10, 300), arrival=i * 0.02)
        for i in range(3000)
    ]
    w = time.perf_counter()
    run(inst, reqs)
    assert all(r.finished_at is not None for r in reqs)
    assert time.perf_counter() - w < 5.0  # ~0.5 s on an idle core
