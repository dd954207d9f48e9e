"""PyTorch twin of `pts_bbox_head` of the pre-training model (BEV queries, transformer, occupancy).

Keys: bev_embedding.weight, positional_encoding.{row,col}_embed.weight, transformer.level_embeds,
transformer.cams_embeds, transformer.can_bus_mlp.{0,2,norm}, transformer.encoder.layers.*,
transformer.decoder.{0,1}.{conv,bn}, transformer.predicter.{0,2}: the manifest's names.
"""

import torch
from torch import nn

from tests.reference.encoder_torch import EncoderTorch
from tests.reference.occupancy_torch import OccupancyHeadTorch


class LearnedPositionalEncodingTorch(nn.Module):
  def __init__(self, num_feats, row_num, col_num):
    super().__init__()
    self.row_embed = nn.Embedding(row_num, num_feats)
    self.col_embed = nn.Embedding(col_num, num_feats)

  def forward(self, b, h, w):
    x = self.col_embed(torch.arange(w))
    y = self.row_embed(torch.arange(h))
    pos = torch.cat([x[None].repeat(h, 1, 1), y[:, None].repeat(1, w, 1)], -1)
    return pos.permute(2, 0, 1)[None].repeat(b, 1, 1, 1)  # (B, C, H, W)


class TransformerTorch(nn.Module):
  def __init__(self, enc_cfg, occ_cfg, num_cams=6):
    super().__init__()
    c = enc_cfg.embed_dims
    self.level_embeds = nn.Parameter(torch.randn(len(enc_cfg.spatial_shapes), c))
    self.cams_embeds = nn.Parameter(torch.randn(num_cams, c))
    self.can_bus_mlp = nn.Sequential(
      nn.Linear(18, c // 2), nn.ReLU(inplace=True), nn.Linear(c // 2, c), nn.ReLU(inplace=True)
    )
    self.can_bus_mlp.add_module('norm', nn.LayerNorm(c))
    self.encoder = EncoderTorch(enc_cfg)
    occ = OccupancyHeadTorch(
      enc_cfg.bev_h, enc_cfg.bev_w, c, occ_cfg.pillar_h, occ_cfg.out_dim, occ_cfg.num_classes
    )
    self.decoder, self.predicter = occ.decoder, occ.predicter
    self._occ = [occ]  # not a submodule: its layers are registered above


class BEVHeadTorch(nn.Module):
  def __init__(self, enc_cfg, occ_cfg, num_cams=6):
    super().__init__()
    self.enc_cfg = enc_cfg
    h, w, c = enc_cfg.bev_h, enc_cfg.bev_w, enc_cfg.embed_dims
    self.bev_embedding = nn.Embedding(h * w, c)
    self.positional_encoding = LearnedPositionalEncodingTorch(c // 2, h, w)
    self.transformer = TransformerTorch(enc_cfg, occ_cfg, num_cams)

  def bev(self, mlvl_feats, lidar2img, ego2lidar, can_bus, prev_bev):
    """mlvl_feats: per level (B, N, C, h, w); can_bus (B, 18) float64 numpy."""
    t = self.transformer
    b = mlvl_feats[0].shape[0]
    h, w = self.enc_cfg.bev_h, self.enc_cfg.bev_w
    pos = self.positional_encoding(b, h, w).flatten(2).permute(0, 2, 1)  # (B, HW, C)
    can = t.can_bus_mlp(torch.tensor(can_bus, dtype=torch.float32))
    query = self.bev_embedding.weight[None] + can[:, None, :]
    feats = []
    for lvl, feat in enumerate(mlvl_feats):
      f = feat.flatten(3).permute(1, 0, 3, 2)  # (N, B, hw, C)
      f = f + t.cams_embeds[:, None, None, :] + t.level_embeds[None, None, lvl : lvl + 1, :]
      feats.append(f)
    feats = torch.cat(feats, 2).permute(1, 0, 2, 3)  # (B, N, L, C)
    return t.encoder(query, pos, feats, lidar2img, ego2lidar, can_bus, prev_bev)

  def occupancy(self, bev):
    return self.transformer._occ[0](bev)
