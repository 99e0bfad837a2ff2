"""WorkerService against a real Apache Kafka with simulated engines (scaled time): no mocks."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec
import pytest
from goodserve.schemas import (
    AgentRequest,
    Assignment,
    Checkpoint,
    DeadLetter,
    Heartbeat,
    Message,
    MigrationCommand,
    Result,
    encode,
)
from goodserve.workers.engines.simulated import SimulatedEngine, synthetic_token_id
from goodserve.workers.service import WorkerService

from goodserve.config import Settings
from goodserve.errors import ConfigError
from goodserve.transport import TypedConsumer, TypedProducer, ensure_topics

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(120)]

MODEL = "llama-2-7b"


def worker(
    settings: Settings, iid: str, *, gpu: str = "H100", scale: float = 0.02, hb: float = 0.1
) -> WorkerService:
    eng = SimulatedEngine(instance_id=iid, gpu=gpu, model=MODEL, time_scale=scale)
    return WorkerService(
        settings=settings, instance_id=iid, engine=eng, gpu=gpu, model=MODEL, heartbeat_period_s=hb
    )


def assignment(
    iid: str, rid: str, *, out: int, max_tokens: int = 2048, slo_s: float = 30.0
) -> Assignment:
    now = time.time()
    req = AgentRequest(
        request_id=rid,
        input_tokens=64,
        max_tokens=max_tokens,
        arrival=now - 0.01,
        slo_s=slo_s,
        metadata={"sim_output_tokens": str(out)},
    )
    return Assignment(
        request=req,
        instance_id=iid,
        decision_id=f"d-{rid}",
        dispatched_at=now,
        deadline=now + slo_s,
        predicted_output_tokens=out,
    )


class Tap:
    """Reads a topic from its start (topics are unique per test) without a group."""

    def __init__(self, settings: Settings, topic: str) -> None:
        self.consumer: TypedConsumer[Message] = TypedConsumer(
            settings=settings, topics=topic, group_id=None, service="test-tap"
        )
        self.seen: list[Any] = []

    async def __aenter__(self) -> Tap:
        await self.consumer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.consumer.stop()

    async def until(self, pred: Any, *, within_s: float = 20.0) -> list[Any]:
        """Read until ``pred(seen)`` holds; returns everything seen so far."""
        end = time.monotonic() + within_s
        while not pred(self.seen):
            if time.monotonic() > end:
                raise AssertionError(f"timed out; saw {len(self.seen)} records")
            self.seen += [e.msg for e in await self.consumer.getmany(timeout_ms=100)]
        return self.seen

    async def quiet(self, s: float = 0.7) -> list[Any]:
        """Everything that arrives until nothing does for ``s`` seconds."""
        end = time.monotonic() + s
        while time.monotonic() < end:
            batch = await self.consumer.getmany(timeout_ms=100)
            if batch:
                self.seen += [e.msg for e in batch]
                end = time.monotonic() + s
        return self.seen


async def inflight(w: WorkerService, within_s: float = 10.0) -> None:
    end = time.monotonic() + within_s
    while not w.inflight():
        assert time.monotonic() < end, "nothing became in-flight"
        await asyncio.sleep(0.02)


async def prepare(settings: Settings) -> TypedProducer:
    await ensure_topics(settings)
    p = TypedProducer(settings=settings)
    await p.start()
    return p


def test_constructor_validates_without_io() -> None:
    s = Settings(bootstrap_servers="127.0.0.1:1")
    eng = SimulatedEngine(instance_id="x", gpu="A40", time_scale=0.1)
    with pytest.raises(ConfigError):
        WorkerService(settings=s, instance_id="", engine=eng, gpu="A40", model=MODEL)
    with pytest.raises(ConfigError, match="names the topic"):  # ':' is no topic character
        WorkerService(settings=s, instance_id="node1:gpu0", engine=eng, gpu="A40", model=MODEL)
    with pytest.raises(ConfigError):
        WorkerService(
            settings=s, instance_id="x", engine=eng, gpu="A40", model=MODEL, heartbeat_period_s=0
        )
    with pytest.raises(ConfigError):
        WorkerService(settings=s, instance_id="x", engine=object(), gpu="A40", model=MODEL)
    WorkerService(settings=s, instance_id="x", engine=eng, gpu="A40", model=MODEL)


async def test_results_heartbeats_and_dead_letters(kafka_settings: Settings) -> None:
    s = kafka_settings
    prod = await prepare(s)
    topic = s.instance_topic("w1")
    try:
        async with (
            worker(s, "w1") as w,
            Tap(s, s.results_topic) as results,
            Tap(s, s.heartbeats_topic) as hbs,
            Tap(s, s.dead_letters_topic) as dls,
        ):
            sent = {
                "r-a": assignment("w1", "r-a", out=40),
                "r-b": assignment("w1", "r-b", out=2000, max_tokens=4096),  # long: seen in beats
                "r-c": assignment("w1", "r-c", out=500, max_tokens=25),
            }
            for a in sent.values():
                await prod.send(topic, a, key=a.request.request_id)
            await prod.send(topic, sent["r-a"], key="r-a")  # duplicate: must not run twice
            await prod.send_raw(topic, b"{not json", key="junk")
            future = encode(assignment("w1", "r-v", out=5)).replace(b'"v":1', b'"v":99')
            await prod.send_raw(topic, future, key="r-v")
            await prod.send(topic, assignment("other", "r-x", out=5), key="r-x")
            await prod.send(topic, assignment("w1", "r-d", out=3), key="r-d")  # still serving

            await results.until(lambda seen: len(seen) >= 4)
            got = await results.quiet()
            assert sorted(r.request_id for r in got) == ["r-a", "r-b", "r-c", "r-d"]
            by = {r.request_id: r for r in got}
            for rid, want in (("r-a", 40), ("r-b", 2000), ("r-c", 25), ("r-d", 3)):
                r: Result = by[rid]
                assert r.status == "ok" and r.instance_id == "w1" and r.decision_id == f"d-{rid}"
                assert r.output_tokens == want == len(r.output_token_ids)
                assert r.output_token_ids == [synthetic_token_id(rid, i) for i in range(want)]
                assert r.input_tokens == 64 and r.finish_reason == "length"
                assert r.arrival is not None and r.dispatched_at is not None
                assert r.first_token_at is not None and r.finished_at is not None
                assert r.arrival <= r.dispatched_at <= r.first_token_at <= r.finished_at
                assert r.met_deadline is True and r.migrations == 0
            assert w.duplicates_dropped == 1

            dl = await dls.until(lambda seen: len(seen) >= 3)
            codes = sorted(d.error_code for d in dl if isinstance(d, DeadLetter))
            assert codes == ["malformed", "unknown_instance", "unsupported_version"]

            beats = await hbs.until(lambda seen: any(h.requests for h in seen) and len(seen) >= 3)
            assert all(isinstance(h, Heartbeat) and h.instance_id == "w1" for h in beats)
            seqs = [h.seq for h in beats]
            assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
            prog = [p for h in beats for p in h.requests]
            assert {p.request_id for p in prog} <= {"r-a", "r-b", "r-c", "r-d"}
            assert any(p.generated > 0 and p.deadline > 0 for p in prog)
            assert beats[-1].max_batch > 0 and beats[-1].kv_total_blocks > 0
    finally:
        await prod.stop()


async def test_workers_of_one_process_share_a_producer(kafka_settings: Settings) -> None:
    """Two workers on one caller-owned producer: both serve; stopping one leaves the
    producer to the other (and to its owner), who stops it."""
    s = kafka_settings
    prod = await prepare(s)
    shared = TypedProducer(settings=s, client_id="node-workers")
    engines = [SimulatedEngine(instance_id=i, gpu="H100", model=MODEL, time_scale=0.02)
               for i in ("n1", "n2")]
    ws = [WorkerService(settings=s, instance_id=e.instance_id, engine=e, gpu="H100", model=MODEL,
                        heartbeat_period_s=0.1, producer=shared) for e in engines]
    with pytest.raises(ConfigError, match="started by its owner"):
        await ws[0].start()  # not started yet: the owner's job
    await shared.start()
    try:
        async with Tap(s, s.results_topic) as results, Tap(s, s.heartbeats_topic) as hbs:
            for w in ws:
                await w.start()
            for k, w in enumerate(ws):
                a = assignment(w.instance_id, f"s-{k}", out=6)
                await prod.send(w.topic, a, key=a.request.request_id)
            got = await results.until(lambda seen: len(seen) >= 2)
            assert {(r.request_id, r.instance_id) for r in got} == {("s-0", "n1"), ("s-1", "n2")}
            await ws[0].stop()
            assert shared.started  # the other worker still sends through it
            a = assignment("n2", "s-2", out=4)
            await prod.send(ws[1].topic, a, key="s-2")
            got = await results.until(lambda seen: any(r.request_id == "s-2" for r in seen))
            assert [r.instance_id for r in got if r.request_id == "s-2"] == ["n2"]
            beats = await hbs.until(lambda seen: {h.instance_id for h in seen} >= {"n1", "n2"})
            assert {h.instance_id for h in beats} >= {"n1", "n2"}
            await ws[1].stop()
            assert shared.started
    finally:
        for w in ws:
            await w.stop()
        await shared.stop()
        await prod.stop()


RECORD_LIMIT = 1_048_576  # aiokafka's max_request_size, which TypedProducer keeps


def _long_prompt_assignment(iid: str, rid: str, *, out: int, spare: int) -> Assignment:
    """An Assignment whose prompt fills a record but for ``spare`` bytes."""
    a = assignment(iid, rid, out=out, max_tokens=4096)
    room = RECORD_LIMIT - len(encode(a)) - len(rid) - 100 - spare
    req = msgspec.structs.replace(a.request, prompt="p" * room)
    return msgspec.structs.replace(a, request=req)


async def _migrate_when(
    prod: TypedProducer, s: Settings, hbs: Tap, rid: str, *, generated: int
) -> MigrationCommand:
    """Once the source reports more than ``generated`` tokens of ``rid``, command its move
    src -> dst (mid-run)."""
    await hbs.until(
        lambda seen: any(
            p.request_id == rid and p.generated > generated
            for h in seen
            if h.instance_id == "src"
            for p in h.requests
        )
    )
    cmd = MigrationCommand(
        migration_id=f"m-{rid}", request_id=rid, source="src", target="dst", at=time.time()
    )
    await prod.send(s.instance_topic("src"), cmd, key=rid)
    return cmd


async def test_migration_moves_request_to_target(kafka_settings: Settings) -> None:
    s = kafka_settings
    prod = await prepare(s)
    try:
        async with (
            worker(s, "src", gpu="V100", scale=0.05) as src,
            worker(s, "dst", gpu="H100", scale=0.02) as dst,
            Tap(s, s.results_topic) as results,
            Tap(s, s.heartbeats_topic) as hbs,
            Tap(s, s.checkpoints_topic) as ckpts,
        ):
            a = assignment("src", "r-m", out=3000, max_tokens=4096)
            await prod.send(s.instance_topic("src"), a, key="r-m")
            cmd = await _migrate_when(prod, s, hbs, "r-m", generated=20)
            got = await results.until(lambda seen: len(seen) >= 1)
            got = await results.quiet(1.0)
            assert len(got) == 1
            r: Result = got[0]
            assert r.instance_id == "dst" and r.status == "ok" and r.migrations == 1
            assert r.output_tokens == 3000
            assert r.output_token_ids == [synthetic_token_id("r-m", i) for i in range(3000)]
            assert r.dispatched_at == a.dispatched_at and r.deadline == a.deadline
            ck = await ckpts.until(lambda seen: len(seen) >= 1)
            c: Checkpoint = ck[0]
            assert c.source == "src" and c.target == "dst" and c.migrations == 1
            assert 20 < len(c.generated_token_ids) < 3000
            assert src.migrated_out == 1 and src.results_produced == 0
            assert dst.results_produced == 1
            # a command for a request that is not running here is ignored
            await prod.send(s.instance_topic("src"), cmd, key="r-m")
            assert len(await results.quiet(0.5)) == 1
    finally:
        await prod.stop()


async def test_a_long_prompt_migrates_with_its_progress(kafka_settings: Settings) -> None:
    """A 600 KB prompt: its resuming Assignment carried the request twice (in the
    Assignment and in its checkpoint), 1.2 MB, which the producer refused: the request,
    stopped at the source, never reached the target. The checkpoint in an Assignment
    carries no prompt now."""
    s = kafka_settings
    prod = await prepare(s)
    try:
        async with (
            worker(s, "src", gpu="V100", scale=0.05) as src,
            worker(s, "dst", gpu="H100", scale=0.02) as dst,
            Tap(s, s.results_topic) as results,
            Tap(s, s.heartbeats_topic) as hbs,
            Tap(s, s.instance_topic("dst")) as to_dst,
        ):
            a = _long_prompt_assignment("src", "r-long", out=3000, spare=450_000)
            assert 2 * len(a.request.prompt or "") > RECORD_LIMIT
            await prod.send(s.instance_topic("src"), a, key="r-long")
            await _migrate_when(prod, s, hbs, "r-long", generated=20)
            got = await results.until(lambda seen: len(seen) >= 1, within_s=30.0)
            r: Result = got[0]
            assert r.status == "ok" and r.instance_id == "dst" and r.migrations == 1
            assert r.output_token_ids == [synthetic_token_id("r-long", i) for i in range(3000)]
            sent = [m for m in await to_dst.until(lambda seen: len(seen) >= 1)
                    if isinstance(m, Assignment)]
            assert sent[0].request.prompt == a.request.prompt  # the one to run
            ck = sent[0].resume
            assert ck is not None and ck.request.prompt is None and not ck.progress_dropped
            assert len(ck.generated_token_ids) > 20  # resumed, not restarted
            assert src.migrated_out == 1 and dst.results_produced == 1
    finally:
        await prod.stop()


async def test_a_checkpoint_too_large_for_a_record_restarts_at_the_target(
    kafka_settings: Settings,
) -> None:
    """A prompt that fills its record but for 2.5 KB, checkpointed after more than 1,000
    tokens (about 5.5 bytes each): the checkpoint with them would pass the limit, so it
    goes without them and the target restarts the request from its prompt. Before, the
    refused send left the request stopped at the source with no Result anywhere."""
    s = kafka_settings
    prod = await prepare(s)
    try:
        async with (
            worker(s, "src", gpu="V100", scale=0.05) as src,
            worker(s, "dst", gpu="H100", scale=0.02),
            Tap(s, s.results_topic) as results,
            Tap(s, s.heartbeats_topic) as hbs,
            Tap(s, s.checkpoints_topic) as ckpts,
        ):
            a = _long_prompt_assignment("src", "r-full", out=3000, spare=2_500)
            await prod.send(s.instance_topic("src"), a, key="r-full")
            await _migrate_when(prod, s, hbs, "r-full", generated=1000)
            got = await results.until(lambda seen: len(seen) >= 1, within_s=30.0)
            r: Result = got[0]
            assert r.status == "ok" and r.instance_id == "dst" and r.migrations == 1
            assert r.output_token_ids == [synthetic_token_id("r-full", i) for i in range(3000)]
            c: Checkpoint = (await ckpts.until(lambda seen: len(seen) >= 1))[0]
            assert c.progress_dropped and c.generated_token_ids == []
            assert src.migrated_out == 1
    finally:
        await prod.stop()


def test_a_result_too_large_loses_its_ids_then_says_why() -> None:
    from goodserve.workers.service import smaller_result

    from goodserve.errors import RecordTooLarge

    e = RecordTooLarge("too large")
    res = Result(request_id="r", status="ok", output_token_ids=[1, 2, 3], text="a b c",
                 output_tokens=3, met_deadline=True)
    first = smaller_result(res, e, 65_536)
    assert first is not None and first.output_token_ids_omitted
    assert first.output_token_ids == [] and first.text == "a b c" and first.status == "ok"
    ids_only = msgspec.structs.replace(res, text="")  # the ids are the output: never ok empty
    for r in (first, ids_only):
        err = smaller_result(r, e, 65_536)
        assert err is not None and err.status == "error" and err.error is not None
        assert err.error.code == "record_too_large"
        assert "max_record_bytes 65536" in err.error.message
        assert err.output_tokens == 3 and err.text == "" and err.met_deadline is False
        assert smaller_result(err, e, 65_536) is None  # nothing left to take out


async def test_a_result_over_the_record_limit_is_delivered_as_an_error(
    kafka_settings: Settings,
) -> None:
    """12,000 generated token ids (about 66 KB) and records of at most 64 KiB: the Result
    was refused by the producer and never delivered; now an error Result says why."""
    s = kafka_settings.replace(max_record_bytes=65_536)
    prod = await prepare(s)
    try:
        async with worker(s, "w1", scale=0.01), Tap(s, s.results_topic) as results:
            await prod.send(s.instance_topic("w1"), assignment("w1", "r-big", out=12_000,
                                                               max_tokens=12_000), key="r-big")
            got = await results.until(lambda seen: len(seen) >= 1, within_s=60.0)
            r: Result = got[0]
            assert r.request_id == "r-big" and r.status == "error" and r.error is not None
            assert r.error.code == "record_too_large" and not r.error.retriable
            assert r.output_tokens == 12_000 and r.output_token_ids == []
    finally:
        await prod.stop()


class _SlowToStop(SimulatedEngine):
    """A checkpoint that cannot stop the request before it finishes (a slowed engine's long
    step holds the token boundary): it waits for the natural end, then finds no request."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.ended: dict[str, asyncio.Event] = {}

    async def generate(self, request: Any) -> Any:
        async for out in super().generate(request):
            if out.finished:  # the engine has let the request go
                self.ended.setdefault(request.request_id, asyncio.Event()).set()
            yield out

    async def checkpoint(self, request_id: str) -> Any:
        await self.ended.setdefault(request_id, asyncio.Event()).wait()
        return await super().checkpoint(request_id)


async def test_a_request_that_finishes_while_being_checkpointed_keeps_its_result(
    kafka_settings: Settings,
) -> None:
    """A migration command whose checkpoint comes too late: the request finished on the
    source in the meantime. Its Result stands, delivered once, from the source (it was
    lost: the finished stream saw the request marked as migrating and left the Result to
    a target that never got it; CI, tests/test_live_migration.py, session 13)."""
    s = kafka_settings
    prod = await prepare(s)
    eng = _SlowToStop(instance_id="src", gpu="V100", model=MODEL, time_scale=0.05)
    src = WorkerService(settings=s, instance_id="src", engine=eng, gpu="V100", model=MODEL,
                        heartbeat_period_s=0.1)
    try:
        async with (
            src,
            Tap(s, s.results_topic) as results,
            Tap(s, s.heartbeats_topic) as hbs,
            Tap(s, s.checkpoints_topic) as ckpts,
        ):
            await prod.send(s.instance_topic("src"), assignment("src", "r-f", out=300), key="r-f")
            await hbs.until(lambda seen: any(p.request_id == "r-f" and p.generated > 5
                                             for h in seen for p in h.requests))
            cmd = MigrationCommand(migration_id="m-f", request_id="r-f", source="src",
                                   target="dst", at=time.time())
            await prod.send(s.instance_topic("src"), cmd, key="r-f")
            await results.until(lambda seen: len(seen) >= 1)
            got = await results.quiet(1.0)
            assert [(r.request_id, r.status, r.instance_id, r.output_tokens) for r in got] == [
                ("r-f", "ok", "src", 300)
            ]
            assert await ckpts.quiet(0.3) == [] and src.migrated_out == 0
    finally:
        await prod.stop()


async def test_graceful_stop_drains_and_restart_does_not_rerun(kafka_settings: Settings) -> None:
    s = kafka_settings
    prod = await prepare(s)
    topic = s.instance_topic("w2")
    try:
        async with Tap(s, s.results_topic) as results, Tap(s, s.heartbeats_topic) as hbs:
            w = worker(s, "w2")
            await w.start()
            for i in range(3):
                a = assignment("w2", f"r-{i}", out=300)
                await prod.send(topic, a, key=a.request.request_id)
            await inflight(w)
            await w.stop(drain_timeout_s=20.0)  # what was taken finishes, then it stops
            await w.stop()  # idempotent
            first = [r.request_id for r in await results.quiet(0.3)]
            assert first and len(first) == len(set(first)) == w.results_produced
            beats = await hbs.quiet(0.3)
            assert beats[-1].draining is True and beats[-1].instance_id == "w2"

            w2 = worker(s, "w2")  # same group: committed work is not re-read, the rest is
            async with w2:
                await prod.send(topic, assignment("w2", "r-new", out=5), key="r-new")
                await results.until(lambda seen: len(seen) >= 4)
                got = await results.quiet(0.7)
            assert sorted(r.request_id for r in got) == ["r-0", "r-1", "r-2", "r-new"]
            assert w2.results_produced == 4 - len(first)
    finally:
        await prod.stop()


async def test_drain_timeout_checkpoints_for_reissue(kafka_settings: Settings) -> None:
    s = kafka_settings
    prod = await prepare(s)
    try:
        async with Tap(s, s.checkpoints_topic) as ckpts, Tap(s, s.results_topic) as results:
            w = worker(s, "w3", gpu="V100", scale=0.05)
            await w.start()
            await prod.send(s.instance_topic("w3"), assignment("w3", "r-long", out=5000), key="r")
            await inflight(w)
            await prod.send(s.instance_topic("w3"), assignment("w3", "r-ab", out=5000), key="a")
            for _ in range(200):
                if "r-ab" in w.inflight():
                    break
                await asyncio.sleep(0.02)
            assert await w.abort("r-ab") is True and await w.abort("nope") is False
            aborted = await results.until(lambda seen: len(seen) >= 1)
            assert aborted[0].request_id == "r-ab" and aborted[0].status == "aborted"
            assert aborted[0].finish_reason == "abort" and aborted[0].met_deadline is False
            await w.stop(drain_timeout_s=0.1)
            ck = await ckpts.until(lambda seen: len(seen) >= 1)
            assert ck[0].request_id == "r-long" and ck[0].target is None
            assert ck[0].generated_token_ids
            assert len(await results.quiet(0.3)) == 1  # only the aborted one
    finally:
        await prod.stop()


def test_worker_command_builds_service() -> None:
    from goodserve.cli import build_parser
    from goodserve.commands.worker import build_worker

    argv = ["worker", "--instance-id", "w9", "--gpu", "A40", "--time-scale", "0.1"]
    args = build_parser().parse_args([*argv, "--bootstrap-servers", "h:1", "--heartbeat-s", "2"])
    svc = build_worker(args)
    assert isinstance(svc, WorkerService)
    assert (svc.instance_id, svc.gpu, svc.model, svc.engine.name) == (
        "w9",
        "A40",
        "llama-2-7b",
        "simulated",
    )
    assert svc.heartbeat_period_s == 2.0 and svc.settings.bootstrap_servers == "h:1"
    assert build_parser().parse_args(["worker", "--instance-id", "x", "--engine", "vllm"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["worker", "--engine", "sim"])  # --instance-id required
