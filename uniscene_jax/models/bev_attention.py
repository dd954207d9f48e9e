"""BEVFormer's two attentions: temporal self-attention (TSA) and spatial cross-attention (SCA).

Both are deformable: a linear layer turns each query into sampling offsets and attention weights
around its reference point(s), and `ops.deformable_attention.ms_deform_attn` reads the value maps
there. Projection output features are laid out as the reference's: offsets (head, [slot], level,
point, xy), weights (head, [slot], level, point), value and output channel 32 * head + d.

Unlike the reference, both are right for more than one sample per device: TSA pairs each sample
with its own previous BEV, and SCA selects the queries each camera sees per sample.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from uniscene_jax.models.initializers import xavier
from uniscene_jax.ops.data_zero import data_zero
from uniscene_jax.ops.deformable_attention import ms_deform_attn


def star_offsets(heads: int, groups: int, points: int) -> np.ndarray:
  """The reference's sampling_offsets bias: head h points along angle 2 pi h / heads (scaled so
  the larger component is 1), point k at (k + 1) times that; layout (heads, groups, points, 2)."""
  theta = np.arange(heads, dtype=np.float32) * np.float32(2.0 * np.pi / heads)
  grid = np.stack([np.cos(theta), np.sin(theta)], -1)
  grid = grid / np.abs(grid).max(-1, keepdims=True)
  grid = np.broadcast_to(grid[:, None, None, :], (heads, groups, points, 2))
  return (grid * np.arange(1, points + 1, dtype=np.float32)[None, None, :, None]).reshape(-1)


def _dense(features, name, dtype, kernel_init=xavier, bias_init=nn.initializers.zeros):
  return nn.Dense(
    features,
    name=name,
    dtype=dtype,
    param_dtype=jnp.float32,
    kernel_init=kernel_init,
    bias_init=bias_init,
  )


def _sampling_projections(query, heads: int, groups: int, points: int, dtype):
  """The `sampling_offsets` (star-initialised) and `attention_weights` layers on query, as
  float32 [..., heads * groups * points * 2] and [..., heads * groups * points]."""
  bias = star_offsets(heads, groups, points)
  off = _dense(
    heads * groups * points * 2,
    'sampling_offsets',
    dtype,
    kernel_init=nn.initializers.zeros,
    bias_init=lambda *_: jnp.asarray(bias),
  )(query)
  aw = _dense(heads * groups * points, 'attention_weights', dtype, nn.initializers.zeros)(query)
  return off.astype(jnp.float32), aw.astype(jnp.float32)


class TemporalSelfAttention(nn.Module):
  """TSA: each query samples its own two BEV slots (previous, current) and averages them.

  Args (call):
    x: [B, HW, C] layer input; pos: [B, HW, C] positional encoding (added to the query only).
    value: [B, 2, HW, C] (previous BEV aligned, initial BEV query) or None for (x, x).
    ref_2d: [B, 2, HW, 2] normalised (x, y) reference per slot.
  Returns [B, HW, C]: x + dropout(output_proj(mean over slots)).
  """

  bev_h: int
  bev_w: int
  embed_dims: int = 256
  num_heads: int = 8
  num_points: int = 4
  num_bev_queue: int = 2
  dropout: float = 0.1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, pos, value, ref_2d, train: bool = False):
    b, hw, c = x.shape
    heads, queue, points = self.num_heads, self.num_bev_queue, self.num_points
    if value is None:
      value = jnp.stack([x] * queue, 1)
    query = x + pos
    q_cat = jnp.concatenate([value[:, 0].astype(query.dtype), query], -1)
    v = _dense(self.embed_dims, 'value_proj', self.dtype)(value.reshape(b * queue, hw, c))
    v = v.reshape(b * queue, hw, heads, c // heads)
    off, aw = _sampling_projections(q_cat, heads, queue, points, self.dtype)
    off = off.reshape(b, hw, heads, queue, 1, points, 2)
    aw = jax.nn.softmax(aw.reshape(b, hw, heads, queue, points), -1)
    off = off.transpose(0, 3, 1, 2, 4, 5, 6).reshape(b * queue, hw, heads, 1, points, 2)
    aw = aw.transpose(0, 3, 1, 2, 4).reshape(b * queue, hw, heads, 1, points)
    scale = jnp.asarray([self.bev_w, self.bev_h], jnp.float32)
    loc = ref_2d.reshape(b * queue, hw, 1, 1, 1, 2).astype(jnp.float32) + off / scale
    out = ms_deform_attn(v, ((self.bev_h, self.bev_w),), loc, aw.astype(v.dtype))
    out = out.reshape(b, queue, hw, c).astype(jnp.float32).mean(1).astype(self.dtype)
    out = _dense(self.embed_dims, 'output_proj', self.dtype)(out)
    out = nn.Dropout(self.dropout, deterministic=not train)(out)
    return x + out


class MSDeformableAttention3D(nn.Module):
  """Deformable attention of queries around several anchors per query, no output projection.

  query [R, Qs, C], value [R, L, C], ref [R, Qs, A, 2] normalised (u, v) anchors -> [R, Qs, C].
  The points of every level are split over the anchors: point k uses anchor k mod A. Attention
  weights are a softmax over all levels and points jointly.
  """

  spatial_shapes: tuple[tuple[int, int], ...]
  embed_dims: int = 256
  num_heads: int = 8
  num_points: int = 8
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, query, value, ref):
    r, qs, c = query.shape
    heads, levels, points = self.num_heads, len(self.spatial_shapes), self.num_points
    anchors = ref.shape[2]
    if points % anchors:
      raise ValueError(f'num_points {points} is not a multiple of the {anchors} anchors')
    v = _dense(self.embed_dims, 'value_proj', self.dtype)(value)
    v = v.reshape(r, value.shape[1], heads, c // heads)
    off, aw = _sampling_projections(query, heads, levels, points, self.dtype)
    aw = jax.nn.softmax(aw.reshape(r, qs, heads, levels * points), -1)
    aw = aw.reshape(r, qs, heads, levels, points)
    sizes = jnp.asarray([[w, h] for h, w in self.spatial_shapes], jnp.float32)  # (x, y) scale
    off = off.reshape(r, qs, heads, levels, points, 2) / sizes[:, None, :]
    off = off.reshape(r, qs, heads, levels, points // anchors, anchors, 2)
    loc = ref.astype(jnp.float32)[:, :, None, None, None, :, :] + off
    loc = loc.reshape(r, qs, heads, levels, points, 2)
    return ms_deform_attn(v, self.spatial_shapes, loc, aw.astype(v.dtype))


def select_visible(visible: jnp.ndarray, capacity: int) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Indices [..., capacity] of the first `capacity` True entries of visible [..., Q] (ascending,
  padded with 0) and their valid flags."""
  q = visible.shape[-1]
  rank = jnp.cumsum(visible, -1) - 1  # position of each visible query among the visible
  slot = jnp.where(visible & (rank < capacity), rank, capacity)  # overflow and hidden -> dropped
  flat = slot.reshape(-1, q)
  rows = jnp.arange(flat.shape[0])[:, None]
  idx = jnp.zeros((flat.shape[0], capacity + 1), jnp.int32)
  idx = idx.at[rows, flat].set(jnp.broadcast_to(jnp.arange(q, dtype=jnp.int32), flat.shape))
  count = jnp.minimum(visible.sum(-1), capacity)
  valid = jnp.arange(capacity) < count[..., None]
  idx = jnp.where(valid, idx[:, :capacity].reshape(*visible.shape[:-1], capacity), 0)
  return idx, valid


class SpatialCrossAttention(nn.Module):
  """SCA: each BEV query attends to the cameras that see any of its pillar anchors.

  Args (call):
    x: [B, HW, C] layer input (no positional encoding).
    feats: [B, N, L, C] camera features of all levels (camera and level embeddings added).
    ref_cam: [B, N, HW, A, 2] anchors in normalised image coordinates.
    bev_mask: [B, N, HW, A] anchor visibility.
  Returns (x + dropout(output_proj(mean over seeing cameras)), overflow [B]): with a positive
  `capacity` each camera processes at most that many visible queries (the first in query order);
  `overflow` counts those left out, which must stay 0 for the result to equal the reference.
  `capacity=0` computes every query for every camera and masks (same result, more work).
  """

  spatial_shapes: tuple[tuple[int, int], ...]
  embed_dims: int = 256
  num_heads: int = 8
  num_points: int = 8
  capacity: int = 0
  dropout: float = 0.1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, feats, ref_cam, bev_mask, train: bool = False):
    b, hw, c = x.shape
    n, length = feats.shape[1], feats.shape[2]
    anchors = ref_cam.shape[3]
    attn = MSDeformableAttention3D(
      self.spatial_shapes,
      self.embed_dims,
      self.num_heads,
      self.num_points,
      self.dtype,
      name='deformable_attention',
    )
    visible = bev_mask.any(-1)  # [B, N, HW]
    values = feats.reshape(b * n, length, c)
    if self.capacity <= 0 or self.capacity >= hw:
      queries = jnp.broadcast_to(x[:, None], (b, n, hw, c)).reshape(b * n, hw, c)
      out = attn(queries, values, ref_cam.reshape(b * n, hw, anchors, 2)).reshape(b, n, hw, c)
      slots = jnp.sum(jnp.where(visible[..., None], out.astype(jnp.float32), 0.0), 1)
      overflow = jnp.zeros((b,), jnp.int32)
    else:
      cap = self.capacity
      idx, valid = select_visible(visible, cap)  # [B, N, cap]
      queries = jnp.take_along_axis(x[:, None], idx[..., None], axis=2)  # [B, N, cap, C]
      refs = jnp.take_along_axis(ref_cam, idx[..., None, None], axis=2)  # [B, N, cap, A, 2]
      out = attn(queries.reshape(b * n, cap, c), values, refs.reshape(b * n, cap, anchors, 2))
      out = jnp.where(valid[..., None], out.reshape(b, n, cap, c).astype(jnp.float32), 0.0)
      rows = jnp.arange(b)[:, None, None]
      # zeros computed from the data: a constant buffer would be allocated at program start
      slots = (jnp.zeros((b, hw, c), jnp.float32) + data_zero(out)).at[rows, idx].add(out)
      overflow = jnp.maximum(visible.sum(-1) - cap, 0).sum(-1).astype(jnp.int32)
    count = jnp.maximum(visible.sum(1), 1).astype(jnp.float32)  # [B, HW]
    out = (slots / count[..., None]).astype(self.dtype)
    out = _dense(self.embed_dims, 'output_proj', self.dtype)(out)
    out = nn.Dropout(self.dropout, deterministic=not train)(out)
    return x + out, overflow
