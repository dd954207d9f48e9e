"""nuScenes table records for the synthetic world (the 13 JSON files of a version folder)."""

import datetime
import hashlib

from uniscene_jax.data import nuscenes_meta as meta
from uniscene_jax.data.synth import sensors, transforms

TABLE_NAMES = (
  'category',
  'attribute',
  'visibility',
  'instance',
  'sensor',
  'calibrated_sensor',
  'ego_pose',
  'log',
  'scene',
  'sample',
  'sample_data',
  'sample_annotation',
  'map',
)
LOCATION = 'singapore-onenorth'
VEHICLE = 'n015'
UTC_OFFSET = datetime.timezone(datetime.timedelta(hours=8))


class Tokens:
  """Deterministic 32-hex-digit tokens from a seed and a name."""

  def __init__(self, seed: int):
    self.seed = seed

  def __call__(self, *parts) -> str:
    key = f'{self.seed}:' + '/'.join(str(p) for p in parts)
    return hashlib.sha1(key.encode()).hexdigest()[:32]


def static_tables(tok: Tokens) -> dict[str, list[dict]]:
  """category (with lidarseg indices), attribute, visibility and sensor tables."""
  return {
    'category': [
      {'token': tok('category', n), 'name': n, 'description': '', 'index': i}
      for i, n in enumerate(meta.CATEGORIES)
    ],
    'attribute': [
      {'token': tok('attribute', n), 'name': n, 'description': ''} for n in meta.ATTRIBUTES
    ],
    'visibility': [
      {'token': t, 'level': level, 'description': d} for t, level, d in meta.VISIBILITY_LEVELS
    ],
    'sensor': [
      {'token': tok('sensor', c), 'channel': c, 'modality': 'camera'} for c in meta.CAMERA_NAMES
    ]
    + [{'token': tok('sensor', meta.LIDAR_NAME), 'channel': meta.LIDAR_NAME, 'modality': 'lidar'}],
  }


def log_record(tok: Tokens, scene_name: str, start_us: int) -> dict:
  when = datetime.datetime.fromtimestamp(start_us / 1e6, UTC_OFFSET)
  return {
    'token': tok('log', scene_name),
    'logfile': f'{VEHICLE}-{when:%Y-%m-%d-%H-%M-%S}+0800',
    'vehicle': VEHICLE,
    'date_captured': f'{when:%Y-%m-%d}',
    'location': LOCATION,
  }


def calibrated_sensors(tok: Tokens, scene_name: str, cameras) -> dict[str, dict]:
  """channel -> calibrated_sensor record (sensor -> ego) for one scene."""
  out = {
    meta.LIDAR_NAME: {
      'token': tok('calibrated_sensor', scene_name, meta.LIDAR_NAME),
      'sensor_token': tok('sensor', meta.LIDAR_NAME),
      'translation': list(sensors.LIDAR_TRANSLATION),
      'rotation': transforms.yaw_quaternion(sensors.LIDAR_YAW),
      'camera_intrinsic': [],
    }
  }
  for cam in cameras:
    out[cam.channel] = {
      'token': tok('calibrated_sensor', scene_name, cam.channel),
      'sensor_token': tok('sensor', cam.channel),
      'translation': list(cam.translation),
      'rotation': transforms.quaternion_from_matrix(cam.rotation),
      'camera_intrinsic': cam.intrinsic.tolist(),
    }
  return out


def ego_pose_record(token: str, utime: int, xyz, yaw: float) -> dict:
  return {
    'token': token,
    'timestamp': utime,
    'rotation': transforms.yaw_quaternion(yaw),
    'translation': [float(v) for v in xyz],
  }


def link_chain(records: list[dict]) -> None:
  """Sets prev/next tokens of records already in time order."""
  for i, r in enumerate(records):
    r['prev'] = records[i - 1]['token'] if i > 0 else ''
    r['next'] = records[i + 1]['token'] if i + 1 < len(records) else ''
