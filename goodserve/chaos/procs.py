"""Services as separate OS processes, so chaos runs can kill -9, SIGTERM and restart them.

Each ``ServiceProc`` runs ``python -m goodserve.cli <service> ...`` with its settings in
``GOODSERVE_*`` environment variables (the password never appears on a command line) and
its log in a file, and reports its resident memory from ``/proc`` (Linux).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from goodserve.config import Settings
from goodserve.errors import ConfigError


def settings_env(settings: Settings) -> dict[str, str]:
    """``GOODSERVE_*`` variables that reproduce ``settings`` in a child process."""
    out: dict[str, str] = {}
    for name in settings.__struct_fields__:
        value = getattr(settings, name)
        if value is None:
            continue
        if isinstance(value, bool):
            value = "true" if value else "false"
        out[f"GOODSERVE_{name.upper()}"] = str(value)
    return out


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return 0
    return 0


@dataclass
class ServiceProc:
    """One service process: start, kill (-9), terminate (SIGTERM, timed), restart."""

    name: str
    args: Sequence[str]
    settings: Settings
    log_dir: Path
    extra_env: Mapping[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    kills: int = 0
    _log: IO[bytes] | None = None

    def __post_init__(self) -> None:
        if not self.name or not self.args:
            raise ConfigError("a service process needs a name and arguments")
        self.log_dir = Path(self.log_dir)

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"{self.name}.log"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        if self.alive:
            return
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.update(settings_env(self.settings))
        env.setdefault("GOODSERVE_LOG_JSON", "1")
        env.update(self.extra_env)
        self._close_log()
        self._log = open(self.log_path, "ab")
        self._log.write(f"--- start {self.starts + 1} at {time.time():.3f}\n".encode())
        self._log.flush()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "goodserve.cli", *self.args],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.starts += 1

    def kill(self) -> None:
        """SIGKILL: a crash, nothing is flushed or committed."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
            self.kills += 1

    def terminate(self, timeout_s: float = 60.0) -> float:
        """SIGTERM and wait; returns the seconds the process took to exit (SIGKILL after)."""
        if self.proc is None or self.proc.poll() is not None:
            return 0.0
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        return time.monotonic() - t0

    def restart(self) -> None:
        self.kill()
        self.start()

    def rss(self) -> int:
        return rss_bytes(self.proc.pid) if self.alive and self.proc is not None else 0

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        """Clean-up: SIGTERM briefly, then SIGKILL; close the log."""
        if self.alive:
            self.terminate(timeout_s=15.0)
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


def dispatcher_proc(settings: Settings, log_dir: Path, *, stale_after_s: float = 2.0,
                    max_prompt_chars: int | None = None, monitor: bool = False,
                    extra_env: Mapping[str, str] | None = None) -> ServiceProc:
    args = ["dispatcher", "--policy", "goodserve", "--stale-after-s", str(stale_after_s),
            "--default-slo-s", "120"]
    if not monitor:
        args.append("--no-monitor")
    if max_prompt_chars is not None:
        args += ["--max-prompt-chars", str(max_prompt_chars)]
    return ServiceProc("dispatcher", args, settings, log_dir, dict(extra_env or {}))


def monitor_proc(settings: Settings, log_dir: Path,
                 extra_env: Mapping[str, str] | None = None) -> ServiceProc:
    return ServiceProc("monitor", ["monitor", "--period-s", "0.5"], settings, log_dir,
                       dict(extra_env or {}))


def worker_proc(settings: Settings, log_dir: Path, instance_id: str, gpu: str, *,
                time_scale: float = 0.01, heartbeat_s: float = 0.2,
                drain_timeout_s: float = 10.0,
                extra_env: Mapping[str, str] | None = None) -> ServiceProc:
    args = ["worker", "--instance-id", instance_id, "--engine", "sim", "--gpu", gpu,
            "--heartbeat-s", str(heartbeat_s), "--time-scale", str(time_scale),
            "--drain-timeout-s", str(drain_timeout_s)]
    return ServiceProc(f"worker-{instance_id}", args, settings, log_dir, dict(extra_env or {}))
