"""Occ3D semantic occupancy metric: a global confusion matrix over camera-visible voxels -> mIoU.

As the Occ3D benchmark and UniScene compute it: per sample, voxels where the camera mask is set add
to an 18 x 18 matrix hist[gt, pred]; after all samples IoU_c = hist[c, c] / (row_c + col_c -
hist[c, c]) on the global matrix, and mIoU = nanmean(IoU_0 .. IoU_16) * 100 (free, class 17, is
left out of the mean but is a row and column of the matrix). A class with neither ground truth nor
prediction is NaN and skipped.
"""

import jax
import jax.numpy as jnp
import numpy as np

from uniscene_jax.data.nuscenes_meta import OCC3D_CLASSES

NUM_CLASSES = 18


def confusion_update(
  confusion: jnp.ndarray, pred: jnp.ndarray, gt: jnp.ndarray, mask: jnp.ndarray | None = None
) -> jnp.ndarray:
  """confusion [C, C] int32 + counts of (gt, pred) pairs over masked voxels; jit-able.

  pred, gt: integer labels of any (equal) shape; mask: same shape, nonzero = counted. Labels
  outside [0, C) are ignored (the benchmark's 255).
  """
  c = confusion.shape[0]
  valid = (gt >= 0) & (gt < c) & (pred >= 0) & (pred < c)
  if mask is not None:
    valid = valid & (mask != 0)
  index = jnp.where(valid, gt.astype(jnp.int32) * c + pred.astype(jnp.int32), 0)
  counts = jnp.bincount(
    index.reshape(-1), weights=valid.reshape(-1).astype(jnp.int32), length=c * c
  )
  return confusion + counts.reshape(c, c).astype(confusion.dtype)


def per_class_iou(confusion) -> np.ndarray:
  hist = np.asarray(confusion, np.float64)
  diag = np.diag(hist)
  with np.errstate(divide='ignore', invalid='ignore'):
    return diag / (hist.sum(0) + hist.sum(1) - diag)


def occ3d_miou(confusion) -> float:
  """mIoU in percent over classes 0..16 (free excluded), NaN classes skipped."""
  iou = per_class_iou(confusion)[: NUM_CLASSES - 1]
  return float(np.nanmean(iou) * 100.0)


def miou_table(confusion) -> str:
  """Per-class IoU table and the mIoU, as text."""
  iou = per_class_iou(confusion)
  lines = [f'{"class":24s} IoU']
  for name, value in zip(OCC3D_CLASSES[: NUM_CLASSES - 1], iou, strict=False):
    lines.append(f'{name:24s} {value * 100:6.2f}' if not np.isnan(value) else f'{name:24s}    nan')
  lines.append(f'{"mIoU":24s} {occ3d_miou(confusion):6.2f}')
  return '\n'.join(lines)


jit_confusion_update = jax.jit(confusion_update)


class SplitConfusion:
  """A C x C confusion summed over a whole split.

  Counts accumulate on the device in int32 (jitted updates, no host round trip per frame) and
  move into an int64 total on the host before they could overflow: nuScenes' val split counts
  6,019 x 640,000 = 3.9e9 voxels, more than int32 holds.
  """

  def __init__(self, classes: int, limit: int = np.iinfo(np.int32).max):
    self.device = jnp.zeros((classes, classes), jnp.int32)
    self.host = np.zeros((classes, classes), np.int64)
    self.limit = limit
    self.room = limit

  def update(self, fn, voxels: int, *args):
    """`self.device, *rest = fn(self.device, *args)` for an update counting at most `voxels`
    voxels; returns `rest`."""
    if voxels > self.limit:
      raise ValueError(f'one update counts {voxels} voxels, more than the limit {self.limit}')
    if voxels > self.room:
      self._flush()
    self.device, *rest = fn(self.device, *args)
    self.room -= voxels
    return rest

  def _flush(self):
    self.host += np.asarray(self.device, np.int64)
    self.device = jnp.zeros_like(self.device)
    self.room = self.limit

  def total(self) -> np.ndarray:
    """The int64 confusion of every update so far."""
    self._flush()
    return self.host.copy()
