"""Benchmarks that print JSON: router throughput, dispatch overhead through Kafka."""
