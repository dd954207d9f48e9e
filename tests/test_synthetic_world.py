"""The synthetic world is real nuScenes to the devkit, and its sensors agree on one geometry."""

import colorsys
import hashlib
import json
import os

import cv2
import numpy as np
import pytest
from nuscenes.can_bus.can_bus_api import NuScenesCanBus
from nuscenes.eval.common.config import config_factory
from nuscenes.eval.common.loaders import load_gt
from nuscenes.eval.detection.data_classes import DetectionBox
from nuscenes.eval.detection.evaluate import DetectionEval
from nuscenes.utils import splits
from nuscenes.utils.data_classes import LidarPointCloud
from nuscenes.utils.geometry_utils import BoxVisibility, view_points
from pyquaternion import Quaternion

from uniscene_jax.data import nuscenes_meta as meta
from uniscene_jax.data import synthetic_world
from uniscene_jax.data.synth import tables, world


def _sensor_to_global(nusc, sd_token):
  """4x4 sensor -> global transform of a sample_data record."""
  sd = nusc.get('sample_data', sd_token)
  cs = nusc.get('calibrated_sensor', sd['calibrated_sensor_token'])
  pose = nusc.get('ego_pose', sd['ego_pose_token'])
  s2e = np.eye(4)
  s2e[:3, :3] = Quaternion(cs['rotation']).rotation_matrix
  s2e[:3, 3] = cs['translation']
  e2g = np.eye(4)
  e2g[:3, :3] = Quaternion(pose['rotation']).rotation_matrix
  e2g[:3, 3] = pose['translation']
  return e2g @ s2e, e2g


def test_devkit_reads_every_file(synthetic_world_dir, nusc):
  version_dir = synthetic_world_dir / 'nuscenes' / 'v1.0-mini'
  assert sorted(p.stem for p in version_dir.glob('*.json')) == sorted(tables.TABLE_NAMES)
  assert {s['name'] for s in nusc.scene} == {'scene-0061', 'scene-0103'}
  assert len(nusc.sample) == 18
  channels = set(meta.CAMERA_NAMES) | {meta.LIDAR_NAME}
  for sample in nusc.sample:
    assert set(sample['data']) == channels
    assert len(sample['anns']) > 10
  n_points = 0
  for sd in nusc.sample_data:
    if sd['channel'] == meta.LIDAR_NAME:
      pc = LidarPointCloud.from_file(nusc.get_sample_data_path(sd['token']))
      raw = np.fromfile(nusc.get_sample_data_path(sd['token']), np.float32).reshape(-1, 5)
      assert pc.points.shape == (4, len(raw)) and len(raw) > 10_000
      assert np.isfinite(raw).all() and raw[:, 3].min() >= 0 and raw[:, 3].max() <= 255
      assert set(np.unique(raw[:, 4])) <= set(range(32)) and len(np.unique(raw[:, 4])) > 20
      n_points += len(raw)
    else:
      img = cv2.imread(nusc.get_sample_data_path(sd['token']))
      assert img.shape == (sd['height'], sd['width'], 3) == (225, 400, 3)
  assert n_points > 1_000_000
  sample = nusc.sample[4]
  lidar = nusc.get('sample_data', sample['data'][meta.LIDAR_NAME])
  cam = nusc.get('sample_data', sample['data']['CAM_BACK'])
  for token in (lidar['token'], cam['token'], lidar['prev'], cam['prev']):
    path, boxes, intrinsic = nusc.get_sample_data(token)
    assert os.path.exists(path) and len(boxes) > 0
    sd = nusc.get('sample_data', token)
    assert (intrinsic is None) == (sd['channel'] == meta.LIDAR_NAME)
  # Sweeps interpolate boxes between the previous and the following key frame.
  _, sweep_boxes, _ = nusc.get_sample_data(lidar['prev'])
  assert all(np.isfinite(b.center).all() for b in sweep_boxes)

  can = NuScenesCanBus(dataroot=str(synthetic_world_dir))
  for scene in nusc.scene:
    pose = can.get_messages(scene['name'], 'pose')
    utimes = np.array([m['utime'] for m in pose])
    assert list(pose[0]) == ['accel', 'orientation', 'pos', 'rotation_rate', 'utime', 'vel']
    assert np.all(np.diff(utimes) == 20_000)  # 50 Hz
    first = nusc.get('sample', scene['first_sample_token'])
    last = nusc.get('sample', scene['last_sample_token'])
    assert utimes[0] < first['timestamp'] and utimes[-1] > last['timestamp']
    # The CAN position is the ego pose, at 50 Hz.
    lidar0 = nusc.get('sample_data', first['data'][meta.LIDAR_NAME])
    ego = nusc.get('ego_pose', lidar0['ego_pose_token'])
    m = pose[int(np.argmin(np.abs(utimes - first['timestamp'])))]
    assert abs(m['utime'] - first['timestamp']) <= 10_000
    # Within 10 ms at under 7 m/s.
    assert np.linalg.norm(np.subtract(m['pos'], ego['translation'])) < 0.07
    assert np.linalg.norm(m['vel']) > 3.9
    for message in meta.CAN_MESSAGES + ('route', 'meta'):
      assert len(can.get_messages(scene['name'], message)) > 0


def test_linkage_and_timing(nusc):
  scene_ranges = []
  for scene in nusc.scene:
    assert scene['name'] in splits.mini_train + splits.mini_val
    tokens = [scene['first_sample_token']]
    while nusc.get('sample', tokens[-1])['next']:
      tokens.append(nusc.get('sample', tokens[-1])['next'])
    assert tokens[-1] == scene['last_sample_token'] and len(tokens) == scene['nbr_samples']
    samples = [nusc.get('sample', t) for t in tokens]
    stamps = [s['timestamp'] for s in samples]
    assert np.all(np.diff(stamps) > 0)
    scene_ranges.append((stamps[0], stamps[-1]))
    for channel in meta.CAMERA_NAMES + (meta.LIDAR_NAME,):
      sd = nusc.get('sample_data', samples[0]['data'][channel])
      assert sd['prev'] == '' and sd['is_key_frame'] is True
      chain = [sd]
      while chain[-1]['next']:
        chain.append(nusc.get('sample_data', chain[-1]['next']))
      assert chain[-1]['token'] == samples[-1]['data'][channel]
      assert np.all(np.diff([c['timestamp'] for c in chain]) > 0)
      assert sum(c['is_key_frame'] for c in chain) == len(samples)
      for c in chain:
        owner = nusc.get('sample', c['sample_token'])
        if c['is_key_frame']:
          assert owner['data'][channel] == c['token']
          assert abs(c['timestamp'] - owner['timestamp']) < 50_000
        else:  # a sweep belongs to the following key frame
          assert (
            nusc.get('sample', owner['prev'])['timestamp']
            < c['timestamp']
            < owner['timestamp'] + 50_000
          )
        assert c['ego_pose_token'] == c['token']
        assert nusc.get('ego_pose', c['token'])['timestamp'] == c['timestamp']
    if channel == meta.LIDAR_NAME:
      assert len(chain) == len(samples) + 9 * (len(samples) - 1)
  (a0, a1), (b0, b1) = sorted(scene_ranges)
  assert a1 < b0
  assert len(nusc.ego_pose) == len(nusc.sample_data)
  for inst in nusc.instance:
    ann = nusc.get('sample_annotation', inst['first_annotation_token'])
    count = 1
    while ann['next']:
      nxt = nusc.get('sample_annotation', ann['next'])
      assert nxt['prev'] == ann['token'] and nxt['instance_token'] == inst['token']
      assert nusc.get('sample', nxt['sample_token'])['prev'] == ann['sample_token']
      ann, count = nxt, count + 1
    assert count == inst['nbr_annotations'] and ann['token'] == inst['last_annotation_token']
  cats = {nusc.get('category', i['category_token'])['name'] for i in nusc.instance}
  assert {meta.CATEGORY_TO_DETECTION[c] for c in cats if c in meta.CATEGORY_TO_DETECTION} == set(
    meta.DETECTION_CLASSES
  )
  assert {a['visibility_token'] for a in nusc.sample_annotation} >= {'1', '4'}


def _hue_deg(rgb):
  h, s, v = colorsys.rgb_to_hsv(*(np.asarray(rgb, float) / 255.0))
  return h * 360.0, s, v


def test_boxes_land_on_their_colour(nusc):
  """Annotation boxes projected with the devkit hit pixels of their class's colour."""
  checked = hits = 0
  for sample in nusc.sample:
    for channel in meta.CAMERA_NAMES:
      path, boxes, intrinsic = nusc.get_sample_data(sample['data'][channel], BoxVisibility.ALL)
      rgb = cv2.imread(path)[..., ::-1]
      h, w = rgb.shape[:2]
      for box in boxes:
        det = meta.CATEGORY_TO_DETECTION.get(box.name)
        ann = nusc.get('sample_annotation', box.token)
        if det is None or ann['visibility_token'] != '4':
          continue
        corners = view_points(box.corners(), intrinsic, normalize=True)[:2]
        if min(np.ptp(corners[0]), np.ptp(corners[1])) < 8:
          continue
        u, v = np.round(view_points(box.center[:, None], intrinsic, normalize=True)[:2, 0]).astype(
          int
        )
        assert 0 <= u < w and 0 <= v < h
        hue, sat, _ = _hue_deg(rgb[v, u])
        diff = abs((hue - world.CLASS_HUES[det] + 180) % 360 - 180)
        checked += 1
        hits += sat > 0.4 and diff < 15
  assert checked >= 30
  assert hits / checked >= 0.9, (hits, checked)


def test_lidar_points_lie_on_world_surfaces(synthetic_world_dir, nusc):
  _, layouts = synthetic_world.load_layouts(str(synthetic_world_dir))
  scene_of = {s['token']: s['name'] for s in nusc.scene}
  for sd in nusc.sample_data[::7]:
    if sd['channel'] != meta.LIDAR_NAME:
      continue
    layout, start_us = layouts[scene_of[nusc.get('sample', sd['sample_token'])['scene_token']]]
    pc = LidarPointCloud.from_file(nusc.get_sample_data_path(sd['token']))
    s2g, _ = _sensor_to_global(nusc, sd['token'])
    pts = (s2g[:3, :3] @ pc.points[:3].astype(np.float64)).T + s2g[:3, 3]
    dist = layout.surface_distance(pts, (sd['timestamp'] - start_us) / 1e6)
    assert dist.max() < 2e-3, (sd['filename'], dist.max())
    # And the world is not trivially flat: a good share of returns come from solids.
    assert (pts[:, 2] > 0.3).mean() > 0.2


def test_occ3d_labels_agree_with_lidar(synthetic_world_dir, nusc):
  root = synthetic_world_dir / 'nuscenes'
  ann = json.loads((root / 'annotations.json').read_text())
  assert ann['train_split'] == ['scene-0061'] and ann['val_split'] == ['scene-0103']
  low = np.array(meta.OCC3D_RANGE[:3])
  for sample in nusc.sample:
    scene = nusc.get('scene', sample['scene_token'])['name']
    info = ann['scene_infos'][scene][sample['token']]
    assert set(info['camera_sensor']) == set(meta.CAMERA_NAMES)
    labels = np.load(root / info['gt_path'])
    sem, m_lidar, m_cam = labels['semantics'], labels['mask_lidar'], labels['mask_camera']
    assert sem.shape == m_lidar.shape == m_cam.shape == meta.OCC3D_SHAPE
    assert sem.dtype == m_lidar.dtype == m_cam.dtype == np.uint8
    assert not np.any(m_cam & ~m_lidar)
    assert 0.01 < m_cam.mean() < m_lidar.mean() < 0.5
    present = set(np.unique(sem[m_cam.astype(bool)]))
    assert {11, 13, 15, 17} <= present and len(present & set(range(1, 11))) >= 3
    # Key-frame lidar points, in the ego frame, fall into occupied, lidar-observed voxels.
    lidar = sample['data'][meta.LIDAR_NAME]
    s2g, e2g = _sensor_to_global(nusc, lidar)
    pc = LidarPointCloud.from_file(nusc.get_sample_data_path(lidar))
    pts = (np.linalg.inv(e2g) @ s2g @ np.vstack([pc.points[:3], np.ones(pc.points.shape[1])]))[:3].T
    idx = np.floor((pts - low) / meta.OCC3D_VOXEL_SIZE).astype(int)
    inside = np.all((idx >= 0) & (idx < np.array(meta.OCC3D_SHAPE)), 1)
    i, j, k = idx[inside].T
    assert inside.sum() > 5000
    assert (sem[i, j, k] != meta.OCC3D_FREE).mean() > 0.995
    assert m_lidar[i, j, k].mean() > 0.97
    # Occupied, lidar-observed voxels are where the accumulated key-frame points are (moving
    # objects leave trails, so only static classes are compared).
    hit = np.zeros(meta.OCC3D_SHAPE, bool)
    window = [sample['token']]
    for step in ('prev', 'next'):
      token = sample['token']
      for _ in range(2):
        token = nusc.get('sample', token)[step]
        if not token:
          break
        window.append(token)
    for token in window:
      other = nusc.get('sample', token)['data'][meta.LIDAR_NAME]
      s2g_o, _ = _sensor_to_global(nusc, other)
      pc = LidarPointCloud.from_file(nusc.get_sample_data_path(other))
      pts = (np.linalg.inv(e2g) @ s2g_o @ np.vstack([pc.points[:3], np.ones(pc.points.shape[1])]))[
        :3
      ].T
      idx = np.floor((pts - low) / meta.OCC3D_VOXEL_SIZE).astype(int)
      idx = idx[np.all((idx >= 0) & (idx < np.array(meta.OCC3D_SHAPE)), 1)]
      hit[tuple(idx.T)] = True
    occupied = sem != meta.OCC3D_FREE
    seen = m_lidar.astype(bool) & occupied
    assert seen.sum() > 5000
    assert (hit & occupied & ~seen).sum() < 0.01 * seen.sum()
    assert (seen & ~hit).sum() < 0.01 * seen.sum()
    # Free space is observed far more than surfaces, and most voxels are not observed at all.
    assert 3 * seen.sum() < (m_lidar.astype(bool) & ~occupied).sum() < 0.5 * sem.size


def test_detection_eval_of_ground_truth_is_perfect(synthetic_world_dir, nusc, tmp_path):
  gt = load_gt(nusc, 'mini_val', DetectionBox, verbose=False)
  results = {}
  for token in gt.sample_tokens:
    results[token] = [
      {
        'sample_token': token,
        'translation': list(b.translation),
        'size': list(b.size),
        'rotation': list(b.rotation),
        'velocity': list(b.velocity),
        'detection_name': b.detection_name,
        'detection_score': 1.0,
        'attribute_name': b.attribute_name,
      }
      for b in gt[token]
      if b.num_pts > 0
    ]
  meta_info = {
    'use_camera': True,
    'use_lidar': False,
    'use_radar': False,
    'use_map': False,
    'use_external': False,
  }
  path = tmp_path / 'results.json'
  path.write_text(json.dumps({'meta': meta_info, 'results': results}))
  evaluator = DetectionEval(
    nusc,
    config_factory('detection_cvpr_2019'),
    str(path),
    'mini_val',
    str(tmp_path / 'eval'),
    verbose=False,
  )
  summary = evaluator.main(plot_examples=0, render_curves=False)
  assert summary['mean_ap'] >= 0.99
  assert summary['nd_score'] >= 0.99
  assert all(summary['mean_dist_aps'][c] >= 0.99 for c in meta.DETECTION_CLASSES)


def _digest(root):
  h = hashlib.sha256()
  for dirpath, _, names in sorted(os.walk(root)):
    for name in sorted(names):
      p = os.path.join(dirpath, name)
      h.update(os.path.relpath(p, root).encode())
      with open(p, 'rb') as f:
        h.update(f.read())
  return h.hexdigest()


SMALL = dict(
  num_scenes=2,
  samples_per_scene=3,
  image_size=(96, 54),
  lidar_sweeps=1,
  camera_sweeps=0,
  lidar_azimuth_bins=180,
)


def test_same_seed_same_bytes_and_safe_output(tmp_path):
  a, b, c = tmp_path / 'a', tmp_path / 'b', tmp_path / 'c'
  synthetic_world.write_world(str(a), synthetic_world.WorldOptions(seed=3, **SMALL), workers=1)
  synthetic_world.write_world(str(b), synthetic_world.WorldOptions(seed=3, **SMALL), workers=2)
  synthetic_world.write_world(str(c), synthetic_world.WorldOptions(seed=4, **SMALL), workers=1)
  assert _digest(a) == _digest(b)  # whatever the number of worker processes
  assert _digest(a) != _digest(c)
  pose_a = json.loads((a / 'nuscenes/v1.0-mini/ego_pose.json').read_text())
  pose_c = json.loads((c / 'nuscenes/v1.0-mini/ego_pose.json').read_text())
  assert pose_a[-1]['translation'] != pose_c[-1]['translation']

  with pytest.raises(FileExistsError, match=str(a)):
    synthetic_world.write_world(str(a), synthetic_world.WorldOptions(seed=5, **SMALL))
  assert _digest(a) == _digest(b)  # untouched
  synthetic_world.write_world(str(a), synthetic_world.WorldOptions(seed=4, **SMALL), overwrite=True)
  assert _digest(a) == _digest(c)
  assert sorted(os.listdir(tmp_path)) == ['a', 'b', 'c']  # no temporary trees left behind

  # The command line says what is wrong and writes nothing.
  assert synthetic_world.main(['--out', str(a), '--seed', '6']) == 2
  with pytest.raises(SystemExit):
    synthetic_world.main(['--out', str(tmp_path / 'd'), '--image_size', '400x225'])
  assert synthetic_world.main(['--out', str(tmp_path / 'd'), '--samples_per_scene', '1']) == 2
  assert sorted(os.listdir(tmp_path)) == ['a', 'b', 'c']
