"""The deformable convolution keeps for its backward about its input, not its gathered samples."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uniscene_jax.ops.deform_conv import modulated_deform_conv2d


def _saved_bytes(fn, *args) -> int:
  """Bytes of the residuals the forward pass hands to the backward."""
  _, pullback = jax.vjp(fn, *args)
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(pullback) if hasattr(x, 'size'))


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_deform_conv_saves_no_gathered_samples(dtype):
  rng = np.random.default_rng(0)
  b, h, w, cin, cout, taps = 2, 9, 11, 64, 8, 9
  x = jnp.asarray(rng.normal(size=(b, h, w, cin)), dtype)
  offset = jnp.asarray(2 * rng.normal(size=(b, h, w, 2 * taps)), dtype)
  mask = jnp.asarray(rng.uniform(size=(b, h, w, taps)), dtype)
  kernel = jnp.asarray(rng.normal(size=(3, 3, cin, cout)), dtype)
  saved = _saved_bytes(modulated_deform_conv2d, x, offset, mask, kernel)
  # The zero-padded input in float32, the kernel, and a few float32 numbers per tap and output
  # pixel (positions, weights, masks). Autodiff of the sampling keeps every tap's four gathered
  # corner maps, 36 x [B, H, W, Cin]: 5 (bfloat16) to 10 (float32) times this bound here.
  padded = b * (h + 3) * (w + 3) * cin * 4
  per_tap = b * h * w * taps * 4
  bound = padded + kernel.size * 4 + 12 * per_tap
  assert saved <= bound, (saved, bound)
  corners = 4 * taps * b * h * w * cin * x.dtype.itemsize
  assert corners > 4 * bound  # the bound tells the two apart
