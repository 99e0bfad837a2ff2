"""GoodServe: deadline-aware, Kafka-native dispatch of agentic LLM inference."""

__version__ = "0.1.0"
