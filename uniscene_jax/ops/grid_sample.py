"""Bilinear grid sampling with torch `F.grid_sample` semantics (align_corners=False, zeros)."""

import jax.numpy as jnp

from uniscene_jax.ops import bilinear


def grid_sample(feat: jnp.ndarray, grid: jnp.ndarray) -> jnp.ndarray:
  """Samples feat at normalised grid positions.

  Args:
    feat: [B, H, W, C] map.
    grid: [B, Hg, Wg, 2], (x, y) with -1 / 1 at the outer edges of the corner pixels
      (align_corners=False). Points outside, however far (1e30, inf), read zeros.

  Returns:
    [B, Hg, Wg, C] in feat.dtype (weights and sums in float32). Differentiable in both arguments;
    the grid gradient is zero where a point lies wholly outside the map, as in PyTorch.
  """
  b, h, w, c = feat.shape
  if grid.shape[0] != b or grid.shape[-1] != 2:
    raise ValueError(f'grid {grid.shape} must be [{b}, Hg, Wg, 2] for feat {feat.shape}')
  size = jnp.array([w, h], jnp.float32)
  # F.grid_sample's un-normalisation, in the same order of operations.
  pix = (grid.astype(jnp.float32) + 1) * (size / 2) - 0.5
  pix, _ = bilinear.clamp_coordinate(pix, size)
  corner, frac = bilinear.axis_corners(pix)
  padded = bilinear.pad_map(feat, (1, 2))
  wp = w + bilinear.PAD_LO + bilinear.PAD_HI
  table = padded.reshape(-1, c)
  base = (jnp.arange(b, dtype=jnp.int32)[:, None, None] * (h + 3) + corner[..., 1]) * wp + corner[
    ..., 0
  ]
  fx, fy = frac[..., 0:1], frac[..., 1:2]
  out = (1 - fy) * ((1 - fx) * table[base] + fx * table[base + 1]) + fy * (
    (1 - fx) * table[base + wp] + fx * table[base + wp + 1]
  )
  return out.astype(feat.dtype)
