"""PyTorch references written from the model spec: occupancy head, focal loss, BEV rotation.

Attribute names follow the reference model (`decoder.0.conv`, `decoder.0.bn`, `predicter.0`), so
their state_dict keys are those of `pts_bbox_head.transformer.*` in the key manifests.
"""

import math

import torch
from torch import nn


class ConvModule3d(nn.Module):
  def __init__(self, cin: int, cout: int):
    super().__init__()
    self.conv = nn.Conv3d(cin, cout, 3, 1, 1, bias=False)
    self.bn = nn.BatchNorm3d(cout, eps=1e-5, momentum=0.1)

  def forward(self, x):
    return torch.relu(self.bn(self.conv(x)))


class OccupancyHeadTorch(nn.Module):
  """bev (B, H*W, C) -> logits (B, W, H, Z, classes), the reference's view/permute order."""

  def __init__(self, bev_h=200, bev_w=200, embed_dims=256, pillar_h=16, out_dim=32, classes=2):
    super().__init__()
    self.bev_h, self.bev_w, self.pillar_h = bev_h, bev_w, pillar_h
    self.decoder = nn.Sequential(
      ConvModule3d(embed_dims // pillar_h, out_dim), ConvModule3d(out_dim, out_dim)
    )
    self.predicter = nn.Sequential(
      nn.Linear(out_dim, out_dim * 2), nn.Softplus(), nn.Linear(out_dim * 2, classes)
    )

  def forward(self, bev):
    b, _, c = bev.shape
    x = bev.permute(0, 2, 1).reshape(b, c, self.bev_h, self.bev_w)
    x = x.view(b, c // self.pillar_h, self.pillar_h, self.bev_h, self.bev_w)
    x = self.decoder(x)  # (B, out, Z, H, W)
    x = x.permute(0, 4, 3, 2, 1)  # (B, W, H, Z, out)
    return self.predicter(x)


def focal_loss_torch(logits, labels, gamma=2.0, alpha=0.25, weight=None):
  """mmdet's python sigmoid focal loss on (N, C) logits and (N,) labels; mean or weighted sum."""
  target = torch.nn.functional.one_hot(labels, logits.shape[1]).type_as(logits)
  p = logits.sigmoid()
  pt = (1 - p) * target + p * (1 - target)
  focal_weight = (alpha * target + (1 - alpha) * (1 - target)) * pt.pow(gamma)
  loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction='none')
  loss = loss * focal_weight
  if weight is None:
    return loss.mean()
  return (loss * weight[:, None]).sum() / weight.sum()


def rotate_torch(img, angle_deg: float):
  """torchvision's tensor `rotate(img, angle)` about the centre (nearest, zero fill, no expand).

  img: (C, H, W). The inverse affine matrix of a pure rotation, applied to a pixel-centre grid in
  float32 and sampled with grid_sample(nearest, align_corners=False), as torchvision does.
  """
  _, h, w = img.shape
  a = math.radians(angle_deg)
  theta = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]])
  xs = torch.linspace(-w * 0.5 + 0.5, w * 0.5 - 0.5, steps=w)
  ys = torch.linspace(-h * 0.5 + 0.5, h * 0.5 - 0.5, steps=h)
  base = torch.ones(1, h, w, 3)
  base[..., 0] = xs
  base[..., 1] = ys[:, None]
  scaled = theta.T / torch.tensor([0.5 * w, 0.5 * h])
  grid = base.view(1, h * w, 3).bmm(scaled[None]).view(1, h, w, 2)
  return torch.nn.functional.grid_sample(
    img[None], grid, mode='nearest', padding_mode='zeros', align_corners=False
  )[0]
