"""Chaos scenarios against real Apache Kafka; each returns a dict of figures (JSON-able).

- ``crash``: kill -9 the dispatcher, the monitor and one worker at random moments of a run
  and restart them; every request must get exactly one Result after de-duplication.
- ``broker_restart``: stop and restart the broker mid-run; no acknowledged request is lost
  and the services reconnect by themselves (same pids before and after).
- ``hostile``: bad records mixed into valid traffic; each is dead-lettered with a reason,
  every valid request is served, no service restarts.
- ``soak``: a fixed rate for a duration; the requests backlog and each service's RSS.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
from aiokafka.errors import KafkaError

from goodserve.broker.apache import ApacheKafkaBroker
from goodserve.schemas import (
    AgentRequest,
    Assignment,
    DeadLetter,
    Heartbeat,
    SamplingParams,
    encode,
)
from goodserve.transport import TypedConsumer

from .cluster import Cluster, committed_total, requests_lag
from .load import CountingClient, LoadGenerator, delivery_figures, wait_for_results

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


async def _open(cluster: Cluster, progress: Progress) -> CountingClient:
    await cluster.start()
    client = CountingClient(settings=cluster.settings, max_buffered=1_000_000)
    await client.start()
    cluster.client = client
    waited = await cluster.warm_up(client)
    progress(f"cluster up (first request served after {waited:.1f}s)")
    return client


async def crash(*, requests: int = 2000, rps: float = 100.0, bootstrap: str | None = None,
                workdir: str | Path | None = None, seed: int = 0,
                worker_down_s: float | None = None, result_timeout_s: float = 180.0,
                progress: Progress = _quiet, **cluster_kw: Any) -> dict[str, Any]:
    """kill -9 dispatcher, monitor and one worker at random moments; restart each."""
    rng = random.Random(seed)
    cluster_kw.setdefault("time_scale", 0.1)  # requests last ~0.1-1 s: some are in flight
    cluster = await Cluster.create(bootstrap=bootstrap, workdir=workdir, **cluster_kw)
    down = worker_down_s if worker_down_s is not None else cluster.stale_after_s + 2.0
    events: list[dict[str, Any]] = []
    try:
        client = await _open(cluster, progress)
        gen = LoadGenerator(settings=cluster.settings, prefix=f"crash-{uuid.uuid4().hex[:6]}",
                            seed=seed)
        await gen.start()
        run_s = requests / rps
        t0 = time.monotonic()
        dispatcher_serving = asyncio.Event()
        victims: list[str] = []

        async def kill_restart(proc: Any, at: float, down_s: float) -> None:
            await asyncio.sleep(max(0.0, at - (time.monotonic() - t0)))
            old = proc.pid
            proc.kill()
            events.append({"t_s": round(time.monotonic() - t0, 2), "killed": proc.name,
                           "pid": old, "signal": "SIGKILL", "down_s": down_s})
            progress(f"kill -9 {proc.name} at {time.monotonic() - t0:.1f}s")
            await asyncio.sleep(down_s)
            proc.start()
            events.append({"t_s": round(time.monotonic() - t0, 2), "restarted": proc.name,
                           "pid": proc.pid})
            up = await cluster.wait_started(proc)
            events.append({"t_s": round(time.monotonic() - t0, 2), "serving": proc.name,
                           "start_s": round(up, 2)})

        async def kill_dispatcher() -> None:
            await kill_restart(cluster.procs["dispatcher"], rng.uniform(0.05, 0.25) * run_s, 0.5)
            # serving again = the new incarnation commits offsets of requests it routed
            base = await committed_total(cluster.settings)
            while time.monotonic() - t0 < 120:
                await asyncio.sleep(0.5)
                if await committed_total(cluster.settings) > base:
                    break
            events.append({"t_s": round(time.monotonic() - t0, 2), "routing": "dispatcher"})
            dispatcher_serving.set()

        async def kill_worker() -> None:
            at = rng.uniform(0.45, 0.7) * run_s
            await dispatcher_serving.wait()  # so the dispatcher knows what the worker holds
            await asyncio.sleep(max(0.0, at - (time.monotonic() - t0)))
            # the busiest worker: the one whose loss tests re-dispatch the most
            victim = max(cluster.workers, key=lambda w: w.log_text().count('"worker.assigned"'))
            victims.append(victim.name)
            await kill_restart(victim, at, down)

        async def chaos() -> None:
            await asyncio.gather(
                kill_dispatcher(),
                kill_restart(cluster.procs["monitor"], rng.uniform(0.2, 0.6) * run_s, 0.5),
                kill_worker())

        chaos_task = asyncio.create_task(chaos())
        await gen.run(total=requests, rps=rps)
        await chaos_task
        await gen.stop()
        waited = await wait_for_results(client, gen.stats.ids, timeout_s=result_timeout_s)
        await asyncio.sleep(1.0)  # late duplicates
        figs = delivery_figures(client, gen.stats.ids)
        disp = cluster.log_events("dispatcher")
        figs.update({
            "scenario": "crash",
            "rps": rps,
            "acked": gen.stats.acked,
            "kills": events,
            "instance_dead_detected": disp.get("dispatcher.instance_dead", 0),
            "reissued": disp.get("dispatcher.reissued", 0),
            "reissued_from_checkpoint": cluster.count_lines(
                "dispatcher", '"dispatcher.reissued"', '"from_checkpoint": true'),
            "killed_worker": victims[0] if victims else None,
            "worker_duplicate_assignments_dropped": sum(
                cluster.log_events(w.name).get("worker.duplicate_assignment", 0)
                for w in cluster.workers),
            "wait_for_results_s": round(waited, 1),
            "ok": figs["results_delivered"] == len(gen.stats.ids),
        })
        return figs
    finally:
        await cluster.stop()


async def broker_restart(*, requests: int = 1000, rps: float = 100.0,
                         workdir: str | Path | None = None, down_s: float = 2.0,
                         broker: ApacheKafkaBroker | None = None,
                         kill: bool = False, result_timeout_s: float = 180.0,
                         progress: Progress = _quiet, **cluster_kw: Any) -> dict[str, Any]:
    """Stop (or kill -9) the broker at 40% of the run, restart it after ``down_s``."""
    cluster = await Cluster.create(workdir=workdir, broker=broker, **cluster_kw)
    assert cluster.broker is not None, "broker_restart needs its own broker"
    broker = cluster.broker
    try:
        client = await _open(cluster, progress)
        pids_before = cluster.pids()
        gen = LoadGenerator(settings=cluster.settings, prefix=f"brk-{uuid.uuid4().hex[:6]}")
        await gen.start()
        timing: dict[str, float] = {}

        async def bounce() -> None:
            await asyncio.sleep(0.4 * requests / rps)
            t0 = time.monotonic()
            await broker.astop(kill=kill)
            progress(f"broker {'killed' if kill else 'stopped'}")
            await asyncio.sleep(down_s)
            await broker.astart()
            timing["broker_down_s"] = round(time.monotonic() - t0, 2)
            progress(f"broker back after {timing['broker_down_s']}s")

        task = asyncio.create_task(bounce())
        await gen.run(total=requests, rps=rps)
        await task
        await gen.stop()
        acked = sorted(gen.stats.acked_ids)
        waited = await wait_for_results(client, acked, timeout_s=result_timeout_s)
        await asyncio.sleep(1.0)
        figs = delivery_figures(client, acked)
        figs.update({
            "scenario": "broker-restart",
            "submitted": gen.stats.submitted,
            "acked": gen.stats.acked,
            "producer_send_retries": gen.stats.send_errors,
            "broker_killed": kill,
            **timing,
            "service_pids_unchanged": cluster.pids() == pids_before,
            "services_alive": all(cluster.alive().values()),
            "wait_for_results_s": round(waited, 1),
            "ok": figs["missing"] == 0 and cluster.pids() == pids_before,
        })
        return figs
    finally:
        await cluster.stop()


# ------------------------------------------------------------------ hostile input
def _bad_records(n: int, rng: random.Random, *, valid_ids: list[str], worker: str,
                 prefix: str) -> list[tuple[str, str | None, bytes | None, str]]:
    """``n`` bad records: (where, key, value, kind); where is 'requests', 'heartbeats' or
    'instance'."""
    now = time.time()

    def req(i: int, **kw: Any) -> bytes:
        base = AgentRequest(request_id=f"{prefix}-bad-{i}", input_tokens=100, max_tokens=64,
                            slo_s=60.0)
        return encode(msgspec.structs.replace(base, **kw))

    kinds: list[tuple[str, Callable[[int], tuple[str, str | None, bytes | None]]]] = [
        ("garbage_bytes", lambda i: ("requests", f"bad-{i}", os.urandom(rng.randint(1, 300)))),
        ("truncated_msgpack", lambda i: ("requests", f"bad-{i}",
                                         b"\x85\xa4kind\xadagent_request\xa1v\x01\xaareq")),
        ("truncated_json", lambda i: ("requests", f"bad-{i}", req(i)[: rng.randint(1, 60)])),
        ("empty_value", lambda i: ("requests", f"bad-{i}", None)),
        ("missing_fields", lambda i: ("requests", f"bad-{i}",
                                      b'{"kind":"agent_request","v":1}')),
        ("wrong_schema_version", lambda i: ("requests", f"bad-{i}", req(i).replace(
            b'"v":1', b'"v":99', 1))),
        ("wrong_kind", lambda i: ("requests", f"bad-{i}", encode(Heartbeat(
            instance_id="x", gpu="A100", model="m", engine="sim", at=now)))),
        ("negative_deadline", lambda i: ("requests", f"bad-{i}", req(i, deadline=-5.0,
                                                                      slo_s=None))),
        ("past_deadline", lambda i: ("requests", f"bad-{i}", req(i, deadline=now - 3600,
                                                                  slo_s=None))),
        ("negative_slo", lambda i: ("requests", f"bad-{i}", req(i, slo_s=-1.0))),
        ("zero_max_tokens", lambda i: ("requests", f"bad-{i}", req(i, max_tokens=0))),
        ("huge_max_tokens", lambda i: ("requests", f"bad-{i}", req(i, max_tokens=10**9))),
        ("zero_input_tokens", lambda i: ("requests", f"bad-{i}", req(i, input_tokens=0))),
        ("huge_input_tokens", lambda i: ("requests", f"bad-{i}", req(i, input_tokens=10**8))),
        ("unknown_model", lambda i: ("requests", f"bad-{i}", req(i, model="no-such-model"))),
        ("prompt_too_large", lambda i: ("requests", f"bad-{i}", req(
            i, input_tokens=None, prompt="x" * 5000))),
        ("duplicate_request_id", lambda i: (
            "requests", (rid := rng.choice(valid_ids)),
            encode(AgentRequest(request_id=rid, input_tokens=50, max_tokens=16, slo_s=60.0)))),
        ("bad_reply_to", lambda i: ("requests", f"bad-{i}", req(i, reply_to="no such/topic"))),
        ("negative_step", lambda i: ("requests", f"bad-{i}", req(i, step=-1))),
        ("bad_sampling", lambda i: ("requests", f"bad-{i}", req(
            i, sampling=SamplingParams(top_p=0.0)))),
        ("negative_token_ids", lambda i: ("requests", f"bad-{i}", req(
            i, input_tokens=None, prompt_token_ids=[5, -1, 7]))),
        ("huge_hint", lambda i: ("requests", f"bad-{i}", req(i, output_tokens_hint=10**9))),
        ("impossible_heartbeat", lambda i: ("heartbeats", f"bad-{i}", encode(Heartbeat(
            instance_id=f"{prefix}-ghost-{i}", gpu="A100", model="m", engine="sim", at=now,
            running=1, max_batch=-256)))),
        ("unknown_instance", lambda i: ("instance", f"bad-{i}", encode(Assignment(
            request=AgentRequest(request_id=f"{prefix}-ghost-{i}", input_tokens=10,
                                 max_tokens=4, slo_s=60.0),
            instance_id="ghost-instance", decision_id="d", dispatched_at=now,
            deadline=now + 60)))),
    ]
    out = []
    for i in range(n):
        name, fn = kinds[i % len(kinds)]
        where, key, value = fn(i)
        out.append((where, key, value, name))
    rng.shuffle(out)
    return out


async def hostile(*, bad: int = 1000, valid: int = 1000, rps: float = 100.0,
                  workdir: str | Path | None = None, bootstrap: str | None = None,
                  result_timeout_s: float = 120.0, progress: Progress = _quiet,
                  **cluster_kw: Any) -> dict[str, Any]:
    """``bad`` hostile records mixed into ``valid`` requests."""
    cluster_kw.setdefault("max_prompt_chars", 4096)
    cluster = await Cluster.create(bootstrap=bootstrap, workdir=workdir, **cluster_kw)
    rng = random.Random(1)
    s = cluster.settings
    try:
        client = await _open(cluster, progress)
        pids_before = cluster.pids()
        prefix = f"hostile-{uuid.uuid4().hex[:6]}"
        gen = LoadGenerator(settings=s, prefix=prefix)
        await gen.start()
        # a first slice of valid traffic, served, so duplicates have originals to collide with
        first = max(10, valid // 10)
        await gen.run(total=first, rps=rps)
        await wait_for_results(client, gen.stats.ids, timeout_s=60)
        records = _bad_records(bad, rng, valid_ids=list(gen.stats.ids), worker=cluster.fleet[0][0],
                               prefix=prefix)
        sent: dict[tuple[str, int, int], str] = {}
        producer = gen.producer

        async def inject() -> None:
            per_tick = max(1, int(len(records) / max(1.0, (valid - first) / rps) * 0.05))
            for k in range(0, len(records), per_tick):
                for where, key, value, name in records[k:k + per_tick]:
                    topic = {"requests": s.requests_topic, "heartbeats": s.heartbeats_topic}.get(
                        where, s.instance_topic(cluster.fleet[0][0]))
                    r = await producer.send_raw(topic, value, key=key)
                    sent[(r.topic, r.partition, r.offset)] = name
                await asyncio.sleep(0.05)

        inj = asyncio.create_task(inject())
        await gen.run(total=valid - first, rps=rps)
        await inj
        await gen.stop()
        waited = await wait_for_results(client, gen.stats.ids, timeout_s=result_timeout_s)
        # read dead letters until every bad record is accounted for
        found: dict[tuple[str, int, int], DeadLetter] = {}
        async with TypedConsumer(settings=s, topics=[s.dead_letters_topic], group_id=None,
                                 service="chaos-dl-reader", message_type=DeadLetter) as c:
            end = time.monotonic() + 60
            while len(found) < len(sent) and time.monotonic() < end:
                for env in await c.getmany(timeout_ms=200):
                    d = env.msg
                    found.setdefault((d.topic, d.partition, d.offset), d)
        matched = {k: found[k] for k in sent if k in found}
        with_reason = sum(1 for d in matched.values() if d.reason and d.error_code)
        figs = delivery_figures(client, gen.stats.ids)
        by_kind: Counter[str] = Counter(sent.values())
        dl_kind: Counter[str] = Counter(sent[k] for k in matched)
        missing_kinds = {k: by_kind[k] - dl_kind.get(k, 0) for k in by_kind
                         if by_kind[k] != dl_kind.get(k, 0)}
        figs.update({
            "scenario": "hostile",
            "bad_sent": len(sent),
            "dead_lettered": len(matched),
            "dead_lettered_with_reason": with_reason,
            "dead_letters_total": len(found),
            "bad_not_dead_lettered": len(sent) - len(matched),
            "bad_not_dead_lettered_by_kind": missing_kinds,
            "dead_letter_codes": dict(Counter(d.error_code for d in matched.values())),
            "bad_kinds": dict(by_kind),
            "valid": len(gen.stats.ids),
            "valid_served_ok": sum(1 for r in gen.stats.ids if client.statuses.get(r) == "ok"),
            "service_restarts": sum(1 for k, v in cluster.pids().items()
                                    if v != pids_before.get(k)) + sum(
                1 for a in cluster.alive().values() if not a),
            "wait_for_results_s": round(waited, 1),
        })
        figs["ok"] = (figs["dead_lettered"] == figs["bad_sent"]
                      and figs["valid_served_ok"] == figs["valid"]
                      and figs["service_restarts"] == 0)
        return figs
    finally:
        await cluster.stop()


# ------------------------------------------------------------------ soak
async def soak(*, duration_s: float = 600.0, rps: float = 500.0, warmup_s: float | None = None,
               sample_s: float = 5.0, workdir: str | Path | None = None,
               bootstrap: str | None = None, result_timeout_s: float = 120.0,
               slo_s: float = 10.0, steady_after_s: float = 180.0,
               progress: Progress = _quiet, **cluster_kw: Any) -> dict[str, Any]:
    """``rps`` for ``duration_s``: backlog samples and RSS of every service, start vs end.

    RSS growth is reported twice: from the end of the warm-up, and from ``steady_after_s``
    on, when the memories that are bounded by time (the 120 s de-duplication windows) are
    full: growth after that point is what a leak would look like.

    The SLO is tight (10 s) on purpose: with a loose one the just-enough policy rightly
    queues everything on the slowest instance that still makes it, which looks like a
    growing backlog.
    """
    # production logging (warnings): per-request info lines cost CPU at hundreds per second
    cluster_kw.setdefault("extra_env", {"GOODSERVE_LOG_LEVEL": "WARNING"})
    cluster = await Cluster.create(bootstrap=bootstrap, workdir=workdir, **cluster_kw)
    warm = warmup_s if warmup_s is not None else min(30.0, max(5.0, duration_s * 0.1))
    try:
        client = await _open(cluster, progress)
        gen = LoadGenerator(settings=cluster.settings, prefix=f"soak-{uuid.uuid4().hex[:6]}",
                            slo_s=slo_s)
        await gen.start()
        samples: list[dict[str, Any]] = []
        rss_start: dict[str, int] = {}
        rss_steady: dict[str, int] = {}
        steady_t: float | None = None
        t_start = time.monotonic()

        async def steady_snapshot() -> None:
            # its own clock: a backlog sample can take seconds on a busy host and must not
            # make the steady-state snapshot miss its moment
            nonlocal rss_steady, steady_t
            await asyncio.sleep(steady_after_s)
            rss_steady = cluster.rss()
            steady_t = round(time.monotonic() - t_start, 1)

        async def sampler() -> None:
            nonlocal rss_start
            await asyncio.sleep(warm)
            rss_start = cluster.rss()
            while True:
                try:
                    lag: int | None = await asyncio.wait_for(
                        requests_lag(cluster.settings), timeout=max(5.0, 2 * sample_s))
                except (TimeoutError, KafkaError):
                    lag = None  # recorded as unknown; the next sample tries again
                done = sum(1 for r in gen.stats.ids if r in client.statuses)
                samples.append({"t_s": round(time.monotonic() - t_start, 1),
                                "requests_lag": lag,
                                "outstanding": gen.stats.acked - done,
                                "rss_mb": {k: round(v / 2**20, 1)
                                           for k, v in cluster.rss().items()}})
                progress(f"t={samples[-1]['t_s']}s lag={lag} outstanding="
                         f"{samples[-1]['outstanding']} delivered={done}")
                await asyncio.sleep(sample_s)

        smp = asyncio.create_task(sampler())
        snap = asyncio.create_task(steady_snapshot())
        await gen.run(total=None, rps=rps, duration_s=duration_s)
        sent_s = time.monotonic() - t_start
        rss_end = cluster.rss()
        smp.cancel()
        snap.cancel()
        await asyncio.gather(smp, snap, return_exceptions=True)
        await gen.stop()
        waited = await wait_for_results(client, gen.stats.ids, timeout_s=result_timeout_s)
        figs = delivery_figures(client, gen.stats.ids)
        growth = {k: round(100.0 * (rss_end[k] - v) / v, 1) for k, v in rss_start.items()
                  if v and rss_end.get(k)}
        steady_growth = {k: round(100.0 * (rss_end[k] - v) / v, 1) for k, v in rss_steady.items()
                         if v and rss_end.get(k)}
        lags = [x["requests_lag"] for x in samples if x["requests_lag"] is not None]
        outstanding = [x["outstanding"] for x in samples]
        half = len(lags) // 2
        figs.update({
            "scenario": "soak",
            "duration_s": duration_s,
            "target_rps": rps,
            "achieved_submit_rps": round(gen.stats.acked / sent_s, 1),
            "served_rps": round(figs["results_delivered"] / (sent_s + waited), 1),
            "slo_s": slo_s,
            "met_slo_or_ok": figs["status"].get("ok", 0),
            "per_instance_results": dict(Counter(
                client.instances.get(r, "none") for r in gen.stats.ids)),
            "rss_start_mb": {k: round(v / 2**20, 1) for k, v in rss_start.items()},
            "rss_end_mb": {k: round(v / 2**20, 1) for k, v in rss_end.items()},
            "rss_growth_pct": growth,
            "max_rss_growth_pct": max(growth.values()) if growth else None,
            "rss_steady_from_s": steady_t,
            "rss_steady_growth_pct": steady_growth,
            "max_rss_steady_growth_pct": max(steady_growth.values()) if steady_growth else None,
            "requests_lag_first_half_max": max(lags[:half], default=0),
            "requests_lag_second_half_max": max(lags[half:], default=0),
            "requests_lag_last": lags[-1] if lags else None,
            "outstanding_max": max(outstanding, default=0),
            "outstanding_last": outstanding[-1] if outstanding else None,
            "drain_after_load_s": round(waited, 1),
            "samples": samples,
            "services_alive": all(cluster.alive().values()),
        })
        return figs
    finally:
        await cluster.stop()
