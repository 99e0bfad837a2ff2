"""Chaos and soak runs against real Apache Kafka: crashes, broker restarts, hostile input.

The names below are imported on first use, so that ``goodserve.chaos.failpoints`` (which
the workers import) does not pull in the broker launcher, the client and the admin API.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .cluster import Cluster, requests_lag
    from .load import CountingClient, LoadGenerator, delivery_figures
    from .procs import ServiceProc, rss_bytes, settings_env

__all__ = [
    "Cluster",
    "CountingClient",
    "LoadGenerator",
    "ServiceProc",
    "delivery_figures",
    "requests_lag",
    "rss_bytes",
    "settings_env",
]

_WHERE = {
    "Cluster": "cluster",
    "requests_lag": "cluster",
    "CountingClient": "load",
    "LoadGenerator": "load",
    "delivery_figures": "load",
    "ServiceProc": "procs",
    "rss_bytes": "procs",
    "settings_env": "procs",
}


def __getattr__(name: str) -> Any:
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{mod}", __name__), name)
