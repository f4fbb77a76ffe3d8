"""Playground commands: convolve, pool, explain."""
