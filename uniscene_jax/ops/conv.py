"""2-D convolution whose backward XLA:CPU runs at full speed inside loops.

Autodiff writes a convolution's gradients as two more convolutions with permuted dimension
numbers (the input gradient with the kernel's I and O swapped, the kernel gradient with the
channels as the batch). XLA:CPU's fast convolution kernels take only the canonical layout (batch,
spatial, feature; kernel spatial, in, out), and it rewrites the others into it in a pass that
reaches straight-line code but not the body of a loop. Inside a `lax.scan` (the backbone's blocks
under remat) the gradients then run on the generic loop emitter: measured 30x and more slower at
6 x 58 x 100 x 256 (a R101 layer3 block). Here the backward is written with the transposes made
explicit, so every convolution of it is canonical wherever it runs; values are autodiff's.

`conv_general_dilated` has `lax.conv_general_dilated`'s signature (so that `flax.linen.Conv` can
take it) and uses the explicit backward for NHWC / HWIO convolutions with unit strides and
dilations and no feature groups (every convolution of a ResNet block after the first of its
stage); anything else goes to `lax.conv_general_dilated` unchanged.
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

_NHWC = ('NHWC', 'HWIO', 'NHWC')


def _is_nhwc_hwio(dimension_numbers, ndim: int) -> bool:
  if ndim != 4 or dimension_numbers is None:
    return False
  canonical = lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), _NHWC)
  given = lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), dimension_numbers)
  return given == canonical


def _pairs(padding, kernel_hw: Sequence[int]) -> tuple[tuple[int, int], ...] | None:
  """Explicit (low, high) padding per spatial dimension for unit strides, or None."""
  if padding == 'VALID':
    return ((0, 0),) * len(kernel_hw)
  if padding == 'SAME':
    return tuple(((k - 1) // 2, k - 1 - (k - 1) // 2) for k in kernel_hw)
  if isinstance(padding, str):
    return None
  return tuple((int(lo), int(hi)) for lo, hi in padding)


def conv_general_dilated(
  lhs,
  rhs,
  window_strides,
  padding,
  lhs_dilation=None,
  rhs_dilation=None,
  dimension_numbers=None,
  feature_group_count=1,
  batch_group_count=1,
  precision=None,
  preferred_element_type=None,
):
  """`lax.conv_general_dilated`, with a loop-friendly backward where it applies (see above)."""
  ones = (1,) * (lhs.ndim - 2)
  pads = _pairs(padding, rhs.shape[:2]) if lhs.ndim == 4 else None
  simple = (
    _is_nhwc_hwio(dimension_numbers, lhs.ndim)
    and tuple(window_strides) == ones
    and tuple(lhs_dilation or ones) == ones
    and tuple(rhs_dilation or ones) == ones
    and feature_group_count == 1
    and batch_group_count == 1
    and preferred_element_type is None
    and pads is not None
  )
  if not simple:  # lax's own, same arguments in the same order
    return lax.conv_general_dilated(
      lhs,
      rhs,
      window_strides,
      padding,
      lhs_dilation,
      rhs_dilation,
      dimension_numbers,
      feature_group_count,
      batch_group_count,
      precision,
      preferred_element_type,
    )
  return conv2d(lhs, rhs, pads, precision)


def _conv(x, kernel, pads, precision):
  return lax.conv_general_dilated(
    x, kernel, (1, 1), pads, dimension_numbers=_NHWC, precision=precision
  )


def conv2d(x, kernel, pads=((1, 1), (1, 1)), precision=None):
  """x [N, H, W, I] * kernel [KH, KW, I, O], unit strides, explicit (low, high) `pads`."""
  return _conv2d(x, kernel, tuple((int(lo), int(hi)) for lo, hi in pads), precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv2d(x, kernel, pads, precision):
  return _conv(x, kernel, pads, precision)


def _conv2d_fwd(x, kernel, pads, precision):
  return _conv(x, kernel, pads, precision), (x, kernel)


def _conv2d_bwd(pads, precision, residuals, g):
  x, kernel = residuals
  kh, kw = kernel.shape[:2]
  g = g.astype(x.dtype)
  # Input gradient: g convolved with the spatially flipped kernel, I and O swapped.
  flipped = jnp.flip(kernel, (0, 1)).swapaxes(2, 3)
  back = ((kh - 1 - pads[0][0], kh - 1 - pads[0][1]), (kw - 1 - pads[1][0], kw - 1 - pads[1][1]))
  dx = _conv(g, flipped, back, precision)
  # Kernel gradient: the input's channels as the batch, g's images as its input channels.
  dk = _conv(x.transpose(3, 1, 2, 0), g.transpose(1, 2, 0, 3), pads, precision)
  return dx, dk.transpose(1, 2, 0, 3).astype(kernel.dtype)


_conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)
