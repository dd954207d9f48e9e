"""BEVFormer encoder: BEV queries + camera features (+ the previous BEV) -> BEV features.

Per layer (post-norm): temporal self-attention, LayerNorm, spatial cross-attention, LayerNorm,
FFN, LayerNorm. Pillar anchors are projected into the cameras once per frame; the previous BEV
is rotated by the frame's yaw change and its reference points shifted by the ego motion.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from uniscene_jax import geometry
from uniscene_jax.models.bev_attention import SpatialCrossAttention, TemporalSelfAttention
from uniscene_jax.models.initializers import torch_default_bias, xavier
from uniscene_jax.models.remat import sequential_call


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  bev_h: int = 200
  bev_w: int = 200
  embed_dims: int = 256
  num_layers: int = 6
  num_heads: int = 8
  ffn_dims: int = 512
  tsa_points: int = 4
  sca_points: int = 8
  num_points_in_pillar: int = 4
  dropout: float = 0.1
  pc_range: tuple[float, ...] = geometry.PC_RANGE
  image_size: tuple[int, int] = (928, 1600)  # padded (height, width): the projection normaliser
  spatial_shapes: tuple[tuple[int, int], ...] = ((116, 200), (58, 100), (29, 50), (15, 25))
  bev_frame: str = 'ego'  # 'ego': project with lidar2img @ ego2lidar (pre-training); 'lidar'
  # UniScene pre-training adds the ego-motion shift to the shared 2-D reference in place, so both
  # TSA slots are shifted; BEVFormer shifts only the previous slot.
  inplace_shift: bool = True
  rotate_prev_bev: bool = True
  sca_capacity: int = 0  # visible queries per camera processed by SCA; 0 = all queries, masked
  remat: bool = False  # recompute each layer in the backward pass


class FFN(nn.Module):
  embed_dims: int
  ffn_dims: int
  dropout: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    def dense(features, fan_in, name):
      return nn.Dense(
        features,
        name=name,
        dtype=self.dtype,
        param_dtype=jnp.float32,
        kernel_init=xavier,
        bias_init=torch_default_bias(fan_in),
      )

    y = nn.relu(dense(self.ffn_dims, self.embed_dims, 'layers_0_0')(x))
    y = nn.Dropout(self.dropout, deterministic=not train)(y)
    y = dense(self.embed_dims, self.ffn_dims, 'layers_1')(y)
    y = nn.Dropout(self.dropout, deterministic=not train)(y)
    return x + y


def _norm(name, dtype):
  return nn.LayerNorm(epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32, name=name)


class BEVFormerLayer(nn.Module):
  config: EncoderConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, pos, prev_stack, exists, ref_2d, feats, ref_cam, bev_mask, train=False):
    """prev_stack [B, 2, HW, C] is the TSA value where exists [B] holds, else (x, x)."""
    cfg = self.config
    value = jnp.where(exists[:, None, None, None], prev_stack, jnp.stack([x, x], 1))
    x = TemporalSelfAttention(
      cfg.bev_h,
      cfg.bev_w,
      cfg.embed_dims,
      cfg.num_heads,
      cfg.tsa_points,
      dropout=cfg.dropout,
      dtype=self.dtype,
      name='attentions_0',
    )(x, pos, value, ref_2d, train)
    x = _norm('norms_0', self.dtype)(x)
    x, overflow = SpatialCrossAttention(
      cfg.spatial_shapes,
      cfg.embed_dims,
      cfg.num_heads,
      cfg.sca_points,
      cfg.sca_capacity,
      cfg.dropout,
      self.dtype,
      name='attentions_1',
    )(x, feats, ref_cam, bev_mask, train)
    x = _norm('norms_1', self.dtype)(x)
    x = FFN(cfg.embed_dims, cfg.ffn_dims, cfg.dropout, self.dtype, name='ffns_0')(x, train)
    return _norm('norms_2', self.dtype)(x), overflow


class BEVFormerEncoder(nn.Module):
  """Encodes one frame.

  Args (call):
    bev_query: [B, HW, C] initial queries (BEV embedding + CAN-bus term).
    bev_pos: [B, HW, C] positional encoding.
    feats: [B, N, L, C] camera features with camera and level embeddings added.
    lidar2img: [B, N, 4, 4]; ego2lidar: [B, 4, 4] (used when bev_frame == 'ego').
    can_bus: [B, 18] with the queue's deltas (0:3 translation, 17 yaw degrees since the previous
      frame) and the absolute yaw in radians at 16.
    prev_bev: [B, HW, C] previous frame's BEV; prev_exists: [B] bool, where False the sample runs
      without history, as with prev_bev=None in the reference.
  Returns (bev [B, HW, C], aux dict with 'sca_overflow' [B] and 'bev_mask' [B, N, HW, P]).
  """

  config: EncoderConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(
    self,
    bev_query,
    bev_pos,
    feats,
    lidar2img,
    ego2lidar,
    can_bus,
    prev_bev,
    prev_exists,
    train=False,
  ):
    cfg = self.config
    b, hw, c = bev_query.shape
    ref_3d = jnp.asarray(
      geometry.bev_reference_3d(cfg.bev_h, cfg.bev_w, cfg.num_points_in_pillar, cfg.pc_range)
    )
    if cfg.bev_frame not in ('ego', 'lidar'):
      raise ValueError(f"EncoderConfig.bev_frame must be 'ego' or 'lidar', got {cfg.bev_frame!r}")
    ref_cam, bev_mask = geometry.project_to_cameras(
      ref_3d,
      lidar2img,
      cfg.image_size,
      ego2lidar if cfg.bev_frame == 'ego' else None,
      cfg.pc_range,
    )
    shift = geometry.can_bus_shift(can_bus, cfg.bev_h, cfg.bev_w, cfg.pc_range)  # [B, 2]
    ref_2d = jnp.asarray(geometry.bev_reference_2d(cfg.bev_h, cfg.bev_w))[None]  # [1, HW, 2]
    exists = prev_exists.astype(bool)[:, None, None]
    shifted = ref_2d + shift[:, None, :]
    if cfg.inplace_shift:
      hybrid = jnp.stack([shifted, shifted], 1)
    else:
      base = jnp.broadcast_to(ref_2d, shifted.shape)
      hybrid = jnp.stack([jnp.where(exists, shifted, base), base], 1)
    if cfg.rotate_prev_bev:
      prev = geometry.rotate_bev(
        prev_bev.reshape(b, cfg.bev_h, cfg.bev_w, c), can_bus[:, 17]
      ).reshape(b, hw, c)
    else:
      prev = prev_bev
    prev = jax.lax.stop_gradient(prev.astype(bev_query.dtype))
    prev_stack = jnp.stack([prev, bev_query], 1)  # the same for every layer

    layers = [BEVFormerLayer(cfg, self.dtype, name=f'layers_{i}') for i in range(cfg.num_layers)]
    shared = (bev_pos, prev_stack, prev_exists.astype(bool), hybrid, feats, ref_cam, bev_mask)
    # One loop over the layers: compiled once, and with the shared inputs' gradients summed as
    # they come (see models.remat.sequential_call).
    x = bev_query.astype(self.dtype)
    x, overflow = sequential_call(self, layers, x, *shared, remat=cfg.remat, train=train)
    overflow = overflow.max(0)
    return x, {'sca_overflow': overflow, 'bev_mask': bev_mask}
