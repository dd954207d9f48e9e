"""One record per nuScenes key frame: planned on the driver with nuscenes-devkit, made anywhere.

Building a record has two halves. `SplitPlanner` (needs the devkit tables in memory, runs once)
turns every key frame of a split into a `SampleItem`: tokens, file paths, the geometry matrices,
the CAN bus vector, the boxes in the lidar frame and, for the binary occupancy label, either the
path of a precomputed `labels_binary_sweep2.npz` or a `LabelJob` (scan paths and poses). Items are
plain picklable data. `make_example` (no devkit, no tables) reads the JPEG bytes, the Occ3D arrays
and the label file, or computes the label, and returns the TFDS example; it is what a Beam worker
runs. Record order is (scene, timestamp) with scenes in time order, and the record key is its
position in the split.

Facts followed here (see the project's docs): lidar2img uses each camera's own ego pose; the CAN
vector takes 7:16 from the pose message search of the reference converter and 0:7, 16:18 from the
lidar ego pose; boxes are in the lidar frame at the bottom centre with yaw -yaw_box - pi/2.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os

import numpy as np
from absl import logging

from uniscene_jax.data import nuscenes_meta as meta
from uniscene_jax.data import occupancy_labels

VERSIONS = {'trainval': 'v1.0-trainval', 'mini': 'v1.0-mini'}
# The devkit's split lists per version: TFDS split name -> devkit split name.
SPLITS = {
  'v1.0-trainval': {'train': 'train', 'val': 'val'},
  'v1.0-mini': {'train': 'mini_train', 'val': 'mini_val'},
}
TABLES = (
  'attribute',
  'calibrated_sensor',
  'category',
  'ego_pose',
  'instance',
  'log',
  'map',
  'sample',
  'sample_annotation',
  'sample_data',
  'scene',
  'sensor',
  'visibility',
)
OCC_SHAPE = (200, 200, 16)
OCC3D_KEYS = ('semantics', 'mask_lidar', 'mask_camera')


class DataError(ValueError):
  """Bad or missing input data; the message names the file and what was expected."""


def transform(translation, rotation) -> np.ndarray:
  """float64 4x4 from a translation and a [w, x, y, z] quaternion."""
  from pyquaternion import Quaternion

  out = np.eye(4)
  out[:3, :3] = Quaternion(rotation).rotation_matrix
  out[:3, 3] = translation
  return out


def yaw_of(rotation) -> float:
  """Heading of a [w, x, y, z] quaternion: angle of the rotated x axis in the xy plane."""
  from pyquaternion import Quaternion

  v = Quaternion(rotation).rotation_matrix[:, 0]
  return float(np.arctan2(v[1], v[0]))


def check_manual_dir(manual_dir: str, version: str) -> None:
  """Raises DataError naming what is missing from the manual directory."""
  nusc_root = os.path.join(manual_dir, 'nuscenes')
  if not os.path.isdir(nusc_root):
    raise DataError(f'{nusc_root}: no such directory; the manual dir must hold nuscenes/')
  table_dir = os.path.join(nusc_root, version)
  if not os.path.isdir(table_dir):
    found = sorted(d for d in os.listdir(nusc_root) if d.startswith('v1.0-'))
    hint = {v: k for k, v in VERSIONS.items()}
    alternatives = ', '.join(f'{d} (--config={hint[d]})' for d in found if d in hint)
    raise DataError(
      f'{table_dir}: no such table folder for version {version}; '
      f'found {", ".join(found) or "no v1.0-* folder"}'
      + (f'. Build {alternatives} instead' if alternatives else '')
    )
  missing = [t for t in TABLES if not os.path.isfile(os.path.join(table_dir, f'{t}.json'))]
  if missing:
    raise DataError(
      f'{table_dir}: missing table file(s) '
      + ', '.join(os.path.join(table_dir, f'{t}.json') for t in missing)
      + f'; nuScenes {version} needs all {len(TABLES)} tables'
    )
  can_dir = os.path.join(manual_dir, 'can_bus')
  if not os.path.isdir(can_dir):
    raise DataError(
      f'{can_dir}: no such directory; download the CAN bus expansion and unpack it beside '
      'nuscenes/ (it holds scene-NNNN_pose.json files)'
    )


@dataclasses.dataclass(frozen=True)
class SampleItem:
  """Everything one record needs, as plain data (picklable, sent to Beam workers)."""

  key: int
  sample_token: str
  scene_token: str
  scene_name: str
  timestamp: int
  frame_index: int
  scene_index: int
  image_paths: tuple[str, ...]  # camera order of meta.CAMERA_NAMES
  image_sizes: tuple[tuple[int, int], ...]  # (width, height) from sample_data
  lidar2img: np.ndarray  # [6, 4, 4]
  ego2lidar: np.ndarray
  lidar2ego: np.ndarray
  ego2global: np.ndarray
  cam_intrinsic: np.ndarray  # [6, 3, 3]
  can_bus: np.ndarray  # [18]
  has_can_bus: bool
  occ3d_path: str | None
  label_path: str | None  # precomputed labels_binary_sweep2.npz, if present
  label_job: occupancy_labels.LabelJob | None  # otherwise computed from this
  label_options: occupancy_labels.LabelOptions
  gt_boxes: np.ndarray  # [M, 9] float32
  gt_labels: np.ndarray  # [M] int64
  gt_valid: np.ndarray  # [M] bool


def can_bus_vector(pose_messages: list[dict], timestamp: int) -> np.ndarray:
  """The reference converter's 18-vector from a scene's CAN `pose` messages (time-ordered).

  0:3 pos and 3:7 orientation come from the last message at or before `timestamp` (the first
  message if none); 7:16 take the remaining keys of that message (accel, rotation_rate, vel in
  file order) but read their values from the first message after `timestamp` (the final message
  if none): the reference's loop-variable quirk. 16:18 are zero here.
  """
  utimes = np.array([m['utime'] for m in pose_messages], np.int64)
  after = int(np.searchsorted(utimes, timestamp, side='right'))  # first utime > timestamp
  last = pose_messages[max(after - 1, 0)]
  loop = pose_messages[min(after, len(pose_messages) - 1)]
  out = list(last['pos']) + list(last['orientation'])
  for k in last:
    if k not in ('utime', 'pos', 'orientation'):
      out.extend(loop[k])
  out.extend([0.0, 0.0])
  if len(out) != 18:
    raise DataError(f'CAN pose message has keys {sorted(last)}; expected 16 values + 2')
  return np.asarray(out, np.float64)


class SplitPlanner:
  """Loads the devkit tables, CAN bus and Occ3D index once; plans the items of each split."""

  def __init__(
    self,
    manual_dir: str,
    version: str,
    label_options: occupancy_labels.LabelOptions | None = None,
  ):
    from nuscenes.can_bus.can_bus_api import NuScenesCanBus
    from nuscenes.nuscenes import NuScenes

    check_manual_dir(manual_dir, version)
    self.manual_dir = manual_dir
    self.version = version
    self.dataroot = os.path.join(manual_dir, 'nuscenes')
    self.label_options = label_options or occupancy_labels.LabelOptions()
    try:
      self.nusc = NuScenes(version=version, dataroot=self.dataroot, verbose=False)
    except Exception as e:
      raise DataError(f'{os.path.join(self.dataroot, version)}: nuscenes-devkit: {e}') from e
    self.can = NuScenesCanBus(dataroot=manual_dir)
    self.aggregator = occupancy_labels.SampleAggregator(self.nusc, self.label_options.num_sweeps)
    self.occ3d = self._load_occ3d_index()

  def _load_occ3d_index(self) -> dict | None:
    path = os.path.join(self.dataroot, 'annotations.json')
    if not os.path.isfile(path):
      logging.warning('%s not found: no Occ3D labels, records get has_occ3d=False', path)
      return None
    try:
      with open(path) as f:
        infos = json.load(f)['scene_infos']
    except (ValueError, KeyError) as e:
      raise DataError(f'{path}: expected Occ3D JSON with a scene_infos dict ({e!r})') from e
    return {
      scene: {token: info['gt_path'] for token, info in samples.items()}
      for scene, samples in infos.items()
    }

  def split_scenes(self, split: str) -> list[dict]:
    """Scene records of a TFDS split ('train' | 'val'), in time order."""
    from nuscenes.utils import splits

    names = set(splits.create_splits_scenes()[SPLITS[self.version][split]])
    scenes = [s for s in self.nusc.scene if s['name'] in names]
    start = {
      s['token']: self.nusc.get('sample', s['first_sample_token'])['timestamp'] for s in scenes
    }
    return sorted(scenes, key=lambda s: start[s['token']])

  def unassigned_scenes(self) -> list[str]:
    """Scenes of the tables in neither split list (left out of the build)."""
    from nuscenes.utils import splits

    lists = splits.create_splits_scenes()
    known = set().union(*(lists[v] for v in SPLITS[self.version].values()))
    return sorted(s['name'] for s in self.nusc.scene if s['name'] not in known)

  def _can_messages(self, scene_name: str) -> list[dict] | None:
    try:
      return self.can.get_messages(scene_name, 'pose')
    except FileNotFoundError:
      logging.warning('%s: no CAN bus pose file; can_bus zeros, has_can_bus=False', scene_name)
    except Exception as e:  # the devkit raises a bare Exception for its blacklist
      if 'does not have any CAN bus data' not in str(e):
        path = os.path.join(self.manual_dir, 'can_bus', f'{scene_name}_pose.json')
        raise DataError(f'{path}: unreadable CAN bus pose file ({e!r})') from e
      logging.info('%s: CAN bus blacklisted by the devkit; can_bus zeros', scene_name)
    return None

  def plan(self, split: str) -> list[SampleItem]:
    """The split's items in (scene, timestamp) order; key = position in the split."""
    items: list[SampleItem] = []
    no_occ3d = 0
    for scene_index, scene in enumerate(self.split_scenes(split)):
      messages = self._can_messages(scene['name'])
      token, frame_index = scene['first_sample_token'], 0
      while token:
        sample = self.nusc.get('sample', token)
        item = self._item(len(items), sample, scene, scene_index, frame_index, messages)
        no_occ3d += item.occ3d_path is None and self.occ3d is not None
        items.append(item)
        token, frame_index = sample['next'], frame_index + 1
    if no_occ3d:
      logging.warning('%s: %d key frames not in Occ3D annotations.json', split, no_occ3d)
    return items

  def _item(self, key, sample, scene, scene_index, frame_index, messages) -> SampleItem:
    nusc = self.nusc
    lidar_sd = nusc.get('sample_data', sample['data'][meta.LIDAR_NAME])
    cs = nusc.get('calibrated_sensor', lidar_sd['calibrated_sensor_token'])
    pose = nusc.get('ego_pose', lidar_sd['ego_pose_token'])
    lidar2ego = transform(cs['translation'], cs['rotation'])
    ego2global = transform(pose['translation'], pose['rotation'])
    global2lidar = np.linalg.inv(ego2global @ lidar2ego)

    paths, sizes, lidar2img, intrinsics = [], [], [], []
    for cam in meta.CAMERA_NAMES:
      sd = nusc.get('sample_data', sample['data'][cam])
      cam_cs = nusc.get('calibrated_sensor', sd['calibrated_sensor_token'])
      cam_pose = nusc.get('ego_pose', sd['ego_pose_token'])
      cam2lidar = (
        global2lidar
        @ transform(cam_pose['translation'], cam_pose['rotation'])
        @ transform(cam_cs['translation'], cam_cs['rotation'])
      )
      viewpad = np.eye(4)
      viewpad[:3, :3] = cam_cs['camera_intrinsic']
      lidar2img.append(viewpad @ np.linalg.inv(cam2lidar))
      intrinsics.append(np.asarray(cam_cs['camera_intrinsic'], np.float64))
      paths.append(os.path.join(self.dataroot, sd['filename']))
      sizes.append((int(sd['width']), int(sd['height'])))

    if messages is None:
      can_bus, has_can_bus = np.zeros(18), False
    else:
      can_bus, has_can_bus = can_bus_vector(messages, sample['timestamp']), True
    can_bus[0:3] = pose['translation']
    can_bus[3:7] = pose['rotation']
    yaw_deg = np.degrees(yaw_of(pose['rotation']))
    yaw_deg = yaw_deg + 360.0 if yaw_deg < 0 else yaw_deg
    can_bus[16] = yaw_deg / 180.0 * np.pi
    can_bus[17] = yaw_deg

    occ3d_path = None
    if self.occ3d is not None:
      gt_path = self.occ3d.get(scene['name'], {}).get(sample['token'])
      if gt_path is not None:
        occ3d_path = os.path.join(self.dataroot, gt_path)
    label_path = occupancy_labels.label_path(self.dataroot, scene['name'], sample['token'])
    has_label_file = os.path.isfile(label_path)

    boxes, labels, valid = self._boxes(sample, lidar_sd, lidar2ego, ego2global)
    return SampleItem(
      key=key,
      sample_token=sample['token'],
      scene_token=scene['token'],
      scene_name=scene['name'],
      timestamp=int(sample['timestamp']),
      frame_index=frame_index,
      scene_index=scene_index,
      image_paths=tuple(paths),
      image_sizes=tuple(sizes),
      lidar2img=np.stack(lidar2img),
      ego2lidar=np.linalg.inv(lidar2ego),
      lidar2ego=lidar2ego,
      ego2global=ego2global,
      cam_intrinsic=np.stack(intrinsics),
      can_bus=can_bus,
      has_can_bus=has_can_bus,
      occ3d_path=occ3d_path,
      label_path=label_path if has_label_file else None,
      label_job=None if has_label_file else self.aggregator.job(sample['token']),
      label_options=self.label_options,
      gt_boxes=boxes,
      gt_labels=labels,
      gt_valid=valid,
    )

  def _boxes(self, sample, lidar_sd, lidar2ego, ego2global):
    """Annotations in the lidar frame: [M, 9] bottom-centre boxes, labels, valid flags."""
    nusc = self.nusc
    _, boxes, _ = nusc.get_sample_data(lidar_sd['token'])
    global2lidar_rot = np.linalg.inv(ego2global[:3, :3] @ lidar2ego[:3, :3])
    out = np.zeros((len(boxes), 9), np.float64)
    labels = np.full(len(boxes), -1, np.int64)
    valid = np.zeros(len(boxes), bool)
    for i, box in enumerate(boxes):  # one per annotation, tens per sample
      ann = nusc.get('sample_annotation', box.token)
      velocity = nusc.box_velocity(box.token)
      velocity = np.nan_to_num(global2lidar_rot @ np.array([velocity[0], velocity[1], 0.0]))
      width, length, height = box.wlh
      bottom = box.center[2] - height / 2
      out[i] = [*box.center[:2], bottom, width, length, height, 0.0, *velocity[:2]]
      out[i, 6] = -box.orientation.yaw_pitch_roll[0] - np.pi / 2
      name = meta.CATEGORY_TO_DETECTION.get(ann['category_name'])
      labels[i] = meta.DETECTION_CLASSES.index(name) if name is not None else -1
      valid[i] = ann['num_lidar_pts'] + ann['num_radar_pts'] > 0
    return out.astype(np.float32), labels, valid


def read_jpeg(path: str, size: tuple[int, int]) -> bytes:
  """The file's bytes, after checking it is a complete JPEG of the expected (width, height)."""
  from PIL import Image

  try:
    with open(path, 'rb') as f:
      data = f.read()
  except OSError as e:
    raise DataError(f'{path}: camera image listed in sample_data cannot be read ({e})') from e
  try:
    image = Image.open(io.BytesIO(data))
    if image.format != 'JPEG':
      raise DataError(f'{path}: expected a JPEG image, found {image.format}')
    if image.size != tuple(size):
      raise DataError(f'{path}: image is {image.size}, sample_data says {tuple(size)}')
    # A reduced-size decode still walks every entropy-coded segment, so truncation shows.
    image.draft('RGB', (max(size[0] // 8, 1), max(size[1] // 8, 1)))
    image.load()
  except DataError:
    raise
  except Exception as e:
    raise DataError(f'{path}: corrupt JPEG ({e})') from e
  return data


def _load_npz(path: str, keys: tuple[str, ...], what: str) -> dict[str, np.ndarray]:
  try:
    with np.load(path) as z:
      arrays = {k: z[k] for k in keys}
  except FileNotFoundError as e:
    raise DataError(f'{path}: {what} file listed for this sample is missing') from e
  except Exception as e:
    raise DataError(f'{path}: expected an npz with arrays {keys} ({e!r})') from e
  for k, a in arrays.items():
    if a.shape != OCC_SHAPE or a.dtype != np.uint8:
      raise DataError(f'{path}: {k} is {a.dtype}{list(a.shape)}, expected uint8{list(OCC_SHAPE)}')
  return arrays


def make_example(item: SampleItem) -> tuple[int, dict]:
  """(key, TFDS example) of one item: reads images and labels, computes the label if needed."""
  images = [read_jpeg(p, s) for p, s in zip(item.image_paths, item.image_sizes, strict=True)]
  zeros = np.zeros(OCC_SHAPE, np.uint8)
  if item.occ3d_path is not None:
    occ = _load_npz(item.occ3d_path, OCC3D_KEYS, 'Occ3D labels.npz')
  else:
    occ = dict.fromkeys(OCC3D_KEYS, zeros)
  if item.label_path is not None:
    binary = _load_npz(item.label_path, ('semantics',), 'binary occupancy')['semantics']
  else:
    binary = item.label_job.labels(item.label_options)
  return item.key, {
    'sample_token': item.sample_token,
    'scene_token': item.scene_token,
    'scene_name': item.scene_name,
    'timestamp': item.timestamp,
    'frame_index': item.frame_index,
    'scene_index': item.scene_index,
    'images': images,
    'lidar2img': item.lidar2img,
    'ego2lidar': item.ego2lidar,
    'lidar2ego': item.lidar2ego,
    'ego2global': item.ego2global,
    'cam_intrinsic': item.cam_intrinsic,
    'can_bus': item.can_bus,
    'has_can_bus': item.has_can_bus,
    'occ_binary': binary,
    'has_occ_binary': True,
    'occ_semantics': occ['semantics'],
    'occ_mask_lidar': occ['mask_lidar'],
    'occ_mask_camera': occ['mask_camera'],
    'has_occ3d': item.occ3d_path is not None,
    'gt_boxes': item.gt_boxes,
    'gt_labels': item.gt_labels,
    'gt_valid': item.gt_valid,
  }


def write_item_shards(items: list[SampleItem], directory: str, prefix: str, per_shard: int = 64):
  """Pickles items into shard files (atomic writes); returns their paths.

  For Beam: the pipeline graph then carries only the shard paths, and each worker unpickles its
  shard from `directory`, which must be on storage every worker can read (as must the manual dir).
  """
  import pickle

  from etils import epath

  directory = epath.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  count = max((len(items) + per_shard - 1) // per_shard, 1)
  paths = []
  for i in range(count):
    path = directory / f'{prefix}-{i:05d}-of-{count:05d}.pkl'
    tmp = directory / f'{path.name}.tmp-{os.getpid()}'
    tmp.write_bytes(pickle.dumps(items[i * per_shard : (i + 1) * per_shard], protocol=4))
    tmp.rename(path)
    paths.append(os.fspath(path))
  return paths


def read_item_shard(path: str) -> list[SampleItem]:
  import pickle

  from etils import epath

  return pickle.loads(epath.Path(path).read_bytes())
