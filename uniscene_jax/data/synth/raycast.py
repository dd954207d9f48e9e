"""Ray casting against vertical boxes and the ground plane, separable in columns and rows.

Both sensors of the synthetic rig are level (no pitch or roll): a lidar ray is (azimuth, elevation)
and a pinhole camera's pixel ray is (column, row). In either case the ray of column u and row v is

    p(lam) = origin + lam * (col_dir[u, 0], col_dir[u, 1], row_slope[v])

so its horizontal direction depends on the column only and its climb on the row only. Against a
vertical box (yaw-only rotation) the footprint test then depends on (u, box) and the height test
on (v, box); a ray hits a box where the two parameter intervals overlap. This costs two small tables
and one min/max per (v, u, box) instead of a full 3-D slab test. For the lidar, lam is the
horizontal distance; for a camera (col_dir = forward + x_n * right, row_slope = -y_n) lam is the
depth along the optical axis.
"""

import dataclasses

import numpy as np

from uniscene_jax.data.synth.world import Boxes

GROUND = -1
NOTHING = -2


@dataclasses.dataclass(frozen=True)
class Hits:
  """First hits of a [V, U] ray grid.

  Attributes:
    lam: [V, U] ray parameter of the first hit, inf where nothing is hit.
    index: [V, U] int, box index, GROUND or NOTHING.
    normal: [V, U, 3] outward unit normal of the surface hit (0 where nothing is hit).
    rays_through: [K] number of rays that pass through box k (occluded or not).
    rays_first: [K] number of rays whose first hit is box k.
  """

  lam: np.ndarray
  index: np.ndarray
  normal: np.ndarray
  rays_through: np.ndarray
  rays_first: np.ndarray


def _slab(o, d, half):
  """Entry/exit parameters of the 1-D slab |o + lam * d| <= half; d may be zero."""
  with np.errstate(divide='ignore', invalid='ignore'):
    t1 = (-half - o) / d
    t2 = (half - o) / d
  parallel = d == 0
  inside = np.abs(o) <= half
  near = np.where(parallel, np.where(inside, -np.inf, np.inf), np.minimum(t1, t2))
  far = np.where(parallel, np.where(inside, np.inf, -np.inf), np.maximum(t1, t2))
  return near, far


def cast(origin, col_dir, row_slope, boxes: Boxes, max_lam=np.inf, chunk=4_000_000) -> Hits:
  """First hits of the rays origin + lam * (col_dir[u], row_slope[v]) for lam > 0.

  Args:
    origin: [3] global position of the sensor.
    col_dir: [U, 2] horizontal direction per column (any non-zero length).
    row_slope: [V] vertical component per row, in the same units as col_dir.
    boxes: K vertical boxes.
    max_lam: hits beyond this parameter are ignored.
    chunk: bound on V_chunk * U * K_visible elements per step (memory).
  """
  origin = np.asarray(origin, np.float64)
  col_dir = np.asarray(col_dir, np.float64)
  row_slope = np.asarray(row_slope, np.float64)
  num_v, num_u, num_k = len(row_slope), len(col_dir), len(boxes.yaw)
  cos, sin = np.cos(boxes.yaw), np.sin(boxes.yaw)
  rel = origin[:2] - boxes.centre[:, :2]
  o_local = np.stack([rel[:, 0] * cos + rel[:, 1] * sin, -rel[:, 0] * sin + rel[:, 1] * cos], -1)
  d_local = np.stack(
    [
      col_dir[:, None, 0] * cos + col_dir[:, None, 1] * sin,
      -col_dir[:, None, 0] * sin + col_dir[:, None, 1] * cos,
    ],
    -1,
  )  # [U, K, 2]
  half_len, half_wid = boxes.size[:, 1] / 2, boxes.size[:, 0] / 2
  near_x, far_x = _slab(o_local[None, :, 0], d_local[..., 0], half_len)
  near_y, far_y = _slab(o_local[None, :, 1], d_local[..., 1], half_wid)
  a_in, a_out = np.maximum(near_x, near_y), np.minimum(far_x, far_y)  # [U, K]
  enter_x = near_x >= near_y
  bottom = boxes.centre[:, 2] - boxes.size[:, 2] / 2
  top = boxes.centre[:, 2] + boxes.size[:, 2] / 2
  b_in, b_out = _slab(
    origin[2] - (bottom + top)[None] / 2, row_slope[:, None], (top - bottom)[None] / 2
  )

  # Only boxes whose footprint some column crosses in front of the sensor.
  seen = np.nonzero(((a_in <= a_out) & (a_out > 0)).any(0))[0]
  a_in_s, a_out_s = a_in[:, seen], a_out[:, seen]
  b_in_s, b_out_s = b_in[:, seen], b_out[:, seen]
  lam = np.full((num_v, num_u), np.inf)
  first = np.full((num_v, num_u), -1, np.int64)
  top_face = np.zeros((num_v, num_u), bool)
  through = np.zeros(num_k, np.int64)
  rows = max(1, chunk // max(1, num_u * len(seen)))
  for v0 in range(0, num_v, rows):
    sl = slice(v0, min(num_v, v0 + rows))
    t_in = np.maximum(a_in_s[None], b_in_s[sl, None])
    t_out = np.minimum(a_out_s[None], b_out_s[sl, None])
    hit = (t_in <= t_out) & (t_in > 1e-6) & (t_in <= max_lam)
    through[seen] += hit.sum((0, 1))
    t_hit = np.where(hit, t_in, np.inf)
    k = np.argmin(t_hit, -1) if len(seen) else np.zeros(t_in.shape[:2], np.int64)
    if len(seen):
      lam[sl] = np.take_along_axis(t_hit, k[..., None], -1)[..., 0]
      first[sl] = seen[k]
      top_face[sl] = np.take_along_axis(b_in_s[sl, None] >= a_in_s[None], k[..., None], -1)[..., 0]

  index = np.where(np.isfinite(lam), first, NOTHING)
  with np.errstate(divide='ignore'):
    lam_ground = np.where(row_slope < 0, -origin[2] / row_slope, np.inf)
  ground = (lam_ground[:, None] < lam) & (lam_ground[:, None] <= max_lam)
  lam = np.where(ground, lam_ground[:, None], lam)
  index = np.where(ground, GROUND, index)

  normal = np.zeros((num_v, num_u, 3))
  on_box = index >= 0
  kk = np.where(on_box, index, 0)
  uu = np.broadcast_to(np.arange(num_u)[None], (num_v, num_u))
  vv = np.broadcast_to(np.arange(num_v)[:, None], (num_v, num_u))
  ex = enter_x[uu, kk]
  dl = d_local[uu, kk]
  side_local = (
    np.where(ex[..., None], [1.0, 0.0], [0.0, 1.0])
    * -np.sign(np.where(ex, dl[..., 0], dl[..., 1]))[..., None]
  )
  c, s = cos[kk], sin[kk]
  side = np.stack(
    [
      side_local[..., 0] * c - side_local[..., 1] * s,
      side_local[..., 0] * s + side_local[..., 1] * c,
      np.zeros_like(c),
    ],
    -1,
  )
  vertical = np.zeros_like(side)
  vertical[..., 2] = -np.sign(row_slope)[vv]
  box_normal = np.where(top_face[..., None], vertical, side)
  normal[on_box] = box_normal[on_box]
  normal[index == GROUND] = [0.0, 0.0, 1.0]
  first_count = np.bincount(index[on_box], minlength=num_k)
  return Hits(lam=lam, index=index, normal=normal, rays_through=through, rays_first=first_count)
