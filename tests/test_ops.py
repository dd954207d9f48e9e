"""Sampling ops against their PyTorch references (tests/reference/ops_torch.py): values and the
gradients with respect to every argument, including points outside, far outside and exactly on
pixel borders.

Tolerances: float32 values and gradients agree to atol 1e-5 plus rtol 1e-5 (the location
gradients are of order map size x value, so the relative term covers their float32 rounding);
bfloat16 runs are compared with float32 ones at atol 0.1 (values are N(0, 1) sums of a few terms,
and bfloat16 keeps 8 bits of mantissa).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.reference import ops_torch as ref
from uniscene_jax.ops.deform_conv import modulated_deform_conv2d
from uniscene_jax.ops.deformable_attention import ms_deform_attn
from uniscene_jax.ops.grid_sample import grid_sample

F32 = dict(rtol=1e-5, atol=1e-5)
BF16_ATOL = 0.1


def _torch_value_and_grads(fn, arrays, cotangent):
  inputs = [torch.tensor(a, requires_grad=True) for a in arrays]
  out = fn(*inputs)
  out.backward(torch.tensor(cotangent))
  return out.detach().numpy(), [t.grad.numpy() for t in inputs]


def _jax_value_and_grads(fn, arrays, cotangent):
  out, vjp = jax.vjp(jax.jit(fn), *[jnp.asarray(a) for a in arrays])
  return np.asarray(out), [np.asarray(g) for g in vjp(jnp.asarray(cotangent))]


def _assert_all_close(jax_result, torch_result, names):
  (jo, jg), (to, tg) = jax_result, torch_result
  np.testing.assert_allclose(jo, to, **F32, err_msg='value')
  for name, a, b in zip(names, jg, tg, strict=True):
    assert np.isfinite(a).all(), name
    np.testing.assert_allclose(a, b, **F32, err_msg=f'gradient w.r.t. {name}')


# ---------------------------------------------------------------------------------------------
# grid_sample


def _grid_points(rng, b, hg, wg, h, w):
  """Random points in and around [-1, 1], plus far-outside ones and exact pixel borders."""
  grid = rng.uniform(-1.3, 1.3, (b, hg, wg, 2)).astype(np.float32)
  # Normalised coordinate whose pixel coordinate ((g + 1) * size - 1) / 2 is exactly k.
  on_pixel = lambda k, size: (2 * k + 1) / size - 1
  special = [
    (1e5, 0.0),
    (0.0, -1e5),
    (-1e30, 1e30),
    (-1.0, 1.0),  # the outer edges
    (on_pixel(-1, w), on_pixel(0, h)),  # pixel -1: last position with an in-map corner
    (on_pixel(w, w), on_pixel(h - 1, h)),  # pixel W: just outside
    (on_pixel(2, w), on_pixel(1, h)),  # exactly on a pixel centre
    (on_pixel(w - 1, w), on_pixel(-0.5, h)),
  ]
  flat = grid.reshape(-1, 2)
  flat[: len(special)] = special
  return flat.reshape(grid.shape)


def test_grid_sample_matches_torch():
  rng = np.random.default_rng(0)
  b, h, w, c = 2, 4, 8, 3  # powers of two keep the border points exact
  feat = rng.standard_normal((b, h, w, c)).astype(np.float32)
  grid = _grid_points(rng, b, 5, 6, h, w)
  cot = rng.standard_normal((b, 5, 6, c)).astype(np.float32)
  jr = _jax_value_and_grads(grid_sample, (feat, grid), cot)
  tr = _torch_value_and_grads(
    lambda f, g: ref.grid_sample(f.permute(0, 3, 1, 2), g).permute(0, 2, 3, 1),
    (feat, grid),
    cot,
  )
  _assert_all_close(jr, tr, ('feat', 'grid'))
  assert np.abs(jr[0]).max() > 0.5  # not trivially zero


def test_grid_sample_inf_and_nan_points_read_zero():
  feat = jnp.ones((1, 3, 3, 2))
  grid = jnp.array([[[[jnp.inf, 0.0], [0.0, -jnp.inf], [jnp.nan, 0.0], [0.0, 0.0]]]])
  out, vjp = jax.vjp(grid_sample, feat, grid)
  np.testing.assert_array_equal(np.asarray(out[0, 0, :3]), 0.0)
  np.testing.assert_allclose(np.asarray(out[0, 0, 3]), 1.0)
  d_feat, d_grid = vjp(jnp.ones_like(out))
  assert np.isfinite(np.asarray(d_grid)).all() and np.isfinite(np.asarray(d_feat)).all()


def test_grid_sample_bfloat16_close_to_float32():
  rng = np.random.default_rng(1)
  feat = jnp.asarray(rng.standard_normal((1, 6, 7, 4)), jnp.float32)
  grid = jnp.asarray(rng.uniform(-1.1, 1.1, (1, 3, 5, 2)), jnp.float32)
  out32 = grid_sample(feat, grid)
  out16 = jax.jit(grid_sample)(feat.astype(jnp.bfloat16), grid.astype(jnp.bfloat16))
  assert out16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out16, np.float32), np.asarray(out32), atol=BF16_ATOL)


# ---------------------------------------------------------------------------------------------
# multi-scale deformable attention

SHAPES = ((4, 8), (2, 4), (1, 2))  # powers of two keep the border points exact


def _msda_inputs(rng, b=2, q=9, heads=3, dh=4, points=3):
  levels = len(SHAPES)
  length = sum(h * w for h, w in SHAPES)
  value = rng.standard_normal((b, length, heads, dh)).astype(np.float32)
  loc = rng.uniform(-0.2, 1.2, (b, q, heads, levels, points, 2)).astype(np.float32)
  # (x, y) in [0, 1] whose pixel coordinate x * w - 0.5 is exactly k (for level 0, w = 8, h = 4).
  on_pixel = lambda k, size: (k + 0.5) / size
  special = [
    (1e5, 0.5),
    (0.5, -1e5),
    (1e30, -1e30),  # behind-camera style projections
    (0.0, 1.0),  # the outer edges
    (on_pixel(-1, 8), on_pixel(0, 4)),
    (on_pixel(8, 8), on_pixel(3, 4)),
    (on_pixel(3, 8), on_pixel(1, 4)),
    (on_pixel(7, 8), on_pixel(-0.5, 4)),
  ]
  for i, xy in enumerate(special):
    loc[i % b, i % q, i % heads, 0, i % points] = xy
  aw = rng.uniform(0, 1, (b, q, heads, levels, points)).astype(np.float32)
  return value, loc, aw


@pytest.mark.parametrize('chunk_queries', [None, 4])  # 4 does not divide Q = 9
def test_ms_deform_attn_matches_torch(chunk_queries):
  rng = np.random.default_rng(2)
  value, loc, aw = _msda_inputs(rng)
  cot = rng.standard_normal((2, 9, 12)).astype(np.float32)
  jr = _jax_value_and_grads(
    lambda v, loc_, a: ms_deform_attn(v, SHAPES, loc_, a, chunk_queries=chunk_queries),
    (value, loc, aw),
    cot,
  )
  tr = _torch_value_and_grads(
    lambda v, loc_, a: ref.ms_deform_attn(v, SHAPES, loc_, a), (value, loc, aw), cot
  )
  _assert_all_close(jr, tr, ('value', 'sampling_locations', 'attention_weights'))
  assert np.abs(jr[1][1]).max() > 1.0  # location gradients are exercised


def test_ms_deform_attn_infinite_points_equal_far_points():
  rng = np.random.default_rng(3)
  value, loc, aw = _msda_inputs(rng, b=1, q=4, heads=2, dh=4, points=2)
  far, inf = loc.copy(), loc.copy()
  far[0, :2, 0, 0, 0] = [[1e30, 0.5], [0.5, -1e30]]
  inf[0, :2, 0, 0, 0] = [[np.inf, 0.5], [0.5, -np.inf]]
  cot = rng.standard_normal((1, 4, 8)).astype(np.float32)
  fn = lambda v, loc_, a: ms_deform_attn(v, SHAPES, loc_, a)
  (of, gf), (oi, gi) = (_jax_value_and_grads(fn, (value, x, aw), cot) for x in (far, inf))
  np.testing.assert_array_equal(oi, of)
  for a, b in zip(gi, gf, strict=True):
    np.testing.assert_array_equal(a, b)


def test_ms_deform_attn_bfloat16_close_to_float32():
  rng = np.random.default_rng(4)
  value, loc, aw = _msda_inputs(rng)
  cot = rng.standard_normal((2, 9, 12)).astype(np.float32)

  def run(dtype):
    fn = lambda v, loc_, a: ms_deform_attn(v, SHAPES, loc_, a)
    out, vjp = jax.vjp(jax.jit(fn), *(jnp.asarray(x, dtype) for x in (value, loc, aw)))
    return out, vjp(jnp.asarray(cot, dtype))

  out32, g32 = run(jnp.float32)
  out16, g16 = run(jnp.bfloat16)
  assert out16.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in g16)
  np.testing.assert_allclose(np.asarray(out16, np.float32), np.asarray(out32), atol=BF16_ATOL)
  # Value and weight gradients; location gradients flip cells where bfloat16 moves a point.
  for a, b in zip(g16[::2], g32[::2], strict=True):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b), atol=BF16_ATOL)


def test_ms_deform_attn_rejects_bad_shapes():
  value = jnp.zeros((1, 10, 2, 4))
  with pytest.raises(ValueError, match='spatial_shapes'):
    ms_deform_attn(value, ((3, 3),), jnp.zeros((1, 2, 2, 1, 1, 2)), jnp.zeros((1, 2, 2, 1, 1)))


# ---------------------------------------------------------------------------------------------
# modulated deformable convolution


def _dcn_inputs(rng, b=2, h=4, w=8, cin=3, cout=5, stride=1, padding=1, dilation=1):
  ho = (h + 2 * padding - 2 * dilation - 1) // stride + 1
  wo = (w + 2 * padding - 2 * dilation - 1) // stride + 1
  x = rng.standard_normal((b, h, w, cin)).astype(np.float32)
  offset = (1.5 * rng.standard_normal((b, ho, wo, 18))).astype(np.float32)
  # Far outside, and sample positions exactly on integers / on the -1 and H borders (tap 0 of
  # output (0, 0) samples at (-padding + dy, -padding + dx)).
  offset[0, 0, 0, 0:2] = [1e5, -1e30]
  offset[0, 0, 1, 2:4] = [-1e5, 0.0]
  offset[1, 0, 0, 0:2] = [padding - 1.0, padding + 2.0]  # y = -1, x = 2
  offset[1, 0, 1, 0:2] = [padding + h, 0.0]  # y = H
  offset[1, 1, 1, 8:10] = [1.0, -1.0]  # centre tap, integer shift
  mask = rng.uniform(0, 1, (b, ho, wo, 9)).astype(np.float32)
  kernel = (rng.standard_normal((3, 3, cin, cout)) / np.sqrt(9 * cin)).astype(np.float32)
  return x, offset, mask, kernel, (b, ho, wo, cout)


def _torch_dcn(stride, padding, dilation):
  def fn(x, offset, mask, kernel):
    out = ref.modulated_deform_conv2d(
      x.permute(0, 3, 1, 2),
      offset.permute(0, 3, 1, 2),
      mask.permute(0, 3, 1, 2),
      kernel.permute(3, 2, 0, 1),
      stride,
      padding,
      dilation,
    )
    return out.permute(0, 2, 3, 1)

  return fn


@pytest.mark.parametrize('stride,padding,dilation', [(1, 1, 1), (2, 2, 2)])
def test_modulated_deform_conv_matches_torch(stride, padding, dilation):
  rng = np.random.default_rng(5)
  *arrays, out_shape = _dcn_inputs(rng, stride=stride, padding=padding, dilation=dilation)
  cot = rng.standard_normal(out_shape).astype(np.float32)
  fn = lambda x, o, m, k: modulated_deform_conv2d(x, o, m, k, stride, padding, dilation)
  jr = _jax_value_and_grads(fn, arrays, cot)
  tr = _torch_value_and_grads(_torch_dcn(stride, padding, dilation), arrays, cot)
  _assert_all_close(jr, tr, ('x', 'offset', 'mask', 'kernel'))
  assert np.abs(jr[1][1]).max() > 0.1


def test_deform_conv_with_zero_offsets_is_a_plain_convolution():
  rng = np.random.default_rng(6)
  x, offset, mask, kernel, _ = _dcn_inputs(rng)
  out = modulated_deform_conv2d(x, np.zeros_like(offset), np.ones_like(mask), kernel)
  conv = jax.lax.conv_general_dilated(
    x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=('NHWC', 'HWIO', 'NHWC')
  )
  np.testing.assert_allclose(np.asarray(out), np.asarray(conv), **F32)


def test_deform_conv_bfloat16_close_to_float32():
  rng = np.random.default_rng(7)
  x, offset, mask, kernel, _ = _dcn_inputs(rng)
  offset = np.clip(offset, -3, 3)
  cot = rng.standard_normal((2, 4, 8, 5)).astype(np.float32)
  # Inputs that bfloat16 holds exactly: rounding the offsets would move the samples, and with
  # them the offset gradient (a bilinear slope, discontinuous at pixel borders).
  arrays = [np.asarray(jnp.asarray(a, jnp.bfloat16), np.float32) for a in (x, offset, mask, kernel)]
  out32, grads32 = _jax_value_and_grads(modulated_deform_conv2d, arrays, cot)
  out16, grads16 = _jax_value_and_grads(
    modulated_deform_conv2d, [a.astype(jnp.bfloat16) for a in arrays], cot.astype(jnp.bfloat16)
  )
  assert out16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out16, np.float32), out32, atol=BF16_ATOL)
  for name, g16, g32 in zip(('x', 'offset', 'mask', 'kernel'), grads16, grads32, strict=True):
    # Sampling and the input gradient's scatter-add run in float32 whatever the dtype.
    scale = np.abs(g32).max()
    err = np.abs(np.asarray(g16, np.float32) - g32).max() / scale
    assert err < 0.01, (name, err)
