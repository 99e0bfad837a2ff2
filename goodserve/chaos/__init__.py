"""Chaos and soak runs against real Apache Kafka: crashes, broker restarts, hostile input."""

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
