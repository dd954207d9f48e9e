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


def _hsv(b, g, r):
  """OpenCV's float BGR -> (H in degrees [0, 360), S = (V - min) / |V|, V = max(B, G, R)),
  OpenCV's epsilons kept, so values below zero (after a brightness shift) convert as there."""
  eps = 1.1920929e-07  # FLT_EPSILON
  v = jnp.maximum(jnp.maximum(b, g), r)
  diff = v - jnp.minimum(jnp.minimum(b, g), r)
  s = diff / (jnp.abs(v) + eps)
  d = 60.0 / (diff + eps)
  h = jnp.where(v == r, (g - b) * d, jnp.where(v == g, (b - r) * d + 120.0, (r - g) * d + 240.0))
  return jnp.where(h < 0, h + 360.0, h), s, v


def _bgr(h, s, v):
  """OpenCV's float HSV -> (B, G, R): the sector formula, hue taken modulo 360. Written as
  selects on the sector, element by element (a gather over six stacked candidates would
  materialise them: ten times slower on a CPU at full size)."""
  h6 = h * (6.0 / 360.0)
  h6 = h6 - 6.0 * jnp.floor(h6 / 6.0)
  sector = jnp.floor(h6)
  f = h6 - sector
  p = v * (1.0 - s)
  q = v * (1.0 - s * f)
  t = v * (1.0 - s * (1.0 - f))

  def pick(*per_sector):  # OpenCV's table: the channel's value in sectors 0..5
    out = per_sector[5]
    for k in range(4, -1, -1):
      out = jnp.where(sector == k, per_sector[k], out)
    return jnp.where(s == 0, v, out)

  return pick(p, p, t, v, v, q), pick(t, v, v, q, p, p), pick(v, q, p, p, t, v)


def bgr_to_hsv(img: jnp.ndarray) -> jnp.ndarray:
  """OpenCV's float BGR [..., 3] -> HSV [..., 3] (see _hsv)."""
  return jnp.stack(_hsv(img[..., 0], img[..., 1], img[..., 2]), -1)


def hsv_to_bgr(hsv: jnp.ndarray) -> jnp.ndarray:
  """OpenCV's float HSV [..., 3] -> BGR [..., 3] (see _bgr)."""
  return jnp.stack(_bgr(hsv[..., 0], hsv[..., 1], hsv[..., 2]), -1)


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
  """img [..., H, W, 3] float BGR in 0..255 with params from draw_photometric(batch shape ...).

  Channel by channel and element by element, so that XLA fuses the whole distortion into one
  pass over the images."""
  params = _materialised(params)
  p = jax.tree.map(lambda a: a[..., None, None], params)  # per image, broadcast over H, W
  brightness = jnp.where(p['brightness_on'], p['brightness'], 0.0)
  contrast = jnp.where(p['contrast_on'], p['contrast'], 1.0)
  first = jnp.where(p['contrast_last'], 1.0, contrast)  # mode 0 of the reference: first
  last = jnp.where(p['contrast_last'], contrast, 1.0)
  b, g, r = ((img[..., c] + brightness) * first for c in range(3))
  h, s, v = _hsv(b, g, r)
  s = s * jnp.where(p['saturation_on'], p['saturation'], 1.0)
  h = h + jnp.where(p['hue_on'], p['hue'], 0.0)
  h = jnp.where(h > 360.0, h - 360.0, jnp.where(h < 0.0, h + 360.0, h))
  bgr = [c * last for c in _bgr(h, s, v)]
  perm = params['permutation'][..., None, None, :]  # output channel c takes input perm[c]
  swap = p['swap_on']
  out = [
    jnp.where(
      swap,
      jnp.where(perm[..., c] == 0, bgr[0], jnp.where(perm[..., c] == 1, bgr[1], bgr[2])),
      bgr[c],
    )
    for c in range(3)
  ]
  return jnp.stack(out, -1)


def _materialised(params: dict) -> dict:
  """The same per-image draws, computed once into one small array.

  XLA duplicates cheap producers into every element of their consumer: broadcast over the
  pixels, the draws' counter-based random bits (threefry hashing, the permutation's sort) were
  recomputed for each pixel, which made the distortion a hundred times slower (3.3 s against
  0.04 s at 6 x 4 x 256 x 416 on a CPU). XLA:CPU drops optimisation barriers, but never
  duplicates a division (an expensive op), so the draws go through one, by 1 + 0 * a draw.
  """
  names = sorted(params)
  shape = params['swap_on'].shape
  cols = [params[k].astype(jnp.float32).reshape(*shape, -1) for k in names]
  table = jnp.concatenate(cols, -1)
  table = table / (1.0 + 0.0 * table[(0,) * table.ndim])  # draws are finite: exactly the same
  out, start = {}, 0
  for k, c in zip(names, cols, strict=True):
    piece = table[..., start : start + c.shape[-1]].reshape(params[k].shape)
    out[k], start = piece.astype(params[k].dtype), start + c.shape[-1]
  return out


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
  dtype=jnp.float32,
) -> jnp.ndarray:
  """uint8 img [B, T, N, H_pad, W_pad, 3] -> network input in `dtype`, same shape.

  In training: photometric distortion of every image, then normalisation, then one GridMask per
  sample on the current (last) frame. Otherwise normalisation only. The arithmetic is float32;
  the result is rounded to `dtype` (the network's compute dtype, whose first layer would round
  it anyway) before the mask, which only zeroes pixels, so the queue is kept at that size.
  """
  x = img.astype(jnp.float32)
  k_photo, k_grid = jax.random.split(key)
  if train and photometric:
    x = photometric_distortion(x, draw_photometric(k_photo, img.shape[:3]))
  x = normalize(x, valid_hw).astype(dtype)
  if train and use_grid_mask:
    b = img.shape[0]
    masks = jax.vmap(lambda k: grid_mask(k, img.shape[3:5], grid_mask_prob))(
      jax.random.split(k_grid, b)
    )
    x = x.at[:, -1].multiply(masks[:, None, :, :, None].astype(dtype))
  return x
