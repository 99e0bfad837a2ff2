"""Helpers shared by tests and benchmarks (tiny models, fixtures' building blocks)."""
