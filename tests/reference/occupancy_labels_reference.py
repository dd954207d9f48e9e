"""Slow, literal reference for UniScene's binary occupancy labels (`creat_binary_occ_labels.py`).

Tests compare the fast vectorised label builder against this module bit for bit, so everything
here follows the original script step by step: per-scan float32 transforms rounded after every
step, a dict-based voxel down-sampler looping over points and a Python loop filling the grid.
Speed is deliberately not a concern; readability of the correspondence is.
"""

import numpy as np
from nuscenes.utils.data_classes import LidarPointCloud
from pyquaternion import Quaternion

RANGE_MIN = np.array([-60.0, -60.0, -10.0])
RANGE_MAX = np.array([60.0, 60.0, 10.0])
VOXEL = 0.2
GRID_MIN = np.array([-51.2, -51.2, -5.0])
GRID_MAX = np.array([51.2, 51.2, 3.0])
GRID_SIZE = np.array([200, 200, 16])


def _translate(pts, t, sign):
  """Adds sign * t row by row; float32 + float64 scalar is computed in float64 (NumPy >= 2,
  which the project pins) and rounded to float32 on assignment, so we spell that out."""
  for i in range(3):
    pts[i, :] = pts[i, :].astype(np.float64) + sign * t[i]


def to_reference(points, cs_src, pose_src, cs_ref, pose_ref):
  """Moves a (4, N) float32 scan from its sensor frame into the reference sensor frame.

  Every step writes back into a float32 array, as the original did, so the rounding after each
  step is part of the expected result. Works on a copy so loaded scans are never modified.
  """
  pts = np.array(points, dtype=np.float32, copy=True)
  pts[:3, :] = np.dot(Quaternion(cs_src['rotation']).rotation_matrix, pts[:3, :])
  _translate(pts, np.array(cs_src['translation']), 1.0)
  pts[:3, :] = np.dot(Quaternion(pose_src['rotation']).rotation_matrix, pts[:3, :])
  _translate(pts, np.array(pose_src['translation']), 1.0)
  _translate(pts, np.array(pose_ref['translation']), -1.0)
  pts[:3, :] = np.dot(np.linalg.inv(Quaternion(pose_ref['rotation']).rotation_matrix), pts[:3, :])
  _translate(pts, np.array(cs_ref['translation']), -1.0)
  pts[:3, :] = np.dot(np.linalg.inv(Quaternion(cs_ref['rotation']).rotation_matrix), pts[:3, :])
  return pts


def _load(nusc, sd_token):
  """Raw float32 (4, N) LIDAR_TOP points plus the calibration and pose records of the scan."""
  sd = nusc.get('sample_data', sd_token)
  pts = LidarPointCloud.from_file(nusc.get_sample_data_path(sd_token)).points
  cs = nusc.get('calibrated_sensor', sd['calibrated_sensor_token'])
  pose = nusc.get('ego_pose', sd['ego_pose_token'])
  return pts, cs, pose


def _in_range(pts):
  """Inclusive +-60 m (xy) / +-10 m (z) box mask over the columns of a (3+, N) array."""
  x, y, z = pts[0], pts[1], pts[2]
  return (
    (x >= RANGE_MIN[0])
    & (x <= RANGE_MAX[0])
    & (y >= RANGE_MIN[1])
    & (y <= RANGE_MAX[1])
    & (z >= RANGE_MIN[2])
    & (z <= RANGE_MAX[2])
  )


def _window(nusc, sample, num_sweeps, key):
  """Up to num_sweeps neighbouring samples along `prev` or `next`, nearest first."""
  out, cur = [], sample
  for _ in range(num_sweeps):
    if cur[key] == '':
      break
    cur = nusc.get('sample', cur[key])
    out.append(cur)
  return out


def _between(nusc, sd_from, sd_to, key):
  """Sample_data tokens strictly between two key-frame lidar records, walking along `key`."""
  out = []
  tok = nusc.get('sample_data', sd_from)[key]
  while tok != '' and tok != sd_to:
    out.append(tok)
    tok = nusc.get('sample_data', tok)[key]
  return out


def reference_points(nusc, sample_token, num_sweeps=2):
  """Float32 (4, N) aggregated cloud in the key frame's lidar frame, before down-sampling."""
  sample = nusc.get('sample', sample_token)
  ref_sd = sample['data']['LIDAR_TOP']
  cur_pts, cs_ref, pose_ref = _load(nusc, ref_sd)
  past = _window(nusc, sample, num_sweeps, 'prev')[::-1]  # oldest first: k-2, k-1
  future = _window(nusc, sample, num_sweeps, 'next')[::-1]  # farthest first: k+2, k+1
  scans = [np.array(cur_pts, dtype=np.float32, copy=True)]
  for other in past + future:
    pts, cs, pose = _load(nusc, other['data']['LIDAR_TOP'])
    scans.append(to_reference(pts, cs, pose, cs_ref, pose_ref))
  key_pts = np.concatenate(scans, axis=1)
  key_pts = key_pts[:, _in_range(key_pts)]

  # Intermediate sweeps: past intervals walked forward, then future intervals walked backward.
  sweep_tokens = []
  chain = past + [sample]
  for a, b in zip(chain[:-1], chain[1:], strict=True):
    sweep_tokens += _between(nusc, a['data']['LIDAR_TOP'], b['data']['LIDAR_TOP'], 'next')
  chain = future + [sample]  # k+2, k+1, k
  for b, a in zip(chain[:-1], chain[1:], strict=True):
    sweep_tokens += _between(nusc, b['data']['LIDAR_TOP'], a['data']['LIDAR_TOP'], 'prev')
  sweeps = []
  for tok in sweep_tokens:
    pts, cs, pose = _load(nusc, tok)
    pts = pts[:, ~((np.abs(pts[0]) < 1) & (np.abs(pts[1]) < 1.5))]
    pts = pts[:, ~((np.abs(pts[0]) < 1) & (np.abs(pts[1]) < 2))]
    sweeps.append(to_reference(pts, cs, pose, cs_ref, pose_ref))
  return np.concatenate([key_pts] + sweeps, axis=1).astype(np.float32)


def reference_downsample(cloud, voxel=VOXEL):
  """Open3D legacy `voxel_down_sample` centroids, one Python iteration per point.

  The voxel index of each point is computed separately in float64 and sums accumulate in input
  order, which is what makes the result reproducible bit for bit. Output rows are sorted by
  voxel index tuple so callers can compare without caring about hash order.
  """
  cloud = np.asarray(cloud, dtype=np.float64)
  if len(cloud) == 0:
    return np.zeros((0, 3), np.float64)
  anchor = cloud.min(axis=0) - voxel * 0.5
  acc = {}
  for p in cloud:
    idx = tuple(np.floor((p - anchor) / voxel).astype(np.int64).tolist())
    if idx in acc:
      acc[idx][0] = acc[idx][0] + p
      acc[idx][1] += 1
    else:
      acc[idx] = [np.zeros(3, np.float64) + p, 1]
  keys = sorted(acc)
  return np.array([acc[k][0] / acc[k][1] for k in keys], dtype=np.float64).reshape(-1, 3)


def reference_binary_labels(nusc, sample_token: str, num_sweeps: int = 2) -> np.ndarray:
  """uint8 [200, 200, 16] UniScene binary occupancy of one key frame (1 = occupied)."""
  pts = reference_points(nusc, sample_token, num_sweeps)
  centroids = reference_downsample(pts[:3].T.astype(np.float64))
  centroids = centroids[_in_range(centroids.T)]
  trans = np.array([[0, 1, 0], [-1, 0, 0], [0, 0, 1]])
  pts = (trans @ centroids.T).T
  intervals = (GRID_MAX - GRID_MIN) / (GRID_SIZE - 1)
  ind = np.floor((np.clip(pts, GRID_MIN, GRID_MAX) - GRID_MIN) / intervals).astype(np.int64)
  labels = np.zeros((200, 200, 16), np.uint8)
  for i, j, k in ind:
    # Indices are deliberately not clipped: anything outside the grid is a bug, not data.
    if not (0 <= i < 200 and 0 <= j < 200 and 0 <= k < 16):
      raise IndexError(f'voxel index {(i, j, k)} outside the 200x200x16 grid')
    labels[i, j, k] = 1
  return labels
