"""The backbone's memory-saving pieces equal what they replace."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uniscene_jax.models.backbone import deform_conv_recomputed
from uniscene_jax.ops.deform_conv import modulated_deform_conv2d


@pytest.mark.parametrize('stride', [1, 2])
def test_recomputed_deform_conv_equals_autodiff(stride):
  rng = np.random.default_rng(0)
  b, h, w, cin, cout = 2, 9, 11, 5, 7
  ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
  x = rng.normal(size=(b, h, w, cin)).astype(np.float32)
  offset = (2 * rng.normal(size=(b, ho, wo, 18))).astype(np.float32)
  mask = rng.uniform(size=(b, ho, wo, 9)).astype(np.float32)
  kernel = rng.normal(size=(3, 3, cin, cout)).astype(np.float32)
  g = rng.normal(size=(b, ho, wo, cout)).astype(np.float32)

  def vjp(fn):
    out, pullback = jax.vjp(lambda *a: fn(*a, stride, 1, 1), x, offset, mask, kernel)
    return out, pullback(jnp.asarray(g))

  want, want_grads = jax.jit(lambda: vjp(modulated_deform_conv2d))()
  for per_image in (False, True):
    fn = functools.partial(deform_conv_recomputed, per_image=per_image)
    got, got_grads = jax.jit(lambda fn=fn: vjp(fn))()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    for a, e in zip(got_grads, want_grads, strict=True):
      np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-5)
