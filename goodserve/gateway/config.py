"""Gateway settings: where it listens, who may call it, and its per-request defaults."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import msgspec

from goodserve.errors import ConfigError

__all__ = ["GatewayConfig", "is_loopback", "load_api_keys"]

ENV_KEYS = "GOODSERVE_API_KEYS"
ENV_KEY_FILE = "GOODSERVE_API_KEY_FILE"
ENV_NO_BOUND = "GOODSERVE_NO_MAX_TOKENS_BOUND"


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def load_api_keys(
    *, keys: str | None = None, key_file: str | os.PathLike[str] | None = None,
    env: dict[str, str] | None = None,
) -> tuple[str, ...]:
    """Keys from a comma-separated list and/or a file (one per line, ``#`` comments),
    falling back to ``GOODSERVE_API_KEYS`` / ``GOODSERVE_API_KEY_FILE``."""
    env = dict(os.environ if env is None else env)
    keys = keys if keys is not None else env.get(ENV_KEYS)
    key_file = key_file if key_file is not None else env.get(ENV_KEY_FILE)
    out: list[str] = [k.strip() for k in (keys or "").split(",") if k.strip()]
    if key_file:
        try:
            lines = Path(key_file).read_text().splitlines()
        except OSError as e:
            raise ConfigError(f"cannot read API key file {key_file}: {e}") from e
        out += [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if any(len(k) < 8 for k in out):
        raise ConfigError("API keys must be at least 8 characters")
    return tuple(dict.fromkeys(out))


class GatewayConfig(msgspec.Struct, kw_only=True, frozen=True):
    """Everything the gateway needs besides the Kafka ``Settings``."""

    host: str = "127.0.0.1"
    port: int = 8000
    """0 picks a free port (``GatewayService.port`` tells which)."""
    api_keys: tuple[str, ...] = ()
    no_auth: bool = False
    """Run open on a non-loopback address (only when something in front authenticates)."""
    default_slo_s: float = 30.0
    """Deadline of a request that names none (seconds from arrival)."""
    deadline_grace_s: float = 10.0
    """How long past its deadline a request is still awaited before a 504."""
    max_body_bytes: int | None = None
    """Largest request body; None: the settings' ``max_record_bytes`` (a request larger
    than a record could not reach the dispatcher anyway)."""
    max_inflight_per_key: int = 256
    max_tokens_bound: bool = True
    """False: ``max_tokens`` no longer caps the predicted length (stamped on each request)."""
    default_max_tokens: int = 256
    """``max_tokens`` of a request that names none (chat; completions default to 16 as OpenAI)."""
    max_max_tokens: int = 32768
    retry_after_s: int = 1
    tokenizer: str | None = None
    """Hugging Face tokenizer (name or path) for input lengths and chat templates."""
    models: tuple[str, ...] = ()
    """Served model names for /v1/models and validation (empty: accept any)."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in 0..65535, got {self.port}")
        if not self.default_slo_s > 0 or self.deadline_grace_s < 0:
            raise ConfigError("default_slo_s must be > 0 and deadline_grace_s >= 0")
        if (self.max_body_bytes is not None and self.max_body_bytes < 1024) or (
            self.max_inflight_per_key < 1
        ):
            raise ConfigError("max_body_bytes >= 1024 and max_inflight_per_key >= 1 required")
        if not 1 <= self.default_max_tokens <= self.max_max_tokens:
            raise ConfigError("default_max_tokens must be in 1..max_max_tokens")
        if self.retry_after_s < 1:
            raise ConfigError("retry_after_s must be >= 1")
        if not self.api_keys and not self.no_auth and not is_loopback(self.host):
            raise ConfigError(
                f"refusing to listen on {self.host} without API keys: set {ENV_KEYS} or a key "
                "file, or pass --no-auth if something in front of it authenticates"
            )

    @property
    def open_access(self) -> bool:
        """No key is checked."""
        return not self.api_keys
