"""GPU performance model: GPU and model catalogue, roofline latency model, calibration."""

from goodserve.perf.catalogue import (
    DEFAULT_MODEL,
    GpuSpec,
    ModelSpec,
    get_gpu,
    get_model,
    gpu_names,
    model_names,
)
from goodserve.perf.latency import PerfModel

__all__ = [
    "DEFAULT_MODEL",
    "GpuSpec",
    "ModelSpec",
    "PerfModel",
    "get_gpu",
    "get_model",
    "gpu_names",
    "model_names",
]
