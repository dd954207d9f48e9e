"""Weights between this project's Flax variables and the reference's PyTorch state dicts."""
