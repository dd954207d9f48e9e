"""PyTorch twin of the whole pre-training model: backbone + neck + BEV head, queue forward.

Its state_dict keys are the reference's (`img_backbone.*`, `img_neck.*`, `pts_bbox_head.*`); the
forward follows the reference's training forward in eval mode: history frames first, each
passing its BEV to the next unless prev_bev_exists is False, then the current frame.
"""

import torch
from torch import nn

from tests.reference.backbone_torch import FPN, ResNet
from tests.reference.head_torch import BEVHeadTorch


class UniSceneOccTorch(nn.Module):
  def __init__(self, stage_blocks, base_width, stage_with_dcn, enc_cfg, occ_cfg, num_cams=6):
    super().__init__()
    self.img_backbone = ResNet(stage_blocks, base_width, stage_with_dcn)
    widths = [4 * base_width * 2**s for s in (1, 2, 3)]
    self.img_neck = FPN(widths, enc_cfg.embed_dims, 4)
    self.pts_bbox_head = BEVHeadTorch(enc_cfg, occ_cfg, num_cams)

  def set_checkpointing(self, on: bool) -> None:
    """Recompute each backbone block and each encoder layer in the backward pass (the JAX
    model's remat_backbone + remat_encoder; mmdet's with_cp)."""
    for module in self.modules():
      if hasattr(module, 'with_cp'):
        module.with_cp = on

  def features(self, img):
    """img (B, N, 3, H, W) -> per level (B, N, C, h, w)."""
    b, n = img.shape[:2]
    feats = self.img_neck(self.img_backbone(img.flatten(0, 1)))
    return [f.view(b, n, *f.shape[1:]) for f in feats]

  def forward(self, img, lidar2img, ego2lidar, can_bus, prev_bev_exists):
    """img (B, T, N, 3, H, W); can_bus numpy (B, T, 18); prev_bev_exists list of T bools (B = 1)."""
    t = img.shape[1]
    prev = None
    with torch.no_grad():
      for i in range(t - 1):
        if not prev_bev_exists[i]:
          prev = None
        prev = self.pts_bbox_head.bev(
          self.features(img[:, i]), lidar2img[:, i], ego2lidar[:, i], can_bus[:, i], prev
        )
    if not prev_bev_exists[-1]:
      prev = None
    bev = self.pts_bbox_head.bev(
      self.features(img[:, -1]), lidar2img[:, -1], ego2lidar[:, -1], can_bus[:, -1], prev
    )
    return self.pts_bbox_head.occupancy(bev), bev
