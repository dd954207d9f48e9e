"""On-device augmentation against OpenCV and literal numpy versions of the reference's steps."""

import cv2
import jax
import jax.numpy as jnp
import numpy as np

from tests.reference.augment_reference import grid_mask_reference, photometric_reference
from uniscene_jax.data import augment


def test_hsv_round_trip_matches_opencv():
  rng = np.random.default_rng(0)
  img = rng.uniform(0, 255, (32, 48, 3)).astype(np.float32)
  img[0, :4] = [[10, 10, 10], [0, 0, 0], [255, 0, 0], [0, 255, 255]]  # grey, black, pure hues
  hsv = np.asarray(augment.bgr_to_hsv(jnp.asarray(img)))
  want = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
  np.testing.assert_allclose(hsv, want, atol=2e-3, rtol=1e-5)
  back = np.asarray(augment.hsv_to_bgr(jnp.asarray(want)))
  np.testing.assert_allclose(back, cv2.cvtColor(want, cv2.COLOR_HSV2BGR), atol=2e-3, rtol=1e-5)


def test_photometric_distortion_matches_the_reference_steps():
  rng = np.random.default_rng(1)
  img = rng.uniform(0, 255, (3, 4, 16, 24, 3)).astype(np.float32)
  params = augment.draw_photometric(jax.random.key(0), (3, 4))
  out = np.asarray(jax.jit(augment.photometric_distortion)(jnp.asarray(img), params))
  params = jax.tree.map(np.asarray, params)
  for i in range(3):
    for j in range(4):
      p = {k: v[i, j] for k, v in params.items()}
      np.testing.assert_allclose(out[i, j], photometric_reference(img[i, j], p), atol=0.05)
  # The draws vary: every switch is on for some images and off for others.
  for k in ('brightness_on', 'contrast_on', 'hue_on', 'swap_on'):
    assert 0 < params[k].mean() < 1


def test_grid_mask_matches_the_literal_algorithm():
  for d, st_h, st_w in [(2, 0, 1), (7, 3, 6), (100, 99, 0), (927, 500, 12), (64, 0, 0)]:
    got = np.asarray(augment.grid_mask_pattern(jnp.int32(d), st_h, st_w, (928, 1600)))
    np.testing.assert_array_equal(got, grid_mask_reference(d, st_h, st_w, 928, 1600))
  masks = np.stack(
    [np.asarray(augment.grid_mask(k, (96, 160))) for k in jax.random.split(jax.random.key(2), 60)]
  )
  untouched = np.all(masks == 1, axis=(1, 2))
  assert 0.15 < untouched.mean() < 0.5  # p = 0.7 of applying


def test_augment_batch_normalises_and_masks_the_current_frame_only():
  rng = np.random.default_rng(3)
  img = np.zeros((2, 3, 2, 64, 96, 3), np.uint8)
  img[..., :50, :90, :] = rng.integers(0, 256, (2, 3, 2, 50, 90, 3))
  plain = np.asarray(augment.augment_batch(jax.random.key(0), jnp.asarray(img), (50, 90), False))
  np.testing.assert_allclose(
    plain[..., :50, :90, :], img[..., :50, :90, :] - np.float32(augment.MEAN_BGR)
  )
  assert not plain[..., 50:, :, :].any() and not plain[..., 90:, :].any()
  fn = jax.jit(
    lambda k, x: augment.augment_batch(k, x, (50, 90), True, photometric=False, grid_mask_prob=1.0)
  )
  masked = np.asarray(fn(jax.random.key(1), jnp.asarray(img)))
  np.testing.assert_array_equal(masked[:, :2], plain[:, :2])  # history frames untouched
  zeroed = (masked[:, 2] == 0) & (plain[:, 2] != 0)
  assert zeroed.any() and not zeroed.all()
  # In a bfloat16 network the queue comes out in bfloat16: the float32 result, rounded.
  half = jax.jit(lambda k, x: augment.augment_batch(k, x, (50, 90), True, dtype=jnp.bfloat16))(
    jax.random.key(1), jnp.asarray(img)
  )
  full = jax.jit(lambda k, x: augment.augment_batch(k, x, (50, 90), True))(
    jax.random.key(1), jnp.asarray(img)
  )
  assert half.dtype == jnp.bfloat16 and full.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(half), np.asarray(full.astype(jnp.bfloat16)))
