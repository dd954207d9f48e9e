"""Detection losses of the BEVFormer head (model_spec 10), pure jnp, float32.

Per decoder layer and image: Hungarian assignment (matching.py), then
  loss_cls  = 2.0  * sum over Q x C of the sigmoid focal loss (alpha 0.25, gamma 2; unmatched
              queries have the background label C, i.e. every channel negative) / avg,
  loss_bbox = 0.25 * sum over matched queries of code_weights * |code - normalize_bbox(gt)| / avg,
with avg = max(mean over devices of the number of matched queries, 1), rows whose target code
is not finite dropped and nan_to_num on both. The last layer's terms are `loss_cls`/`loss_bbox`,
layer l < L-1 gives `d{l}.loss_cls`/`d{l}.loss_bbox`; the training loss is their sum.

Normalisation across devices. The reference computes, on device d with its local batch,
  loss_d = sum_d / max(mean_d'(num_pos_d'), 1)
and DDP averages the gradients, i.e. optimises mean_d loss_d. Three ways to get it here:
  * inside shard_map / pmap: pass `axis_name` (num_pos is pmean-ed) -> loss_d;
  * one call on the whole global batch made of R reference devices' samples: `num_replicas=R`
    -> mean_d loss_d = sum / max(total_pos / R, 1) / R (equal to the reference's when every
    device holds the same number of samples);
  * `avg_factor`: the mean number of positives over devices, computed by the caller.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from uniscene_jax.detection import boxes as box_lib
from uniscene_jax.detection import matching
from uniscene_jax.losses import sigmoid_focal

CLS_WEIGHT = 2.0
BBOX_WEIGHT = 0.25
FOCAL_GAMMA = 2.0
FOCAL_ALPHA = 0.25


def layer_targets(
  cls_logits: jnp.ndarray,
  box_code: jnp.ndarray,
  gt_boxes: jnp.ndarray,
  gt_labels: jnp.ndarray,
  gt_valid: jnp.ndarray,
  code_weights: tuple[float, ...] = box_lib.CODE_WEIGHTS,
) -> dict[str, jnp.ndarray]:
  """Assigned targets of one image and decoder layer.

  Args:
    cls_logits: [Q, C]; box_code: [Q, 10] (centres in metres).
    gt_boxes: [G, 9] lidar frame, **gravity** centre; gt_labels: [G] int; gt_valid: [G] bool.

  Returns:
    labels [Q] int32 (C = background), box_target [Q, 10] (non-finite entries zeroed),
    box_weight [Q, 10] (code_weights on matched rows with a finite target, else 0),
    num_pos [] float32 (matched queries), assigned_gt [Q] int32 (-1 = background).
  """
  num_classes = cls_logits.shape[-1]
  assigned = matching.hungarian_assign(cls_logits, box_code, gt_boxes, gt_labels, gt_valid)
  matched = assigned >= 0
  safe = jnp.maximum(assigned, 0)
  labels = jnp.where(matched, gt_labels[safe], num_classes).astype(jnp.int32)
  target = box_lib.normalize_bbox(gt_boxes.astype(jnp.float32)[safe])
  finite = jnp.all(jnp.isfinite(target), axis=-1)
  keep = matched & finite
  weight = jnp.where(keep[:, None], jnp.asarray(code_weights, jnp.float32), 0.0)
  return {
    'labels': labels,
    'box_target': jnp.where(keep[:, None], target, 0.0),
    'box_weight': weight,
    'num_pos': jnp.sum(matched).astype(jnp.float32),
    'assigned_gt': assigned,
  }


def _mean_num_pos(num_pos, axis_name, num_replicas, avg_factor):
  if avg_factor is not None:
    return jnp.asarray(avg_factor, jnp.float32)
  if axis_name is not None:
    return jax.lax.pmean(num_pos, axis_name)
  return num_pos / num_replicas


def detection_loss(
  cls_scores: jnp.ndarray,
  bbox_preds: jnp.ndarray,
  gt_boxes: jnp.ndarray,
  gt_labels: jnp.ndarray,
  gt_valid: jnp.ndarray | None = None,
  *,
  axis_name: str | None = None,
  num_replicas: int = 1,
  avg_factor: float | jnp.ndarray | None = None,
  code_weights: tuple[float, ...] = box_lib.CODE_WEIGHTS,
) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """The reference's detection loss summed over decoder layers.

  Args:
    cls_scores: [L, B, Q, C] class logits of every decoder layer (L = 6, Q = 900, C = 10).
    bbox_preds: [L, B, Q, 10] box codes (centres in metres, lidar frame).
    gt_boxes: [B, M, 9] lidar frame, **bottom** centre, (x, y, z, w, l, h, yaw, vx, vy), as the
      batches carry them (padded).
    gt_labels: [B, M] int, 0..C-1, -1 = padding / not a detection class (never matched).
    gt_valid: optional [B, M] bool, further excludes boxes (e.g. no lidar/radar points).
    axis_name, num_replicas, avg_factor: how the positives are averaged (module docstring).

  Returns:
    (total loss [], dict of the named per-layer terms, plus 'num_pos' (the local count)).
  """
  if cls_scores.ndim != 4 or bbox_preds.shape != cls_scores.shape[:3] + (box_lib.CODE_SIZE,):
    raise ValueError(
      f'detection_loss: cls_scores {cls_scores.shape} and bbox_preds {bbox_preds.shape}; '
      f'expected [L, B, Q, C] and [L, B, Q, {box_lib.CODE_SIZE}]'
    )
  num_layers, batch, _, num_classes = cls_scores.shape
  if gt_boxes.shape[0] != batch or gt_boxes.shape[-1] != box_lib.BOX_SIZE:
    raise ValueError(
      f'detection_loss: gt_boxes is {gt_boxes.shape}; expected [{batch}, M, {box_lib.BOX_SIZE}]'
    )
  valid = gt_labels >= 0
  if gt_valid is not None:
    valid &= gt_valid.astype(bool)
  gt_gravity = box_lib.gravity_center(gt_boxes.astype(jnp.float32))

  per_image = jax.vmap(
    lambda c, b, g, lab, v: layer_targets(c, b, g, lab, v, code_weights),
    in_axes=(0, 0, 0, 0, 0),
  )
  per_layer = jax.vmap(per_image, in_axes=(0, 0, None, None, None))
  targets = per_layer(cls_scores, bbox_preds, gt_gravity, gt_labels, valid)

  onehot = jax.nn.one_hot(targets['labels'], num_classes + 1, dtype=jnp.float32)[..., :num_classes]
  focal = sigmoid_focal(cls_scores, onehot, FOCAL_GAMMA, FOCAL_ALPHA)
  cls_sum = jnp.sum(focal, axis=(1, 2, 3))  # [L]
  diff = jnp.abs(bbox_preds.astype(jnp.float32) - targets['box_target']) * targets['box_weight']
  bbox_sum = jnp.sum(diff, axis=(1, 2, 3))  # [L]
  num_pos = jnp.sum(targets['num_pos'], axis=1)  # [L], local (this call's batch)
  mean_pos = _mean_num_pos(num_pos, axis_name, num_replicas, avg_factor)
  avg = jnp.maximum(jax.lax.stop_gradient(mean_pos), 1.0) * num_replicas
  loss_cls = jnp.nan_to_num(CLS_WEIGHT * cls_sum / avg)
  loss_bbox = jnp.nan_to_num(BBOX_WEIGHT * bbox_sum / avg)

  terms = {}
  for layer in range(num_layers):
    prefix = '' if layer == num_layers - 1 else f'd{layer}.'
    terms[f'{prefix}loss_cls'] = loss_cls[layer]
    terms[f'{prefix}loss_bbox'] = loss_bbox[layer]
  total = sum(terms.values())
  terms['num_pos'] = num_pos[-1]
  return total, terms
