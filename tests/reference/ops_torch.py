"""PyTorch references for the sampling ops, written from the model spec (sections 4 and 7.4).

Layouts follow the reference code: channel-first for maps and DCN tensors, (x, y) grids. These are
deliberately plain: `F.grid_sample` is the sampling primitive for MSDA (as in mmcv's
`multi_scale_deformable_attn_pytorch`), and the DCN samples its input with an explicit four-corner
bilinear gather so that it shares no code with the MSDA reference.
"""

import torch
import torch.nn.functional as F


def grid_sample(feat: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
  """feat [B, C, H, W], grid [B, Hg, Wg, 2] (x, y) in [-1, 1] -> [B, C, Hg, Wg]."""
  return F.grid_sample(feat, grid, mode='bilinear', padding_mode='zeros', align_corners=False)


def ms_deform_attn(
  value: torch.Tensor,
  spatial_shapes: tuple[tuple[int, int], ...],
  sampling_locations: torch.Tensor,
  attention_weights: torch.Tensor,
) -> torch.Tensor:
  """Multi-scale deformable attention, one grid_sample per level.

  Args:
    value: [B, L, heads, Dh] with L = sum of h * w over levels, level-major, row-major inside.
    spatial_shapes: ((h, w), ...) per level.
    sampling_locations: [B, Q, heads, levels, points, 2], (x, y) normalised to [0, 1].
    attention_weights: [B, Q, heads, levels, points].

  Returns:
    [B, Q, heads * Dh], channel 32 * head + d for Dh = 32.
  """
  b, _, heads, dh = value.shape
  _, q, _, levels, points, _ = sampling_locations.shape
  sizes = [h * w for h, w in spatial_shapes]
  value_list = value.split(sizes, dim=1)
  grids = 2 * sampling_locations - 1
  sampled = []
  for lvl, (h, w) in enumerate(spatial_shapes):
    # [B, h*w, heads, Dh] -> [B*heads, Dh, h, w]
    v = value_list[lvl].flatten(2).transpose(1, 2).reshape(b * heads, dh, h, w)
    # [B, Q, heads, P, 2] -> [B*heads, Q, P, 2]
    g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
    sampled.append(grid_sample(v, g))  # [B*heads, Dh, Q, P]
  # [B, Q, heads, levels, P] -> [B*heads, 1, Q, levels*P]
  aw = attention_weights.transpose(1, 2).reshape(b * heads, 1, q, levels * points)
  out = (torch.stack(sampled, dim=-2).flatten(-2) * aw).sum(-1)  # [B*heads, Dh, Q]
  return out.view(b, heads * dh, q).transpose(1, 2).contiguous()


def _bilinear_zero_pad(x: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
  """Samples x [B, C, H, W] at pixel coordinates ys, xs [B, K, H', W'] -> [B, C, K, H', W'].

  As mmcv's dmcn_im2col_bilinear: a sample is zero unless -1 < y < H and -1 < x < W, and inside
  that range the corners outside the map count as zero. Coordinates are clamped first only so that
  the integer conversion stays defined (the clamped points read zeros and get no gradient).
  """
  b, c, h, w = x.shape
  region = ((ys > -1) & (ys < h) & (xs > -1) & (xs < w)).to(x.dtype)
  ys = ys.clamp(-2.0, h + 1.0)
  xs = xs.clamp(-2.0, w + 1.0)
  y0 = torch.floor(ys).detach()
  x0 = torch.floor(xs).detach()
  flat = x.reshape(b, c, h * w)
  out = 0
  for dy in (0, 1):
    for dx in (0, 1):
      yi = y0 + dy
      xi = x0 + dx
      wy = ys - y0 if dy else y0 + 1 - ys
      wx = xs - x0 if dx else x0 + 1 - xs
      inside = (yi >= 0) & (yi <= h - 1) & (xi >= 0) & (xi <= w - 1)
      idx = (yi.clamp(0, h - 1) * w + xi.clamp(0, w - 1)).long()  # [B, K, H', W']
      vals = torch.gather(flat, 2, idx.reshape(b, 1, -1).expand(b, c, -1))
      out = out + vals.reshape(b, c, *idx.shape[1:]) * (wy * wx * inside * region)[:, None]
  return out


def modulated_deform_conv2d(
  x: torch.Tensor,
  offset: torch.Tensor,
  mask: torch.Tensor,
  weight: torch.Tensor,
  stride: int = 1,
  padding: int = 1,
  dilation: int = 1,
) -> torch.Tensor:
  """DCNv2 with mmcv's layout, deform_groups = 1, no bias.

  Args:
    x: [B, Cin, H, W].
    offset: [B, 2K, H', W']; channel 2k is dy and 2k + 1 is dx of tap k = i * kw + j.
    mask: [B, K, H', W'] modulation (already through the sigmoid).
    weight: [Cout, Cin, kh, kw].

  Returns:
    [B, Cout, H', W'].
  """
  _, _, kh, kw = weight.shape
  b, _, ho, wo = offset.shape
  k = kh * kw
  taps_i = torch.arange(kh, dtype=x.dtype).repeat_interleave(kw)  # [K]
  taps_j = torch.arange(kw, dtype=x.dtype).repeat(kh)
  rows = torch.arange(ho, dtype=x.dtype) * stride - padding
  cols = torch.arange(wo, dtype=x.dtype) * stride - padding
  base_y = rows[None, :, None] + dilation * taps_i[:, None, None]  # [K, H', 1]
  base_x = cols[None, None, :] + dilation * taps_j[:, None, None]  # [K, 1, W']
  off = offset.view(b, k, 2, ho, wo)
  ys = base_y[None] + off[:, :, 0]
  xs = base_x[None] + off[:, :, 1]
  cols_ = _bilinear_zero_pad(x, ys, xs) * mask[:, None]  # [B, Cin, K, H', W']
  return torch.einsum('bckhw,ock->bohw', cols_, weight.reshape(weight.shape[0], -1, k))
