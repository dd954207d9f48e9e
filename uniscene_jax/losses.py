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


def occupancy_cross_entropy(
  logits: jnp.ndarray, target: jnp.ndarray, mask: jnp.ndarray | None = None
) -> jnp.ndarray:
  """Softmax cross-entropy over the class axis (mmdet's CrossEntropyLoss, the Occ3D baseline's).

  Args:
    logits: [B, X, Y, Z, C]; target: [B, X, Y, Z] labels in [0, C).
    mask: optional [B, X, Y, Z] voxel weights (the camera mask): weighted sum over voxels divided
      by the sum of the weights (avg_factor); without it, the mean over voxels.
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
  nll = -jnp.take_along_axis(logp, target[..., None].astype(jnp.int32), -1)[..., 0]
  if mask is None:
    return nll.mean()
  w = mask.astype(jnp.float32)
  return jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)


OCCUPANCY_LOSSES = {'focal': occupancy_focal_loss, 'cross_entropy': occupancy_cross_entropy}


def occupancy_loss(kind: str, logits, target, mask=None) -> jnp.ndarray:
  """The occupancy loss named by config.loss.kind: 'focal' (UniScene) or 'cross_entropy'."""
  if kind not in OCCUPANCY_LOSSES:
    raise ValueError(f'config.loss.kind must be one of {sorted(OCCUPANCY_LOSSES)}, got {kind!r}')
  return OCCUPANCY_LOSSES[kind](logits, target, mask)
