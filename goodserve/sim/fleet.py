"""Fleet files (YAML): the GPU instances a dispatcher routes over (the "Fleet file" interface).

Accepted shapes::

    - {id: h100-a, gpu: H100}              # a list of entries, or
    model: llama-2-7b                      # a mapping with a fleet-wide model
    instances:
      - {gpu: A40, count: 2}               # -> ids a40-0, a40-1
      - {gpu: V100, count: 1, id_prefix: slow}   # -> slow-0
      - {id: remote, gpu: A100, endpoint: "http://10.0.0.5:8000"}

Ids from ``count`` are ``<id_prefix or gpu-lower>-<n>``, n counting from 0 per prefix and
skipping ids already taken, so they are unique across the file. An instance without an
``endpoint`` is simulated; ``model: null`` means the fleet's model.
"""

from __future__ import annotations

import math
import re
from importlib import resources
from pathlib import Path
from typing import Any

import msgspec
import yaml

from goodserve.config import MAX_INSTANCE_ID, is_instance_id
from goodserve.errors import ConfigError

__all__ = [
    "BUILTIN_FLEETS",
    "Fleet",
    "FleetInstance",
    "builtin_fleet",
    "builtin_fleet_path",
    "load_fleet",
    "parse_fleet",
]

BUILTIN_FLEETS: tuple[str, ...] = ("figure2", "mixed8", "demo")


class FleetInstance(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One GPU instance; ``speed_factor`` < 1 slows a simulated one (e.g. a degraded GPU)."""

    id: str
    gpu: str
    model: str | None = None
    endpoint: str | None = None
    max_batch: int | None = None
    speed_factor: float = 1.0


class Fleet(msgspec.Struct, kw_only=True):
    """The instances plus the model they serve unless an instance names its own."""

    instances: list[FleetInstance]
    model: str = "llama-2-7b"

    def model_of(self, inst: FleetInstance) -> str:
        """The model ``inst`` serves (its own, else the fleet's)."""
        return inst.model or self.model

    def get(self, instance_id: str) -> FleetInstance:
        for inst in self.instances:
            if inst.id == instance_id:
                return inst
        raise KeyError(instance_id)


_ENTRY_KEYS = {"id", "count", "id_prefix", "gpu", "model", "endpoint", "max_batch", "speed_factor"}
_TOP_KEYS = {"model", "instances"}


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "gpu"


def _check_gpu(gpu: str, where: str) -> None:
    """Validate against the GPU catalogue when it is importable (it is optional here)."""
    try:
        from goodserve.perf.catalogue import get_gpu  # type: ignore[attr-defined,unused-ignore]
    except ImportError:
        return
    try:
        get_gpu(gpu)
    except Exception as e:  # the catalogue's own error type is not ours to depend on
        raise ConfigError(f"{where}: unknown gpu {gpu!r}: {e}") from None


def _str(entry: dict[str, Any], key: str, where: str) -> str | None:
    v = entry.get(key)
    if v is None:
        return None
    if not isinstance(v, str | int | float) or isinstance(v, bool) or str(v).strip() == "":
        raise ConfigError(f"{where}: {key} must be a non-empty string, got {v!r}")
    return str(v)


def parse_fleet(data: Any, source: str = "<fleet>") -> Fleet:
    """Build a :class:`Fleet` from parsed YAML (list of entries or {model, instances})."""
    model = "llama-2-7b"
    if isinstance(data, dict):
        unknown = set(data) - _TOP_KEYS
        if unknown:
            raise ConfigError(
                f"{source}: unknown top-level key(s) {', '.join(sorted(map(str, unknown)))} "
                f"(allowed: {', '.join(sorted(_TOP_KEYS))})"
            )
        if "model" in data:
            m = _str(data, "model", source)
            if m is None:
                raise ConfigError(f"{source}: model must be a non-empty string")
            model = m
        entries = data.get("instances")
    else:
        entries = data
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{source}: expected a non-empty list of instances")

    explicit: set[str] = set()
    for i, e in enumerate(entries):
        if isinstance(e, dict) and e.get("id") is not None:
            eid = str(e["id"])
            if eid in explicit:
                raise ConfigError(f"{source}: instance {i}: duplicate id {eid!r}")
            explicit.add(eid)

    taken: set[str] = set(explicit)
    counters: dict[str, int] = {}
    out: list[FleetInstance] = []
    for i, e in enumerate(entries):
        where = f"{source}: instance {i}"
        if not isinstance(e, dict):
            raise ConfigError(f"{where}: expected a mapping, got {e!r}")
        unknown = set(e) - _ENTRY_KEYS
        if unknown:
            raise ConfigError(
                f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))} "
                f"(allowed: {', '.join(sorted(_ENTRY_KEYS))})"
            )
        gpu = _str(e, "gpu", where)
        if gpu is None:
            raise ConfigError(f"{where}: missing gpu")
        _check_gpu(gpu, where)
        has_id, has_count = e.get("id") is not None, e.get("count") is not None
        if has_id == has_count:
            raise ConfigError(f"{where}: give exactly one of id or count")
        count = e.get("count", 1)
        if has_count and (not isinstance(count, int) or isinstance(count, bool) or count < 1):
            raise ConfigError(f"{where}: count must be an integer >= 1, got {count!r}")
        if has_id and e.get("id_prefix") is not None:
            raise ConfigError(f"{where}: id_prefix only applies with count")
        endpoint = _str(e, "endpoint", where)
        if endpoint is not None and count > 1:
            raise ConfigError(f"{where}: an endpoint is one server; use count 1 or list ids")
        max_batch = e.get("max_batch")
        if max_batch is not None and (
            not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1
        ):
            raise ConfigError(f"{where}: max_batch must be an integer >= 1, got {max_batch!r}")
        speed = e.get("speed_factor", 1.0)
        if (
            not isinstance(speed, int | float)
            or isinstance(speed, bool)
            or not math.isfinite(speed)
            or speed <= 0
        ):
            raise ConfigError(f"{where}: speed_factor must be a number > 0, got {speed!r}")
        common: dict[str, Any] = {
            "gpu": gpu,
            "model": _str(e, "model", where),
            "endpoint": endpoint,
            "max_batch": max_batch,
            "speed_factor": float(speed),
        }
        if has_id:
            iid = str(e["id"])
            if not is_instance_id(iid):
                raise ConfigError(
                    f"{where}: id {iid[:100]!r} must be 1-{MAX_INSTANCE_ID} of A-Z a-z 0-9 . _ -"
                    " (it names the instance's topic)"
                )
            out.append(FleetInstance(id=iid, **common))
            continue
        prefix = _slug(_str(e, "id_prefix", where) or gpu)
        for _ in range(count):
            n = counters.get(prefix, 0)
            while f"{prefix}-{n}" in taken:
                n += 1
            iid = f"{prefix}-{n}"
            counters[prefix] = n + 1
            taken.add(iid)
            out.append(FleetInstance(id=iid, **common))
    return Fleet(instances=out, model=model)


def builtin_fleet_path(name: str) -> Path:
    """Path of a fleet shipped as package data (``goodserve/data/fleets/<name>.yaml``)."""
    if name not in BUILTIN_FLEETS:
        raise ConfigError(f"unknown built-in fleet {name!r} (known: {', '.join(BUILTIN_FLEETS)})")
    return Path(str(resources.files("goodserve") / "data" / "fleets" / f"{name}.yaml"))


def builtin_fleet(name: str) -> Fleet:
    """One of the shipped fleets: ``figure2``, ``mixed8``, ``demo``."""
    return load_fleet(builtin_fleet_path(name))


def load_fleet(path: str | Path) -> Fleet:
    """Read a fleet YAML file; a bare built-in name (``figure2``) that is not a file works too."""
    p = Path(path)
    if not p.exists():
        if str(path) in BUILTIN_FLEETS:
            return builtin_fleet(str(path))
        raise ConfigError(f"{p}: no such fleet file (built-in names: {', '.join(BUILTIN_FLEETS)})")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: invalid YAML: {e}") from None
    return parse_fleet(data, str(p))
