"""A compact PyTorch twin of the backbone and neck (mmdet ResNet caffe-style + DCNv2, mmdet FPN),
with the reference attribute names, so its state_dict keys read `img_backbone.layer3.0.conv2.
conv_offset.weight`, `img_neck.fpn_convs.3.conv.bias`, ... as in the model manifests.

Written from the model spec (sections 4 and 5); BN is in eval mode throughout (norm_eval) and the
DCN samples with tests/reference/ops_torch.py.
"""

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from tests.reference import ops_torch


class ModulatedDeformConv2dPack(nn.Module):
  def __init__(self, cin, cout, stride=1, padding=1, dilation=1):
    super().__init__()
    self.stride, self.padding, self.dilation = stride, padding, dilation
    self.weight = nn.Parameter(torch.zeros(cout, cin, 3, 3))
    self.conv_offset = nn.Conv2d(cin, 27, 3, stride, padding, dilation, bias=True)

  def forward(self, x):
    o1, o2, mask = torch.chunk(self.conv_offset(x), 3, dim=1)
    offset = torch.cat((o1, o2), dim=1)
    return ops_torch.modulated_deform_conv2d(
      x, offset, torch.sigmoid(mask), self.weight, self.stride, self.padding, self.dilation
    )


class Bottleneck(nn.Module):
  def __init__(self, cin, planes, stride, downsample, dcn):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, planes, 1, stride, bias=False)  # caffe style: stride here
    self.bn1 = nn.BatchNorm2d(planes)
    if dcn:
      self.conv2 = ModulatedDeformConv2dPack(planes, planes)
    else:
      self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, 4 * planes, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(4 * planes)
    self.downsample = None
    if downsample:
      self.downsample = nn.Sequential(
        nn.Conv2d(cin, 4 * planes, 1, stride, bias=False), nn.BatchNorm2d(4 * planes)
      )
    self.with_cp = False  # as mmdet's with_cp: recompute the block in the backward pass

  def forward(self, x):
    if self.with_cp and torch.is_grad_enabled():
      return torch.utils.checkpoint.checkpoint(self._forward, x, use_reentrant=False)
    return self._forward(x)

  def _forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = F.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    identity = x if self.downsample is None else self.downsample(x)
    return F.relu(out + identity)


class ResNet(nn.Module):
  def __init__(self, stage_blocks, base_width, stage_with_dcn, out_indices=(1, 2, 3)):
    super().__init__()
    self.out_indices = out_indices
    self.conv1 = nn.Conv2d(3, base_width, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(base_width)
    cin = base_width
    for s, blocks in enumerate(stage_blocks):
      planes = base_width * 2**s
      layer = []
      for i in range(blocks):
        stride = (1 if s == 0 else 2) if i == 0 else 1
        layer.append(Bottleneck(cin, planes, stride, i == 0, stage_with_dcn[s]))
        cin = 4 * planes
      setattr(self, f'layer{s + 1}', nn.Sequential(*layer))
    self.num_stages = len(stage_blocks)

  def forward(self, x):
    x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
    outs = []
    for s in range(self.num_stages):
      x = getattr(self, f'layer{s + 1}')(x)
      if s in self.out_indices:
        outs.append(x)
    return outs


class ConvModule(nn.Module):
  def __init__(self, cin, cout, k, stride=1):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, bias=True)

  def forward(self, x):
    return self.conv(x)


class FPN(nn.Module):
  """mmdet 2.x FPN with add_extra_convs='on_output' and relu_before_extra_convs=True."""

  def __init__(self, in_channels, out_channels, num_outs):
    super().__init__()
    self.lateral_convs = nn.ModuleList(ConvModule(c, out_channels, 1) for c in in_channels)
    self.fpn_convs = nn.ModuleList(ConvModule(out_channels, out_channels, 3) for _ in in_channels)
    for _ in range(num_outs - len(in_channels)):
      self.fpn_convs.append(ConvModule(out_channels, out_channels, 3, 2))
    self.num_ins, self.num_outs = len(in_channels), num_outs

  def forward(self, inputs):
    laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs, strict=True)]
    for i in range(self.num_ins - 1, 0, -1):
      size = laterals[i - 1].shape[2:]
      laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=size, mode='nearest')
    outs = [self.fpn_convs[i](laterals[i]) for i in range(self.num_ins)]
    # mmdet 2.x: the first extra conv takes the last output as it is; ReLU only before later ones.
    outs.append(self.fpn_convs[self.num_ins](outs[-1]))
    for i in range(self.num_ins + 1, self.num_outs):
      outs.append(self.fpn_convs[i](F.relu(outs[-1])))
    return outs


class BackboneNeck(nn.Module):
  def __init__(self, stage_blocks, base_width, stage_with_dcn, out_channels, num_outs=4):
    super().__init__()
    self.img_backbone = ResNet(stage_blocks, base_width, stage_with_dcn)
    widths = [4 * base_width * 2**s for s in (1, 2, 3)]
    self.img_neck = FPN(widths, out_channels, num_outs)

  def forward(self, img):
    return self.img_neck(self.img_backbone(img))
