"""GPU and model catalogue: the hardware and model shapes the performance model reasons about.

GPU numbers are copied from ``data/gpu/gpu_table.csv`` of the shared data set (columns
``fp16_bf16_dense_tflops``, ``mem_bw_GBps``, ``mem_GB``; each spec's ``source`` repeats that
row's ``source_repo_path``). Efficiency factors are the fraction of the datasheet peak that
real kernels reach; they are fitted in ``goodserve.perf.calibration`` (see docs/perf-model.md)
where measurements exist and default to the measured averages (65% of peak FLOP/s, 70% of
peak bandwidth) elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

from goodserve.errors import ConfigError

__all__ = [
    "DEFAULT_MODEL",
    "GPUS",
    "MODELS",
    "GpuSpec",
    "ModelSpec",
    "get_gpu",
    "get_model",
    "gpu_names",
    "model_names",
]


@dataclass(frozen=True, slots=True)
class GpuSpec:
    """One GPU type: datasheet peaks plus the efficiencies real kernels reach on it."""

    name: str
    bf16_tflops: float
    """Dense BF16 (FP16 where the GPU has no BF16) tensor-core peak, TFLOP/s."""
    hbm_gbps: float
    """Peak memory bandwidth, GB/s."""
    memory_gb: float
    compute_eff: float = 0.65
    """Fraction of ``bf16_tflops`` reached by large GEMMs (prefill)."""
    mem_eff: float = 0.70
    """Fraction of ``hbm_gbps`` reached streaming weights and KV (decode)."""
    attn_eff: float = 0.45
    """Fraction of peak FLOP/s reached by (flash) attention in prefill."""
    interconnect_gbps: float = 300.0
    """Per-direction GPU-to-GPU bandwidth used for tensor-parallel all-reduce."""
    source: str = ""


def _g(name: str, tflops: float, bw: float, mem: float, source: str, **kw: float) -> GpuSpec:
    return GpuSpec(name=name, bf16_tflops=tflops, hbm_gbps=bw, memory_gb=mem, source=source, **kw)


_TABLE = "shared data/gpu/gpu_table.csv"

# Efficiencies marked "fit" were fitted against measured profiles (docs/perf-model.md);
# the rest are defaults or adjusted to the published batch-1 inter-token-latency ranges.
GPUS: dict[str, GpuSpec] = {
    g.name: g
    for g in (
        _g("V100", 125.0, 900.0, 32.0, f"{_TABLE}: V100-SXM2-32GB (FP16, no BF16)",
           compute_eff=0.55, mem_eff=0.70, attn_eff=0.30, interconnect_gbps=150.0),
        _g("T4", 65.0, 320.0, 16.0, f"{_TABLE}: T4 (FP16, no BF16)",
           compute_eff=0.50, mem_eff=0.70, attn_eff=0.30, interconnect_gbps=16.0),
        _g("A10", 125.0, 600.0, 24.0, f"{_TABLE}: A10", interconnect_gbps=32.0),
        _g("A40", 149.7, 696.0, 48.0, f"{_TABLE}: A40",
           compute_eff=0.67, mem_eff=0.77, interconnect_gbps=56.0),  # fit: vidur a40
        _g("L4", 121.0, 300.0, 24.0, f"{_TABLE}: L4", interconnect_gbps=32.0),
        _g("L40S", 362.0, 864.0, 48.0, f"{_TABLE}: L40S",
           compute_eff=0.55, interconnect_gbps=32.0),
        _g("A6000", 154.8, 768.0, 48.0,
           "NVIDIA RTX A6000 datasheet (dense BF16 tensor 154.8 TFLOP/s; not in gpu_table.csv)",
           compute_eff=0.75, mem_eff=0.75, interconnect_gbps=56.0),  # fit: llmservingsim
        _g("A100-40GB", 312.0, 1555.0, 40.0, f"{_TABLE}: A100-SXM-40GB",
           compute_eff=0.65, mem_eff=0.68),
        _g("A100-80GB", 312.0, 2039.0, 80.0, f"{_TABLE}: A100-SXM-80GB",
           compute_eff=0.65, mem_eff=0.68),  # fit: vidur a100
        _g("A800", 312.0, 2039.0, 80.0, f"{_TABLE}: A800-SXM-80GB",
           compute_eff=0.65, mem_eff=0.68, interconnect_gbps=200.0),
        _g("H100-SXM", 989.0, 3350.0, 80.0, f"{_TABLE}: H100-SXM-80GB",
           compute_eff=0.66, mem_eff=0.69, attn_eff=0.40, interconnect_gbps=450.0),  # fit
        _g("H100-PCIE", 756.0, 2000.0, 80.0, f"{_TABLE}: H100-PCIe-80GB",
           compute_eff=0.66, mem_eff=0.69, attn_eff=0.40, interconnect_gbps=64.0),
        _g("H800", 989.0, 3350.0, 80.0, f"{_TABLE}: H800-SXM-80GB",
           compute_eff=0.66, mem_eff=0.69, attn_eff=0.40, interconnect_gbps=200.0),
        _g("H200", 989.0, 4800.0, 141.0, f"{_TABLE}: H200-SXM-141GB",
           compute_eff=0.66, mem_eff=0.69, attn_eff=0.40, interconnect_gbps=450.0),
        _g("B200", 2250.0, 8000.0, 180.0, f"{_TABLE}: B200 (180 GB usable)",
           compute_eff=0.60, mem_eff=0.65, attn_eff=0.40, interconnect_gbps=900.0),
        _g("MI300X", 1307.0, 5300.0, 192.0, f"{_TABLE}: MI300X",
           compute_eff=0.45, mem_eff=0.55, attn_eff=0.30, interconnect_gbps=448.0),
    )
}

_GPU_ALIASES: dict[str, str] = {
    "v100-sxm2-32gb": "V100",
    "v100-sxm2": "V100",
    "a100": "A100-80GB",
    "a100-80": "A100-80GB",
    "a100-sxm": "A100-80GB",
    "a100-sxm-80gb": "A100-80GB",
    "a100-40": "A100-40GB",
    "a100-sxm-40gb": "A100-40GB",
    "a800-sxm-80gb": "A800",
    "h100": "H100-SXM",
    "h100-sxm-80gb": "H100-SXM",
    "h100-pcie-80gb": "H100-PCIE",
    "h800-sxm-80gb": "H800",
    "h200-sxm-141gb": "H200",
    "h200-sxm": "H200",
    "rtx-a6000": "A6000",
}


def gpu_names() -> list[str]:
    """Canonical GPU names, slowest-ish first (catalogue order)."""
    return list(GPUS)


def get_gpu(name: str | GpuSpec) -> GpuSpec:
    """Look a GPU up by name, case-insensitively, with aliases ("H100", "A100")."""
    if isinstance(name, GpuSpec):
        return name
    key = name.strip().lower().replace("_", "-").replace(" ", "-")
    for canon, spec in GPUS.items():
        if canon.lower() == key:
            return spec
    if key in _GPU_ALIASES:
        return GPUS[_GPU_ALIASES[key]]
    known = ", ".join(list(GPUS) + sorted({"H100", "A100"}))
    raise ConfigError(f"unknown GPU type {name!r}; known: {known}")


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A dense decoder-only transformer's shape (enough for FLOP and byte counts)."""

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    bytes_per_param: int = 2
    tied_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def layer_params(self) -> int:
        """Weights of one decoder layer (attention q/k/v/o + gated MLP; norms ignored)."""
        h = self.hidden
        return 2 * h * h + 2 * h * self.kv_dim + 3 * h * self.intermediate

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.embedding_params


MODELS: dict[str, ModelSpec] = {
    m.name: m
    for m in (
        ModelSpec("llama-2-7b", 32, 4096, 32, 32, 11008, 32000),
        ModelSpec("llama-2-70b", 80, 8192, 64, 8, 28672, 32000),
        ModelSpec("llama-3-8b", 32, 4096, 32, 8, 14336, 128256),
        ModelSpec("llama-3-70b", 80, 8192, 64, 8, 28672, 128256),
        ModelSpec("qwen2.5-7b", 28, 3584, 28, 4, 18944, 152064),
        ModelSpec("qwen2.5-14b", 48, 5120, 40, 8, 13824, 152064),
        ModelSpec("qwen2.5-32b", 64, 5120, 40, 8, 27648, 152064),
        ModelSpec("tiny-llama", 2, 256, 4, 4, 512, 1024),
    )
}

_MODEL_ALIASES: dict[str, str] = {
    "meta-llama/llama-2-7b-hf": "llama-2-7b",
    "llama-2-7b-hf": "llama-2-7b",
    "meta-llama/llama-2-70b-hf": "llama-2-70b",
    "llama-2-70b-hf": "llama-2-70b",
    "meta-llama/meta-llama-3-8b": "llama-3-8b",
    "meta-llama-3-8b": "llama-3-8b",
    "llama-3.1-8b": "llama-3-8b",
    "meta-llama/llama-3.1-8b": "llama-3-8b",
    "meta-llama/llama-3.1-8b-instruct": "llama-3-8b",
    "meta-llama/meta-llama-3-70b": "llama-3-70b",
    "meta-llama-3-70b": "llama-3-70b",
    "llama-3.1-70b": "llama-3-70b",
    "meta-llama/llama-3.1-70b": "llama-3-70b",
    "meta-llama/llama-3.1-70b-instruct": "llama-3-70b",
    "qwen/qwen2.5-7b-instruct": "qwen2.5-7b",
    "qwen/qwen2.5-14b-instruct": "qwen2.5-14b",
    "qwen/qwen2.5-32b-instruct": "qwen2.5-32b",
    "default": "llama-2-7b",
}

DEFAULT_MODEL = "llama-2-7b"


def model_names() -> list[str]:
    return list(MODELS)


def get_model(name: str | ModelSpec = DEFAULT_MODEL) -> ModelSpec:
    """Look a model shape up by name (case-insensitive; HF repo ids of the same shape accepted)."""
    if isinstance(name, ModelSpec):
        return name
    key = name.strip().lower()
    if key in MODELS:
        return MODELS[key]
    if key in _MODEL_ALIASES:
        return MODELS[_MODEL_ALIASES[key]]
    raise ConfigError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
