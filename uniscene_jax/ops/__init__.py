"""Sampling ops as pure jnp functions: grid_sample, deformable attention, deformable convolution."""
