"""Routing policies as llm-d-style plugins: filters, scorers, pickers, registered by name."""
