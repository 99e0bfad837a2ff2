"""``goodserve broker apache|embedded``: run a local broker in the foreground until Ctrl-C."""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "broker", help="run a local Kafka-compatible broker in the foreground"
    )
    bsub = p.add_subparsers(dest="broker_kind", metavar="KIND")
    a = bsub.add_parser("apache", help="Apache Kafka 4.1 (KRaft; jars fetched with Maven once)")
    a.add_argument("--port", type=int, default=9092, help="client port (0 picks a free one)")
    a.add_argument(
        "--workdir", type=Path, help="data directory (kept between runs; default a temp dir)"
    )
    a.add_argument("--create-topics", action="store_true", help="create the standard topics")
    a.add_argument("--topic-prefix", default="goodserve")
    a.set_defaults(func=run_apache)
    e = bsub.add_parser("embedded", help="the embedded Tansu broker (memory only, no Java)")
    e.add_argument("--port", type=int, default=9092, help="client port (0 picks a free one)")
    e.add_argument("--create-topics", action="store_true", help="create the standard topics")
    e.add_argument("--topic-prefix", default="goodserve")
    e.set_defaults(func=run_embedded)
    t = bsub.add_parser("topics", help="create the standard topics on a running Kafka")
    from goodserve.config import Settings

    Settings.add_arguments(t)
    t.add_argument("--instance", action="append", default=[], help="also this instance's topic")
    t.set_defaults(func=run_topics)

    def _help(args: argparse.Namespace) -> int:
        p.print_help()
        return 0

    p.set_defaults(func=_help)


def _serve(broker: Any, settings_kw: dict[str, Any], args: argparse.Namespace) -> int:
    """Start, optionally create topics, print the address, block until SIGINT/SIGTERM."""
    import asyncio

    from goodserve.config import Settings
    from goodserve.transport import ensure_topics

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    broker.start()
    try:
        if args.create_topics:
            s = Settings(
                bootstrap_servers=broker.bootstrap_servers,
                topic_prefix=args.topic_prefix,
                **settings_kw,
            )
            created = asyncio.run(ensure_topics(s))
            print(f"created topics: {', '.join(created) or '(all existed)'}", file=sys.stderr)
        print(f"broker ready: --bootstrap-servers {broker.bootstrap_servers}", flush=True)
        while not stop.is_set() and broker.running:
            stop.wait(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        broker.stop()
    return 0


def run_apache(args: argparse.Namespace) -> int:
    from goodserve.broker.apache import ApacheKafkaBroker

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="goodserve-kafka-"))
    print(f"kafka data in {workdir}", file=sys.stderr)
    return _serve(ApacheKafkaBroker(workdir=workdir, port=args.port), {}, args)


def run_embedded(args: argparse.Namespace) -> int:
    from goodserve.broker.embedded import EmbeddedBroker

    print("embedded broker: pass --no-idempotence to clients (Tansu rejects it)", file=sys.stderr)
    return _serve(EmbeddedBroker(port=args.port), {"idempotent_producer": False}, args)


def run_topics(args: argparse.Namespace) -> int:
    """Idempotent: creates what is missing, prints every standard topic name."""
    import asyncio

    from goodserve.config import Settings
    from goodserve.transport import ensure_topics, instance_topic_spec, standard_topics

    s = Settings.from_args(args)
    specs = standard_topics(s) + [instance_topic_spec(s, i) for i in args.instance]
    created = set(asyncio.run(ensure_topics(s, specs)))
    for spec in specs:
        state = "created" if spec.name in created else "exists"
        print(f"{spec.name}\t{spec.partitions}\t{state}")
    return 0
