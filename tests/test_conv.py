"""The loop-friendly convolution: autodiff's values and gradients, canonical backward in loops."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from uniscene_jax.ops import conv

DN = ('NHWC', 'HWIO', 'NHWC')


def _loss(fn, pads):
  def loss(x, k, w):
    return jnp.sum(jnp.sin(fn(x, k, pads)) * w)

  return loss


def _ours(x, k, pads):
  return conv.conv_general_dilated(x, k, (1, 1), pads, dimension_numbers=DN)


def _lax(x, k, pads):
  return lax.conv_general_dilated(x, k, (1, 1), pads, dimension_numbers=DN)


@pytest.mark.parametrize('kernel_grad', ['convolution', 'tap dots'])
@pytest.mark.parametrize(
  'kernel,pads',
  [((1, 1), 'VALID'), ((3, 3), ((1, 1), (1, 1))), ((3, 3), 'SAME'), ((3, 2), ((2, 0), (0, 1)))],
)
def test_values_and_gradients_equal_autodiff(kernel, pads, kernel_grad, monkeypatch):
  # The kernel gradient's two ways, chosen by channel count: both are checked at small sizes.
  taps = kernel_grad == 'tap dots'
  monkeypatch.setattr(conv, 'TAP_DOTS_RULES', ((1, 1),) if taps else ())
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 9, 11, 5)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(*kernel, 5, 7)), jnp.float32)
  out = _lax(x, k, pads)
  w = jnp.asarray(rng.normal(size=out.shape), jnp.float32)
  np.testing.assert_allclose(_ours(x, k, pads), out, rtol=1e-5, atol=1e-5)
  got = jax.grad(_loss(_ours, pads), argnums=(0, 1))(x, k, w)
  want = jax.grad(_loss(_lax, pads), argnums=(0, 1))(x, k, w)
  for a, b in zip(got, want, strict=True):
    assert a.shape == b.shape and float(jnp.abs(b).max()) > 0.1
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
  'kernel,pads',
  [
    ((3, 3, 3), ((1, 1), (1, 1), (1, 1))),
    ((3, 3, 3), 'SAME'),
    ((2, 3, 1), ((0, 2), (1, 0), (0, 0))),
    ((1, 1, 1), 'VALID'),
  ],
)
def test_3d_values_and_gradients_equal_autodiff(kernel, pads):
  # A 3-D convolution's forward runs as a 2-D one over depth slices, the depth taps as channels.
  dn = ('NDHWC', 'DHWIO', 'NDHWC')
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(2, 5, 6, 7, 3)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(*kernel, 3, 4)), jnp.float32)

  def ours(x, k):
    return conv.conv_general_dilated(x, k, (1, 1, 1), pads, dimension_numbers=dn)

  def plain(x, k):
    return lax.conv_general_dilated(x, k, (1, 1, 1), pads, dimension_numbers=dn)

  _assert_values_and_gradients_equal(ours, plain, x, k, rng)
  # The forward runs no 3-D convolution (XLA:CPU's is 3-7x slower than torch's).
  hlo = jax.jit(ours).lower(x, k).compile().as_text()
  assert not re.findall(r'convolution\(.*?dim_labels=\S*012', hlo)


def _assert_values_and_gradients_equal(ours, plain, x, k, rng):
  want = plain(x, k)
  np.testing.assert_allclose(ours(x, k), want, rtol=1e-5, atol=1e-5)
  w = jnp.asarray(rng.normal(size=want.shape), jnp.float32)
  got = jax.grad(lambda x, k: jnp.sum(jnp.sin(ours(x, k)) * w), (0, 1))(x, k)
  ref = jax.grad(lambda x, k: jnp.sum(jnp.sin(plain(x, k)) * w), (0, 1))(x, k)
  for a, b in zip(got, ref, strict=True):
    assert a.shape == b.shape and float(jnp.abs(b).max()) > 0.1
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_bfloat16_and_the_lax_fallback():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(1, 8, 8, 4)), jnp.bfloat16)
  k = jnp.asarray(rng.normal(size=(3, 3, 4, 4)), jnp.bfloat16)
  gx, gk = jax.grad(lambda x, k: jnp.sum(_ours(x, k, 'SAME').astype(jnp.float32)), (0, 1))(x, k)
  assert gx.dtype == jnp.bfloat16 and gk.dtype == jnp.bfloat16
  ref = jax.grad(lambda x, k: jnp.sum(_lax(x, k, 'SAME').astype(jnp.float32)), (0, 1))(x, k)
  np.testing.assert_allclose(np.float32(gk), np.float32(ref[1]), rtol=2e-2, atol=0.1)
  # Strided: lax's own convolution and gradient.
  strided = conv.conv_general_dilated(x, k, (2, 2), 'SAME', dimension_numbers=DN)
  want = lax.conv_general_dilated(x, k, (2, 2), 'SAME', dimension_numbers=DN)
  np.testing.assert_array_equal(np.float32(strided), np.float32(want))


def test_backward_inside_a_scan_uses_only_canonical_convolutions():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(2, 12, 12, 8)), jnp.float32)
  ks = jnp.asarray(rng.normal(size=(3, 3, 3, 8, 8)) * 0.2, jnp.float32)

  def loss(fn):
    def f(ks, x):
      x, _ = lax.scan(lambda x, k: (jax.nn.relu(fn(x, k, ((1, 1), (1, 1)))), None), x, ks)
      return jnp.sum(x**2)

    return jax.jit(jax.grad(f, argnums=(0, 1)))

  ours, plain = loss(_ours), loss(_lax)
  for a, b in zip(ours(ks, x), plain(ks, x), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)

  def layouts(fn):
    hlo = fn.lower(ks, x).compile().as_text()
    return set(re.findall(r'convolution\(.*?dim_labels=(\S+?),', hlo))

  # XLA:CPU's fast kernels take b01f_01io->b01f only; autodiff's backward in a loop is not.
  assert layouts(ours) <= {'b01f_01io->b01f'}
  assert layouts(plain) - {'b01f_01io->b01f'}  # what this module exists for


@pytest.mark.parametrize('strides,pads', [((1, 1), 'SAME'), ((2, 2), 'VALID'), ((2, 1), 'SAME')])
def test_pointwise_convolution_is_a_dot_with_lax_values_and_gradients(strides, pads):
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(2, 9, 11, 5)), jnp.float32)  # odd sizes: strided edges
  k = jnp.asarray(rng.normal(size=(1, 1, 5, 7)), jnp.float32)

  def ours(x, k):
    return conv.conv_general_dilated(x, k, strides, pads, dimension_numbers=DN)

  def plain(x, k):
    return lax.conv_general_dilated(x, k, strides, pads, dimension_numbers=DN)

  _assert_values_and_gradients_equal(ours, plain, x, k, rng)
  hlo = jax.jit(jax.grad(lambda x, k: jnp.sum(ours(x, k) ** 2), (0, 1))).lower(x, k).as_text()
  assert 'convolution' not in hlo and 'dot_general' in hlo
