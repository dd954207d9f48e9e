"""Occ3D mIoU on the real Occ3D sample: the benchmark's stated values and a bincount reference."""

import os

import jax.numpy as jnp
import numpy as np

from uniscene_jax import metrics

SAMPLE = os.path.join(
  os.path.dirname(__file__), '..', '..', 'shared', 'reference', 'occ3d_sample_labels.npz'
)


def _sample():
  with np.load(SAMPLE) as z:
    return z['semantics'], z['mask_camera']


def _miou(pred, gt, mask):
  conf = metrics.jit_confusion_update(
    jnp.zeros((18, 18), jnp.int32), jnp.asarray(pred), jnp.asarray(gt), jnp.asarray(mask)
  )
  return metrics.occ3d_miou(conf), conf


def test_reference_values_on_the_real_sample():
  gt, mask = _sample()
  perfect, conf = _miou(gt, gt, mask)
  assert f'{perfect:.2f}' == '100.00'
  assert np.sum(~np.isnan(metrics.per_class_iou(conf)[:17])) == 10  # classes counted
  assert f'{_miou(np.full_like(gt, 17), gt, mask)[0]:.2f}' == '0.00'
  assert f'{_miou(np.full_like(gt, 11), gt, mask)[0]:.2f}' == '1.37'
  assert 'mIoU' in metrics.miou_table(conf) and 'driveable_surface' in metrics.miou_table(conf)


def test_accumulation_equals_a_bincount_reference():
  gt, mask = _sample()
  rng = np.random.default_rng(0)
  conf = jnp.zeros((18, 18), jnp.int32)
  want = np.zeros((18, 18), np.int64)
  for _ in range(3):
    pred = np.where(rng.random(gt.shape) < 0.7, gt, rng.integers(0, 18, gt.shape)).astype(np.uint8)
    noisy_gt = np.where(rng.random(gt.shape) < 0.01, 255, gt)  # ignored label
    conf = metrics.jit_confusion_update(
      conf, jnp.asarray(pred), jnp.asarray(noisy_gt), jnp.asarray(mask)
    )
    keep = (mask != 0) & (noisy_gt < 18)
    want += np.bincount(noisy_gt[keep].astype(np.int64) * 18 + pred[keep], minlength=324).reshape(
      18, 18
    )
  np.testing.assert_array_equal(conf, want)
  iou = np.diag(want) / (want.sum(0) + want.sum(1) - np.diag(want))
  np.testing.assert_allclose(metrics.occ3d_miou(conf), np.nanmean(iou[:17]) * 100)
