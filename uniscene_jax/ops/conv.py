"""Convolutions for XLA:CPU: a 2-D backward that runs at full speed in loops, 1 x 1 kernels as
dots, 3-D convolutions as 2-D ones.

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
1.7 s at those sizes). The tap dots are used from 128 channels on both sides at 4096 output pixels
per image, and from 16 channels at 16384 pixels (`TAP_DOTS_RULES`). Below, XLA's convolution is
often as fast or faster, but erratically so (6 x 48 x 80 x 128: 93-156 ms against 110-123 ms;
24 x 64 x 104, 16 channels in: 16 ms against 36 with 16 out, 155 ms against 46 with 27 out), and
it stays. Above: 6 x 116 x 200, 64 channels: 1.31 s against 0.24 s; 16 x 200 x 200, 48 > 32
channels: 2.18 s against 0.47 s.

A 1 x 1 convolution is a matrix product over the channels, and XLA:CPU runs it 1.5-3x faster as
a dot than as a convolution, and its backward (two more dots) 3-6x faster than as the two
convolutions above (6 x 58 x 100, 1024 -> 256 channels: 143 ms against 401 forward, 387 ms against
1221 forward + backward), inside loops or not. More than half of a ResNet's convolutions are 1 x 1.

XLA:CPU's 3-D convolution has no fast kernel: 3-7x slower than torch's, forward and backward
(the occupancy head's 3 x 3 x 3 ones at 16 x 200 x 200, 16 > 32 channels: 0.65 s forward and
2.7 s forward + backward, torch 0.19 s and 0.92 s; at `:local`'s 16 x 50 x 50, 2 > 16: 30 ms and
98 ms, torch 4 and 14). Its forward here is a 2-D convolution over the output's depth slices
whose input channels are the kernel's depth taps side by side (the depth-padded input sliced KD
times and concatenated on channels): 0.27-0.34 s and 3 ms at those sizes. Its backward stays
lax's: the 2-D form's was twice as fast but needs the stacked taps and their gradient, which
raised the base train step's compiled peak (see `_conv3d_bwd`).

`conv_general_dilated` has `lax.conv_general_dilated`'s signature (so that `flax.linen.Conv` can
take it). For NHWC / HWIO convolutions with no dilation and no feature groups it uses a dot when the
kernel is 1 x 1 and unpadded (any stride: the input is subsampled first), and the explicit backward
when the strides are 1 (every other convolution of a ResNet block after the first of its stage);
NDHWC / DHWIO ones with unit strides (and no negative depth padding) go through the 2-D form;
anything else goes to `lax.conv_general_dilated` unchanged.
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from uniscene_jax.ops.data_zero import data_zero

_NHWC = ('NHWC', 'HWIO', 'NHWC')
_NDHWC = ('NDHWC', 'DHWIO', 'NDHWC')


def _is_channels_last(dimension_numbers, ndim: int) -> bool:
  """Whether the dimension numbers are NHWC / HWIO (4-D) or NDHWC / DHWIO (5-D)."""
  if ndim not in (4, 5) or dimension_numbers is None:
    return False
  ones = (1,) * ndim
  canonical = lax.conv_dimension_numbers(ones, ones, _NHWC if ndim == 4 else _NDHWC)
  return lax.conv_dimension_numbers(ones, ones, dimension_numbers) == canonical


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
  pads = _pairs(padding, rhs.shape[: lhs.ndim - 2]) if lhs.ndim in (4, 5) else None
  plain = (
    _is_channels_last(dimension_numbers, lhs.ndim)
    and tuple(lhs_dilation or ones) == ones
    and tuple(rhs_dilation or ones) == ones
    and feature_group_count == 1
    and batch_group_count == 1
    and pads is not None
  )
  if plain and lhs.ndim == 4 and rhs.shape[:2] == (1, 1) and pads == ((0, 0), (0, 0)):
    return pointwise(lhs, rhs, tuple(window_strides), precision, preferred_element_type)
  simple = plain and tuple(window_strides) == ones and preferred_element_type is None
  if simple and lhs.ndim == 5:
    simple = min(pads[0]) >= 0  # the depth taps are slices of the depth-padded input
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
  if lhs.ndim == 5:
    return conv3d(lhs, rhs, pads, precision)
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
  channels, pixels = min(kernel.shape[2:]), g.shape[1] * g.shape[2]
  taps = min(min(p) for p in pads) >= 0 and any(
    channels >= c and pixels >= n for c, n in TAP_DOTS_RULES
  )
  if taps:
    dk = _kernel_grad_by_taps(x, g, (kh, kw), pads, precision)
  else:
    # The input's channels as the batch, g's images as its input channels.
    dk = _conv(x.transpose(3, 1, 2, 0), g.transpose(1, 2, 0, 3), pads, precision)
    dk = dk.transpose(1, 2, 0, 3)
  return dx, dk.astype(kernel.dtype)


# (fewest input or output channels, fewest output pixels per image): the kernel gradient is
# computed by per-tap dots when any pair is met (measured on XLA:CPU, see above).
TAP_DOTS_RULES = ((128, 4096), (16, 16384))


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


def conv3d(x, kernel, pads=((1, 1), (1, 1), (1, 1)), precision=None):
  """x [N, D, H, W, I] * kernel [KD, KH, KW, I, O], unit strides, explicit (low, high) `pads`
  (the depth ones not negative): a 2-D convolution over the N x D' output slices whose input
  channels are the KD depth taps side by side (see above)."""
  return _conv3d(x, kernel, tuple((int(lo), int(hi)) for lo, hi in pads), precision)


def _depth_taps(x, kd: int, pad_d: tuple[int, int]):
  """[N, D, H, W, I] -> [N * D', H, W, KD * I]; channel t * I + i of output slice z is channel i of
  input slice z + t - pad_d[0] (zero outside)."""
  n, d = x.shape[:2]
  xp = jnp.pad(x, ((0, 0), pad_d, (0, 0), (0, 0), (0, 0)))
  out_d = d + pad_d[0] + pad_d[1] - kd + 1
  taps = [lax.slice_in_dim(xp, t, t + out_d, axis=1) for t in range(kd)]
  return jnp.concatenate(taps, axis=-1).reshape(n * out_d, *x.shape[2:4], kd * x.shape[-1])


def _planar_kernel(kernel):
  """[KD, KH, KW, I, O] -> [KH, KW, KD * I, O], the channel order of `_depth_taps`."""
  kd, kh, kw, i, o = kernel.shape
  return kernel.transpose(1, 2, 0, 3, 4).reshape(kh, kw, kd * i, o)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv3d(x, kernel, pads, precision):
  y = _conv(_depth_taps(x, kernel.shape[0], pads[0]), _planar_kernel(kernel), pads[1:], precision)
  return y.reshape(x.shape[0], -1, *y.shape[1:])


def _conv3d_fwd(x, kernel, pads, precision):
  return _conv3d(x, kernel, pads, precision), (x, kernel)


def _conv3d_bwd(pads, precision, residuals, g):
  # lax's own 3-D backward. The 2-D form's backward (the depth taps stacked, or one tap at a
  # time) was about 2x faster but raised the base train step's compiled peak by 0.66-0.9 GB
  # (bfloat16 7.76 -> 8.11 GB, over its 8 GB goal), as the head's backward runs at the peak.
  x, kernel = residuals
  _, vjp = jax.vjp(
    lambda x, k: lax.conv_general_dilated(
      x, k, (1, 1, 1), pads, dimension_numbers=_NDHWC, precision=precision
    ),
    x,
    kernel,
  )
  return vjp(g.astype(x.dtype))


_conv3d.defvjp(_conv3d_fwd, _conv3d_bwd)
