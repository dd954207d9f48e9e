"""PyTorch twin of the BEVFormer encoder, written from the model spec (sections 1, 6, 7).

It follows the reference's own procedure, including what is only right for one sample: TSA takes
`V[:B]` of the slot-interleaved value stack, SCA selects each camera's queries from sample 0's
mask and rebatches them to the longest selection. Attribute names give the reference's state_dict
keys (`layers.0.attentions.1.deformable_attention.sampling_offsets.weight`, ...).
"""

import math

import torch
import torch.utils.checkpoint
from torch import nn

from tests.reference.occupancy_torch import rotate_torch
from tests.reference.ops_torch import ms_deform_attn


class TSA(nn.Module):
  def __init__(self, dims, heads, points, bev_h, bev_w, queue=2):
    super().__init__()
    self.heads, self.points, self.queue, self.bev_h, self.bev_w = heads, points, queue, bev_h, bev_w
    self.sampling_offsets = nn.Linear(dims * queue, heads * queue * points * 2)
    self.attention_weights = nn.Linear(dims * queue, heads * queue * points)
    self.value_proj = nn.Linear(dims, dims)
    self.output_proj = nn.Linear(dims, dims)

  def forward(self, query, query_pos, value, ref_2d):
    """query (B, HW, C); value (2B, HW, C) interleaved 2b + t or None; ref_2d (2B, HW, 1, 2)."""
    b, hw, c = query.shape
    identity = query
    if value is None:
      value = torch.stack([query, query], 1).reshape(b * 2, hw, c)
    query = query + query_pos
    query = torch.cat([value[:b], query], -1)  # the reference's slice: right for B = 1 only
    v = self.value_proj(value).view(b * 2, hw, self.heads, -1)
    off = self.sampling_offsets(query).view(b, hw, self.heads, self.queue, 1, self.points, 2)
    aw = self.attention_weights(query).view(b, hw, self.heads, self.queue, self.points)
    aw = aw.softmax(-1).view(b, hw, self.heads, self.queue, 1, self.points)
    off = off.permute(0, 3, 1, 2, 4, 5, 6).reshape(b * 2, hw, self.heads, 1, self.points, 2)
    aw = aw.permute(0, 3, 1, 2, 4, 5).reshape(b * 2, hw, self.heads, 1, self.points)
    norm = torch.tensor([self.bev_w, self.bev_h], dtype=off.dtype)
    loc = ref_2d[:, :, None, :, None, :] + off / norm
    out = ms_deform_attn(v, ((self.bev_h, self.bev_w),), loc, aw)  # (2B, HW, C)
    out = out.permute(1, 2, 0).reshape(hw, c, b, self.queue).mean(-1).permute(2, 0, 1)
    return self.output_proj(out) + identity


class MSDA3D(nn.Module):
  def __init__(self, dims, heads, levels, points):
    super().__init__()
    self.heads, self.levels, self.points = heads, levels, points
    self.sampling_offsets = nn.Linear(dims, heads * levels * points * 2)
    self.attention_weights = nn.Linear(dims, heads * levels * points)
    self.value_proj = nn.Linear(dims, dims)

  def forward(self, query, value, ref, shapes):
    bs, nq, _ = query.shape
    v = self.value_proj(value).view(bs, value.shape[1], self.heads, -1)
    off = self.sampling_offsets(query).view(bs, nq, self.heads, self.levels, self.points, 2)
    aw = self.attention_weights(query).view(bs, nq, self.heads, self.levels * self.points)
    aw = aw.softmax(-1).view(bs, nq, self.heads, self.levels, self.points)
    norm = torch.tensor([[w, h] for h, w in shapes], dtype=off.dtype)
    off = off / norm[None, None, None, :, None, :]
    d = ref.shape[2]
    off = off.view(bs, nq, self.heads, self.levels, self.points // d, d, 2)
    loc = (ref[:, :, None, None, None, :, :] + off).view(
      bs, nq, self.heads, self.levels, self.points, 2
    )
    return ms_deform_attn(v, shapes, loc, aw)


class SCA(nn.Module):
  def __init__(self, dims, heads, levels, points):
    super().__init__()
    self.deformable_attention = MSDA3D(dims, heads, levels, points)
    self.output_proj = nn.Linear(dims, dims)

  def forward(self, query, feats, ref_cam, bev_mask, shapes):
    """query (B, HW, C); feats (N, L, B, C); ref_cam (N, B, HW, D, 2); bev_mask (N, B, HW, D)."""
    b, hw, c = query.shape
    n = feats.shape[0]
    slots = torch.zeros_like(query)
    indexes = [m[0].sum(-1).nonzero().squeeze(-1) for m in bev_mask]  # sample 0's selection
    max_len = max(len(i) for i in indexes)
    d = ref_cam.shape[3]
    q_re = query.new_zeros(b, n, max_len, c)
    r_re = ref_cam.new_zeros(b, n, max_len, d, 2)
    for j in range(b):
      for i, idx in enumerate(indexes):
        q_re[j, i, : len(idx)] = query[j, idx]
        r_re[j, i, : len(idx)] = ref_cam[i, j, idx]
    value = feats.permute(2, 0, 1, 3).reshape(b * n, feats.shape[1], c)
    out = self.deformable_attention(
      q_re.view(b * n, max_len, c), value, r_re.view(b * n, max_len, d, 2), shapes
    ).view(b, n, max_len, c)
    for j in range(b):
      for i, idx in enumerate(indexes):
        slots[j, idx] += out[j, i, : len(idx)]
    count = (bev_mask.sum(-1) > 0).permute(1, 2, 0).sum(-1).clamp(min=1.0)
    return self.output_proj(slots / count[..., None]) + query


class FFN(nn.Module):
  def __init__(self, dims, hidden):
    super().__init__()
    self.layers = nn.Sequential(
      nn.Sequential(nn.Linear(dims, hidden), nn.ReLU(), nn.Dropout(0.0)),
      nn.Linear(hidden, dims),
      nn.Dropout(0.0),
    )

  def forward(self, x):
    return x + self.layers(x)


class Layer(nn.Module):
  def __init__(self, dims, heads, ffn, tsa_points, sca_points, levels, bev_h, bev_w):
    super().__init__()
    self.attentions = nn.ModuleList(
      [TSA(dims, heads, tsa_points, bev_h, bev_w), SCA(dims, heads, levels, sca_points)]
    )
    self.norms = nn.ModuleList([nn.LayerNorm(dims) for _ in range(3)])
    self.ffns = nn.ModuleList([FFN(dims, ffn)])
    self.with_cp = False  # recompute the layer in the backward pass

  def forward(self, x, bev_pos, value, hybrid, feats, ref_cam, bev_mask, shapes):
    if self.with_cp and torch.is_grad_enabled():
      return torch.utils.checkpoint.checkpoint(
        self._forward,
        x,
        bev_pos,
        value,
        hybrid,
        feats,
        ref_cam,
        bev_mask,
        shapes,
        use_reentrant=False,
      )
    return self._forward(x, bev_pos, value, hybrid, feats, ref_cam, bev_mask, shapes)

  def _forward(self, x, bev_pos, value, hybrid, feats, ref_cam, bev_mask, shapes):
    x = self.norms[0](self.attentions[0](x, bev_pos, value, hybrid))
    x = self.norms[1](self.attentions[1](x, feats, ref_cam, bev_mask, shapes))
    return self.norms[2](self.ffns[0](x))


class EncoderTorch(nn.Module):
  """Encoder of one frame, batch-first (B, HW, C), eval mode (no dropout)."""

  def __init__(self, cfg):
    super().__init__()
    self.cfg = cfg
    self.layers = nn.ModuleList(
      [
        Layer(
          cfg.embed_dims,
          cfg.num_heads,
          cfg.ffn_dims,
          cfg.tsa_points,
          cfg.sca_points,
          len(cfg.spatial_shapes),
          cfg.bev_h,
          cfg.bev_w,
        )
        for _ in range(cfg.num_layers)
      ]
    )

  def point_sampling(self, lidar2img, ego2lidar):
    cfg = self.cfg
    h, w, p = cfg.bev_h, cfg.bev_w, cfg.num_points_in_pillar
    height = cfg.pc_range[5] - cfg.pc_range[2]
    zs = torch.linspace(0.5, height - 0.5, p).view(-1, 1, 1).expand(p, h, w) / height
    xs = torch.linspace(0.5, w - 0.5, w).view(1, 1, w).expand(p, h, w) / w
    ys = torch.linspace(0.5, h - 0.5, h).view(1, h, 1).expand(p, h, w) / h
    ref = torch.stack((xs, ys, zs), -1).flatten(1, 2)  # (P, HW, 3)
    lo, hi = torch.tensor(cfg.pc_range[:3]), torch.tensor(cfg.pc_range[3:])
    ref = ref * (hi - lo) + lo
    ref = torch.cat([ref, torch.ones_like(ref[..., :1])], -1)
    mats = lidar2img.float()
    if cfg.bev_frame == 'ego':
      mats = mats @ ego2lidar[0].float()  # the reference reads sample 0's ego2lidar
    cam = torch.einsum('bnij,pqj->nbqpi', mats, ref)
    eps = 1e-5
    mask = cam[..., 2] > eps
    uv = cam[..., :2] / torch.clamp(cam[..., 2:3], min=eps)
    uv = uv / torch.tensor([cfg.image_size[1], cfg.image_size[0]], dtype=uv.dtype)
    mask = mask & (uv[..., 0] > 0) & (uv[..., 0] < 1) & (uv[..., 1] > 0) & (uv[..., 1] < 1)
    return uv, mask  # (N, B, HW, P, 2), (N, B, HW, P)

  def forward(self, bev_query, bev_pos, feats, lidar2img, ego2lidar, can_bus, prev_bev):
    """feats (B, N, L, C); can_bus (B, 18) as a numpy-like float64 tensor; prev_bev or None."""
    cfg = self.cfg
    b, hw, c = bev_query.shape
    ref_cam, bev_mask = self.point_sampling(lidar2img, ego2lidar)
    shifts = []
    for j in range(b):
      dx, dy = float(can_bus[j, 0]), float(can_bus[j, 1])
      yaw = float(can_bus[j, 16]) / math.pi * 180
      length = math.sqrt(dx * dx + dy * dy)
      angle = yaw - math.atan2(dy, dx) / math.pi * 180
      shifts.append(
        [
          length
          * math.sin(angle / 180 * math.pi)
          / ((cfg.pc_range[3] - cfg.pc_range[0]) / cfg.bev_w)
          / cfg.bev_w,
          length
          * math.cos(angle / 180 * math.pi)
          / ((cfg.pc_range[4] - cfg.pc_range[1]) / cfg.bev_h)
          / cfg.bev_h,
        ]
      )
    shift = torch.tensor(shifts, dtype=torch.float32)
    h, w = cfg.bev_h, cfg.bev_w
    ys, xs = torch.meshgrid(
      torch.linspace(0.5, h - 0.5, h) / h, torch.linspace(0.5, w - 0.5, w) / w, indexing='ij'
    )
    ref_2d = torch.stack((xs.reshape(-1), ys.reshape(-1)), -1)[None].repeat(b, 1, 1)[:, :, None]
    shift_ref = ref_2d.clone() if not cfg.inplace_shift else ref_2d
    shift_ref += shift[:, None, None, :]  # in place: with the quirk ref_2d moves too
    value = None
    if prev_bev is not None:
      prev = torch.stack(
        [
          rotate_torch(prev_bev[j].T.reshape(c, h, w), float(can_bus[j, 17])).reshape(c, hw).T
          for j in range(b)
        ]
      )
      value = torch.stack([prev, bev_query], 1).reshape(b * 2, hw, c)
      hybrid = torch.stack([shift_ref, ref_2d], 1).reshape(b * 2, hw, 1, 2)
    else:
      hybrid = torch.stack([ref_2d, ref_2d], 1).reshape(b * 2, hw, 1, 2)
    feats_t = feats.permute(1, 2, 0, 3)  # (N, L, B, C)
    x = bev_query
    for layer in self.layers:
      x = layer(x, bev_pos, value, hybrid, feats_t, ref_cam, bev_mask, cfg.spatial_shapes)
    return x
