"""The sensor rig of the synthetic world: a 32-beam top lidar and six level pinhole cameras.

Calibrations follow the real nuScenes rig (translations in the ego frame, camera yaws, focal
lengths at 1600x900, scaled to the chosen image size). The lidar's frame is rotated by -90 deg
about z (x right, y forward), as on the real car.
"""

import dataclasses

import numpy as np

from uniscene_jax.data import nuscenes_meta as meta
from uniscene_jax.data.synth import raycast, transforms
from uniscene_jax.data.synth.world import SceneLayout

# HDL-32E: 32 beams from -30.67 to +10.67 degrees.
LIDAR_ELEVATIONS_DEG = np.linspace(-30.67, 10.67, 32)
LIDAR_TRANSLATION = (0.943713, 0.0, 1.84023)
LIDAR_YAW = -np.pi / 2
LIDAR_MAX_RANGE = 80.0

# channel: (translation in ego, yaw in degrees, fx, cx, cy at 1600x900).
CAMERA_RIG = {
  'CAM_FRONT': ((1.70, 0.016, 1.51), 0.0, 1266.4, 816.3, 491.5),
  'CAM_FRONT_RIGHT': ((1.55, -0.493, 1.49), -55.0, 1260.8, 807.9, 495.3),
  'CAM_FRONT_LEFT': ((1.52, 0.494, 1.51), 55.0, 1272.6, 826.6, 479.8),
  'CAM_BACK': ((0.03, 0.017, 1.58), 180.0, 809.2, 829.2, 481.8),
  'CAM_BACK_LEFT': ((1.04, 0.481, 1.56), 110.0, 1256.7, 817.8, 451.9),
  'CAM_BACK_RIGHT': ((1.05, -0.482, 1.56), -110.0, 1259.5, 807.3, 501.2),
}
# Camera exposure offsets from the lidar key frame, in microseconds.
CAMERA_OFFSET_US = {
  'CAM_FRONT': 12_000,
  'CAM_FRONT_RIGHT': 20_500,
  'CAM_FRONT_LEFT': 3_500,
  'CAM_BACK': 45_000,
  'CAM_BACK_LEFT': 37_000,
  'CAM_BACK_RIGHT': 28_500,
}
SUN = np.array([0.35, 0.25, 0.9]) / np.linalg.norm([0.35, 0.25, 0.9])
SKY_TOP = np.array([0.45, 0.62, 0.85])
SKY_HORIZON = np.array([0.82, 0.86, 0.90])


@dataclasses.dataclass(frozen=True)
class Camera:
  channel: str
  translation: tuple[float, float, float]  # in the ego frame
  yaw: float  # radians, in the ego frame
  intrinsic: np.ndarray  # [3, 3]
  width: int
  height: int

  @property
  def rotation(self) -> np.ndarray:
    """Sensor -> ego rotation [3, 3]."""
    return transforms.camera_rotation(self.yaw)


def make_cameras(width: int, height: int) -> list[Camera]:
  """The six cameras in the model's order with intrinsics scaled to width x height."""
  sx, sy = width / 1600.0, height / 900.0
  cams = []
  for channel in meta.CAMERA_NAMES:
    t, yaw_deg, f, cx, cy = CAMERA_RIG[channel]
    k = np.array([[f * sx, 0.0, cx * sx], [0.0, f * sy, cy * sy], [0.0, 0.0, 1.0]])
    cams.append(Camera(channel, t, np.deg2rad(yaw_deg), k, width, height))
  return cams


def sensor_origin(ego_xyz, ego_yaw, translation) -> np.ndarray:
  return np.asarray(ego_xyz) + transforms.rotation_z(ego_yaw) @ np.asarray(translation)


@dataclasses.dataclass(frozen=True)
class LidarScan:
  points: np.ndarray  # [N, 5] float32 (x, y, z, intensity, ring) in the sensor frame
  range_image: np.ndarray  # [32, U] horizontal distance of the first return, inf if none
  origin: np.ndarray  # [3] global sensor position
  yaw: float  # global yaw of the sensor frame

  def global_points(self) -> np.ndarray:
    """[N, 3] float64 points in global coordinates."""
    return self.points[:, :3].astype(np.float64) @ transforms.rotation_z(self.yaw).T + self.origin


def lidar_scan(layout: SceneLayout, t: float, azimuth_bins: int) -> LidarScan:
  """One instantaneous 360-degree scan at scene time t."""
  ego_xyz, ego_yaw = layout.ego_pose(t)
  origin = sensor_origin(ego_xyz, ego_yaw, LIDAR_TRANSLATION)
  yaw = ego_yaw + LIDAR_YAW
  az = 2 * np.pi * (np.arange(azimuth_bins) + 0.5) / azimuth_bins  # in the sensor frame
  slope = np.tan(np.deg2rad(LIDAR_ELEVATIONS_DEG))
  col_dir = np.stack([np.cos(az + yaw), np.sin(az + yaw)], -1)
  max_lam = LIDAR_MAX_RANGE / np.sqrt(1 + slope.max() ** 2)
  boxes = layout.tracks.at(layout.road, t)
  hits = raycast.cast(origin, col_dir, slope, boxes, max_lam=max_lam)
  lam = np.where(hits.lam * np.sqrt(1 + slope[:, None] ** 2) <= LIDAR_MAX_RANGE, hits.lam, np.inf)
  valid = np.isfinite(lam)
  ring = np.broadcast_to(np.arange(len(slope))[:, None], lam.shape)
  local = np.stack([lam * np.cos(az)[None], lam * np.sin(az)[None], lam * slope[:, None]], -1)
  with np.errstate(invalid='ignore'):
    ray = np.nan_to_num(local / np.linalg.norm(local, axis=-1, keepdims=True))
  global_ray = np.concatenate(
    [transforms.rotation_z(yaw)[None, None, :2, :2] @ ray[..., :2, None], ray[..., 2:, None]], -2
  )[..., 0]
  cos_inc = np.abs((global_ray * hits.normal).sum(-1))
  refl = np.where(hits.index >= 0, layout.tracks.reflectivity[np.maximum(hits.index, 0)], 0.0)
  ground_xy = origin[:2] + lam[..., None] * col_dir[None]
  _, ground_refl = layout.road.ground_appearance(np.where(valid[..., None], ground_xy, 0.0))
  refl = np.where(hits.index == raycast.GROUND, ground_refl, refl)
  intensity = np.clip(np.round(255 * refl * (0.3 + 0.7 * cos_inc)), 0, 255)
  # File order: azimuth-major, beams ascending within a firing.
  cols = [local[..., 0], local[..., 1], local[..., 2], intensity, ring]
  points = np.stack([c.T[valid.T] for c in cols], -1).astype(np.float32)
  return LidarScan(points=points, range_image=lam, origin=origin, yaw=yaw)


@dataclasses.dataclass(frozen=True)
class CameraImage:
  rgb: np.ndarray  # [H, W, 3] uint8
  depth: np.ndarray  # [H, W] depth along the optical axis, inf for sky
  rays_through: np.ndarray  # [K] per box
  rays_first: np.ndarray  # [K] per box


def render(layout: SceneLayout, t: float, cam: Camera) -> CameraImage:
  """Renders camera `cam` at scene time t: class colours, sun shading, textures and haze."""
  ego_xyz, ego_yaw = layout.ego_pose(t)
  origin = sensor_origin(ego_xyz, ego_yaw, cam.translation)
  yaw = ego_yaw + cam.yaw
  fwd = np.array([np.cos(yaw), np.sin(yaw)])
  right = np.array([np.sin(yaw), -np.cos(yaw)])
  k = cam.intrinsic
  x_n = (np.arange(cam.width) - k[0, 2]) / k[0, 0]
  y_n = (np.arange(cam.height) - k[1, 2]) / k[1, 1]
  col_dir = fwd[None] + x_n[:, None] * right[None]
  boxes = layout.tracks.at(layout.road, t)
  hits = raycast.cast(origin, col_dir, -y_n, boxes)
  lam = hits.lam
  finite = np.isfinite(lam)
  lam0 = np.where(finite, lam, 0.0)
  point = origin + np.concatenate(
    [lam0[..., None] * col_dir[None], (-lam0 * y_n[:, None])[..., None]], -1
  )
  on_box = hits.index >= 0
  kk = np.maximum(hits.index, 0)
  colour = layout.tracks.colour[kk].copy()
  # Building facades: dark window panes on the side faces.
  win = on_box & layout.tracks.windows[kk] & (hits.normal[..., 2] == 0)
  rel = point[..., :2] - boxes.centre[kk, :2]
  along = rel[..., 0] * -hits.normal[..., 1] + rel[..., 1] * hits.normal[..., 0]
  pane = (np.mod(point[..., 2], 3.0) > 1.0) & (np.mod(point[..., 2], 3.0) < 2.2)
  pane &= np.mod(along, 2.5) > 0.6
  pane &= np.mod(along, 2.5) < 1.8
  pane &= point[..., 2] < boxes.size[kk, 2] - 0.5
  colour[win & pane] *= 0.4
  ground = hits.index == raycast.GROUND
  ground_rgb, _ = layout.road.ground_appearance(point[..., :2])
  colour = np.where(ground[..., None], ground_rgb, colour)
  shade = 0.45 + 0.55 * np.clip(hits.normal @ SUN, 0.0, 1.0)
  colour = colour * shade[..., None]
  # Sky gradient above the horizon, haze with distance.
  up = np.clip(-y_n * 2.0, 0.0, 1.0)[:, None, None]
  sky = np.broadcast_to(SKY_HORIZON * (1 - up) + SKY_TOP * up, colour.shape)
  dist = lam0 * np.sqrt(1 + x_n[None] ** 2 + y_n[:, None] ** 2)
  haze = (1 - np.exp(-dist / 400.0))[..., None]
  colour = np.where(finite[..., None], colour * (1 - haze) + sky * haze, sky)
  rgb = np.clip(np.round(colour * 255), 0, 255).astype(np.uint8)
  return CameraImage(rgb=rgb, depth=lam, rays_through=hits.rays_through, rays_first=hits.rays_first)
