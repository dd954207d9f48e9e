"""Occupancy targets at the model's grid: pooling full-resolution labels onto a coarser BEV.

Quick runs (`:local`, `:tiny`) use a BEV a factor f coarser than the 200 x 200 label grids; their
targets are pooled over f x f cells in x and y (z is kept). Pure jnp, jit-able.
"""

import jax
import jax.numpy as jnp


def pool_binary(target: jnp.ndarray, factor: int) -> jnp.ndarray:
  """[B, X, Y, Z] -> [B, X / f, Y / f, Z]: a coarse cell is occupied if any of its cells is."""
  b, x, y, z = target.shape
  return target.reshape(b, x // factor, factor, y // factor, factor, z).max((2, 4))


def pool_semantic(
  target: jnp.ndarray, mask: jnp.ndarray | None, factor: int, free: int
) -> tuple[jnp.ndarray, jnp.ndarray | None]:
  """Occ3D labels [B, X, Y, Z] (and camera mask) -> [B, X / f, Y / f, Z].

  A coarse cell takes the most frequent non-free class among its cells (counted over
  camera-visible cells when a mask is given), or `free` when it has none; like binary pooling,
  anything occupied wins over free. The pooled mask marks cells with any visible cell.
  """
  b, x, y, z = target.shape
  shape = (b, x // factor, factor, y // factor, factor, z)
  onehot = jax.nn.one_hot(target.reshape(shape), free + 1, dtype=jnp.float32)
  if mask is not None:
    onehot = onehot * mask.reshape(shape)[..., None].astype(jnp.float32)
  counts = onehot.sum((2, 4))[..., :free]  # non-free classes only
  pooled = jnp.where(counts.max(-1) > 0, jnp.argmax(counts, -1), free).astype(target.dtype)
  return pooled, None if mask is None else pool_binary(mask, factor)


def model_targets(
  target: jnp.ndarray, mask: jnp.ndarray | None, factor: int, kind: str, free: int = 17
) -> tuple[jnp.ndarray, jnp.ndarray | None]:
  """(target, mask) at a BEV `factor` times coarser; kind 'binary' or 'occ3d'."""
  if factor <= 1:
    return target, mask
  if kind == 'binary':
    return pool_binary(target, factor), None if mask is None else pool_binary(mask, factor)
  return pool_semantic(target, mask, factor, free)
