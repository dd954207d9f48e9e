"""PyTorch twin of the BEVFormer-base detector, written from the model spec (sections 6, 7, 10).

The forward follows the reference's procedure: sequence-first decoder layers around torch's own
nn.MultiheadAttention, CustomMSDeformableAttention with a (B, Q, levels, 2) reference, the
decoder's in-loop refinement (detached), and the head recomputing each layer's branches on its
output. Attribute names and registration order give the reference's state_dict keys in the order
of `bevformer_base_keys.json` (`pts_bbox_head.*`, then `img_backbone.*`, then `img_neck.*`).
Dropout is left out (eval mode).
"""

import copy

import torch
from torch import nn

from tests.reference.backbone_torch import FPN, ResNet
from tests.reference.encoder_torch import FFN, EncoderTorch
from tests.reference.head_torch import BEVHeadTorch, LearnedPositionalEncodingTorch
from tests.reference.ops_torch import ms_deform_attn


def inverse_sigmoid(x, eps=1e-5):
  x = x.clamp(min=0, max=1)
  return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


class MultiheadAttentionTorch(nn.Module):
  """mmcv MultiheadAttention: identity + attn(query + pos, key + pos, value), sequence-first."""

  def __init__(self, dims, heads):
    super().__init__()
    self.attn = nn.MultiheadAttention(dims, heads, dropout=0.0)

  def forward(self, query, query_pos):
    q = query + query_pos
    return query + self.attn(q, q, query)[0]


class CustomMSDATorch(nn.Module):
  def __init__(self, dims, heads, levels, points):
    super().__init__()
    self.heads, self.levels, self.points = heads, levels, points
    self.sampling_offsets = nn.Linear(dims, heads * levels * points * 2)
    self.attention_weights = nn.Linear(dims, heads * levels * points)
    self.value_proj = nn.Linear(dims, dims)
    self.output_proj = nn.Linear(dims, dims)

  def forward(self, query, query_pos, value, reference_points, shapes):
    """query (Q, B, C); value (HW, B, C); reference_points (B, Q, levels, 2) -> (Q, B, C)."""
    identity = query
    query = (query + query_pos).permute(1, 0, 2)
    value = value.permute(1, 0, 2)
    bs, nq, _ = query.shape
    v = self.value_proj(value).view(bs, value.shape[1], self.heads, -1)
    off = self.sampling_offsets(query).view(bs, nq, self.heads, self.levels, self.points, 2)
    aw = self.attention_weights(query).view(bs, nq, self.heads, self.levels * self.points)
    aw = aw.softmax(-1).view(bs, nq, self.heads, self.levels, self.points)
    normalizer = torch.tensor([[w, h] for h, w in shapes], dtype=off.dtype)
    loc = reference_points[:, :, None, :, None, :] + off / normalizer[None, None, None, :, None, :]
    out = self.output_proj(ms_deform_attn(v, shapes, loc, aw))
    return out.permute(1, 0, 2) + identity


class DecoderLayerTorch(nn.Module):
  def __init__(self, dims, heads, ffn, points):
    super().__init__()
    self.attentions = nn.ModuleList(
      [MultiheadAttentionTorch(dims, heads), CustomMSDATorch(dims, heads, 1, points)]
    )
    self.ffns = nn.ModuleList([FFN(dims, ffn)])
    self.norms = nn.ModuleList([nn.LayerNorm(dims) for _ in range(3)])

  def forward(self, x, pos, value, reference_points, shapes):
    x = self.norms[0](self.attentions[0](x, pos))
    x = self.norms[1](self.attentions[1](x, pos, value, reference_points, shapes))
    return self.norms[2](self.ffns[0](x))


class DecoderTorch(nn.Module):
  def __init__(self, num_layers, dims, heads, ffn, points):
    super().__init__()
    self.layers = nn.ModuleList(
      [DecoderLayerTorch(dims, heads, ffn, points) for _ in range(num_layers)]
    )

  def forward(self, query, query_pos, value, reference_points, reg_branches, shapes):
    """query, query_pos (Q, B, C); value (HW, B, C); reference_points (B, Q, 3)."""
    output = query
    intermediate, intermediate_refs = [], []
    for lid, layer in enumerate(self.layers):
      output = layer(output, query_pos, value, reference_points[..., :2].unsqueeze(2), shapes)
      output = output.permute(1, 0, 2)
      tmp = reg_branches[lid](output)
      new = torch.zeros_like(reference_points)
      new[..., :2] = tmp[..., :2] + inverse_sigmoid(reference_points[..., :2])
      new[..., 2:3] = tmp[..., 4:5] + inverse_sigmoid(reference_points[..., 2:3])
      reference_points = new.sigmoid().detach()
      output = output.permute(1, 0, 2)
      intermediate.append(output)
      intermediate_refs.append(reference_points)
    return torch.stack(intermediate), torch.stack(intermediate_refs)


class DetTransformerTorch(nn.Module):
  def __init__(self, enc_cfg, det_cfg, num_cams=6):
    super().__init__()
    c = enc_cfg.embed_dims
    self.level_embeds = nn.Parameter(torch.randn(len(enc_cfg.spatial_shapes), c))
    self.cams_embeds = nn.Parameter(torch.randn(num_cams, c))
    self.encoder = EncoderTorch(enc_cfg)
    self.decoder = DecoderTorch(
      det_cfg.num_layers, c, det_cfg.num_heads, det_cfg.ffn_dims, det_cfg.num_points
    )
    self.reference_points = nn.Linear(c, 3)
    self.can_bus_mlp = nn.Sequential(
      nn.Linear(18, c // 2), nn.ReLU(inplace=True), nn.Linear(c // 2, c), nn.ReLU(inplace=True)
    )
    self.can_bus_mlp.add_module('norm', nn.LayerNorm(c))


class BEVFormerHeadTorch(BEVHeadTorch):
  """BEVFormerHead with box refinement; `bev` (queries -> encoder) is BEVHeadTorch's."""

  def __init__(self, enc_cfg, det_cfg, num_cams=6):
    nn.Module.__init__(self)
    self.enc_cfg, self.det_cfg = enc_cfg, det_cfg
    h, w, c = enc_cfg.bev_h, enc_cfg.bev_w, enc_cfg.embed_dims
    self.code_weights = nn.Parameter(torch.tensor(det_cfg.code_weights), requires_grad=False)
    self.positional_encoding = LearnedPositionalEncodingTorch(c // 2, h, w)
    self.transformer = DetTransformerTorch(enc_cfg, det_cfg, num_cams)
    cls = nn.Sequential(
      nn.Linear(c, c),
      nn.LayerNorm(c),
      nn.ReLU(inplace=True),
      nn.Linear(c, c),
      nn.LayerNorm(c),
      nn.ReLU(inplace=True),
      nn.Linear(c, det_cfg.num_classes),
    )
    reg = nn.Sequential(
      nn.Linear(c, c), nn.ReLU(), nn.Linear(c, c), nn.ReLU(), nn.Linear(c, det_cfg.code_size)
    )
    n = det_cfg.num_layers
    self.cls_branches = nn.ModuleList([copy.deepcopy(cls) for _ in range(n)])
    self.reg_branches = nn.ModuleList([copy.deepcopy(reg) for _ in range(n)])
    self.bev_embedding = nn.Embedding(h * w, c)
    self.query_embedding = nn.Embedding(det_cfg.num_query, 2 * c)

  def detect(self, bev):
    """bev (B, HW, C) -> cls (L, B, Q, classes), box (L, B, Q, 10) as BEVFormerHead.forward."""
    t, c = self.transformer, self.enc_cfg.embed_dims
    b = bev.shape[0]
    query_pos, query = torch.split(self.query_embedding.weight, c, dim=1)
    query_pos = query_pos[None].expand(b, -1, -1)
    query = query[None].expand(b, -1, -1)
    reference_points = t.reference_points(query_pos).sigmoid()
    init_reference = reference_points
    shapes = ((self.enc_cfg.bev_h, self.enc_cfg.bev_w),)
    hs, inter_references = t.decoder(
      query.permute(1, 0, 2),
      query_pos.permute(1, 0, 2),
      bev.permute(1, 0, 2),
      reference_points,
      self.reg_branches,
      shapes,
    )
    hs = hs.permute(0, 2, 1, 3)  # (L, B, Q, C)
    pc = self.det_cfg.pc_range
    classes, coords = [], []
    for lvl in range(hs.shape[0]):
      reference = init_reference if lvl == 0 else inter_references[lvl - 1]
      reference = inverse_sigmoid(reference)
      outputs_class = self.cls_branches[lvl](hs[lvl])
      tmp = self.reg_branches[lvl](hs[lvl])
      tmp[..., 0:2] += reference[..., 0:2]
      tmp[..., 0:2] = tmp[..., 0:2].sigmoid()
      tmp[..., 4:5] += reference[..., 2:3]
      tmp[..., 4:5] = tmp[..., 4:5].sigmoid()
      tmp[..., 0:1] = tmp[..., 0:1] * (pc[3] - pc[0]) + pc[0]
      tmp[..., 1:2] = tmp[..., 1:2] * (pc[4] - pc[1]) + pc[1]
      tmp[..., 4:5] = tmp[..., 4:5] * (pc[5] - pc[2]) + pc[2]
      classes.append(outputs_class)
      coords.append(tmp)
    return torch.stack(classes), torch.stack(coords)


class UniSceneDetTorch(nn.Module):
  def __init__(self, stage_blocks, base_width, stage_with_dcn, enc_cfg, det_cfg, num_cams=6):
    super().__init__()
    self.pts_bbox_head = BEVFormerHeadTorch(enc_cfg, det_cfg, num_cams)
    self.img_backbone = ResNet(stage_blocks, base_width, stage_with_dcn)
    widths = [4 * base_width * 2**s for s in (1, 2, 3)]
    self.img_neck = FPN(widths, enc_cfg.embed_dims, 4)

  def features(self, img):
    """img (B, N, 3, H, W) -> per level (B, N, C, h, w)."""
    b, n = img.shape[:2]
    feats = self.img_neck(self.img_backbone(img.flatten(0, 1)))
    return [f.view(b, n, *f.shape[1:]) for f in feats]

  def forward(self, img, lidar2img, ego2lidar, can_bus, prev_bev_exists):
    """img (B, T, N, 3, H, W); can_bus numpy (B, T, 18); prev_bev_exists list of T bools (B = 1).

    Returns (cls, box, bev): the queue's history frames run first under no_grad, each passing
    its BEV on unless the next frame starts a new scene, then the current frame is detected.
    """
    head = self.pts_bbox_head
    prev = None
    with torch.no_grad():
      for i in range(img.shape[1] - 1):
        if not prev_bev_exists[i]:
          prev = None
        prev = head.bev(
          self.features(img[:, i]), lidar2img[:, i], ego2lidar[:, i], can_bus[:, i], prev
        )
    if not prev_bev_exists[-1]:
      prev = None
    bev = head.bev(
      self.features(img[:, -1]), lidar2img[:, -1], ego2lidar[:, -1], can_bus[:, -1], prev
    )
    cls, box = head.detect(bev)
    return cls, box, bev
