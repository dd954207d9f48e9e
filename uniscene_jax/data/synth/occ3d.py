"""Occ3D-style labels of the synthetic world: semantics, lidar mask and camera mask.

The grid is Occ3D's: 200 x 200 x 16 voxels of 0.4 m over [-40, 40] x [-40, 40] x [-1, 5.4] m in the
ego frame of the key frame, indexed [x, y, z]. Semantics are the world's exact geometry (a voxel
takes the class of the last solid that overlaps it; the ground plane occupies the layer that holds
z = 0). The masks come from visibility, over the scans of the key frames within two of this one: a
free voxel is lidar-observed if some ray reaches it before its first return, an occupied voxel if it
holds a return; a voxel is camera-observed if it is lidar-observed and not behind the depth of some
current camera image.
"""

import numpy as np

from uniscene_jax.data import nuscenes_meta as meta
from uniscene_jax.data.synth import sensors, transforms
from uniscene_jax.data.synth.world import SceneLayout

VOXEL = meta.OCC3D_VOXEL_SIZE
LOW = np.array(meta.OCC3D_RANGE[:3])
SHAPE = meta.OCC3D_SHAPE
# A voxel counts as reached if its centre is at most this far behind the measured surface.
DEPTH_SLACK = 0.3


def voxel_centres_global(ego_xyz, ego_yaw) -> np.ndarray:
  """Global centres [X, Y, Z, 3] of the Occ3D voxels around an ego pose."""
  idx = [np.arange(n) for n in SHAPE]
  local = np.stack(np.meshgrid(*idx, indexing='ij'), -1) * VOXEL + LOW + VOXEL / 2
  rot = transforms.rotation_z(ego_yaw)
  return local @ rot.T + np.asarray(ego_xyz)


def semantics(layout: SceneLayout, t: float) -> np.ndarray:
  """uint8 [200, 200, 16] classes 0..17 of the world at scene time t."""
  ego_xyz, ego_yaw = layout.ego_pose(t)
  centres = voxel_centres_global(ego_xyz, ego_yaw)
  sem = np.full(SHAPE, meta.OCC3D_FREE, np.uint8)
  ground_k = int(np.floor((0.0 - LOW[2]) / VOXEL))
  sem[:, :, ground_k] = layout.road.ground_class(centres[:, :, ground_k, :2])
  boxes = layout.tracks.at(layout.road, t)
  rot = transforms.rotation_z(ego_yaw)[:2, :2]
  centre_ego = (boxes.centre[:, :2] - ego_xyz[:2]) @ rot  # [K, 2]
  yaw_ego = boxes.yaw - ego_yaw
  # Static solids first, then annotated objects on top.
  order = np.argsort(layout.tracks.instance >= 0, kind='stable')
  for k in order:
    c, s = np.cos(yaw_ego[k]), np.sin(yaw_ego[k])
    half_l, half_w = boxes.size[k, 1] / 2, boxes.size[k, 0] / 2
    ext = np.array([abs(c) * half_l + abs(s) * half_w, abs(s) * half_l + abs(c) * half_w])
    z0 = boxes.centre[k, 2] - boxes.size[k, 2] / 2
    lo = np.floor((np.append(centre_ego[k] - ext, z0) - LOW) / VOXEL).astype(int)
    hi = np.floor((np.append(centre_ego[k] + ext, z0 + boxes.size[k, 2]) - LOW) / VOXEL).astype(int)
    lo, hi = np.maximum(lo, 0), np.minimum(hi, np.array(SHAPE) - 1)
    if np.any(lo > hi):
      continue
    ii, jj, kk = (np.arange(a, b + 1) for a, b in zip(lo, hi, strict=True))
    vx = LOW[0] + (ii + 0.5) * VOXEL - centre_ego[k, 0]
    vy = LOW[1] + (jj + 0.5) * VOXEL - centre_ego[k, 1]
    vz = LOW[2] + (kk + 0.5) * VOXEL
    dx, dy = vx[:, None], vy[None, :]
    half = VOXEL / 2
    # Separating axes: the voxel's x and y, then the box's own two axes.
    overlap = (np.abs(dx) < half + ext[0]) & (np.abs(dy) < half + ext[1])
    overlap &= np.abs(dx * c + dy * s) < half_l + half * (abs(c) + abs(s))
    overlap &= np.abs(-dx * s + dy * c) < half_w + half * (abs(c) + abs(s))
    z_overlap = (vz + half > z0) & (vz - half < z0 + boxes.size[k, 2])
    cell = overlap[:, :, None] & z_overlap[None, None, :]
    block = sem[lo[0] : hi[0] + 1, lo[1] : hi[1] + 1, lo[2] : hi[2] + 1]
    block[cell] = layout.tracks.occ_class[k]
  return sem


def lidar_mask(scans: list[sensors.LidarScan], ego_xyz, ego_yaw, sem: np.ndarray) -> np.ndarray:
  """bool [X, Y, Z]: lidar-observed voxels of the scans, as Occ3D defines them.

  A free voxel is observed if some ray reaches it before (or at) its first return; an occupied
  voxel is observed if it holds a return.
  """
  elev = sensors.LIDAR_ELEVATIONS_DEG
  step = elev[1] - elev[0]
  reached = np.zeros(SHAPE, bool)
  returns = np.zeros(SHAPE, bool)
  centres = voxel_centres_global(ego_xyz, ego_yaw)
  rot = transforms.rotation_z(ego_yaw)
  for scan in scans:
    rel = centres - scan.origin
    rho = np.hypot(rel[..., 0], rel[..., 1])
    el = np.rad2deg(np.arctan2(rel[..., 2], rho))
    ring = np.round((el - elev[0]) / step).astype(int)
    ok = (ring >= 0) & (ring < len(elev)) & (np.abs(el - elev[0] - ring * step) <= step / 2)
    bins = scan.range_image.shape[1]
    az = np.mod(np.arctan2(rel[..., 1], rel[..., 0]) - scan.yaw, 2 * np.pi)
    col = np.minimum((az / (2 * np.pi) * bins).astype(int), bins - 1)
    reach = scan.range_image[np.clip(ring, 0, len(elev) - 1), col]
    reached |= ok & np.isfinite(reach) & (rho <= reach + DEPTH_SLACK)
    idx = np.floor(((scan.global_points() - ego_xyz) @ rot - LOW) / VOXEL).astype(int)
    idx = idx[np.all((idx >= 0) & (idx < np.array(SHAPE)), 1)]
    returns[tuple(idx.T)] = True
  return np.where(sem == meta.OCC3D_FREE, reached, returns) | returns


def camera_visible(image: sensors.CameraImage, cam: sensors.Camera, origin, yaw, centres):
  """bool [X, Y, Z]: voxel centres inside the image and not behind its depth."""
  rel = centres - origin
  fwd = np.array([np.cos(yaw), np.sin(yaw)])
  right = np.array([np.sin(yaw), -np.cos(yaw)])
  z = rel[..., :2] @ fwd
  x = rel[..., :2] @ right
  y = -rel[..., 2]
  k = cam.intrinsic
  with np.errstate(divide='ignore', invalid='ignore'):
    u = np.round(k[0, 0] * x / z + k[0, 2])
    v = np.round(k[1, 1] * y / z + k[1, 2])
  inside = (z > 0.1) & (u >= 0) & (u < cam.width) & (v >= 0) & (v < cam.height)
  ui = np.where(inside, u, 0).astype(int)
  vi = np.where(inside, v, 0).astype(int)
  return inside & (z <= image.depth[vi, ui] + DEPTH_SLACK)
