"""2-D convolution for XLA:CPU: a backward that runs at full speed in loops, 1 x 1 kernels as dots.

Autodiff writes a convolution's gradients as two more convolutions with permuted dimension
numbers (the input gradient with the kernel's I and O swapped, the kernel gradient with the
channels as the batch). XLA:CPU's fast convolution kernels take only the canonical layout (batch,
spatial, feature; kernel spatial, in, out), and it rewrites the others into it in a pass that
reaches straight-line code but not the body of a loop. Inside a `lax.scan` (the backbone's blocks
under remat) the gradients then run on the generic loop emitter: measured 30x and more slower at
6 x 58 x 100 x 256 (a R101 layer3 block). Here the backward is written with the transposes made
explicit, so every convolution of it is canonical wherever it runs; values are autodiff's.

That kernel gradient (a convolution whose "kernel" is the whole output gradient) is also XLA:CPU's
slowest convolution once the images are large: 2.5 s at 6 x 116 x 200 x 128 channels, 9.5 s at
256, 8-20x the forward. For wide channels on large images it is computed instead as one dot per
kernel tap over the rows of the flattened, padded input: with the output gradient laid on the same
padded grid (zeros outside the output), tap (i, j) pairs each output row with the input row
i * Wp + j further on, a contiguous slice, so no shifted copy of the input is gathered (0.6 s and
1.7 s at those sizes). Below 128 channels on either side or 4096 output pixels per image the
convolution is as fast or faster (6 x 48 x 80 x 128: 93 ms against 110; DCN's 27-channel offset
convolution), and it stays.

A 1 x 1 convolution is a matrix product over the channels, and XLA:CPU runs it 1.5-3x faster as
a dot than as a convolution, and its backward (two more dots) 3-6x faster than as the two
convolutions above (6 x 58 x 100, 1024 -> 256 channels: 143 ms against 401 forward, 387 ms against
1221 forward + backward), inside loops or not. More than half of a ResNet's convolutions are 1 x 1.

`conv_general_dilated` has `lax.conv_general_dilated`'s signature (so that `flax.linen.Conv` can
take it). For NHWC / HWIO convolutions with no dilation and no feature groups it uses a dot when the
kernel is 1 x 1 and unpadded (any stride: the input is subsampled first), and the explicit backward
when the strides are 1 (every other convolution of a ResNet block after the first of its stage);
anything else goes to `lax.conv_general_dilated` unchanged.
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from uniscene_jax.ops.data_zero import data_zero

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
  """`lax.conv_general_dilated`, as a dot or with a loop-friendly backward where it applies (see
  above)."""
  ones = (1,) * (lhs.ndim - 2)
  pads = _pairs(padding, rhs.shape[:2]) if lhs.ndim == 4 else None
  plain = (
    _is_nhwc_hwio(dimension_numbers, lhs.ndim)
    and tuple(lhs_dilation or ones) == ones
    and tuple(rhs_dilation or ones) == ones
    and feature_group_count == 1
    and batch_group_count == 1
    and pads is not None
  )
  if plain and rhs.shape[:2] == (1, 1) and pads == ((0, 0), (0, 0)):
    return pointwise(lhs, rhs, tuple(window_strides), precision, preferred_element_type)
  simple = plain and tuple(window_strides) == ones and preferred_element_type is None
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


def pointwise(x, kernel, strides=(1, 1), precision=None, preferred_element_type=None):
  """A 1 x 1 convolution as a dot: x [N, H, W, I], kernel [1, 1, I, O], output [N, H', W', O]."""
  sh, sw = strides
  return lax.dot_general(
    x[:, ::sh, ::sw],
    kernel[0, 0],
    (((3,), (0,)), ((), ())),
    precision=precision,
    preferred_element_type=preferred_element_type,
  )


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
  taps = (
    min(kernel.shape[2:]) >= TAP_DOTS_MIN_CHANNELS
    and g.shape[1] * g.shape[2] >= TAP_DOTS_MIN_PIXELS
    and min(min(p) for p in pads) >= 0
  )
  if taps:
    dk = _kernel_grad_by_taps(x, g, (kh, kw), pads, precision)
  else:
    # The input's channels as the batch, g's images as its input channels.
    dk = _conv(x.transpose(3, 1, 2, 0), g.transpose(1, 2, 0, 3), pads, precision)
    dk = dk.transpose(1, 2, 0, 3)
  return dx, dk.astype(kernel.dtype)


# From these input and output channels and output pixels per image, the kernel gradient is
# computed by per-tap dots (measured on XLA:CPU, see above).
TAP_DOTS_MIN_CHANNELS = 128
TAP_DOTS_MIN_PIXELS = 4096


def _kernel_grad_by_taps(x, g, kernel_hw, pads, precision):
  """d loss / d kernel [KH, KW, I, O] of a unit-stride convolution, one dot per tap (see above)."""
  kh, kw = kernel_hw
  xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  _, hp, wp, c = xp.shape
  _, ho, wo, o = g.shape
  g_rows = jnp.pad(g, ((0, 0), (0, hp - ho), (0, wp - wo), (0, 0))).reshape(-1, o)
  m = g_rows.shape[0]
  # Rows past the last image, so that every tap's slice has m rows (they meet zero g rows).
  x_rows = jnp.pad(xp.reshape(-1, c), ((0, (kh - 1) * wp + kw - 1), (0, 0)))
  # Each tap's slice is a copy. Chained by a zero from the previous tap's result (the first
  # from g), each is made just before its dot and freed after it: without the chain XLA makes
  # all of them as soon as x exists, kh * kw copies of x held across the rest of the backward.
  taps, after = [], g_rows
  for i in range(kh):
    for j in range(kw):
      rows = lax.slice_in_dim(x_rows, i * wp + j, i * wp + j + m)
      rows = rows + data_zero(after).astype(rows.dtype)
      after = lax.dot_general(rows, g_rows, (((0,), (0,)), ((), ())), precision=precision)
      taps.append(after)
  return jnp.stack(taps).reshape(kh, kw, c, o)


_conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)
