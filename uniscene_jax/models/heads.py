"""The BEV head shared by pre-training and detection: BEV queries, positional encoding, transformer.

Module names follow the reference's `pts_bbox_head.*` paths: `bev_embedding`,
`positional_encoding/{row,col}_embed`, `transformer/{level_embeds, cams_embeds, can_bus_mlp_*,
encoder, decoder_*, predicter_*}`.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from uniscene_jax.models.bev_encoder import BEVFormerEncoder, EncoderConfig
from uniscene_jax.models.initializers import normal, torch_default_bias, xavier
from uniscene_jax.models.occupancy_head import (
  OccupancyHeadConfig,
  occupancy_layers,
  occupancy_logits,
)


@dataclasses.dataclass(frozen=True)
class HeadConfig:
  encoder: EncoderConfig = EncoderConfig()
  occupancy: OccupancyHeadConfig | None = OccupancyHeadConfig()  # None: no occupancy layers
  num_cams: int = 6
  can_bus_dims: int = 18


class LearnedPositionalEncoding(nn.Module):
  """pos[h, w] = concat(col_embed[w], row_embed[h]) -> [H * W, 2 * num_feats] (mmdet's)."""

  bev_h: int
  bev_w: int
  num_feats: int

  @nn.compact
  def __call__(self) -> jnp.ndarray:
    row = nn.Embed(self.bev_h, self.num_feats, embedding_init=normal, name='row_embed').embedding
    col = nn.Embed(self.bev_w, self.num_feats, embedding_init=normal, name='col_embed').embedding
    pos = jnp.concatenate(
      [
        jnp.broadcast_to(col[None, :, :], (self.bev_h, self.bev_w, self.num_feats)),
        jnp.broadcast_to(row[:, None, :], (self.bev_h, self.bev_w, self.num_feats)),
      ],
      -1,
    )
    return pos.reshape(self.bev_h * self.bev_w, 2 * self.num_feats)


class PerceptionTransformer(nn.Module):
  """Camera features + BEV queries -> BEV features; optionally BEV -> occupancy logits."""

  config: HeadConfig
  dtype: Any = jnp.float32

  def setup(self):
    cfg, enc = self.config, self.config.encoder
    c = enc.embed_dims
    self.level_embeds = self.param('level_embeds', normal, (len(enc.spatial_shapes), c))
    self.cams_embeds = self.param('cams_embeds', normal, (cfg.num_cams, c))
    dense = dict(dtype=self.dtype, param_dtype=jnp.float32, kernel_init=xavier)
    self.can_bus_mlp_0 = nn.Dense(c // 2, bias_init=torch_default_bias(cfg.can_bus_dims), **dense)
    self.can_bus_mlp_2 = nn.Dense(c, bias_init=torch_default_bias(c // 2), **dense)
    self.can_bus_mlp_norm = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, param_dtype=jnp.float32)
    self.encoder = BEVFormerEncoder(enc, self.dtype)
    if cfg.occupancy is not None:
      for name, layer in occupancy_layers(cfg.occupancy, self.dtype).items():
        setattr(self, name, layer)

  def bev(
    self,
    mlvl_feats,
    bev_queries,
    bev_pos,
    lidar2img,
    ego2lidar,
    can_bus,
    prev_bev,
    prev_exists,
    train,
  ):
    """mlvl_feats: per level [B, N, h, w, C]; bev_queries [HW, C]; bev_pos [HW, C]."""
    b = mlvl_feats[0].shape[0]
    can = nn.relu(self.can_bus_mlp_0(can_bus.astype(self.dtype)))
    can = self.can_bus_mlp_norm(nn.relu(self.can_bus_mlp_2(can)))
    query = bev_queries.astype(self.dtype)[None] + can[:, None, :]
    feats = []
    for lvl, feat in enumerate(mlvl_feats):  # four static levels
      _, n, h, w, c = feat.shape
      feat = feat.reshape(b, n, h * w, c).astype(self.dtype)
      feat = feat + self.cams_embeds[None, :n, None, :].astype(self.dtype)
      feats.append(feat + self.level_embeds[None, None, lvl : lvl + 1].astype(self.dtype))
    pos = jnp.broadcast_to(bev_pos.astype(self.dtype)[None], query.shape)
    return self.encoder(
      query,
      pos,
      jnp.concatenate(feats, 2),
      lidar2img,
      ego2lidar,
      can_bus,
      prev_bev,
      prev_exists,
      train,
    )

  def occupancy(self, bev, train):
    cfg = self.config.occupancy
    decoder = (self.decoder_0, self.decoder_1)
    predicter = (self.predicter_0, self.predicter_2)
    return occupancy_logits(bev, decoder, predicter, cfg, train, self.dtype)


class BEVHead(nn.Module):
  """`pts_bbox_head`: owns the BEV queries, their positional encoding and the transformer."""

  config: HeadConfig
  dtype: Any = jnp.float32

  def setup(self):
    enc = self.config.encoder
    self.bev_embedding = nn.Embed(
      enc.bev_h * enc.bev_w, enc.embed_dims, embedding_init=normal, param_dtype=jnp.float32
    )
    self.positional_encoding = LearnedPositionalEncoding(enc.bev_h, enc.bev_w, enc.embed_dims // 2)
    self.transformer = self.make_transformer()

  def make_transformer(self):
    """The `transformer` submodule (the detector's head returns its own)."""
    return PerceptionTransformer(self.config, self.dtype)

  def bev(self, mlvl_feats, lidar2img, ego2lidar, can_bus, prev_bev, prev_exists, train=False):
    """-> (bev [B, HW, C], aux) for one frame."""
    return self.transformer.bev(
      mlvl_feats,
      self.bev_embedding.embedding,
      self.positional_encoding(),
      lidar2img,
      ego2lidar,
      can_bus,
      prev_bev,
      prev_exists,
      train,
    )

  def occupancy(self, bev, train=False):
    return self.transformer.occupancy(bev, train)
