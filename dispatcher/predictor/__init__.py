"""Output-length predictor (XGBoost quantile regression); see docs/predictor.md.

Re-exports the routing-time API. Training and data conversion live in ``train`` and
``datasets`` (offline tools, with file I/O) and are not imported here.
"""

from goodserve.dispatcher.predictor.model import (
    ConstantPredictor,
    LengthPrediction,
    OutputLengthPredictor,
    PredictorInput,
    TaskMedianPredictor,
    conditional_remaining,
)

__all__ = [
    "ConstantPredictor",
    "LengthPrediction",
    "OutputLengthPredictor",
    "PredictorInput",
    "TaskMedianPredictor",
    "conditional_remaining",
]
