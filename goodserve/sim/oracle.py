"""Evaluation-only predictors that know the true output length.

The simulator may use them to separate routing quality from prediction quality:
``oracle`` (exact lengths) and ``noisy`` (exact lengths corrupted by log-normal
error of a given relative size, as the paper's reviewers asked). Never used live.
"""

from __future__ import annotations

import hashlib
import math
import random
from typing import Any

import msgspec


class OraclePrediction(msgspec.Struct, frozen=True):
    p50: float
    p90: float
    p99: float = 0.0


class OraclePredictor:
    """Predicts the true length (looked up by request id), optionally with noise.

    With ``error`` e > 0: p50 = true * exp(N(0, s)) where s = log(1 + e), and the
    quantiles widen accordingly (p90 = p50 * exp(1.2816 s)); the noise of a request
    is a function of (seed, request id), so runs are repeatable.
    """

    def __init__(self, truth: dict[str, int], *, error: float = 0.0, seed: int = 0) -> None:
        self.truth = truth
        self.error = error
        self.seed = seed
        self.sigma = math.log1p(error) if error > 0 else 0.0
        self.version = f"oracle-e{error:g}" if error else "oracle"

    def features(self, x: Any) -> list[float]:
        return [float(getattr(x, "input_tokens", 0))]

    def predict(self, x: Any) -> OraclePrediction:
        rid = getattr(x, "request_id", None) or getattr(x, "workflow_id", None)
        true = float(self.truth.get(str(rid), 256))
        if self.sigma == 0.0:
            return OraclePrediction(true, true, true)
        h = hashlib.blake2b(f"{self.seed}:{rid}".encode(), digest_size=8).digest()
        z = random.Random(int.from_bytes(h, "little")).gauss(0.0, 1.0)
        p50 = max(1.0, true * math.exp(z * self.sigma))
        return OraclePrediction(
            p50, p50 * math.exp(1.2816 * self.sigma), p50 * math.exp(2.3263 * self.sigma)
        )

    def observe(self, x: Any, actual_output_tokens: int) -> None:
        pass


class OracleInput(msgspec.Struct, kw_only=True):
    """Predictor input carrying the request id (oracle look-up key)."""

    request_id: str
    input_tokens: int
    task: str = "chat"
    model: str = "default"
    prompt: str | None = None
    workflow_id: str | None = None
    step: int = 0
    output_tokens_hint: int | None = None
