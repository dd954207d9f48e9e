"""Losses, pure jnp, computed in float32."""

import jax
import jax.numpy as jnp


def sigmoid_focal(
  logits: jnp.ndarray, targets: jnp.ndarray, gamma: float = 2.0, alpha: float = 0.25
) -> jnp.ndarray:
  """Element-wise sigmoid focal loss (mmdet's FocalLoss with use_sigmoid), targets in {0, 1}."""
  x = logits.astype(jnp.float32)
  t = targets.astype(jnp.float32)
  p = jax.nn.sigmoid(x)
  # Binary cross-entropy from logits, stable for large |x|.
  bce = jnp.maximum(x, 0.0) - x * t + jnp.log1p(jnp.exp(-jnp.abs(x)))
  pt = (1.0 - p) * t + p * (1.0 - t)
  weight = (alpha * t + (1.0 - alpha) * (1.0 - t)) * pt**gamma
  return bce * weight


def occupancy_focal_loss(
  logits: jnp.ndarray,
  target: jnp.ndarray,
  mask: jnp.ndarray | None = None,
  gamma: float = 2.0,
  alpha: float = 0.25,
) -> jnp.ndarray:
  """The reference's occupancy loss: a sigmoid focal loss per class channel.

  Args:
    logits: [B, X, Y, Z, C]; channel c is its own binary problem with target (label == c), so
      class 0 (free, in pre-training) is a positive class of its own channel too.
    target: [B, X, Y, Z] integer labels in [0, C).
    mask: optional [B, X, Y, Z] voxel weights (Occ3D camera mask); the loss is then the weighted
      sum over voxels and channels divided by the sum of the weights.

  Returns:
    scalar: without a mask, the mean over all B * X * Y * Z * C elements (no avg_factor).
  """
  onehot = jax.nn.one_hot(target, logits.shape[-1], dtype=jnp.float32)
  loss = sigmoid_focal(logits, onehot, gamma, alpha)
  if mask is None:
    return loss.mean()
  w = mask.astype(jnp.float32)
  return jnp.sum(loss * w[..., None]) / jnp.maximum(jnp.sum(w), 1.0)
