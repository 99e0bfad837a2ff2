"""The OpenAI-compatible gateway: HTTP (FastAPI + uvicorn) in front of GoodServe's Kafka topics."""

from .config import GatewayConfig, is_loopback, load_api_keys
from .service import GatewayService

__all__ = ["GatewayConfig", "GatewayService", "is_loopback", "load_api_keys"]
