"""Evaluation-only predictors that know the true output length.

The simulator may use them to separate routing quality from prediction quality:
``oracle`` (exact lengths) and ``noisy`` (exact lengths corrupted by log-normal
error of a given relative size, as the paper's reviewers asked). Never used live.
"""

from __future__ import annotations

import hashlib
import math
import random

import msgspec

from goodserve.dispatcher.predictor.model import PredictorInput


class OraclePrediction(msgspec.Struct, frozen=True):
    p50: float
    p90: float
    p99: float = 0.0


class OraclePredictor:
    """Predicts the true length, looked up by ``PredictorInput.request_id``, optionally
    with noise. It takes the same input as every other predictor; a request id it does
    not know gets 256 tokens.

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

    def features(self, x: PredictorInput) -> list[float]:
        return [float(x.input_tokens)]

    def predict(self, x: PredictorInput) -> OraclePrediction:
        rid = x.request_id
        true = float(self.truth.get(rid, 256)) if rid is not None else 256.0
        if self.sigma == 0.0:
            return OraclePrediction(true, true, true)
        h = hashlib.blake2b(f"{self.seed}:{rid}".encode(), digest_size=8).digest()
        z = random.Random(int.from_bytes(h, "little")).gauss(0.0, 1.0)
        p50 = max(1.0, true * math.exp(z * self.sigma))
        return OraclePrediction(
            p50, p50 * math.exp(1.2816 * self.sigma), p50 * math.exp(2.3263 * self.sigma)
        )

    def observe(self, x: PredictorInput, actual_output_tokens: int) -> None:
        pass
