r"""Writes the embedded synthetic world in the exact nuScenes on-disk format.

    python -m uniscene_jax.data.synthetic_world --out DIR [--num_scenes N] \
        [--samples_per_scene K] [--image_size W,H] [--seed S] [--overwrite]

DIR/nuscenes/ is a nuScenes dataroot (version folder v1.0-mini with the 13 tables, samples/,
sweeps/, maps/), with Occ3D labels (gts/<scene>/<sample>/labels.npz, annotations.json);
DIR/can_bus/ holds the CAN bus expansion. Every sensor observes one geometric world per scene,
so lidar points, camera pixels, annotation boxes and voxel labels agree.
DIR/synthetic_world.json records how it was made (`load_layouts` rebuilds the geometry from it).
The tree is written under a temporary name and renamed when complete.
"""

import argparse
import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time

import numpy as np

from uniscene_jax.data import nuscenes_meta as meta
from uniscene_jax.data.synth import canbus, files, occ3d, sensors, tables, transforms, world

KEY_INTERVAL_US = 500_000
BASE_TIME_US = 1_532_402_927_647_951
SCENE_SPACING_US = 120_000_000
MAX_LAYOUT_ATTEMPTS = 8
CLASS_RANGE = {
  'car': 50,
  'truck': 50,
  'bus': 50,
  'trailer': 50,
  'construction_vehicle': 50,
  'pedestrian': 40,
  'motorcycle': 40,
  'bicycle': 40,
  'traffic_cone': 30,
  'barrier': 30,
}


@dataclasses.dataclass(frozen=True)
class WorldOptions:
  num_scenes: int = 2
  samples_per_scene: int = 9
  image_size: tuple[int, int] = (400, 225)  # (W, H)
  seed: int = 0
  version: str = 'v1.0-mini'
  lidar_sweeps: int = 9  # per key-frame interval (20 Hz lidar)
  camera_sweeps: int = 1  # per key-frame interval and camera
  lidar_azimuth_bins: int = 720
  jpeg_quality: int = 92


def scene_names(options: WorldOptions) -> list[str]:
  """Real scene names, so that the devkit's predefined splits select them (train, val, ...)."""
  if options.version == 'v1.0-mini':
    train, val = list(meta.MINI_TRAIN_SCENES), list(meta.MINI_VAL_SCENES)
  elif options.version == 'v1.0-trainval':
    from nuscenes.utils import splits

    def usable(names):  # the CAN bus API refuses blacklisted scene numbers
      return [n for n in names if int(n[-4:]) not in meta.CAN_BLACKLIST]

    train, val = usable(splits.train), usable(splits.val)
  else:
    raise ValueError(f'--version: expected v1.0-mini or v1.0-trainval, got {options.version!r}')
  names = []
  for i in range(options.num_scenes):
    pool = val if (i % 2 == 1 and val) or not train else train
    if not pool:
      raise ValueError(
        f'--num_scenes={options.num_scenes}: {options.version} has only '
        f'{len(meta.MINI_TRAIN_SCENES) + len(meta.MINI_VAL_SCENES)} scene names'
      )
    names.append(pool.pop(0))
  return names


def scene_start_us(index: int) -> int:
  return BASE_TIME_US + index * SCENE_SPACING_US


def make_layout(options: WorldOptions, index: int, attempt: int) -> world.SceneLayout:
  rng = np.random.default_rng([options.seed, index, attempt])
  origin = np.array([500.0 + 400.0 * (index % 4), 500.0 + 400.0 * (index // 4)])
  origin += rng.uniform(-50, 50, size=2)
  duration = (options.samples_per_scene - 1) * KEY_INTERVAL_US / 1e6
  return world.layout_scene(rng, origin, duration)


def load_layouts(root: str) -> tuple[WorldOptions, dict[str, tuple[world.SceneLayout, int]]]:
  """Options and {scene name: (layout, scene start in us)} of a world written to `root`."""
  with open(os.path.join(root, 'synthetic_world.json')) as f:
    record = json.load(f)
  opts = record['options']
  options = WorldOptions(**{**opts, 'image_size': tuple(opts['image_size'])})
  layouts = {}
  for i, scene in enumerate(record['scenes']):
    layouts[scene['name']] = (make_layout(options, i, scene['layout_attempt']), scene_start_us(i))
  return options, layouts


def _timeline(options: WorldOptions) -> dict[str, list[tuple[int, bool]]]:
  """channel -> [(microseconds after scene start, is_key_frame)] in time order."""
  n = options.samples_per_scene
  out = {}
  lidar = []
  for j in range(n):
    lidar.append((j * KEY_INTERVAL_US, True))
    if j + 1 < n:
      step = KEY_INTERVAL_US / (options.lidar_sweeps + 1)
      lidar += [
        (j * KEY_INTERVAL_US + round(m * step), False) for m in range(1, options.lidar_sweeps + 1)
      ]
  out[meta.LIDAR_NAME] = lidar
  for cam in meta.CAMERA_NAMES:
    off = sensors.CAMERA_OFFSET_US[cam]
    frames = []
    for j in range(n):
      frames.append((j * KEY_INTERVAL_US + off, True))
      if j + 1 < n:
        step = KEY_INTERVAL_US / (options.camera_sweeps + 1)
        frames += [
          (j * KEY_INTERVAL_US + off + round(m * step), False)
          for m in range(1, options.camera_sweeps + 1)
        ]
    out[cam] = frames
  return out


class _SceneWriter:
  """Renders and records one scene into the tables and the temporary tree."""

  def __init__(self, options, tok, root, index, name, cameras):
    self.options, self.tok, self.root = options, tok, root
    self.index, self.name, self.cameras = index, name, cameras
    self.start = scene_start_us(index)

  def layout_with_coverage(self):
    """A layout whose key frames see every detection class in range with lidar points."""
    for attempt in range(MAX_LAYOUT_ATTEMPTS):
      layout = make_layout(self.options, self.index, attempt)
      scans = [
        sensors.lidar_scan(layout, j * KEY_INTERVAL_US / 1e6, self.options.lidar_azimuth_bins)
        for j in range(self.options.samples_per_scene)
      ]
      counts = [self.points_in_boxes(layout, j, s) for j, s in enumerate(scans)]
      covered = set()
      for j, c in enumerate(counts):
        boxes = layout.tracks.at(layout.road, j * KEY_INTERVAL_US / 1e6)
        ego, _ = layout.ego_pose(j * KEY_INTERVAL_US / 1e6)
        for inst, n in zip(layout.instances, c, strict=True):
          det = meta.CATEGORY_TO_DETECTION.get(inst.category)
          dist = np.hypot(*(boxes.centre[inst.track, :2] - ego[:2]))
          if det and n > 0 and dist <= CLASS_RANGE[det]:
            covered.add(det)
      if len(covered) == len(meta.DETECTION_CLASSES):
        return layout, attempt, scans, counts
    raise RuntimeError(
      f'scene {self.name}: no layout with every detection class visible '
      f'after {MAX_LAYOUT_ATTEMPTS} attempts (seed {self.options.seed})'
    )

  @staticmethod
  def points_in_boxes(layout, j, scan) -> np.ndarray:
    """Lidar points inside each annotated box at key frame j: int [num_instances]."""
    boxes = layout.tracks.at(layout.road, j * KEY_INTERVAL_US / 1e6)
    tracks = np.array([i.track for i in layout.instances], int)
    local = boxes.local(scan.global_points())[:, tracks]
    inside = np.all(np.abs(local) <= boxes.half_extents[tracks] + 1e-3, -1)
    return inside.sum(0)

  def write(self, t: dict[str, list], occ_infos: dict) -> dict:
    opts, tok, name, start = self.options, self.tok, self.name, self.start
    layout, attempt, key_scans, counts = self.layout_with_coverage()
    calib = tables.calibrated_sensors(tok, name, self.cameras)
    t['calibrated_sensor'] += calib.values()
    log = tables.log_record(tok, name, start)
    t['log'].append(log)
    scene_token = tok('scene', name)
    n = opts.samples_per_scene
    samples = [
      {
        'token': tok('sample', name, j),
        'timestamp': start + j * KEY_INTERVAL_US,
        'scene_token': scene_token,
      }
      for j in range(n)
    ]
    tables.link_chain(samples)
    t['sample'] += samples
    t['scene'].append(
      {
        'token': scene_token,
        'log_token': log['token'],
        'nbr_samples': n,
        'name': name,
        'first_sample_token': samples[0]['token'],
        'last_sample_token': samples[-1]['token'],
        'description': f'Synthetic scene {self.index}, seed {opts.seed}.',
      }
    )

    key_views = [[] for _ in range(n)]  # j -> [(camera, image, origin, yaw, sample_data token)]
    for channel, frames in _timeline(opts).items():
      is_lidar = channel == meta.LIDAR_NAME
      offset = 0 if is_lidar else sensors.CAMERA_OFFSET_US[channel]
      cam = None if is_lidar else self.cameras[meta.CAMERA_NAMES.index(channel)]
      chain = []
      for dt, key in frames:
        utime = start + dt
        tsec = dt / 1e6
        j = (dt - offset) // KEY_INTERVAL_US + (0 if key else 1)
        token = tok('sample_data', name, channel, utime)
        ego_xyz, ego_yaw = layout.ego_pose(tsec)
        t['ego_pose'].append(tables.ego_pose_record(token, utime, ego_xyz, ego_yaw))
        folder = 'samples' if key else 'sweeps'
        if is_lidar:
          filename = f'{folder}/{channel}/{log["logfile"]}__{channel}__{utime}.pcd.bin'
          scan = key_scans[j] if key else sensors.lidar_scan(layout, tsec, opts.lidar_azimuth_bins)
          files.write_points(os.path.join(self.root, 'nuscenes', filename), scan.points)
          width = height = 0
        else:
          filename = f'{folder}/{channel}/{log["logfile"]}__{channel}__{utime}.jpg'
          image = sensors.render(layout, tsec, cam)
          files.write_jpeg(
            os.path.join(self.root, 'nuscenes', filename), image.rgb, opts.jpeg_quality
          )
          width, height = cam.width, cam.height
          if key:
            origin = sensors.sensor_origin(ego_xyz, ego_yaw, cam.translation)
            key_views[j].append((cam, image, origin, ego_yaw + cam.yaw, filename, ego_xyz, ego_yaw))
        chain.append(
          {
            'token': token,
            'sample_token': samples[j]['token'],
            'ego_pose_token': token,
            'calibrated_sensor_token': calib[channel]['token'],
            'timestamp': utime,
            'fileformat': 'pcd' if is_lidar else 'jpg',
            'is_key_frame': key,
            'height': height,
            'width': width,
            'filename': filename,
          }
        )
      tables.link_chain(chain)
      t['sample_data'] += chain

    self._annotations(t, layout, samples, counts, key_views)
    occ_infos[name] = self._occ3d(layout, samples, key_scans, key_views, calib)
    end = start + (n - 1) * KEY_INTERVAL_US
    for msg, content in canbus.messages(layout, start, start - 1_000_000, end + 1_000_000).items():
      files.write_json(os.path.join(self.root, 'can_bus', f'{name}_{msg}.json'), content)
    return {'name': name, 'layout_attempt': attempt, 'start_us': start}

  def _annotations(self, t, layout, samples, counts, key_views):
    tok = self.tok
    for i, inst in enumerate(layout.instances):
      inst_token = tok('instance', self.name, i)
      chain = []
      for j, sample in enumerate(samples):
        boxes = layout.tracks.at(layout.road, j * KEY_INTERVAL_US / 1e6)
        through = sum(int(v[1].rays_through[inst.track]) for v in key_views[j])
        first = sum(int(v[1].rays_first[inst.track]) for v in key_views[j])
        frac = first / through if through else 0.0
        level = 1 + int(frac >= 0.4) + int(frac >= 0.6) + int(frac >= 0.8)
        wlh = [float(v) for v in boxes.size[inst.track]]
        chain.append(
          {
            'token': tok('sample_annotation', self.name, i, j),
            'sample_token': sample['token'],
            'instance_token': inst_token,
            'visibility_token': str(level),
            'attribute_tokens': [tok('attribute', inst.attribute)] if inst.attribute else [],
            'translation': [float(v) for v in boxes.centre[inst.track]],
            'size': wlh,
            'rotation': transforms.yaw_quaternion(float(boxes.yaw[inst.track])),
            'num_lidar_pts': int(counts[j][i]),
            'num_radar_pts': 0,
          }
        )
      tables.link_chain(chain)
      t['sample_annotation'] += chain
      t['instance'].append(
        {
          'token': inst_token,
          'category_token': tok('category', inst.category),
          'nbr_annotations': len(chain),
          'first_annotation_token': chain[0]['token'],
          'last_annotation_token': chain[-1]['token'],
        }
      )

  def _occ3d(self, layout, samples, key_scans, key_views, calib) -> dict:
    infos = {}
    for j, sample in enumerate(samples):
      tsec = j * KEY_INTERVAL_US / 1e6
      ego_xyz, ego_yaw = layout.ego_pose(tsec)
      centres = occ3d.voxel_centres_global(ego_xyz, ego_yaw)
      sem = occ3d.semantics(layout, tsec)
      mask_lidar = occ3d.lidar_mask(key_scans[max(0, j - 2) : j + 3], ego_xyz, ego_yaw, sem)
      seen = np.zeros_like(mask_lidar)
      for cam, image, origin, yaw, *_ in key_views[j]:
        seen |= occ3d.camera_visible(image, cam, origin, yaw, centres)
      gt_path = f'gts/{self.name}/{sample["token"]}/labels.npz'
      files.write_npz_compressed(
        os.path.join(self.root, 'nuscenes', gt_path),
        semantics=sem,
        mask_lidar=mask_lidar.astype(np.uint8),
        mask_camera=(seen & mask_lidar).astype(np.uint8),
      )
      cams = {}
      for cam, _, _, _, filename, cam_ego_xyz, cam_ego_yaw in key_views[j]:
        cams[cam.channel] = {
          'img_path': filename,
          'intrinsics': cam.intrinsic.tolist(),
          'extrinsic': {
            'translation': calib[cam.channel]['translation'],
            'rotation': calib[cam.channel]['rotation'],
          },
          'ego_pose': {
            k: v
            for k, v in tables.ego_pose_record('', 0, cam_ego_xyz, cam_ego_yaw).items()
            if k in ('translation', 'rotation')
          },
        }
      pose = tables.ego_pose_record('', 0, ego_xyz, ego_yaw)
      infos[sample['token']] = {
        'timestamp': str(sample['timestamp']),
        'camera_sensor': cams,
        'ego_pose': {'translation': pose['translation'], 'rotation': pose['rotation']},
        'gt_path': gt_path,
        'prev': sample['prev'],
        'next': sample['next'],
      }
    return infos


def _map_png(layouts: list[world.SceneLayout]) -> np.ndarray:
  """Drivable-area mask at 1 m per pixel over the region of every scene (row 0 at y = 0)."""
  size = 2400
  mask = np.zeros((size, size), np.uint8)
  for layout in layouts:
    ox, oy = np.round(layout.road.xy(0.0, 0.0)).astype(int)
    x0, y0 = max(0, ox - 200), max(0, oy - 200)
    xs, ys = np.meshgrid(
      np.arange(x0, min(size, ox + 200)) + 0.5, np.arange(y0, min(size, oy + 200)) + 0.5
    )
    road = layout.road.ground_class(np.stack([xs, ys], -1)) == 11
    mask[y0 : y0 + road.shape[0], x0 : x0 + road.shape[1]] |= np.where(road, 255, 0).astype(
      np.uint8
    )
  return mask


def _check(options: WorldOptions) -> None:
  if options.num_scenes < 1:
    raise ValueError(f'--num_scenes: expected >= 1, got {options.num_scenes}')
  if options.samples_per_scene < 2:
    raise ValueError(f'--samples_per_scene: expected >= 2, got {options.samples_per_scene}')
  w, h = options.image_size
  if w < 16 or h < 16:
    raise ValueError(f'--image_size: expected W,H of at least 16 pixels each, got {w},{h}')
  if options.lidar_sweeps < 0 or options.camera_sweeps < 0:
    raise ValueError('--lidar_sweeps and --camera_sweeps must be >= 0')


def write_world(
  out: str, options: WorldOptions = WorldOptions(), overwrite: bool = False, workers: int = 0
) -> dict:
  """Writes the world to `out` (see the module docstring) and returns a summary.

  Scenes are written by `workers` processes (0: one per CPU core); the bytes do not depend on it.
  """
  _check(options)
  out = os.path.abspath(out)
  if os.path.exists(out) and not overwrite and (not os.path.isdir(out) or os.listdir(out)):
    raise FileExistsError(f'--out {out} exists and is not empty; pass --overwrite to replace it')
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(out)}.tmp-', dir=parent)
  try:
    summary = _write_tree(tmp, options, workers or os.cpu_count() or 1)
    if os.path.exists(out):
      old = tempfile.mkdtemp(prefix=f'.{os.path.basename(out)}.old-', dir=parent)
      os.rename(out, os.path.join(old, 'x'))
      os.rename(tmp, out)
      shutil.rmtree(old)
    else:
      os.rename(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return summary


def _write_scene(job) -> tuple[dict, dict, dict]:
  options, root, index, name = job
  t = {name: [] for name in tables.TABLE_NAMES}
  occ_infos: dict = {}
  cameras = sensors.make_cameras(*options.image_size)
  writer = _SceneWriter(options, tables.Tokens(options.seed), root, index, name, cameras)
  summary = writer.write(t, occ_infos)
  return t, occ_infos, summary


def _write_tree(root: str, options: WorldOptions, workers: int) -> dict:
  tok = tables.Tokens(options.seed)
  t = {name: [] for name in tables.TABLE_NAMES}
  t.update(tables.static_tables(tok))
  names = scene_names(options)
  jobs = [(options, root, i, name) for i, name in enumerate(names)]
  workers = min(workers, len(jobs))
  if workers > 1:
    # Scenes are independent; spawned workers (not forked) are safe beside threaded libraries.
    ctx = multiprocessing.get_context('spawn')
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
      parts = list(pool.map(_write_scene, jobs))
  else:
    parts = [_write_scene(job) for job in jobs]
  occ_infos: dict = {}
  scenes = []
  for part_tables, part_occ, summary in parts:  # merged in scene order: reproducible bytes
    for table, records in part_tables.items():
      t[table] += records
    occ_infos.update(part_occ)
    scenes.append(summary)
  layouts = [make_layout(options, i, s['layout_attempt']) for i, s in enumerate(scenes)]
  map_token = tok('map', tables.LOCATION)
  map_file = f'maps/{map_token}.png'
  files.write_png(os.path.join(root, 'nuscenes', map_file), _map_png(layouts))
  t['map'] = [
    {
      'token': map_token,
      'log_tokens': [log['token'] for log in t['log']],
      'category': 'semantic_prior',
      'filename': map_file,
    }
  ]
  for table, records in t.items():
    files.write_json(os.path.join(root, 'nuscenes', options.version, f'{table}.json'), records)
  train = set(meta.MINI_TRAIN_SCENES) if options.version == 'v1.0-mini' else None
  if train is None:
    from nuscenes.utils import splits

    train = set(splits.train)
  files.write_json(
    os.path.join(root, 'nuscenes', 'annotations.json'),
    {
      'train_split': [n for n in names if n in train],
      'val_split': [n for n in names if n not in train],
      'scene_infos': occ_infos,
    },
  )
  summary = {'options': dataclasses.asdict(options), 'scenes': scenes}
  files.write_json(os.path.join(root, 'synthetic_world.json'), summary)
  return summary


def _parse_size(text: str) -> tuple[int, int]:
  try:
    w, h = (int(v) for v in text.split(','))
  except ValueError:
    raise argparse.ArgumentTypeError(
      f'--image_size: expected W,H (e.g. 400,225), got {text!r}'
    ) from None
  return w, h


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--out', required=True, help='output directory (must be empty or absent)')
  p.add_argument('--num_scenes', type=int, default=WorldOptions.num_scenes)
  p.add_argument('--samples_per_scene', type=int, default=WorldOptions.samples_per_scene)
  p.add_argument('--image_size', type=_parse_size, default=WorldOptions.image_size, help='W,H')
  p.add_argument('--seed', type=int, default=WorldOptions.seed)
  p.add_argument('--version', default=WorldOptions.version, choices=['v1.0-mini', 'v1.0-trainval'])
  p.add_argument('--lidar_sweeps', type=int, default=WorldOptions.lidar_sweeps)
  p.add_argument('--camera_sweeps', type=int, default=WorldOptions.camera_sweeps)
  p.add_argument('--lidar_azimuth_bins', type=int, default=WorldOptions.lidar_azimuth_bins)
  p.add_argument('--workers', type=int, default=0, help='processes (default: one per core)')
  p.add_argument('--overwrite', action='store_true', help='replace a non-empty --out')
  args = p.parse_args(argv)
  options = WorldOptions(
    num_scenes=args.num_scenes,
    samples_per_scene=args.samples_per_scene,
    image_size=args.image_size,
    seed=args.seed,
    version=args.version,
    lidar_sweeps=args.lidar_sweeps,
    camera_sweeps=args.camera_sweeps,
    lidar_azimuth_bins=args.lidar_azimuth_bins,
  )
  start = time.time()
  try:
    summary = write_world(args.out, options, overwrite=args.overwrite, workers=args.workers)
  except (ValueError, FileExistsError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  n = len(summary['scenes'])
  print(
    f'wrote {n} scenes x {options.samples_per_scene} samples to {os.path.abspath(args.out)} '
    f'in {time.time() - start:.1f} s'
  )
  return 0


if __name__ == '__main__':
  sys.exit(main())
