"""Engines behind a worker: vLLM (in process), simulated (performance model), OpenAI backend."""
