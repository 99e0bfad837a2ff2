"""Shared pytest set-up. Fixtures live in plugin modules, one per real component."""

pytest_plugins = ["fixtures_kafka", "fixtures_vllm"]
