"""Risk monitor: each running request's risk of missing its deadline, and migration planning."""
