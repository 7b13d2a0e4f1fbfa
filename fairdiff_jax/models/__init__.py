"""Flax networks, each proven equal to its PyTorch reference in tests/."""
