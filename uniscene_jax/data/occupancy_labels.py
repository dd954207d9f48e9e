r"""UniScene's multi-sweep binary occupancy labels (`labels_binary_sweep2.npz`), vectorised.

The label of key frame k aggregates, in the LIDAR_TOP frame of k: the key-frame scans of k and of
up to `num_sweeps` key frames on each side (cropped to |x|, |y| <= 60, |z| <= 10), and every lidar
sweep between consecutive window key frames (points within |x| < 1, |y| < 2 of their own sensor
removed, not cropped). The cloud is down-sampled to 0.2 m voxel centroids with Open3D's anchor
rule (cloud minimum - 0.1), cropped again, turned by the fixed rotation (x, y, z) -> (y, -x, z) and
written into a 200 x 200 x 16 grid over [-51.2, 51.2] x [-51.2, 51.2] x [-5, 3] with interval
range / (size - 1), points beyond the range clipped into the boundary cells. These are the
reference's choices; each of the three questionable ones has a flag in `LabelOptions`. Scans are
moved between frames with float32 rounding after every step, as the reference does, so labels are
bit-identical to it.

    python -m uniscene_jax.data.occupancy_labels --dataroot DIR/nuscenes [--version v1.0-mini] \
        [--workers N] [--overwrite] [--num_sweeps 2] [--true_lidar_to_ego] [--drop_out_of_range] \
        [--interval_range_over_size]

writes `gts/<scene>/<sample>/labels_binary_sweep2.npz` (semantics; all-zero masks) for every key
frame, skipping files already written. The file does not record the options it was made with (the
reference's layout); the command prints them.
"""

import argparse
import concurrent.futures
import dataclasses
import multiprocessing
import os
import sys

import numpy as np

GRID_MIN = np.array([-51.2, -51.2, -5.0])
GRID_MAX = np.array([51.2, 51.2, 3.0])
GRID_SIZE = np.array([200, 200, 16])
VOXEL = 0.2
KEY_CROP = np.array([60.0, 60.0, 10.0])
LABEL_FILE = 'labels_binary_sweep2.npz'
# The reference's stand-in for lidar -> ego: -90 degrees about z, no translation.
FIXED_ROTATION = np.array([[0, 1, 0], [-1, 0, 0], [0, 0, 1]])


@dataclasses.dataclass(frozen=True)
class LabelOptions:
  num_sweeps: int = 2  # window of key frames on each side
  true_lidar_to_ego: bool = False  # label in the ego frame with the real calibration
  drop_out_of_range: bool = False  # drop points beyond the grid instead of clipping them in
  interval_range_over_size: bool = False  # 0.512 m cells instead of range / (size - 1)


def describe_options(options: LabelOptions) -> str:
  """The options that differ from the reference's, e.g. 'drop_out_of_range=True', or 'reference'."""
  changed = [
    f'{f.name}={getattr(options, f.name)}'
    for f in dataclasses.fields(LabelOptions)
    if getattr(options, f.name) != f.default
  ]
  return ', '.join(changed) or 'reference'


def voxel_downsample(xyz: np.ndarray, voxel: float = VOXEL) -> np.ndarray:
  """Centroids [M, 3] of the occupied voxel cells of xyz [N, 3] (Open3D's legacy rule).

  Cells are floor((p - (min(p) - voxel / 2)) / voxel); centroids are float64 sums in input order
  divided by counts, so they equal Open3D's bit for bit. Rows are ordered by cell index.
  """
  xyz = np.asarray(xyz, np.float64)
  if len(xyz) == 0:
    return np.zeros((0, 3))
  anchor = xyz.min(0) - voxel * 0.5
  idx = np.floor((xyz - anchor) / voxel).astype(np.int64)
  n = idx.max(0) + 1
  key = (idx[:, 0] * n[1] + idx[:, 1]) * n[2] + idx[:, 2]
  _, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
  sums = np.stack([np.bincount(inverse, weights=xyz[:, a]) for a in range(3)], -1)
  return sums / counts[:, None]


def binary_occupancy(
  points_xyz: np.ndarray,
  options: LabelOptions = LabelOptions(),
  lidar2ego: np.ndarray | None = None,
) -> np.ndarray:
  """uint8 [200, 200, 16] occupancy (1 = occupied) of an aggregated cloud in the lidar frame.

  Args:
    points_xyz: [N, 3] the aggregated cloud in the key frame's LIDAR_TOP frame (not down-sampled).
    options: reference behaviour and its fixes.
    lidar2ego: 4x4, needed only with `options.true_lidar_to_ego`.
  """
  centroids = voxel_downsample(points_xyz)
  centroids = centroids[np.all(np.abs(centroids) <= KEY_CROP, 1)]
  if options.true_lidar_to_ego:
    if lidar2ego is None:
      raise ValueError('binary_occupancy: true_lidar_to_ego needs the lidar2ego matrix')
    pts = centroids @ lidar2ego[:3, :3].T + lidar2ego[:3, 3]
  else:
    pts = (FIXED_ROTATION @ centroids.T).T
  if options.drop_out_of_range:
    pts = pts[np.all((pts >= GRID_MIN) & (pts < GRID_MAX), 1)]
  interval = (GRID_MAX - GRID_MIN) / (
    GRID_SIZE if options.interval_range_over_size else GRID_SIZE - 1
  )
  ind = np.floor((np.clip(pts, GRID_MIN, GRID_MAX) - GRID_MIN) / interval).astype(np.int64)
  ind = np.minimum(ind, GRID_SIZE - 1)  # only reached with range / size cells at the max bound
  labels = np.zeros(tuple(GRID_SIZE), np.uint8)
  labels[ind[:, 0], ind[:, 1], ind[:, 2]] = 1
  return labels


def _rotation(quaternion) -> np.ndarray:
  from pyquaternion import Quaternion

  return Quaternion(quaternion).rotation_matrix


def to_reference_frame(points: np.ndarray, cs_src, pose_src, cs_ref, pose_ref) -> np.ndarray:
  """float32 [4, N] points moved sensor -> ego -> global -> ego_ref -> sensor_ref.

  Each of the eight rotate/translate steps is rounded to float32, as the reference stores them.
  """
  pts = np.array(points, np.float32, copy=True)
  for rec in (cs_src, pose_src):
    pts[:3] = np.dot(_rotation(rec['rotation']), pts[:3])
    pts[:3] = pts[:3] + np.asarray(rec['translation'], np.float64)[:, None]
  for rec in (pose_ref, cs_ref):
    pts[:3] = pts[:3] - np.asarray(rec['translation'], np.float64)[:, None]
    pts[:3] = np.dot(np.linalg.inv(_rotation(rec['rotation'])), pts[:3])
  return pts


def remove_close(points: np.ndarray) -> np.ndarray:
  """Drops sweep points near the sensor: |x| < 1 and |y| < 2 (the reference's two passes)."""
  near = (np.abs(points[0]) < 1.0) & (np.abs(points[1]) < 2.0)
  return points[:, ~near]


def load_scan(path: str) -> np.ndarray:
  """float32 [4, N] (x, y, z, intensity) of a `.pcd.bin` file, checked for truncation."""
  try:
    size = os.path.getsize(path)
  except OSError as e:
    raise FileNotFoundError(f'{path}: lidar file listed in sample_data is missing') from e
  if size % 20:
    raise ValueError(f'{path}: {size} bytes is not a multiple of 20 (5 float32 per point)')
  return np.fromfile(path, np.float32).reshape(-1, 5)[:, :4].T


@dataclasses.dataclass(frozen=True)
class Scan:
  """One lidar file with its calibration and ego pose (plain dicts: translation, rotation)."""

  path: str
  calib: dict
  pose: dict


@dataclasses.dataclass(frozen=True)
class LabelJob:
  """Everything one key frame's label needs, without the devkit: picklable, sent to workers.

  `reference` is the key frame's scan, `keys` the window key frames (past oldest first, then
  future farthest first), `sweeps` the intermediate sweeps in the reference's order.
  """

  reference: Scan
  keys: tuple[Scan, ...]
  sweeps: tuple[Scan, ...]

  def points(self) -> np.ndarray:
    """float32 [4, N] aggregated cloud (x, y, z, intensity) in the key frame's lidar frame."""
    ref = self.reference
    clouds = [load_scan(ref.path)]
    for s in self.keys:
      clouds.append(to_reference_frame(load_scan(s.path), s.calib, s.pose, ref.calib, ref.pose))
    key = np.concatenate(clouds, 1)
    key = key[:, np.all(np.abs(key[:3]) <= KEY_CROP[:, None], 0)]
    sweeps = [
      to_reference_frame(remove_close(load_scan(s.path)), s.calib, s.pose, ref.calib, ref.pose)
      for s in self.sweeps
    ]
    return np.concatenate([key] + sweeps, 1)

  def labels(self, options: LabelOptions = LabelOptions()) -> np.ndarray:
    """uint8 [200, 200, 16] binary occupancy of the key frame."""
    lidar2ego = None
    if options.true_lidar_to_ego:
      lidar2ego = np.eye(4)
      lidar2ego[:3, :3] = _rotation(self.reference.calib['rotation'])
      lidar2ego[:3, 3] = self.reference.calib['translation']
    cloud = self.points()
    return binary_occupancy(cloud[:3].T.astype(np.float64), options, lidar2ego)


def _plain(record: dict) -> dict:
  return {'translation': list(record['translation']), 'rotation': list(record['rotation'])}


class SampleAggregator:
  """Walks a key frame's sweep window with nuscenes-devkit and gathers the reference's cloud."""

  def __init__(self, nusc, num_sweeps: int = 2):
    self.nusc = nusc
    self.num_sweeps = num_sweeps

  def _lidar(self, sample) -> dict:
    return self.nusc.get('sample_data', sample['data']['LIDAR_TOP'])

  def _scan(self, sd) -> Scan:
    return Scan(
      path=self.nusc.get_sample_data_path(sd['token']),
      calib=_plain(self.nusc.get('calibrated_sensor', sd['calibrated_sensor_token'])),
      pose=_plain(self.nusc.get('ego_pose', sd['ego_pose_token'])),
    )

  def window(self, sample_token: str) -> tuple[list[dict], list[dict]]:
    """(past key samples oldest first, future key samples farthest first)."""
    sample = self.nusc.get('sample', sample_token)
    past, future = [], []
    s = sample
    while len(past) < self.num_sweeps and s['prev']:
      s = self.nusc.get('sample', s['prev'])
      past.insert(0, s)
    s = sample
    while len(future) < self.num_sweeps and s['next']:
      s = self.nusc.get('sample', s['next'])
      future.insert(0, s)
    return past, future

  def sweeps(self, sample_token: str) -> list[dict]:
    """Lidar sweeps between window key frames: past intervals forward, future ones backward."""
    sample = self.nusc.get('sample', sample_token)
    past, future = self.window(sample_token)
    out = []
    chain = past + [sample]
    for a, b in zip(chain[:-1], chain[1:], strict=True):
      sd, stop = self._lidar(a), self._lidar(b)['token']
      while sd['next'] and sd['next'] != stop:
        sd = self.nusc.get('sample_data', sd['next'])
        out.append(sd)
    chain = future + [sample]  # farthest first
    for b, a in zip(chain[:-1], chain[1:], strict=True):
      sd, stop = self._lidar(b), self._lidar(a)['token']
      while sd['prev'] and sd['prev'] != stop:
        sd = self.nusc.get('sample_data', sd['prev'])
        out.append(sd)
    return out

  def job(self, sample_token: str) -> LabelJob:
    """The key frame's label work item (file paths and poses only)."""
    past, future = self.window(sample_token)
    return LabelJob(
      reference=self._scan(self._lidar(self.nusc.get('sample', sample_token))),
      keys=tuple(self._scan(self._lidar(s)) for s in past + future),
      sweeps=tuple(self._scan(sd) for sd in self.sweeps(sample_token)),
    )

  def points(self, sample_token: str) -> np.ndarray:
    """float32 [4, N] aggregated cloud (x, y, z, intensity) in the key frame's lidar frame."""
    return self.job(sample_token).points()

  def labels(self, sample_token: str, options: LabelOptions = LabelOptions()) -> np.ndarray:
    """uint8 [200, 200, 16] binary occupancy of one key frame."""
    return self.job(sample_token).labels(options)


def label_path(dataroot: str, scene_name: str, sample_token: str) -> str:
  return os.path.join(dataroot, 'gts', scene_name, sample_token, LABEL_FILE)


def write_labels(path: str, labels: np.ndarray) -> None:
  """The reference's npz layout (semantics + two all-zero masks), written atomically."""
  from uniscene_jax.data.synth.files import write_npz_compressed

  zeros = np.zeros_like(labels)
  tmp = f'{path}.tmp-{os.getpid()}.npz'
  write_npz_compressed(tmp, semantics=labels, mask_lidar=zeros, mask_camera=zeros)
  os.replace(tmp, path)


_WORKER: dict = {}


def _init_worker(version, dataroot, options):
  from nuscenes.nuscenes import NuScenes

  nusc = NuScenes(version=version, dataroot=dataroot, verbose=False)
  _WORKER['agg'] = SampleAggregator(nusc, options.num_sweeps)
  _WORKER['options'] = options


def _label_one(job) -> str:
  token, path = job
  write_labels(path, _WORKER['agg'].labels(token, _WORKER['options']))
  return token


def write_dataset_labels(dataroot, version, options=LabelOptions(), workers=1, overwrite=False):
  """Writes the label file of every key frame; returns (written, skipped) counts."""
  from nuscenes.nuscenes import NuScenes
  from tqdm import tqdm

  nusc = NuScenes(version=version, dataroot=dataroot, verbose=False)
  jobs, skipped = [], 0
  for scene in nusc.scene:
    token = scene['first_sample_token']
    while token:
      path = label_path(dataroot, scene['name'], token)
      if os.path.exists(path) and not overwrite:
        skipped += 1
      else:
        jobs.append((token, path))
      token = nusc.get('sample', token)['next']
  for _, path in jobs:
    os.makedirs(os.path.dirname(path), exist_ok=True)
  if workers > 1:
    ctx = multiprocessing.get_context('spawn')
    with concurrent.futures.ProcessPoolExecutor(
      workers, mp_context=ctx, initializer=_init_worker, initargs=(version, dataroot, options)
    ) as pool:
      for _ in tqdm(pool.map(_label_one, jobs, chunksize=4), total=len(jobs), desc='labels'):
        pass
  else:
    _WORKER['agg'] = SampleAggregator(nusc, options.num_sweeps)
    _WORKER['options'] = options
    for job in tqdm(jobs, desc='labels'):
      _label_one(job)
  return len(jobs), skipped


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description='Writes UniScene binary occupancy labels.')
  p.add_argument('--dataroot', required=True, help='the nuScenes dataroot (holds v1.0-*/)')
  p.add_argument('--version', default='v1.0-trainval')
  p.add_argument(
    '--num_sweeps',
    type=int,
    default=2,
    help='key frames aggregated on each side of the labelled one, with the sweeps between them '
    '(reference: 2)',
  )
  p.add_argument('--workers', type=int, default=os.cpu_count() or 1)
  p.add_argument('--overwrite', action='store_true', help='recompute files already written')
  fixes = p.add_argument_group(
    'departures from the reference',
    'Off by default, which reproduces the reference bit for bit. Files written with them replace '
    'the reference labels at the same path and do not record the options.',
  )
  fixes.add_argument(
    '--true_lidar_to_ego',
    action='store_true',
    help="label in the ego frame, moved there with the key frame's lidar calibration (rotation "
    'and translation); the reference applies only the fixed rotation (x, y, z) -> (y, -x, z), so '
    'its grid is centred on the lidar, about 0.94 m ahead of and 1.84 m above the ego origin',
  )
  fixes.add_argument(
    '--drop_out_of_range',
    action='store_true',
    help='drop points outside the grid [-51.2, 51.2) x [-51.2, 51.2) x [-5, 3); the reference '
    'clips them into the boundary cells',
  )
  fixes.add_argument(
    '--interval_range_over_size',
    action='store_true',
    help='cells of range / size (0.512 x 0.512 x 0.5 m); the reference uses range / (size - 1) '
    '(0.5146 x 0.5146 x 0.5333 m)',
  )
  args = p.parse_args(argv)
  if not os.path.isdir(os.path.join(args.dataroot, args.version)):
    print(
      f'error: --dataroot/--version: no table folder {os.path.join(args.dataroot, args.version)}',
      file=sys.stderr,
    )
    return 2
  options = LabelOptions(
    num_sweeps=args.num_sweeps,
    true_lidar_to_ego=args.true_lidar_to_ego,
    drop_out_of_range=args.drop_out_of_range,
    interval_range_over_size=args.interval_range_over_size,
  )
  written, skipped = write_dataset_labels(
    args.dataroot, args.version, options, args.workers, args.overwrite
  )
  print(
    f'wrote {written} label files (options: {describe_options(options)}), '
    f'skipped {skipped} already present'
  )
  if skipped and options != LabelOptions():
    print(
      'warning: the skipped files were kept whatever options made them; --overwrite recomputes',
      file=sys.stderr,
    )
  return 0


if __name__ == '__main__':
  sys.exit(main())
