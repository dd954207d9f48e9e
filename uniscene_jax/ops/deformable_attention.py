"""Multi-scale deformable attention (MSDA) with a hand-written backward.

Semantics are mmcv's `multi_scale_deformable_attn_pytorch` (model spec 7.4): for each level, head
and point, the value map is sampled bilinearly at pixel (x * w - 0.5, y * h - 0.5) with zero
padding, and the samples are weighted by the attention weights and summed over levels and points.

Layout. Each (sample, head) map, all levels zero-padded (ops.bilinear) and concatenated, is one
contiguous block of a table whose rows are padded pixels and whose columns are the Dh channels.
Every bilinear corner is then one row, the four corners of a sample sit at rows r, r + 1, r + Wp
and r + Wp + 1, and no index can leave the table whatever the location (clamped first).

Forward. A loop over the (sample, head) maps, so one map (about 4 MB for an SCA camera) stays in
cache while all its queries are processed; inside, a fully unrolled `fori_loop` over the static
(level, point) samples gathers the four corner rows and accumulates them with explicit adds. Keeping
the sum free of `reduce` ops matters on CPU: XLA hands large reductions to a library kernel, which
would make it materialise every gathered row (5 GB for one SCA camera) instead of fusing the gather
into the accumulation.

Backward (jax.custom_vjp; nothing but the inputs is saved). A loop over (map, query chunk)
steps. Per step the four corner rows of every sample are gathered once; their dot products with
the output gradient (one small batched contraction) give the attention-weight gradient (bilinear
weights x dots) and the location gradient (weight derivatives x dots, zero where the clamp acts).
The value gradient is the transposed sampling: a scatter-add of (bilinear weight x attention
weight x output gradient) into a padded table carried by the loop and updated in place. Chunks of
2**14 corner rows keep each step's gathered rows and scatter updates cache-sized; one scatter over
the whole problem instead spends most of its time writing and page-faulting a multi-gigabyte
update array (that, and autodiff's four separate scatters, is why the plain autodiff backward is
3-4x slower than PyTorch).
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from uniscene_jax.ops import bilinear
from uniscene_jax.ops.batch_parallel import over_batch
from uniscene_jax.ops.data_zero import data_zero


def ms_deform_attn(
  value: jnp.ndarray,
  spatial_shapes,
  sampling_locations: jnp.ndarray,
  attention_weights: jnp.ndarray,
  *,
  chunk_queries: int | None = None,
) -> jnp.ndarray:
  """Multi-scale deformable attention.

  Args:
    value: [B, L, heads, Dh], L = sum of h * w over the levels (level-major, row-major inside).
    spatial_shapes: ((h, w), ...) per level, static Python ints.
    sampling_locations: [B, Q, heads, levels, points, 2], (x, y) normalised to [0, 1]; any finite
      or infinite value is allowed (points outside the maps read zeros).
    attention_weights: [B, Q, heads, levels, points].
    chunk_queries: queries per backward step (default: 2**14 sampled corner rows per step).

  Returns:
    [B, Q, heads * Dh] in value.dtype, channel = head * Dh + d; accumulated in float32.
  """
  shapes = tuple((int(h), int(w)) for h, w in spatial_shapes)
  b, length, heads, dh = value.shape
  _, q, _, levels, points, two = sampling_locations.shape
  if length != sum(h * w for h, w in shapes):
    raise ValueError(
      f'value has {length} tokens; spatial_shapes {shapes} need {sum(h * w for h, w in shapes)}'
    )
  if levels != len(shapes) or two != 2:
    raise ValueError(
      f'sampling_locations {sampling_locations.shape} must be [B, Q, heads, {len(shapes)}, P, 2]'
    )
  if attention_weights.shape != (b, q, heads, levels, points):
    raise ValueError(
      f'attention_weights {attention_weights.shape} must be {(b, q, heads, levels, points)}'
    )
  if chunk_queries is None:
    chunk_queries = max(1, (1 << 14) // (levels * points * 4))
  msda = over_batch(functools.partial(_msda, shapes, int(chunk_queries)))
  out = msda(value, sampling_locations, attention_weights)
  return out.reshape(b, q, heads * dh)


def _table(value, shapes):
  """value [B, L, heads, Dh] -> (padded head-major table [B * heads * Lp, Dh], level offsets, Lp).

  Head-major rows keep one (sample, head) map contiguous (a few MB), so the gathers of a head stay
  in cache while the queries of that head are processed.
  """
  b, _, heads, dh = value.shape
  parts, offsets = [], []
  start = offset = 0
  for h, w in shapes:
    v = value[:, start : start + h * w].reshape(b, h, w, heads, dh)
    v = bilinear.pad_map(v.transpose(0, 3, 1, 2, 4), (2, 3))  # [B, heads, hp, wp, Dh]
    parts.append(v.reshape(b, heads, -1, dh))
    offsets.append(offset)
    start += h * w
    offset += v.shape[2] * v.shape[3]
  return jnp.concatenate(parts, axis=2).reshape(-1, dh), tuple(offsets), offset


def _untable(table, shapes, b, heads):
  """Inverse of _table for gradients: drops the padding, -> [B, L, heads, Dh]."""
  dh = table.shape[-1]
  table = table.reshape(b, heads, -1, dh)
  parts = []
  offset = 0
  lo = bilinear.PAD_LO
  for h, w in shapes:
    hp, wp = h + lo + bilinear.PAD_HI, w + lo + bilinear.PAD_HI
    v = table[:, :, offset : offset + hp * wp].reshape(b, heads, hp, wp, dh)
    v = v[:, :, lo : lo + h, lo : lo + w].transpose(0, 2, 3, 1, 4)
    parts.append(v.reshape(b, h * w, heads, dh))
    offset += hp * wp
  return jnp.concatenate(parts, axis=1)


def _sample_geometry(loc, shapes, offsets):
  """Table row of each sample's top-left corner (relative to its map) and bilinear factors.

  Args:
    loc: [..., levels, points, 2] float32, (x, y) normalised.

  Returns:
    row: int32 [..., levels, points], row of the top-left corner within one (sample, head) map.
    frac: [..., levels, points, 2] (fx, fy), fraction towards the high corner.
    scale: [..., levels, points, 2] d pixel / d loc, zero where the clamp is active.
    stride_y: int32 [levels, 1], row offset of the bottom-left corner (the top-right one is 1).
  """
  sizes = jnp.array([(w, h) for h, w in shapes], jnp.float32)[:, None, :]  # [levels, 1, 2] (x, y)
  # Same arithmetic as F.grid_sample on grid = 2 * loc - 1 (align_corners=False), so that the
  # sampled positions round as in the reference.
  grid = 2 * loc - 1
  pix = (grid + 1) * (sizes / 2) - 0.5
  pix, keep = bilinear.clamp_coordinate(pix, sizes)
  corner, frac = bilinear.axis_corners(pix)
  stride_y = jnp.array([[w + bilinear.PAD_LO + bilinear.PAD_HI] for _, w in shapes], jnp.int32)
  level_offset = jnp.array(offsets, jnp.int32)[:, None]
  row = level_offset + corner[..., 1] * stride_y + corner[..., 0]
  scale = jnp.where(keep, sizes, 0.0)
  return row, frac, scale, stride_y


def _corner_weights(frac):
  """frac [..., 2] (fx, fy) -> the four bilinear weights, corners in the order
  top-left, top-right, bottom-left, bottom-right."""
  fx, fy = frac[..., 0], frac[..., 1]
  gx, gy = 1 - fx, 1 - fy
  return gy * gx, gy * fx, fy * gx, fy * fx


def _head_major(x):
  """[B, Q, heads, ...] -> [B * heads, Q, ...]."""
  x = jnp.swapaxes(x, 1, 2)
  return x.reshape(-1, *x.shape[2:])


def _forward(shapes, value, loc, aw):
  b, _, heads, dh = value.shape
  _, q, _, levels, points, _ = loc.shape
  table, offsets, lp = _table(value, shapes)
  loc = _head_major(loc.astype(jnp.float32))  # [BH, Q, L, P, 2]
  aw = _head_major(aw.astype(jnp.float32))

  def one_head(xs):
    bh, loc_h, aw_h = xs
    row, frac, _, stride_y = _sample_geometry(loc_h, shapes, offsets)
    row = row + bh * lp  # [Q, L, P]
    coef = jnp.stack(_corner_weights(frac), axis=-1) * aw_h[..., None]  # [Q, L, P, 4]
    row = row.reshape(q, levels * points)
    coef = coef.reshape(q, levels * points, 4)
    stride = jnp.repeat(stride_y[:, 0], points)  # [L * P]

    def add_sample(k, out):
      # Fully unrolled (static k), so this is straight-line code: explicit adds over the samples
      # instead of a `reduce`; see the module docstring.
      r = row[:, k]
      corner_rows = (r, r + 1, r + stride[k], r + stride[k] + 1)
      for c in range(4):
        out = out + coef[:, k, c, None] * table[corner_rows[c]].astype(jnp.float32)
      return out

    out = lax.fori_loop(
      0, levels * points, add_sample, jnp.zeros((q, dh), jnp.float32), unroll=True
    )
    return out

  # One (sample, head) map at a time: its table rows (a few MB) stay in cache, and the loop
  # boundary keeps XLA from fusing the final transpose into the gather loop. The output buffer
  # starts as zeros computed from the input, so that XLA cannot allocate it at the start of the
  # program (as it does with constants) and keep it alive until this point.
  def body(i, out):
    return lax.dynamic_update_index_in_dim(out, one_head((i, loc[i], aw[i])), i, 0)

  init = jnp.zeros((b * heads, q, dh), jnp.float32) + data_zero(loc)
  out = lax.fori_loop(0, b * heads, body, init)  # [BH, Q, Dh]
  return out.reshape(b, heads, q, dh).swapaxes(1, 2).astype(value.dtype)


def _split(x, n_chunks, chunk):
  """[B, Q, heads, ...] -> [B * heads * n_chunks, chunk, ...] float32, queries zero-padded."""
  x = _head_major(x.astype(jnp.float32))
  pad = n_chunks * chunk - x.shape[1]
  x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
  return x.reshape(-1, chunk, *x.shape[2:])


def _merge(x, b, heads, q):
  """[B * heads * n_chunks, chunk, ...] -> [B, Q, heads, ...]."""
  x = x.reshape(b, heads, -1, *x.shape[2:])[:, :, :q]
  return jnp.swapaxes(x, 1, 2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _msda(shapes, chunk, value, loc, aw):
  return _forward(shapes, value, loc, aw)


def _msda_fwd(shapes, chunk, value, loc, aw):
  return _forward(shapes, value, loc, aw), (value, loc, aw)


def _msda_bwd(shapes, chunk, residuals, g):
  value, loc, aw = residuals
  b, _, heads, dh = value.shape
  _, q, _, levels, points, _ = loc.shape
  table, offsets, lp = _table(value, shapes)
  chunk = min(chunk, q)
  n_chunks = math.ceil(q / chunk)
  split = functools.partial(_split, n_chunks=n_chunks, chunk=chunk)

  def step(dtable, xs):
    bh, loc_c, aw_c, g_c = xs  # [], [C, L, P, 2], [C, L, P], [C, Dh]
    row, frac, scale, stride_y = _sample_geometry(loc_c, shapes, offsets)
    row = row + bh * lp
    corner_rows = (0, 1, stride_y, stride_y + 1)
    w = _corner_weights(frac)
    gq = g_c[:, None, None, :]
    rows = jnp.stack([row + r for r in corner_rows], axis=-1)  # [C, L, P, 4]
    corners = table[rows].astype(jnp.float32)  # [C, L, P, 4, Dh]
    dots = jnp.einsum('clpkd,cd->clpk', corners, g_c, preferred_element_type=jnp.float32)
    dots = [dots[..., c] for c in range(4)]
    d_aw = w[0] * dots[0] + w[1] * dots[1] + w[2] * dots[2] + w[3] * dots[3]
    fx, fy = frac[..., 0], frac[..., 1]
    # d w_c / d x and d w_c / d y, written out for the four corners.
    d_x = (1 - fy) * (dots[1] - dots[0]) + fy * (dots[3] - dots[2])
    d_y = (1 - fx) * (dots[2] - dots[0]) + fx * (dots[3] - dots[1])
    d_loc = jnp.stack([d_x, d_y], axis=-1) * (aw_c[..., None] * scale)
    upd = (jnp.stack(w, axis=-1) * aw_c[..., None])[..., None] * gq[:, :, :, None, :]
    dtable = dtable.at[rows].add(upd, mode='drop')
    return dtable, (d_loc, d_aw)

  bh_ids = jnp.repeat(jnp.arange(b * heads, dtype=jnp.int32), n_chunks)
  xs = (bh_ids, split(loc), split(aw), split(g))
  # The loop's buffers start as zeros computed from g, not as constants: XLA would otherwise
  # allocate them (a few hundred MB at the reference's shapes) at the start of the program, long
  # before this backward runs, and keep them alive throughout.
  zero = data_zero(g)

  def body(i, carry):
    dtable, d_loc, d_aw = carry
    dtable, (dl, da) = step(dtable, jax.tree.map(lambda x: x[i], xs))
    d_loc = lax.dynamic_update_index_in_dim(d_loc, dl, i, 0)
    d_aw = lax.dynamic_update_index_in_dim(d_aw, da, i, 0)
    return dtable, d_loc, d_aw

  steps = bh_ids.shape[0]
  init = (
    jnp.zeros(table.shape, jnp.float32) + zero,
    jnp.zeros((steps, chunk, levels, points, 2), jnp.float32) + zero,
    jnp.zeros((steps, chunk, levels, points), jnp.float32) + zero,
  )
  dtable, d_loc, d_aw = lax.fori_loop(0, steps, body, init)

  d_value = _untable(dtable, shapes, b, heads).astype(value.dtype)
  d_loc, d_aw = _merge(d_loc, b, heads, q), _merge(d_aw, b, heads, q)
  return d_value, d_loc.astype(loc.dtype), d_aw.astype(aw.dtype)


_msda.defvjp(_msda_fwd, _msda_bwd)
