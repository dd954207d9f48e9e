"""nuscenes_occ on the synthetic world: counts, values against the devkit, Beam, bad input.

The standard `tfds.testing.DatasetBuilderTestCase` reads through TensorFlow; these tests read the
array_record files through `tfds.data_source`, as training does.
"""

import glob
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from nuscenes.utils import splits
from nuscenes.utils.geometry_utils import BoxVisibility, view_points
from PIL import Image
from pyquaternion import Quaternion

from data_builders.nuscenes_occ import nuscenes_occ_dataset_builder as nbuilder
from uniscene_jax.data import nuscenes_meta as meta
from uniscene_jax.data import nuscenes_records as records
from uniscene_jax.data import occupancy_labels, synthetic_world

BUILDER_DIR = os.path.dirname(os.path.abspath(nbuilder.__file__))
NAME = 'nuscenes_occ/mini'


def _build(manual_dir, data_dir, beam_flags=None):
  beam_options = None
  if beam_flags:
    from apache_beam.options.pipeline_options import PipelineOptions

    beam_options = PipelineOptions(flags=beam_flags)
  builder = nbuilder.Builder(data_dir=str(data_dir), config='mini')
  builder.download_and_prepare(
    download_config=tfds.download.DownloadConfig(
      manual_dir=str(manual_dir), beam_options=beam_options
    )
  )
  return builder


@pytest.fixture(scope='module')
def built(tfds_dir):
  return tfds_dir  # the plain Python build of the default world (conftest.py)


@pytest.fixture(scope='module')
def small_world(tmp_path_factory):
  root = tmp_path_factory.mktemp('small') / 'world'
  options = synthetic_world.WorldOptions(
    samples_per_scene=3,
    image_size=(160, 90),
    lidar_sweeps=3,
    camera_sweeps=0,
    lidar_azimuth_bins=360,
  )
  synthetic_world.write_world(str(root), options, workers=1)
  return root


@pytest.fixture
def world_copy(small_world, tmp_path):
  dst = tmp_path / 'world'
  shutil.copytree(small_world, dst)
  return dst


def _source(data_dir, split):
  return tfds.data_source(NAME, data_dir=str(data_dir), split=split, download=False)


def test_records_per_split_in_scene_time_order(built, nusc):
  lists = splits.create_splits_scenes()
  for split, devkit_split in (('train', 'mini_train'), ('val', 'mini_val')):
    scenes = [s for s in nusc.scene if s['name'] in lists[devkit_split]]
    expected = sum(s['nbr_samples'] for s in scenes)
    ds = _source(built, split)
    assert len(ds) == expected > 0
    rows = [
      (ds[i]['scene_index'], ds[i]['frame_index'], ds[i]['timestamp']) for i in range(len(ds))
    ]
    assert rows == sorted(rows) and rows[0][:2] == (0, 0)
    for i, (_, frame, ts) in enumerate(rows):
      record = ds[i]
      sample = nusc.get('sample', record['sample_token'].decode())
      assert ts == sample['timestamp']
      scene = nusc.get('scene', sample['scene_token'])
      assert record['scene_name'].decode() == scene['name'] in lists[devkit_split]
      token = scene['first_sample_token']
      for _ in range(frame):
        token = nusc.get('sample', token)['next']
      assert token == sample['token']


def test_reading_does_not_import_tensorflow(built):
  code = (
    'import sys, numpy as np, tensorflow_datasets as tfds\n'
    f'ds = tfds.data_source({NAME!r}, data_dir={str(built)!r}, split="val", download=False)\n'
    'r = ds[len(ds) - 1]\n'
    'assert len(r["images"]) == 6 and r["images"][0].dtype == np.uint8\n'
    'assert r["occ_semantics"].shape == (200, 200, 16)\n'
    'assert "tensorflow" not in sys.modules, "reading imported TensorFlow"\n'
  )
  subprocess.run([sys.executable, '-c', code], check=True, timeout=300)


def test_images_and_geometry_match_the_devkit(built, nusc, synthetic_world_dir):
  ds = _source(built, 'val')
  record = ds[3]
  sample = nusc.get('sample', record['sample_token'].decode())
  lidar_sd = nusc.get('sample_data', sample['data']['LIDAR_TOP'])
  cs = nusc.get('calibrated_sensor', lidar_sd['calibrated_sensor_token'])
  pose = nusc.get('ego_pose', lidar_sd['ego_pose_token'])
  np.testing.assert_allclose(record['lidar2ego'][:3, 3], cs['translation'])
  np.testing.assert_array_equal(record['ego2global'][:3, 3], pose['translation'])  # float64 kept
  np.testing.assert_allclose(record['ego2lidar'] @ record['lidar2ego'], np.eye(4), atol=1e-12)
  _, lidar_boxes, _ = nusc.get_sample_data(lidar_sd['token'])
  projected = 0
  for c, cam in enumerate(meta.CAMERA_NAMES):
    sd = nusc.get('sample_data', sample['data'][cam])
    expected = np.asarray(Image.open(os.path.join(synthetic_world_dir, 'nuscenes', sd['filename'])))
    np.testing.assert_array_equal(record['images'][c], expected)  # RGB, decoded from the bytes
    cam_cs = nusc.get('calibrated_sensor', sd['calibrated_sensor_token'])
    np.testing.assert_array_equal(record['cam_intrinsic'][c], cam_cs['camera_intrinsic'])
    # Every box, in the camera frame at the camera's own time.
    _, cam_boxes, k = nusc.get_sample_data(sd['token'], box_vis_level=BoxVisibility.NONE)
    by_token = {b.token: b for b in cam_boxes}
    for box in lidar_boxes:
      cam_box = by_token[box.token]
      if cam_box.center[2] < 1.0:
        continue
      want = view_points(cam_box.corners(), k, normalize=True)[:2]
      corners = np.concatenate([box.corners(), np.ones((1, 8))])
      uvw = record['lidar2img'][c] @ corners
      np.testing.assert_allclose(uvw[:2] / uvw[2], want, atol=1e-6)
      projected += 1
  assert projected > 10


def test_can_bus_against_the_pose_file(built, nusc, synthetic_world_dir):
  ds = _source(built, 'train')
  for i in (0, len(ds) - 1):
    record = ds[i]
    assert record['has_can_bus']
    name = record['scene_name'].decode()
    with open(os.path.join(synthetic_world_dir, 'can_bus', f'{name}_pose.json')) as f:
      messages = json.load(f)
    after = [m for m in messages if m['utime'] > record['timestamp']]
    loop = after[0] if after else messages[-1]  # the reference reads 7:16 from this message
    np.testing.assert_array_equal(
      record['can_bus'][7:16], loop['accel'] + loop['rotation_rate'] + loop['vel']
    )
    sample = nusc.get('sample', record['sample_token'].decode())
    pose = nusc.get(
      'ego_pose', nusc.get('sample_data', sample['data']['LIDAR_TOP'])['ego_pose_token']
    )
    np.testing.assert_array_equal(record['can_bus'][:7], pose['translation'] + pose['rotation'])
    yaw = np.degrees(Quaternion(pose['rotation']).yaw_pitch_roll[0]) % 360.0
    np.testing.assert_allclose(record['can_bus'][17], yaw, atol=1e-9)
    np.testing.assert_allclose(record['can_bus'][16], np.radians(yaw), atol=1e-9)


def test_can_bus_vector_takes_the_next_message():
  def msg(t, v):
    return {'accel': [v] * 3, 'orientation': [1.0, 0, 0, 0], 'pos': [t, 0, 0],
            'rotation_rate': [v] * 3, 'utime': t, 'vel': [v] * 3}  # fmt: skip

  messages = [msg(10, 1.0), msg(20, 2.0), msg(30, 3.0)]
  v = records.can_bus_vector(messages, 20)
  assert v[0] == 20 and np.all(v[7:16] == 3.0) and v[16] == v[17] == 0  # pos from 20, rest 30
  assert (
    np.all(records.can_bus_vector(messages, 5)[7:16] == 1.0)
    and records.can_bus_vector(messages, 5)[0] == 10
  )  # before the first message: both from the first
  assert np.all(records.can_bus_vector(messages, 99)[7:16] == 3.0)  # after the last


def test_occupancy_arrays_and_boxes(built, nusc, synthetic_world_dir):
  ds = _source(built, 'train')
  agg = occupancy_labels.SampleAggregator(nusc)
  for i in (0, 4):
    record = ds[i]
    token = record['sample_token'].decode()
    assert record['has_occ3d'] and record['has_occ_binary']
    gt = os.path.join(synthetic_world_dir, 'nuscenes', 'gts', record['scene_name'].decode(), token)
    with np.load(os.path.join(gt, 'labels.npz')) as z:
      for key in ('semantics', 'mask_lidar', 'mask_camera'):
        assert record[f'occ_{key}'].tobytes() == z[key].tobytes()
    np.testing.assert_array_equal(record['occ_binary'], agg.labels(token))
    sample = nusc.get('sample', token)
    lidar_sd = nusc.get('sample_data', sample['data']['LIDAR_TOP'])
    _, boxes, _ = nusc.get_sample_data(lidar_sd['token'])
    assert record['gt_boxes'].shape == (len(boxes), 9) and len(boxes) > 5
    rot = record['lidar2ego'][:3, :3].T @ record['ego2global'][:3, :3].T
    for box, row, label, valid in zip(
      boxes, record['gt_boxes'], record['gt_labels'], record['gt_valid'], strict=True
    ):
      ann = nusc.get('sample_annotation', box.token)
      bottom = box.center - [0, 0, box.wlh[2] / 2]
      np.testing.assert_allclose(row[:6], [*bottom, *box.wlh], atol=1e-4)
      np.testing.assert_allclose(row[6], -box.orientation.yaw_pitch_roll[0] - np.pi / 2, atol=1e-5)
      velocity = np.nan_to_num(nusc.box_velocity(box.token))
      np.testing.assert_allclose(row[7:], (rot @ [velocity[0], velocity[1], 0])[:2], atol=1e-4)
      name = meta.CATEGORY_TO_DETECTION.get(ann['category_name'])
      assert label == (meta.DETECTION_CLASSES.index(name) if name else -1)
      assert valid == (ann['num_lidar_pts'] + ann['num_radar_pts'] > 0)
  labels = np.concatenate([ds[i]['gt_labels'] for i in range(len(ds))])
  assert set(labels.tolist()) >= set(range(10))


def test_beam_cli_build_equals_plain_build(small_world, tmp_path):
  from tensorflow_datasets.proto import tf_example_pb2

  plain = tmp_path / 'plain'
  _build(small_world, plain)
  beam = tmp_path / 'beam'
  command = [
    os.path.join(os.path.dirname(sys.executable), 'tfds'),
    'build',
    BUILDER_DIR,
    '--config=mini',
    f'--manual_dir={small_world}',
    f'--data_dir={beam}',
    '--beam_pipeline_options=runner=DirectRunner,direct_num_workers=2,'
    'direct_running_mode=multi_processing',
  ]
  subprocess.run(command, check=True, timeout=600, capture_output=True)
  assert glob.glob(str(beam / 'downloads' / 'nuscenes_occ_items' / 'mini-train-*.pkl'))
  from array_record.python.array_record_data_source import ArrayRecordDataSource

  for split in ('train', 'val'):
    raw = []
    for root in (plain, beam):
      files = sorted(glob.glob(str(root / 'nuscenes_occ/mini/1.0.0' / f'*-{split}.array_record-*')))
      source = ArrayRecordDataSource(files)
      raw.append([tf_example_pb2.Example.FromString(source[i]) for i in range(len(source))])
    assert len(raw[0]) == 3 and raw[0] == raw[1]  # same records (proto maps compare unordered)


def test_precomputed_label_files_are_used(world_copy, tmp_path):
  planner = records.SplitPlanner(str(world_copy), 'v1.0-mini')
  item = planner.plan('train')[1]
  assert item.label_path is None and item.label_job is not None
  marker = np.zeros((200, 200, 16), np.uint8)
  marker[3, 4, 5] = 1
  path = occupancy_labels.label_path(planner.dataroot, item.scene_name, item.sample_token)
  occupancy_labels.write_labels(path, marker)
  item = records.SplitPlanner(str(world_copy), 'v1.0-mini').plan('train')[1]
  assert item.label_path == path and item.label_job is None
  np.testing.assert_array_equal(records.make_example(item)[1]['occ_binary'], marker)


def test_missing_table_can_dir_and_wrong_version(world_copy):
  os.rename(world_copy / 'can_bus', world_copy / 'can')
  with pytest.raises(records.DataError, match=r'can_bus: no such directory'):
    records.SplitPlanner(str(world_copy), 'v1.0-mini')
  os.rename(world_copy / 'can', world_copy / 'can_bus')
  os.remove(world_copy / 'nuscenes' / 'v1.0-mini' / 'ego_pose.json')
  with pytest.raises(records.DataError, match=r'v1.0-mini/ego_pose\.json'):
    records.SplitPlanner(str(world_copy), 'v1.0-mini')
  with pytest.raises(records.DataError, match=r'v1.0-trainval.*found v1.0-mini.*--config=mini'):
    records.SplitPlanner(str(world_copy), 'v1.0-trainval')


def test_truncated_lidar_and_corrupt_jpeg_name_the_file(world_copy):
  items = records.SplitPlanner(str(world_copy), 'v1.0-mini').plan('train')
  scan = items[0].label_job.sweeps[0].path
  with open(scan, 'r+b') as f:
    f.truncate(os.path.getsize(scan) - 7)
  with pytest.raises(ValueError, match=re.escape(scan) + ': .* not a multiple of 20'):
    records.make_example(items[0])
  image = items[2].image_paths[4]
  with open(image, 'r+b') as f:
    f.truncate(os.path.getsize(image) // 2)
  with pytest.raises(records.DataError, match=re.escape(image) + ': corrupt JPEG'):
    records.make_example(items[2])


def test_missing_can_and_occ3d(world_copy):
  annotations = world_copy / 'nuscenes' / 'annotations.json'
  with open(annotations) as f:
    occ = json.load(f)
  first_scene = sorted(occ['scene_infos'])[0]
  os.remove(world_copy / 'can_bus' / f'{first_scene}_pose.json')
  planner = records.SplitPlanner(str(world_copy), 'v1.0-mini')
  items = [it for split in ('train', 'val') for it in planner.plan(split)]
  for it in items:
    assert it.has_can_bus == (it.scene_name != first_scene)
    if not it.has_can_bus:  # the reference's zeros, then the ego pose and yaw overwrite
      assert np.all(it.can_bus[7:16] == 0) and np.any(it.can_bus[:3] != 0)
  # A sample missing from annotations.json: no Occ3D arrays, flagged.
  token = items[0].sample_token
  del occ['scene_infos'][items[0].scene_name][token]
  with open(annotations, 'w') as f:
    json.dump(occ, f)
  lost = records.SplitPlanner(str(world_copy), 'v1.0-mini').plan('train')
  lost = [it for it in lost if it.sample_token == token][0]
  example = records.make_example(lost)[1]
  assert not example['has_occ3d'] and not example['occ_semantics'].any()
  # Listed but the file is gone: an error naming it.
  missing = items[1].occ3d_path
  os.remove(missing)
  with pytest.raises(
    records.DataError, match=re.escape(missing) + ': Occ3D labels.npz file .* missing'
  ):
    records.make_example(items[1])


def test_interrupted_build_leaves_no_dataset(world_copy, tmp_path):
  planner = records.SplitPlanner(str(world_copy), 'v1.0-mini')
  last = planner.plan('val')[-1]
  with open(last.image_paths[0], 'wb') as f:
    f.write(b'\xff\xd8 not a jpeg')
  out = tmp_path / 'out'
  with pytest.raises(Exception, match='corrupt JPEG'):
    _build(world_copy, out)
  assert not glob.glob(str(out / 'nuscenes_occ' / 'mini' / '*' / 'dataset_info.json'))
  with pytest.raises(Exception):  # noqa: B017 -- TFDS raises its own not-found type
    _source(out, 'train')
