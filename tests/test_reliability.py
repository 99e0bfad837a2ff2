"""Reliability and security on real Apache Kafka, services as separate OS processes.

Shortened versions of ``goodserve chaos crash|broker-restart|hostile|soak`` plus a SCRAM+TLS
broker and a SIGTERM drain. The full-length runs are the chaos commands (docs/reliability.md).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from goodserve.schemas import AgentRequest

from goodserve.broker.apache import ApacheKafkaBroker
from goodserve.chaos import scenarios
from goodserve.chaos.cluster import Cluster, requests_lag
from goodserve.chaos.load import CountingClient, wait_for_results
from goodserve.chaos.secure import make_tls, secure_broker_kwargs, secure_settings
from goodserve.errors import GoodServeError
from goodserve.transport import kafka_client_kwargs

pytestmark = pytest.mark.kafka

FAST_SESSION = {"group.min.session.timeout.ms": "2000"}


def show(figs: dict[str, Any]) -> None:
    print(json.dumps({k: v for k, v in figs.items() if k != "samples"}, sort_keys=True))


async def test_crash_kill9_dispatcher_monitor_worker(kafka_broker_factory: Callable[..., Any],
                                                     tmp_path: Path) -> None:
    broker = kafka_broker_factory(extra_config=FAST_SESSION)
    figs = await scenarios.crash(requests=300, rps=15, broker=broker, workdir=tmp_path,
                                 time_scale=0.5, seed=3)
    show(figs)
    assert figs["results_delivered"] == 300 and figs["missing"] == 0
    assert figs["status"] == {"ok": 300}
    killed = {e["killed"] for e in figs["kills"] if "killed" in e}
    assert {"dispatcher", "monitor", figs["killed_worker"]} <= killed
    assert figs["instance_dead_detected"] >= 1  # missing heartbeats noticed
    assert figs["reissued"] >= 1  # and its requests re-dispatched


async def test_broker_kill_and_restart_loses_no_acked_request(
        kafka_broker_factory: Callable[..., Any], tmp_path: Path) -> None:
    broker = kafka_broker_factory(extra_config=FAST_SESSION)
    figs = await scenarios.broker_restart(requests=300, rps=30, broker=broker, kill=True,
                                          down_s=1.0, workdir=tmp_path)
    show(figs)
    assert figs["acked"] == 300
    assert figs["missing"] == 0 and figs["results_delivered"] == 300
    assert figs["service_pids_unchanged"] and figs["services_alive"]


async def test_hostile_input_dead_lettered_valid_served(kafka_bootstrap: str,
                                                        tmp_path: Path) -> None:
    figs = await scenarios.hostile(bad=200, valid=200, rps=50, bootstrap=kafka_bootstrap,
                                   workdir=tmp_path)
    show(figs)
    assert figs["bad_sent"] == 200
    assert figs["dead_lettered"] == 200, figs["bad_not_dead_lettered_by_kind"]
    assert figs["dead_lettered_with_reason"] == 200
    assert figs["valid_served_ok"] == figs["valid"] == 200
    assert figs["service_restarts"] == 0
    assert len(figs["bad_kinds"]) >= 24  # every kind, the invalid heartbeat included


async def test_soak_short_backlog_and_rss(kafka_bootstrap: str, tmp_path: Path) -> None:
    figs = await scenarios.soak(duration_s=20, rps=100, warmup_s=6, sample_s=2,
                                steady_after_s=12, bootstrap=kafka_bootstrap, workdir=tmp_path)
    show(figs)
    assert figs["missing"] == 0 and figs["requests"] >= 1900
    assert figs["requests_lag_last"] is not None and figs["requests_lag_last"] < 200
    assert figs["outstanding_last"] is not None and figs["outstanding_last"] < 500
    assert figs["services_alive"]
    # a 14 s window is noisy (allocator warm-up); the 10-minute soak targets < 10%
    assert figs["max_rss_growth_pct"] is not None and figs["max_rss_growth_pct"] < 25
    assert figs["rss_steady_from_s"] is not None and figs["rss_steady_from_s"] >= 12
    assert set(figs["rss_steady_growth_pct"]) == set(figs["rss_growth_pct"])


async def test_scram_tls_every_service(kafka_broker_factory: Callable[..., Any],
                                       tmp_path: Path) -> None:
    user, password = "goodserve-svc", f"pw-{uuid.uuid4().hex}"
    tls = make_tls(tmp_path / "tls")
    broker: ApacheKafkaBroker = kafka_broker_factory(
        **secure_broker_kwargs(tls, username=user, password=password))
    s = secure_settings(broker, tls, username=user, password=password,
                        topic_prefix=f"sec-{uuid.uuid4().hex[:6]}")
    cluster = await Cluster.create(settings=s, workdir=tmp_path / "run",
                                   extra_env={"GOODSERVE_LOG_LEVEL": "DEBUG"})
    marker = f"TOPSECRET-{uuid.uuid4().hex}"
    try:
        await cluster.start()
        client = CountingClient(settings=s)
        await client.start()
        cluster.client = client
        await cluster.warm_up(client)
        ids = []
        for i in range(20):
            req = AgentRequest(request_id=f"sec-{i}", prompt=f"{marker} question {i}",
                               max_tokens=32, slo_s=120.0, metadata={"sim_output_tokens": "8"})
            await client.submit(req)
            ids.append(req.request_id)
        await wait_for_results(client, ids, timeout_s=60)
        assert all(client.statuses.get(r) == "ok" for r in ids)
        for name in ("dispatcher", "monitor", *(w.name for w in cluster.workers)):
            assert cluster.log_events(name), f"{name} logged nothing"
        # every service connected over SASL_SSL (there is no other client listener in use)
        assert all(cluster.alive().values())
    finally:
        await cluster.stop()
    logs = cluster.all_logs()
    assert '"worker.result"' in logs and '"dispatcher.started"' in logs
    assert marker not in logs  # no prompt text without log_payloads
    assert password not in logs  # secrets never logged
    assert '"sasl_password": "***"' in logs  # settings are logged redacted
    # a wrong password is refused by the broker
    bad = CountingClient(settings=s.replace(sasl_password="wrong"))
    with pytest.raises(GoodServeError):
        await asyncio.wait_for(bad.start(), 60)
    await bad.stop()


async def _group_lag(settings: Any, group: str, topic: str) -> int:
    admin = AIOKafkaAdminClient(**kafka_client_kwargs(settings, role="admin"))
    from aiokafka import AIOKafkaConsumer
    from aiokafka.structs import TopicPartition

    consumer = AIOKafkaConsumer(**kafka_client_kwargs(settings, role="consumer"), group_id=None)
    try:
        await admin.start()
        await consumer.start()
        tp = TopicPartition(topic, 0)
        end = (await consumer.end_offsets([tp]))[tp]
        committed = await admin.list_consumer_group_offsets(group, partitions=[tp])
        md = committed.get(tp)
        return end - (md.offset if md is not None and md.offset >= 0 else 0)
    finally:
        await consumer.stop()
        await admin.close()


async def test_sigterm_drains_worker_and_dispatcher(kafka_bootstrap: str, tmp_path: Path) -> None:
    cluster = await Cluster.create(bootstrap=kafka_bootstrap, workdir=tmp_path,
                                   fleet=(("d-a100", "A100"), ("d-l40s", "L40S")),
                                   time_scale=3.0)
    cluster.build()
    for iid, gpu in cluster.fleet:  # a short drain: what is still running gets checkpointed
        from goodserve.chaos.procs import worker_proc

        cluster.procs[iid] = worker_proc(cluster.settings, tmp_path / "logs", iid, gpu,
                                         time_scale=3.0, drain_timeout_s=0.5)
    try:
        await cluster.start()
        client = CountingClient(settings=cluster.settings)
        await client.start()
        cluster.client = client
        await cluster.warm_up(client, timeout_s=120)
        ids = []
        for i in range(24):
            req = AgentRequest(request_id=f"drain-{i}", input_tokens=200, max_tokens=64,
                               slo_s=300.0, metadata={"sim_output_tokens": "64"})
            await client.submit(req)
            ids.append(req.request_id)
        t_end = time.monotonic() + 30
        while time.monotonic() < t_end:  # every request reached a worker
            if sum(w.log_text().count('"drain-') for w in cluster.workers) >= len(ids):
                break
            await asyncio.sleep(0.2)
        victim = max(cluster.workers, key=lambda w: w.log_text().count('"drain-'))
        took = victim.terminate(timeout_s=60)
        assert took < 15.0, f"worker drain took {took:.1f}s"
        assert victim.proc is not None and victim.proc.returncode == 0
        text = victim.log_text()
        assert '"worker.stopped"' in text
        # offsets committed: what the worker read and settled is never read again; only
        # records that arrived after it stopped taking work stay uncommitted
        iid = victim.name.removeprefix("worker-")
        lag = await _group_lag(cluster.settings, f"goodserve-worker-{iid}",
                               cluster.settings.instance_topic(iid))
        read_before = text.count('"worker.assigned"')
        await wait_for_results(client, ids, timeout_s=120)
        assert all(client.statuses.get(r) == "ok" for r in ids), client.statuses
        victim.start()
        await cluster.wait_started(victim)
        await asyncio.sleep(3.0)
        again = victim.log_text().count('"worker.assigned"') - read_before
        assert again <= lag, f"re-read {again} settled assignments (uncommitted: {lag})"
        checkpointed = text.count('"worker.drain_checkpoint"')
        if checkpointed:  # handed back: the dispatcher resumed them from their checkpoints
            assert cluster.count_lines("dispatcher", '"dispatcher.reissued"',
                                       '"from_checkpoint": true') >= checkpointed
        took = cluster.procs["dispatcher"].terminate(timeout_s=60)
        assert took < 15.0 and cluster.procs["dispatcher"].proc.returncode == 0  # type: ignore[union-attr]
        assert await requests_lag(cluster.settings) == 0
        print(json.dumps({"drain_checkpoints": checkpointed, "dispatcher_exit_s": round(took, 2),
                          "worker_uncommitted_unread": lag}))
    finally:
        await cluster.stop()
