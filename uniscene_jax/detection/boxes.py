"""3-D box coding of the BEVFormer detection head and its NMS-free decoder, pure jnp.

Boxes live in the lidar frame of the key frame, in metres, in the mmdet3d 0.17 LiDAR convention
that the records use: 9 values (x, y, z, w, l, h, yaw, vx, vy) with yaw = -yaw_nuscenes - pi/2.
Two origins appear: the records and the decoder output put z at the **bottom** of the box; the
loss, the assigner and the box code use the **gravity centre** (z + h / 2).

The 10-value box code regressed by the head is
  (cx, cy, log w, log l, cz, log h, sin yaw, cos yaw, vx, vy),
with the centre in metres (the reference's normalize_bbox ignores pc_range).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

CODE_SIZE = 10
BOX_SIZE = 9
# Per-dimension weights of the L1 box loss (a frozen parameter of the reference head).
CODE_WEIGHTS = (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.2, 0.2)
# Decoded centres outside this box (x_min, y_min, z_min, x_max, y_max, z_max) are dropped.
POST_CENTER_RANGE = (-61.2, -61.2, -10.0, 61.2, 61.2, 10.0)
MAX_NUM = 300


def gravity_center(boxes: jnp.ndarray) -> jnp.ndarray:
  """[..., >=6] bottom-centre boxes -> the same with z moved to the gravity centre (z + h/2)."""
  boxes = jnp.asarray(boxes)
  return boxes.at[..., 2].add(boxes[..., 5] * 0.5)


def bottom_center(boxes: jnp.ndarray) -> jnp.ndarray:
  """Inverse of `gravity_center`: z -= h/2."""
  boxes = jnp.asarray(boxes)
  return boxes.at[..., 2].add(-boxes[..., 5] * 0.5)


def normalize_bbox(boxes: jnp.ndarray) -> jnp.ndarray:
  """Box -> code: [..., 9] (or 7, no velocity) gravity-centre boxes -> [..., 10] (or 8).

  Sizes are logged as they come, so a zero size (padding) gives -inf; callers drop rows whose
  code is not finite, as the reference does.
  """
  if boxes.shape[-1] not in (7, 9):
    raise ValueError(f'normalize_bbox: boxes last axis is {boxes.shape[-1]}, expected 7 or 9')
  b = jnp.asarray(boxes)
  parts = [
    b[..., 0:1],
    b[..., 1:2],
    jnp.log(b[..., 3:4]),
    jnp.log(b[..., 4:5]),
    b[..., 2:3],
    jnp.log(b[..., 5:6]),
    jnp.sin(b[..., 6:7]),
    jnp.cos(b[..., 6:7]),
  ]
  if b.shape[-1] == 9:
    parts += [b[..., 7:9]]
  return jnp.concatenate(parts, axis=-1)


def denormalize_bbox(code: jnp.ndarray) -> jnp.ndarray:
  """Code -> box: [..., 10] (or 8) -> [..., 9] (or 7) gravity-centre boxes.

  yaw = atan2(sin, cos), so the code's (sin, cos) need not be unit length; sizes = exp(log size).
  """
  if code.shape[-1] not in (8, 10):
    raise ValueError(f'denormalize_bbox: code last axis is {code.shape[-1]}, expected 8 or 10')
  c = jnp.asarray(code)
  parts = [
    c[..., 0:2],
    c[..., 4:5],
    jnp.exp(c[..., 2:4]),
    jnp.exp(c[..., 5:6]),
    jnp.arctan2(c[..., 6:7], c[..., 7:8]),
  ]
  if c.shape[-1] == 10:
    parts += [c[..., 8:10]]
  return jnp.concatenate(parts, axis=-1)


def decode(
  cls_logits: jnp.ndarray,
  box_code: jnp.ndarray,
  max_num: int = MAX_NUM,
  post_center_range: tuple[float, ...] | None = POST_CENTER_RANGE,
  score_threshold: float | None = None,
) -> dict[str, jnp.ndarray]:
  """The NMS-free coder for one sample (the last decoder layer's output).

  Args:
    cls_logits: [Q, C] class logits (sigmoid per class; Q = 900, C = 10).
    box_code: [Q, 10] box codes, centres in metres of the lidar frame.
    max_num: K, the number of (query, class) pairs kept, by sigmoid score over all Q * C.
    post_center_range: centres outside it are marked invalid (None keeps all).
    score_threshold: optional; scores at or below it are marked invalid. The reference
      configuration has none.

  Returns:
    dict of static-shape arrays, sorted by descending score:
      boxes [K, 9] lidar frame, **bottom** centre, (x, y, z, w, l, h, yaw, vx, vy);
      scores [K] sigmoid scores; labels [K] int32 class; query [K] int32 query index;
      valid [K] bool, False for the pairs the reference drops (range / threshold).
  """
  num_queries, num_classes = cls_logits.shape
  if box_code.shape != (num_queries, CODE_SIZE):
    raise ValueError(
      f'decode: box_code is {box_code.shape}, expected ({num_queries}, {CODE_SIZE}) to match '
      f'cls_logits {cls_logits.shape}'
    )
  if max_num > num_queries * num_classes:
    raise ValueError(f'decode: max_num {max_num} > Q * C = {num_queries * num_classes}')
  scores = jax.nn.sigmoid(cls_logits.astype(jnp.float32)).reshape(-1)
  scores, index = jax.lax.top_k(scores, max_num)
  labels = (index % num_classes).astype(jnp.int32)
  query = (index // num_classes).astype(jnp.int32)
  boxes = denormalize_bbox(box_code.astype(jnp.float32)[query])
  valid = jnp.ones((max_num,), bool)
  if post_center_range is not None:
    lo = jnp.asarray(post_center_range[:3], jnp.float32)
    hi = jnp.asarray(post_center_range[3:], jnp.float32)
    centre = boxes[:, :3]
    valid &= jnp.all((centre >= lo) & (centre <= hi), axis=-1)
  if score_threshold is not None:
    valid &= scores > score_threshold
  return {
    'boxes': bottom_center(boxes),
    'scores': scores,
    'labels': labels,
    'query': query,
    'valid': valid,
  }


def decode_batch(
  cls_logits: jnp.ndarray, box_code: jnp.ndarray, **kwargs
) -> dict[str, jnp.ndarray]:
  """`decode` over a leading batch axis: [B, Q, C], [B, Q, 10] -> arrays with a leading B."""
  return jax.vmap(lambda c, b: decode(c, b, **kwargs))(cls_logits, box_code)
