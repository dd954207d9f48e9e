"""Small pose helpers for the synthetic world (float64 numpy, quaternions [w, x, y, z])."""

import numpy as np


def yaw_quaternion(yaw: float) -> list[float]:
  """Rotation by `yaw` radians about +z, as [w, x, y, z]."""
  return [float(np.cos(yaw / 2)), 0.0, 0.0, float(np.sin(yaw / 2))]


def quaternion_from_matrix(rot: np.ndarray) -> list[float]:
  """[w, x, y, z] of a proper 3x3 rotation matrix, with w >= 0."""
  m = np.asarray(rot, dtype=np.float64)
  trace = np.trace(m)
  if trace > 0:
    s = 2.0 * np.sqrt(1.0 + trace)
    q = [0.25 * s, (m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s]
  else:
    i = int(np.argmax(np.diag(m)))
    j, k = (i + 1) % 3, (i + 2) % 3
    s = 2.0 * np.sqrt(1.0 + m[i, i] - m[j, j] - m[k, k])
    q = [0.0] * 4
    q[0] = (m[k, j] - m[j, k]) / s
    q[1 + i] = 0.25 * s
    q[1 + j] = (m[j, i] + m[i, j]) / s
    q[1 + k] = (m[k, i] + m[i, k]) / s
  q = np.asarray(q)
  q = q / np.linalg.norm(q)
  if q[0] < 0:
    q = -q
  return [float(v) for v in q]


def rotation_z(yaw) -> np.ndarray:
  """[..., 3, 3] rotation matrices about +z."""
  yaw = np.asarray(yaw, dtype=np.float64)
  c, s = np.cos(yaw), np.sin(yaw)
  zero, one = np.zeros_like(yaw), np.ones_like(yaw)
  return np.stack(
    [np.stack([c, -s, zero], -1), np.stack([s, c, zero], -1), np.stack([zero, zero, one], -1)], -2
  )


def camera_rotation(yaw: float) -> np.ndarray:
  """Sensor -> ego rotation of a level camera looking along ego yaw `yaw`.

  Camera axes: x right, y down, z forward (optical axis).
  """
  c, s = np.cos(yaw), np.sin(yaw)
  x_axis = [s, -c, 0.0]
  y_axis = [0.0, 0.0, -1.0]
  z_axis = [c, s, 0.0]
  return np.array([x_axis, y_axis, z_axis], dtype=np.float64).T


def make_transform(rot: np.ndarray, trans) -> np.ndarray:
  """4x4 homogeneous transform from a 3x3 rotation and a translation."""
  t = np.eye(4)
  t[:3, :3] = rot
  t[:3, 3] = trans
  return t


def wrap_angle(a):
  """Angles wrapped into [-pi, pi)."""
  return (np.asarray(a) + np.pi) % (2 * np.pi) - np.pi
