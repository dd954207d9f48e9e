"""Shared pieces of zero-padded bilinear sampling: corner indices and weights.

Every sampling op here reads from maps padded by one zero pixel on the low side and two on the
high side. A pixel coordinate is clamped to [-1, size] first (a NaN goes to -1), so its top-left
corner lies in [-1, size] and both corners of each axis index inside the padded map: no index ever
wraps or leaves the buffer, whatever the input (1e5, inf, NaN). Clamped points read only padding,
which is exactly the zero-padding value, and get a zero location gradient, as in PyTorch.
"""

import jax.numpy as jnp

# Zero pixels added before / after each spatial axis of a sampled map.
PAD_LO = 1
PAD_HI = 2


def clamp_coordinate(pix: jnp.ndarray, size) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Clamps pixel coordinates to [-1, size]; returns (clamped, d clamped / d pix as 0/1).

  `size` broadcasts against `pix`. Written with where/minimum so that NaN maps to -1.
  """
  keep = (pix >= -1) & (pix <= size)
  pix = jnp.minimum(jnp.where(pix >= -1, pix, -1), size)
  return pix, keep


def axis_corners(pix: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Clamped pixel coordinate -> (padded index of the low corner, fraction towards the high one)."""
  low = jnp.floor(pix)
  return low.astype(jnp.int32) + PAD_LO, pix - low


def pad_map(x: jnp.ndarray, axes: tuple[int, int]) -> jnp.ndarray:
  """Zero-pads the two spatial axes of x by (PAD_LO, PAD_HI)."""
  widths = [(0, 0)] * x.ndim
  for a in axes:
    widths[a] = (PAD_LO, PAD_HI)
  return jnp.pad(x, widths)
