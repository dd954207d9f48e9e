"""On-device image augmentation and normalisation, vectorised over every image of a batch.

The reference's order: photometric distortion on each raw image (0..255 float, BGR), subtraction of
the BGR mean (std 1), zero padding to a multiple of 32 (the padding is 0 after normalisation), and
GridMask on the current frame inside the model. Images arrive here already padded (uint8), so the
padding is re-zeroed after normalisation with a mask of the original size.

Random draws take a jax PRNG key; every image draws its own photometric parameters, every sample
its own GridMask (the reference draws one mask per GPU batch of one sample).
"""

import math

import jax
import jax.numpy as jnp

MEAN_BGR = (103.530, 116.280, 123.675)


def bgr_to_hsv(img: jnp.ndarray) -> jnp.ndarray:
  """OpenCV's float BGR -> HSV: H in degrees [0, 360), S = (V - min) / |V|, V = max(B, G, R).

  OpenCV's epsilons are kept, so values below zero (after a brightness shift) convert as there.
  """
  eps = 1.1920929e-07  # FLT_EPSILON
  b, g, r = img[..., 0], img[..., 1], img[..., 2]
  v = jnp.maximum(jnp.maximum(b, g), r)
  diff = v - jnp.minimum(jnp.minimum(b, g), r)
  s = diff / (jnp.abs(v) + eps)
  d = 60.0 / (diff + eps)
  h = jnp.where(v == r, (g - b) * d, jnp.where(v == g, (b - r) * d + 120.0, (r - g) * d + 240.0))
  h = jnp.where(h < 0, h + 360.0, h)
  return jnp.stack([h, s, v], -1)


def hsv_to_bgr(hsv: jnp.ndarray) -> jnp.ndarray:
  """OpenCV's float HSV -> BGR (sector formula; hue taken modulo 360)."""
  h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
  h6 = h * (6.0 / 360.0)
  h6 = h6 - 6.0 * jnp.floor(h6 / 6.0)
  sector = jnp.floor(h6)
  f = h6 - sector
  p = v * (1.0 - s)
  q = v * (1.0 - s * f)
  t = v * (1.0 - s * (1.0 - f))
  sector = sector.astype(jnp.int32) % 6
  # (b, g, r) per sector, as OpenCV's table
  r = jnp.choose(sector, [v, q, p, p, t, v], mode='clip')
  g = jnp.choose(sector, [t, v, v, q, p, p], mode='clip')
  b = jnp.choose(sector, [p, p, t, v, v, q], mode='clip')
  bgr = jnp.stack([b, g, r], -1)
  return jnp.where((s == 0)[..., None], v[..., None], bgr)


def draw_photometric(key: jax.Array, batch_shape: tuple[int, ...]) -> dict:
  """Parameters of mmdet3d's PhotoMetricDistortionMultiViewImage for each image of batch_shape."""
  ks = jax.random.split(key, 11)
  u = lambda k, lo, hi: jax.random.uniform(k, batch_shape, jnp.float32, lo, hi)  # noqa: E731
  coin = lambda k: jax.random.bernoulli(k, 0.5, batch_shape)  # noqa: E731
  return {
    'brightness_on': coin(ks[0]),
    'brightness': u(ks[1], -32.0, 32.0),
    'contrast_last': coin(ks[2]),
    'contrast_on': coin(ks[3]),
    'contrast': u(ks[4], 0.5, 1.5),
    'saturation_on': coin(ks[5]),
    'saturation': u(ks[6], 0.5, 1.5),
    'hue_on': coin(ks[7]),
    'hue': u(ks[8], -18.0, 18.0),
    'swap_on': coin(ks[9]),
    'permutation': jax.vmap(lambda k: jax.random.permutation(k, 3))(
      jax.random.split(ks[10], max(1, math.prod(batch_shape)))
    ).reshape(*batch_shape, 3),
  }


def photometric_distortion(img: jnp.ndarray, params: dict) -> jnp.ndarray:
  """img [..., H, W, 3] float BGR in 0..255 with params from draw_photometric(batch shape ...)."""

  def per_image(p):
    return jax.tree.map(lambda a: a[..., None, None, None], p)

  p = per_image({k: v for k, v in params.items() if k != 'permutation'})
  img = jnp.where(p['brightness_on'], img + p['brightness'], img)
  contrast = jnp.where(p['contrast_on'], p['contrast'], 1.0)
  img = jnp.where(p['contrast_last'], img, img * contrast)  # mode 0 of the reference: first
  hsv = bgr_to_hsv(img)
  sat = jnp.where(p['saturation_on'][..., 0], p['saturation'][..., 0], 1.0)
  hue = hsv[..., 0] + jnp.where(p['hue_on'][..., 0], p['hue'][..., 0], 0.0)
  hue = jnp.where(hue > 360.0, hue - 360.0, jnp.where(hue < 0.0, hue + 360.0, hue))
  img = hsv_to_bgr(jnp.stack([hue, hsv[..., 1] * sat, hsv[..., 2]], -1))
  img = jnp.where(p['contrast_last'], img * contrast, img)
  perm = params['permutation'][..., None, None, :]
  swapped = jnp.take_along_axis(img, jnp.broadcast_to(perm, img.shape), axis=-1)
  return jnp.where(p['swap_on'], swapped, img)


def normalize(img: jnp.ndarray, valid_hw: tuple[int, int]) -> jnp.ndarray:
  """Padded images [..., H_pad, W_pad, 3] (BGR 0..255) -> minus the BGR mean, padding zero."""
  hp, wp = img.shape[-3:-1]
  rows = jnp.arange(hp) < valid_hw[0]
  cols = jnp.arange(wp) < valid_hw[1]
  valid = (rows[:, None] & cols[None, :])[..., None]
  return jnp.where(valid, img.astype(jnp.float32) - jnp.asarray(MEAN_BGR, jnp.float32), 0.0)


def grid_mask_pattern(d, st_h, st_w, shape: tuple[int, int], ratio: float = 0.5) -> jnp.ndarray:
  """The mode-1 GridMask [H, W] for period d and band starts (st_h, st_w), as float32 0/1."""
  h, w = shape
  hh, ww = int(1.5 * h), int(1.5 * w)
  band = jnp.minimum(jnp.maximum((ratio * d + 0.5).astype(jnp.int32), 1), d - 1)

  def in_band(coord, start, full):
    rel = coord - start
    return (rel >= 0) & (rel % d < band) & (rel // d < full // d)

  rows = in_band(jnp.arange(h) + (hh - h) // 2, st_h, hh)
  cols = in_band(jnp.arange(w) + (ww - w) // 2, st_w, ww)
  return (rows[:, None] | cols[None, :]).astype(jnp.float32)


def grid_mask(
  key: jax.Array, shape: tuple[int, int], prob: float = 0.7, ratio: float = 0.5
) -> jnp.ndarray:
  """One GridMask [H, W] float32 (mode 1, no rotation), the reference's drawing rule.

  With probability 1 - prob the mask is all ones. Otherwise d ~ U{2..H-1}, bands of width
  l = min(max(int(ratio * d + 0.5), 1), d - 1) every d rows and columns of a 1.5x canvas from random
  starts, centre-cropped; the kept region is the union of the row and column bands.
  """
  h = shape[0]
  k_apply, k_d, k_h, k_w = jax.random.split(key, 4)
  d = jax.random.randint(k_d, (), 2, h)
  st_h = jax.random.randint(k_h, (), 0, d)
  st_w = jax.random.randint(k_w, (), 0, d)
  mask = grid_mask_pattern(d, st_h, st_w, shape, ratio)
  apply = jax.random.uniform(k_apply) <= prob
  return jnp.where(apply, mask, 1.0)


def augment_batch(
  key: jax.Array,
  img: jnp.ndarray,
  valid_hw: tuple[int, int],
  train: bool,
  photometric: bool = True,
  use_grid_mask: bool = True,
  grid_mask_prob: float = 0.7,
) -> jnp.ndarray:
  """uint8 img [B, T, N, H_pad, W_pad, 3] -> float32 network input, same shape.

  In training: photometric distortion of every image, then normalisation, then one GridMask per
  sample on the current (last) frame. Otherwise normalisation only.
  """
  x = img.astype(jnp.float32)
  k_photo, k_grid = jax.random.split(key)
  if train and photometric:
    x = photometric_distortion(x, draw_photometric(k_photo, img.shape[:3]))
  x = normalize(x, valid_hw)
  if train and use_grid_mask:
    b = img.shape[0]
    masks = jax.vmap(lambda k: grid_mask(k, img.shape[3:5], grid_mask_prob))(
      jax.random.split(k_grid, b)
    )
    x = x.at[:, -1].multiply(masks[:, None, :, :, None])
  return x
