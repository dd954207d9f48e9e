"""BEV geometry, pure jnp: reference points, projection to the cameras, ego-motion shift, rotation.

Conventions (the reference's): the BEV query index is q = h * W + w, row h along y and column w
along x; normalised 2-D references are (x, y) = ((w + 0.5) / W, (h + 0.5) / H). Pillar anchors sit
at normalised heights linspace(0.5, Z - 0.5, P) / Z of the pc_range height Z. Points project to
pixels of the padded image and are normalised by its (width, height).
"""

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

PC_RANGE = (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0)


def bev_reference_2d(bev_h: int, bev_w: int) -> np.ndarray:
  """float32 [H * W, 2] normalised (x, y) centres of the BEV cells, row-major in (h, w)."""
  ys, xs = np.meshgrid(
    (np.arange(bev_h) + 0.5) / bev_h, (np.arange(bev_w) + 0.5) / bev_w, indexing='ij'
  )
  return np.stack([xs, ys], -1).reshape(-1, 2).astype(np.float32)


def bev_reference_3d(
  bev_h: int, bev_w: int, num_points: int = 4, pc_range: Sequence[float] = PC_RANGE
) -> np.ndarray:
  """float32 [P, H * W, 3] normalised (x, y, z) pillar anchors of every BEV cell."""
  height = pc_range[5] - pc_range[2]
  zs = np.linspace(0.5, height - 0.5, num_points) / height
  xy = bev_reference_2d(bev_h, bev_w)
  out = np.concatenate(
    [
      np.broadcast_to(xy, (num_points, *xy.shape)),
      np.broadcast_to(zs[:, None, None], (num_points, len(xy), 1)),
    ],
    -1,
  )
  return out.astype(np.float32)


def project_to_cameras(
  ref_3d: jnp.ndarray,
  lidar2img: jnp.ndarray,
  image_size: tuple[int, int],
  ego2lidar: jnp.ndarray | None = None,
  pc_range: Sequence[float] = PC_RANGE,
) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Projects pillar anchors into every camera.

  Args:
    ref_3d: [P, Q, 3] normalised anchors (bev_reference_3d).
    lidar2img: [B, N, 4, 4] lidar -> padded-image pixels.
    image_size: (height, width) of the padded image, the normaliser.
    ego2lidar: [B, 4, 4]; given, the anchors are in the ego frame (pre-training), projected with
      lidar2img @ ego2lidar; None, they are in the lidar frame (detection).
    pc_range: metric range that the normalised anchors span.

  Returns:
    reference_points_cam: [B, N, Q, P, 2] normalised (u, v); huge for anchors behind a camera.
    bev_mask: [B, N, Q, P] bool, in front of the camera (depth > 1e-5) and strictly inside (0, 1)^2.
  """
  lo = jnp.asarray(pc_range[:3], jnp.float32)
  hi = jnp.asarray(pc_range[3:], jnp.float32)
  pts = ref_3d.astype(jnp.float32) * (hi - lo) + lo
  pts = jnp.concatenate([pts, jnp.ones_like(pts[..., :1])], -1)  # [P, Q, 4]
  mat = lidar2img.astype(jnp.float32)
  if ego2lidar is not None:
    mat = mat @ ego2lidar.astype(jnp.float32)[:, None]
  cam = jnp.einsum('bnij,pqj->bnqpi', mat, pts, precision='highest')
  eps = 1e-5
  depth = cam[..., 2:3]
  uv = cam[..., 0:2] / jnp.maximum(depth, eps)
  uv = uv / jnp.asarray([image_size[1], image_size[0]], jnp.float32)
  mask = (depth[..., 0] > eps) & jnp.all((uv > 0.0) & (uv < 1.0), -1)
  return uv, mask


def can_bus_shift(
  can_bus: jnp.ndarray, bev_h: int, bev_w: int, pc_range: Sequence[float] = PC_RANGE
) -> jnp.ndarray:
  """[B, 2] (shift_x, shift_y) of the previous BEV in normalised units, from the queue's can_bus.

  can_bus[0:2] is the global-frame translation since the previous frame and can_bus[16] the
  absolute yaw in radians; zero translation gives zero shift.
  """
  can_bus = can_bus.astype(jnp.float32)
  dx, dy = can_bus[:, 0], can_bus[:, 1]
  cell_y = (pc_range[4] - pc_range[1]) / bev_h
  cell_x = (pc_range[3] - pc_range[0]) / bev_w
  length = jnp.sqrt(dx * dx + dy * dy)
  angle = jnp.degrees(can_bus[:, 16]) - jnp.degrees(jnp.arctan2(dy, dx))
  shift_y = length * jnp.cos(jnp.radians(angle)) / cell_y / bev_h
  shift_x = length * jnp.sin(jnp.radians(angle)) / cell_x / bev_w
  return jnp.stack([shift_x, shift_y], -1)


def rotate_bev(bev: jnp.ndarray, angle_deg: jnp.ndarray) -> jnp.ndarray:
  """torchvision `rotate(img, angle, center=[W / 2, H / 2])` on [B, H, W, C]: nearest, zero fill.

  Positive angles turn the picture counter-clockwise as displayed (row 0 at the top). Output
  pixel (h, w) reads input (round(s * dc + c * dr + ch), round(c * dc - s * dr + cw)) with
  dc, dr the offsets from the exact centre, rounding half to even as grid_sample's nearest mode.
  """
  b, h, w, _ = bev.shape
  ch, cw = (h - 1) / 2.0, (w - 1) / 2.0
  theta = jnp.radians(angle_deg.astype(jnp.float32))
  cos, sin = jnp.cos(theta)[:, None, None], jnp.sin(theta)[:, None, None]
  dr = (jnp.arange(h, dtype=jnp.float32) - ch)[None, :, None]
  dc = (jnp.arange(w, dtype=jnp.float32) - cw)[None, None, :]
  src_w = jnp.round(cos * dc - sin * dr + cw).astype(jnp.int32)
  src_h = jnp.round(sin * dc + cos * dr + ch).astype(jnp.int32)
  inside = (src_w >= 0) & (src_w < w) & (src_h >= 0) & (src_h < h)
  flat = jnp.where(inside, jnp.clip(src_h, 0, h - 1) * w + jnp.clip(src_w, 0, w - 1), 0)
  out = jnp.take_along_axis(bev.reshape(b, h * w, -1), flat.reshape(b, h * w, 1), axis=1)
  return jnp.where(inside.reshape(b, h * w, 1), out, 0).reshape(bev.shape)
