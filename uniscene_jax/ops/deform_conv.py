"""Modulated deformable convolution (DCNv2, deform_groups = 1), model spec 4, channel-last."""

import jax
import jax.numpy as jnp
from jax import lax

from uniscene_jax.ops import bilinear


def modulated_deform_conv2d(
  x: jnp.ndarray,
  offset: jnp.ndarray,
  mask: jnp.ndarray,
  kernel: jnp.ndarray,
  stride: int = 1,
  padding: int = 1,
  dilation: int = 1,
) -> jnp.ndarray:
  """DCNv2 as mmcv's `modulated_deform_conv2d` (no bias).

  out[p, q] = sum over taps k = i * kw + j and input channels of
  kernel[i, j] * mask_k * bilinear(x, y_s, x_s), with y_s = p * stride - padding + i * dilation
  + dy_k and x_s = q * stride - padding + j * dilation + dx_k. A sample is zero unless
  -1 < y_s < H and -1 < x_s < W; inside that range corners off the map count as zero.

  Args:
    x: [B, H, W, Cin].
    offset: [B, H', W', 2K], mmcv channel order: 2k = dy, 2k + 1 = dx of tap k.
    mask: [B, H', W', K] modulation (already through the sigmoid).
    kernel: [kh, kw, Cin, Cout] (HWIO).
    stride, padding, dilation: as for a plain convolution; H' and W' must match them.

  Returns:
    [B, H', W', Cout] in x.dtype; sampling and the contraction's sum are in float32.

  The taps run as a loop whose backward recomputes each tap's samples, so neither pass holds
  more than one tap's gathered columns, and what the forward keeps for the backward is about the
  size of x in float32 plus a few numbers per tap and output pixel.
  """
  b, h, w, cin = x.shape
  kh, kw, kcin, cout = kernel.shape
  taps = kh * kw
  ho = (h + 2 * padding - dilation * (kh - 1) - 1) // stride + 1
  wo = (w + 2 * padding - dilation * (kw - 1) - 1) // stride + 1
  if kcin != cin:
    raise ValueError(f'kernel {kernel.shape} expects {kcin} input channels, x has {cin}')
  if offset.shape != (b, ho, wo, 2 * taps) or mask.shape != (b, ho, wo, taps):
    raise ValueError(
      f'offset {offset.shape} / mask {mask.shape} must be {(b, ho, wo, 2 * taps)} / '
      f'{(b, ho, wo, taps)} for x {x.shape}, kernel {kernel.shape}, stride {stride}'
    )
  off = offset.astype(jnp.float32).reshape(b, ho, wo, taps, 2)
  tap_i = jnp.repeat(jnp.arange(kh), kw).astype(jnp.float32)  # [K]
  tap_j = jnp.tile(jnp.arange(kw), kh).astype(jnp.float32)
  rows = (jnp.arange(ho) * stride - padding).astype(jnp.float32)
  cols = (jnp.arange(wo) * stride - padding).astype(jnp.float32)
  ys = rows[:, None, None] + dilation * tap_i + off[..., 0]  # [B, H', W', K]
  xs = cols[None, :, None] + dilation * tap_j + off[..., 1]
  region = (ys > -1) & (ys < h) & (xs > -1) & (xs < w)
  ys, _ = bilinear.clamp_coordinate(ys, h)
  xs, _ = bilinear.clamp_coordinate(xs, w)
  iy, fy = bilinear.axis_corners(ys)
  ix, fx = bilinear.axis_corners(xs)
  wp = w + bilinear.PAD_LO + bilinear.PAD_HI
  hp = h + bilinear.PAD_LO + bilinear.PAD_HI
  # The table is read in float32 so that the scatter-add of the input gradient accumulates in
  # float32 too (bfloat16 sums of the 36 corner contributions lose a few times more).
  table = bilinear.pad_map(x, (1, 2)).reshape(b, hp * wp, cin).astype(jnp.float32)
  base = iy * wp + ix  # row of the top-left corner in its own image's padded map
  mod = mask.astype(jnp.float32) * region
  per_tap = tuple(jnp.moveaxis(a, -1, 0) for a in (base, fx, fy, mod))  # [K, B, H', W'] each
  kernels = kernel.reshape(taps, cin, cout).astype(x.dtype)  # row k = i * kw + j

  # One tap's contribution, recomputed in the backward from its per-tap inputs: the backward
  # then holds one tap's sampled columns ([B, H', W', Cin]) at a time, and the forward keeps
  # nothing of them. It takes no running sum, so the loop keeps no per-tap copy of one either.
  # (Inside a loop the residuals are chosen when JAX differentiates the loop, so this holds on
  # XLA:CPU too, unlike `jax.checkpoint` in straight-line code; see models.remat.)
  @jax.checkpoint
  def tap(inputs):
    bk, fxk, fyk, mk, kk = inputs
    fxk, fyk, mk = fxk[..., None], fyk[..., None], mk[..., None]
    # Rows of each image's own table (a gather with the batch as a batching dimension), so
    # that with the batch sharded over devices every device samples only its own images.
    rows = lambda r: jax.vmap(lambda t, i: t[i])(table, r)  # noqa: E731
    top = (1 - fxk) * rows(bk) + fxk * rows(bk + 1)
    bottom = (1 - fxk) * rows(bk + wp) + fxk * rows(bk + wp + 1)
    col = (mk * ((1 - fyk) * top + fyk * bottom)).astype(x.dtype)
    return lax.dot_general(col, kk, (((3,), (0,)), ((), ())), preferred_element_type=jnp.float32)

  # A loop, not nine unrolled taps: XLA compiles one tap instead of nine (the unrolled forward
  # and backward are about 2,000 operations per convolution, each R101 DCN block has one). The
  # sum starts from zeros computed per pixel from the (always finite) sampling fractions, not
  # from a constant, which XLA would allocate at the start of the program, nor from one element
  # of the batch, which would be sent to every device when the batch is sharded.
  out, _ = lax.scan(
    lambda acc, inputs: (acc + tap(inputs), None),
    jnp.zeros((b, ho, wo, cout), jnp.float32) + 0 * fx[..., :1],
    per_tap + (kernels,),
  )
  return out.astype(x.dtype)
