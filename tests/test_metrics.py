"""Occ3D mIoU on the real Occ3D sample: the benchmark's stated values and a bincount reference."""

import os

import jax.numpy as jnp
import numpy as np
import pytest

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


def test_split_confusion_moves_counts_to_int64_before_int32_could_overflow():
  gt, mask = _sample()
  rng = np.random.default_rng(1)
  frames = [rng.integers(0, 18, gt.shape).astype(np.uint8) for _ in range(5)]
  want = np.zeros((18, 18), np.int64)
  for pred in frames:
    want += np.bincount(gt.astype(np.int64).ravel() * 18 + pred.ravel(), minlength=324).reshape(
      18, 18
    )
  # A limit of 2.5 frames' voxels stands for int32's range: every third update flushes first.
  conf = metrics.SplitConfusion(18, limit=int(2.5 * gt.size))
  flushed = []
  for pred in frames:
    before = conf.host.sum()
    (out,) = conf.update(
      lambda c, p, g: (metrics.confusion_update(c, p, g), p.sum()), gt.size, pred, gt
    )
    assert int(out) == int(pred.sum())  # the update's other outputs come back
    flushed.append(conf.host.sum() > before)
    assert int(np.asarray(conf.device).sum()) <= conf.limit
  assert flushed == [False, False, True, False, True]
  np.testing.assert_array_equal(conf.total(), want)
  assert conf.total().dtype == np.int64 and not np.asarray(conf.device).any()
  with pytest.raises(ValueError, match='more than the limit'):
    conf.update(None, conf.limit + 1)
