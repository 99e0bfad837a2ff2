"""Simulation: the simulated instance (continuous batching), traces, fleets, the simulator."""
