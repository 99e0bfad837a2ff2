"""A real Apache Kafka (KRaft, single node) started from jars, for tests and local runs.

Why not Docker: the test machines have Java and Maven but no container runtime. The jars
come from Maven Central through ``scripts/kafka-broker.sh`` into ``.cache/kafka`` (once),
or from an unpacked Kafka distribution named by ``GOODSERVE_KAFKA_HOME``.

The broker keeps its data in ``workdir`` and keeps its ports across ``restart()``, so tests
can kill it and bring it back with committed offsets and topics intact.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import base64
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from goodserve.errors import BrokerUnavailable, ConfigError
from goodserve.logging import get_logger

log = get_logger(__name__)

KAFKA_VERSION = "4.1.1"
_REPO_ROOT = Path(__file__).resolve().parents[2]
_FETCH_SCRIPT = _REPO_ROOT / "scripts" / "kafka-broker.sh"
_LIVE: set[ApacheKafkaBroker] = set()


def new_cluster_id() -> str:
    """A random KRaft cluster id that Kafka's command line can take.

    Base64url of a UUID, as Kafka's ``Uuid.randomUuid`` makes it; like Kafka we redraw
    an id beginning with ``-``, which the storage tool's argument parser reads as an
    option (``--cluster-id: expected one argument``), about one format in 64.
    """
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cluster_id.startswith("-"):
            return cluster_id


@dataclass(frozen=True, slots=True)
class Listener:
    """An extra client listener (e.g. SASL_PLAINTEXT for SCRAM tests); port 0 picks one."""

    name: str
    protocol: str
    port: int = 0


def free_port(host: str = "127.0.0.1") -> int:
    """A currently free TCP port on ``host`` (racy by nature; good enough on loopback)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def kafka_classpath(*, version: str = KAFKA_VERSION, fetch: bool = True) -> str:
    """Jars of Apache Kafka as a Java classpath, fetching them from Maven Central if needed."""
    home = os.environ.get("GOODSERVE_KAFKA_HOME")
    if home:
        libs = Path(home) / "libs"
        jars = sorted(libs.glob("*.jar"))
        if not jars:
            raise ConfigError(f"GOODSERVE_KAFKA_HOME={home!r} has no libs/*.jar")
        return os.pathsep.join(str(j) for j in jars)
    cache = Path(os.environ.get("GOODSERVE_CACHE_DIR", _REPO_ROOT / ".cache")) / "kafka"
    lib = cache / f"lib-{version}"
    if not (lib / ".complete").exists():
        if not fetch or not _FETCH_SCRIPT.exists():
            raise ConfigError(
                f"Apache Kafka {version} jars not found in {lib}; run scripts/kafka-broker.sh "
                "fetch or set GOODSERVE_KAFKA_HOME to an unpacked Kafka distribution"
            )
        env = dict(os.environ, KAFKA_VERSION=version)
        proc = subprocess.run(
            ["bash", str(_FETCH_SCRIPT), "fetch"], env=env, capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise BrokerUnavailable(
                f"fetching Apache Kafka {version} failed (rc={proc.returncode}): "
                f"{proc.stderr.strip()[-2000:]}"
            )
    return os.pathsep.join(str(j) for j in sorted(lib.glob("*.jar")))


def probe_metadata(host: str, port: int, *, timeout: float = 2.0) -> int:
    """Send a Kafka Metadata (v4) request; return the number of brokers it reports.

    A broker that answers Metadata with itself in the list is ready for clients, which
    an open port alone does not prove.
    """
    client_id = b"goodserve-probe"
    body = struct.pack(">i", -1) + b"\x00"  # all topics (null array), no auto-create
    header = struct.pack(">hhih", 3, 4, 7, len(client_id)) + client_id
    req = header + body
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.settimeout(timeout)
        s.sendall(struct.pack(">i", len(req)) + req)
        size = struct.unpack(">i", _recv_exact(s, 4))[0]
        resp = _recv_exact(s, size)
    corr, _throttle, n_brokers = struct.unpack(">iii", resp[:12])
    if corr != 7:
        raise BrokerUnavailable(f"bad metadata response correlation id {corr}")
    return int(n_brokers)


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed by broker")
        buf += chunk
    return bytes(buf)


def wait_until_ready(
    host: str, port: int, *, timeout_s: float, alive: Callable[[], bool] | None = None
) -> float:
    """Poll Metadata until the broker lists itself; return seconds waited."""
    t0 = time.monotonic()
    last: Exception | None = None
    while time.monotonic() - t0 < timeout_s:
        if alive is not None and not alive():
            raise BrokerUnavailable(f"broker process on port {port} exited during start")
        try:
            if probe_metadata(host, port) > 0:
                return time.monotonic() - t0
        except (OSError, struct.error, BrokerUnavailable) as e:
            last = e
        time.sleep(0.2)
    raise BrokerUnavailable(f"broker on {host}:{port} not ready after {timeout_s:.0f}s: {last}")


class ApacheKafkaBroker:
    """One Apache Kafka process in combined broker+controller (KRaft) mode on loopback.

    ``start()``/``stop()`` are synchronous (usable from any fixture); ``astart()``/``astop()``
    and ``async with`` run them in a thread. ``stop(kill=True)`` simulates a crash.
    """

    def __init__(
        self,
        *,
        workdir: str | os.PathLike[str],
        port: int = 0,
        controller_port: int = 0,
        host: str = "127.0.0.1",
        extra_listeners: Sequence[Listener] = (),
        extra_config: Mapping[str, str] | None = None,
        jvm_heap: str = "512m",
        jvm_opts: Sequence[str] = (),
        start_timeout_s: float = 120.0,
        version: str = KAFKA_VERSION,
        format_args: Sequence[str] = (),
    ) -> None:
        if port < 0 or controller_port < 0:
            raise ConfigError("ports must be >= 0 (0 picks a free one)")
        if start_timeout_s <= 0:
            raise ConfigError("start_timeout_s must be > 0")
        names = [listener.name.upper() for listener in extra_listeners]
        if {"PLAINTEXT", "CONTROLLER"} & set(names) or len(set(names)) != len(names):
            raise ConfigError(f"extra listener names must be unique and not reserved: {names}")
        self.workdir = Path(workdir).resolve()
        self.host = host
        self._port = self._want_port = port
        self._controller_port = self._want_controller_port = controller_port
        self._extra = list(extra_listeners)
        self._extra_ports: dict[str, int] = {}
        self._extra_config = dict(extra_config or {})
        self._jvm = [f"-Xmx{jvm_heap}", f"-Xms{min(jvm_heap, '256m', key=_mem)}", *jvm_opts]
        self.start_timeout_s = start_timeout_s
        self.version = version
        self._format_args = list(format_args)
        """Extra ``kafka-storage format`` arguments, e.g. ``--add-scram`` for SCRAM users."""
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self.started_in_s: float | None = None

    # --- addresses --------------------------------------------------------------------------
    @property
    def port(self) -> int:
        if not self._port:
            raise BrokerUnavailable("broker not started yet (port not chosen)")
        return self._port

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    def listener_address(self, name: str) -> str:
        """host:port of an extra listener."""
        return f"{self.host}:{self._extra_ports[name.upper()]}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "server.log"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The broker JVM's process id while it runs (benches read its CPU time)."""
        return self._proc.pid if self.running and self._proc is not None else None

    # --- config -----------------------------------------------------------------------------
    def _choose_ports(self) -> None:
        if not self._port:
            self._port = free_port(self.host)
        if not self._controller_port:
            self._controller_port = free_port(self.host)
        for lst in self._extra:
            if lst.name.upper() not in self._extra_ports:
                self._extra_ports[lst.name.upper()] = lst.port or free_port(self.host)

    def server_properties(self) -> dict[str, str]:
        h, p, c = self.host, self._port, self._controller_port
        listeners = [f"PLAINTEXT://{h}:{p}", f"CONTROLLER://{h}:{c}"]
        advertised = [f"PLAINTEXT://{h}:{p}"]
        protomap = ["PLAINTEXT:PLAINTEXT", "CONTROLLER:PLAINTEXT"]
        for lst in self._extra:
            name = lst.name.upper()
            listeners.append(f"{name}://{h}:{self._extra_ports[name]}")
            advertised.append(f"{name}://{h}:{self._extra_ports[name]}")
            protomap.append(f"{name}:{lst.protocol.upper()}")
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@{h}:{c}",
            "listeners": ",".join(listeners),
            "advertised.listeners": ",".join(advertised),
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": ",".join(protomap),
            "log.dirs": str(self.workdir / "data"),
            "num.partitions": "1",
            "auto.create.topics.enable": "true",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "4",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "4",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            # a killed broker restarts fast: its old session expires in 2 s, not 9 s
            "broker.session.timeout.ms": "2000",
            "broker.heartbeat.interval.ms": "500",
            "log.retention.hours": "24",
            # a local broker shares a few cores with its clients: fewer request threads
            # (defaults 3 network, 8 io) cost less CPU (58% vs 63% of a core at 1,000 req/s)
            "num.network.threads": "1",
            "num.io.threads": "2",
            # no forced fsync (Kafka's default: the OS flushes; a killed broker loses
            # nothing, its page cache survives it): an fsync every 10,000 messages stalled
            # the appending request thread for as long as the disk took
        }
        props.update(self._extra_config)
        return props

    def _write_config(self) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        path = self.workdir / "server.properties"
        path.write_text("".join(f"{k}={v}\n" for k, v in self.server_properties().items()))
        (self.workdir / "log4j.properties").write_text(
            "log4j.rootLogger=INFO, file\n"
            "log4j.appender.file=org.apache.log4j.FileAppender\n"
            f"log4j.appender.file.File={self.log_path}\n"
            "log4j.appender.file.layout=org.apache.log4j.PatternLayout\n"
            "log4j.appender.file.layout.ConversionPattern=[%d] %p %m (%c)%n\n"
            "log4j.logger.kafka=INFO\nlog4j.logger.org.apache.kafka=INFO\n"
            "log4j.logger.state.change.logger=WARN\n"
        )
        return path

    def _java(self, classpath: str, *args: str) -> list[str]:
        log4j = self.workdir / "log4j.properties"
        # A test/bench broker lives seconds to minutes on a few cores shared with its
        # clients: C2's compiler threads took ~40% of a core through the first minute of
        # a 1,000 req/s bench; C1 alone compiles in a fraction of that, and code it
        # compiles is fast enough here. jvm_opts come after, so they can override both.
        return [
            os.environ.get("JAVA", "java"),
            "-XX:+UseSerialGC",
            "-XX:TieredStopAtLevel=1",
            *self._jvm,
            "-Djava.awt.headless=true",
            f"-Dlog4j.configuration=file:{log4j}",
            "-cp",
            classpath,
            *args,
        ]

    def _format(self, classpath: str, config: Path) -> None:
        if (self.workdir / "data" / "meta.properties").exists():
            return
        cluster_id = new_cluster_id()
        cmd = self._java(
            classpath, "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(config),
            *self._format_args,
        )
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise BrokerUnavailable(
                f"kafka storage format failed (rc={proc.returncode}): "
                f"{(proc.stdout + proc.stderr).strip()[-2000:]}"
            )

    # --- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        """Format storage (first time only), start the JVM and wait until Metadata answers.

        Ports picked here (port=0) are kept for restarts; if the very first start fails
        because another process took a picked port meanwhile, it retries once on new ones.
        """
        if self.running:
            return
        auto = not self._port or not self._controller_port
        first = self.started_in_s is None
        try:
            self._start_once()
        except BrokerUnavailable as e:
            if not (auto and first and self._port_clash()):
                raise
            log.warning("kafka.port_taken_retrying", error=str(e).splitlines()[0])
            self._port, self._controller_port = self._want_port, self._want_controller_port
            self._extra_ports.clear()
            self._start_once()

    def _start_once(self) -> None:
        t0 = time.monotonic()
        classpath = kafka_classpath(version=self.version)
        self._choose_ports()
        config = self._write_config()
        for old in (self.workdir / "stdout.log", self.log_path):
            if old.exists():  # keep one previous run's logs for post-mortems
                old.replace(old.with_suffix(".log.1"))
        self._format(classpath, config)
        out = open(self.workdir / "stdout.log", "ab")  # closed in stop()
        self._log_file = out
        self._proc = subprocess.Popen(
            self._java(classpath, "kafka.Kafka", str(config)),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        _LIVE.add(self)
        log.info("kafka.starting", pid=self._proc.pid, bootstrap=self.bootstrap_servers)
        try:
            wait_until_ready(
                self.host,
                self._port,
                timeout_s=self.start_timeout_s,
                alive=lambda: self.running,
            )
        except BrokerUnavailable as e:
            tail = self._tail()
            self.stop(kill=True)
            raise BrokerUnavailable(f"{e}\n--- kafka log tail ---\n{tail}") from None
        self.started_in_s = time.monotonic() - t0
        log.info("kafka.ready", bootstrap=self.bootstrap_servers, seconds=self.started_in_s)

    def stop(self, *, kill: bool = False, timeout_s: float = 30.0) -> None:
        """SIGTERM (controlled shutdown), then SIGKILL after ``timeout_s``; idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
                try:
                    proc.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
            log.info("kafka.stopped", rc=proc.returncode, killed=kill)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        _LIVE.discard(self)

    def restart(self, *, kill: bool = False) -> None:
        """Stop and start again on the same ports with the same data directory."""
        self.stop(kill=kill)
        self.start()

    def _port_clash(self) -> bool:
        """Did the last start fail because a port was taken (BindException in the logs)?"""
        for p in (self.workdir / "stdout.log", self.log_path):
            if p.exists() and "Address already in use" in p.read_text(errors="replace"):
                return True
        return False

    def _tail(self, n: int = 4000) -> str:
        parts = []
        for p in (self.workdir / "stdout.log", self.log_path):
            if p.exists():
                parts.append(p.read_text(errors="replace")[-n:])
        return "\n".join(parts)

    async def astart(self) -> None:
        await asyncio.to_thread(self.start)

    async def astop(self, *, kill: bool = False) -> None:
        await asyncio.to_thread(self.stop, kill=kill)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        await self.astart()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.astop()


def _mem(s: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    s = s.lower()
    return int(s[:-1]) * units[s[-1]] if s[-1] in units else int(s)


@atexit.register
def _kill_leftovers() -> None:
    """Never leave a JVM behind when the Python process exits without stop()."""
    for b in list(_LIVE):
        b.stop(kill=True, timeout_s=5)


def main(argv: list[str] | None = None) -> int:
    """Run one broker in the foreground until interrupted (``scripts/kafka-broker.sh run``)."""
    ap = argparse.ArgumentParser(prog="goodserve.broker.apache")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--port", type=int, default=9092)
    args = ap.parse_args(argv)
    broker = ApacheKafkaBroker(workdir=args.workdir, port=args.port)
    broker.start()
    print(f"kafka ready at {broker.bootstrap_servers} (Ctrl-C stops)", file=sys.stderr)
    try:
        while broker.running:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
