"""Roofline latency model of one inference engine iteration on one GPU type.

Every iteration (vLLM "step") runs all its tokens through the weights once:

* linear layers: ``hypot(compute, weight streaming)`` -- a smooth roofline that is
  memory-bound at small token counts (decode) and compute-bound at large ones (prefill);
* attention: prefill FLOPs over the causal context, decode reads of the KV cache;
* LM head: once per sequence that samples a token;
* tensor-parallel all-reduce when ``tp > 1``;
* a fixed CPU overhead per step (scheduling, input preparation, sampling) plus a small
  per-sequence part.

All methods are plain float arithmetic (no numpy) because the router and the simulator call
them in hot loops. Constants are fitted in ``goodserve.perf.calibration``.
"""

from __future__ import annotations

import math

from goodserve.perf.catalogue import DEFAULT_MODEL, GpuSpec, ModelSpec, get_gpu, get_model

__all__ = ["ACTIVATION_RESERVE_GB", "PER_SEQ_OVERHEAD_S", "STEP_OVERHEAD_S", "PerfModel"]

STEP_OVERHEAD_S = 0.0045
"""Fixed CPU time per engine iteration (fitted to the batch-1 ITL ranges, docs/perf-model.md)."""
PER_SEQ_OVERHEAD_S = 6e-6
"""CPU time per sequence in a step (vidur cpu_overheads: ~5 us per sequence)."""
ACTIVATION_RESERVE_GB = 1.5
"""Per-GPU memory kept for activations, CUDA graphs and the allocator (not KV)."""
ALLREDUCE_LATENCY_S = 8e-6


class PerfModel:
    """Latency of prefill, decode and mixed iterations of ``model`` on ``gpu`` (tp-way)."""

    __slots__ = (
        "_ar_bw",
        "_ar_bytes_per_token",
        "_attn_flops",
        "_attn_flops_pair",
        "_bw",
        "_flops",
        "_head_bytes",
        "_head_flops",
        "_kv_bytes_layer_token",
        "_lin_bytes",
        "_lin_flops",
        "gpu",
        "model",
        "per_seq_overhead_s",
        "step_overhead_s",
        "tp",
    )

    def __init__(
        self,
        gpu: GpuSpec | str,
        model: ModelSpec | str = DEFAULT_MODEL,
        *,
        tp: int = 1,
        step_overhead_s: float = STEP_OVERHEAD_S,
        per_seq_overhead_s: float = PER_SEQ_OVERHEAD_S,
    ) -> None:
        from goodserve.errors import ConfigError

        if tp < 1:
            raise ConfigError(f"tp must be >= 1, got {tp}")
        self.gpu: GpuSpec = get_gpu(gpu)
        self.model: ModelSpec = get_model(model)
        self.tp = tp
        self.step_overhead_s = step_overhead_s
        self.per_seq_overhead_s = per_seq_overhead_s
        g, m = self.gpu, self.model
        self._flops = g.bf16_tflops * 1e12 * g.compute_eff
        self._attn_flops = g.bf16_tflops * 1e12 * g.attn_eff
        self._bw = g.hbm_gbps * 1e9 * g.mem_eff
        self._lin_flops = 2.0 * m.layers * m.layer_params / tp
        self._lin_bytes = float(m.layers * m.layer_params * m.bytes_per_param) / tp
        self._head_flops = 2.0 * m.hidden * m.vocab / tp
        self._head_bytes = float(m.hidden * m.vocab * m.bytes_per_param) / tp
        # causal attention: QK^T and AV, 2 FLOPs per MAC, per (query, key) pair and layer
        self._attn_flops_pair = 4.0 * m.hidden * m.layers / tp
        self._kv_bytes_layer_token = 2.0 * m.kv_dim * m.bytes_per_param * m.layers / tp
        self._ar_bw = g.interconnect_gbps * 1e9
        self._ar_bytes_per_token = (
            2.0 * (tp - 1) / tp * m.hidden * m.bytes_per_param if tp > 1 else 0.0
        )

    # -- sizes --------------------------------------------------------------------------
    @property
    def weights_bytes(self) -> float:
        """Weights held by the whole tensor-parallel group, bytes."""
        return float(self.model.params * self.model.bytes_per_param)

    @property
    def kv_bytes_per_token(self) -> float:
        """KV cache bytes of one token over all layers (whole tp group)."""
        m = self.model
        return 2.0 * m.layers * m.kv_dim * m.bytes_per_param

    def kv_capacity_tokens(self, gpu_memory_utilization: float = 0.9) -> int:
        """Tokens of KV that fit: memory x utilization minus weights minus activation reserve."""
        total = self.gpu.memory_gb * 1e9 * gpu_memory_utilization * self.tp
        free = total - self.weights_bytes - ACTIVATION_RESERVE_GB * 1e9 * self.tp
        return max(0, int(free // self.kv_bytes_per_token))

    # -- iteration times ----------------------------------------------------------------
    def _forward(
        self, tokens: int, seqs: int, attn_pairs: float, kv_read_tokens: float
    ) -> float:
        """GPU time of one forward pass (no CPU overhead)."""
        t = math.hypot(tokens * self._lin_flops / self._flops, self._lin_bytes / self._bw)
        if seqs:
            t += math.hypot(seqs * self._head_flops / self._flops, self._head_bytes / self._bw)
        t += attn_pairs * self._attn_flops_pair / self._attn_flops
        t += kv_read_tokens * self._kv_bytes_layer_token / self._bw
        if self._ar_bytes_per_token:
            t += 2 * self.model.layers * (
                ALLREDUCE_LATENCY_S + tokens * self._ar_bytes_per_token / self._ar_bw
            )
        return t

    def forward_time(self, num_tokens: int, context_tokens: int = 0) -> float:
        """GPU time of a single-sequence prefill forward, without CPU overhead (calibration)."""
        pairs = num_tokens * (context_tokens + num_tokens * 0.5)
        return self._forward(num_tokens, 1, pairs, context_tokens)

    def linear_time(self, num_tokens: int) -> float:
        """Time of the decoder layers' linear ops (+norms) for ``num_tokens`` (calibration)."""
        return math.hypot(
            num_tokens * self._lin_flops / self._flops, self._lin_bytes / self._bw
        )

    def prefill_time(self, num_tokens: int, context_tokens: int = 0) -> float:
        """One iteration prefilling ``num_tokens`` new tokens after ``context_tokens`` cached."""
        if num_tokens <= 0:
            return 0.0
        return (
            self.step_overhead_s
            + self.per_seq_overhead_s
            + self.forward_time(num_tokens, context_tokens)
        )

    def decode_step_time(self, batch: int, total_context_tokens: int) -> float:
        """One decode iteration of ``batch`` sequences holding ``total_context_tokens`` of KV."""
        if batch <= 0:
            return 0.0
        return (
            self.step_overhead_s
            + self.per_seq_overhead_s * batch
            + self._forward(batch, batch, batch * 1.0, total_context_tokens)
        )

    def step_time(
        self,
        prefill_tokens: int,
        decode_batch: int,
        decode_context_tokens: int,
        *,
        prefill_seqs: int = 1,
        prefill_attn_pairs: float | None = None,
    ) -> float:
        """A mixed (chunked-prefill) iteration.

        ``prefill_attn_pairs`` is ``sum(n_i * (c_i + n_i / 2))`` over the prefill chunks
        (n_i new tokens after c_i tokens of context); ``None`` assumes one chunk without context.
        """
        if prefill_tokens <= 0 and decode_batch <= 0:
            return 0.0
        if prefill_tokens <= 0:
            prefill_seqs = 0
            pairs = 0.0
        elif prefill_attn_pairs is None:
            pairs = prefill_tokens * prefill_tokens * 0.5
        else:
            pairs = prefill_attn_pairs
        seqs = prefill_seqs + decode_batch
        return (
            self.step_overhead_s
            + self.per_seq_overhead_s * seqs
            + self._forward(
                prefill_tokens + decode_batch,
                seqs,
                pairs + decode_batch,
                decode_context_tokens,
            )
        )

    # -- request-level estimates ---------------------------------------------------------
    def ttft(self, input_tokens: int, chunk_tokens: int = 8192) -> float:
        """Time to first token of a request running alone (chunked at ``chunk_tokens``)."""
        if input_tokens <= chunk_tokens:
            return self.prefill_time(max(1, input_tokens))
        t, done = 0.0, 0
        while done < input_tokens:
            n = min(chunk_tokens, input_tokens - done)
            t += self.prefill_time(n, done)
            done += n
        return t

    def tpot(self, batch: int = 1, avg_context: float = 1024.0) -> float:
        """Time per output token of a request in a decode batch of ``batch`` sequences."""
        b = max(1, batch)
        return self.decode_step_time(b, int(b * avg_context))

    def isolated_latency(self, input_tokens: int, output_tokens: int) -> float:
        """Latency of a request running alone (the SLO-scale reference T_ref).

        The decode steps' context grows linearly, so the mean context gives the exact sum.
        """
        t = self.ttft(input_tokens)
        n = max(0, output_tokens - 1)
        if n:
            t += n * self.decode_step_time(1, int(input_tokens + 1 + n / 2))
        return t

    def __repr__(self) -> str:
        return f"PerfModel(gpu={self.gpu.name!r}, model={self.model.name!r}, tp={self.tp})"
