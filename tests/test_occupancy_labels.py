"""Binary occupancy labels: bit-identical to the literal reference, and on the world's surfaces."""

import numpy as np
import pytest
from nuscenes.nuscenes import NuScenes
from pyquaternion import Quaternion

from tests.reference import occupancy_labels_reference as ref
from uniscene_jax.data import occupancy_labels as ol
from uniscene_jax.data import synthetic_world


@pytest.fixture(scope='module')
def small_world(tmp_path_factory):
  root = tmp_path_factory.mktemp('labels') / 'world'
  options = synthetic_world.WorldOptions(
    num_scenes=1,
    samples_per_scene=6,
    image_size=(64, 36),
    lidar_sweeps=3,
    camera_sweeps=0,
    lidar_azimuth_bins=360,
  )
  synthetic_world.write_world(str(root), options, workers=1)
  return root, NuScenes('v1.0-mini', str(root / 'nuscenes'), verbose=False)


def test_downsample_matches_reference_bit_for_bit():
  rng = np.random.default_rng(0)
  xyz = np.concatenate([rng.normal(0, 20, (20_000, 3)), rng.uniform(-3, 3, (5_000, 3))])
  xyz = xyz.astype(np.float32).astype(np.float64)
  fast = ol.voxel_downsample(xyz)
  slow = ref.reference_downsample(xyz)
  assert fast.shape == slow.shape and len(fast) > 15_000
  assert np.array_equal(fast, slow)  # exact, rows in the same (cell) order


def test_labels_equal_the_literal_reference(small_world):
  _, nusc = small_world
  agg = ol.SampleAggregator(nusc)
  tokens = [s['token'] for s in nusc.sample]
  for token in (tokens[0], tokens[2], tokens[-1]):  # scene start, middle, end
    np.testing.assert_array_equal(agg.points(token), ref.reference_points(nusc, token))
    fast = agg.labels(token)
    slow = ref.reference_binary_labels(nusc, token)
    assert fast.dtype == np.uint8 and fast.shape == (200, 200, 16)
    assert np.array_equal(fast, slow) and fast.sum() > 2000


def test_window_edges_and_empty_intervals(small_world):
  _, nusc = small_world
  agg = ol.SampleAggregator(nusc)
  tokens = [s['token'] for s in nusc.sample]
  past, future = agg.window(tokens[0])
  assert past == [] and [s['token'] for s in future] == [tokens[2], tokens[1]]
  assert len(agg.sweeps(tokens[0])) == 2 * 3 and len(agg.sweeps(tokens[2])) == 4 * 3
  # No window at all: only the current scan (the original crashed on one-sample scenes).
  lone = ol.SampleAggregator(nusc, num_sweeps=0)
  scan = np.fromfile(nusc.get_sample_data_path(nusc.sample[0]['data']['LIDAR_TOP']), np.float32)
  assert lone.points(tokens[0]).shape[1] == np.sum(
    np.all(np.abs(scan.reshape(-1, 5)[:, :3]) <= ol.KEY_CROP, 1)
  )
  assert lone.labels(tokens[0]).sum() > 500


def test_occupied_voxels_lie_on_world_surfaces(small_world):
  root, nusc = small_world
  _, layouts = synthetic_world.load_layouts(str(root))
  layout, start_us = layouts[nusc.scene[0]['name']]
  sample = nusc.sample[3]
  labels = ol.SampleAggregator(nusc).labels(sample['token'])
  interval = (ol.GRID_MAX - ol.GRID_MIN) / (ol.GRID_SIZE - 1)
  inner = np.argwhere(labels[1:-1, 1:-1, 1:-1]) + 1  # boundary cells collect clipped points
  centres = ol.GRID_MIN + (inner + 0.5) * interval
  lidar_xyz = centres @ ol.FIXED_ROTATION  # undo (x, y, z) -> (y, -x, z)
  sd = nusc.get('sample_data', sample['data']['LIDAR_TOP'])
  cs = nusc.get('calibrated_sensor', sd['calibrated_sensor_token'])
  pose = nusc.get('ego_pose', sd['ego_pose_token'])
  ego = lidar_xyz @ Quaternion(cs['rotation']).rotation_matrix.T + cs['translation']
  glob = ego @ Quaternion(pose['rotation']).rotation_matrix.T + pose['translation']
  dist = layout.surface_distance(glob, (sample['timestamp'] - start_us) / 1e6)
  # Half a cell diagonal plus the centroid spread; moving objects leave trails over the window.
  assert np.mean(dist < 0.6) > 0.9 and np.median(dist) < 0.3
  # The ground under and around the ego is occupied: the label frame is the lidar's, 1.84 m up.
  ground_k = int(np.floor((-cs['translation'][2] - ol.GRID_MIN[2]) / interval[2]))
  assert labels[90:110, 90:110, ground_k].mean() > 0.5


def test_fix_flags(small_world):
  _, nusc = small_world
  agg = ol.SampleAggregator(nusc)
  token = nusc.sample[2]['token']
  base = agg.labels(token)
  dropped = agg.labels(token, ol.LabelOptions(drop_out_of_range=True))
  assert (
    np.all(dropped <= base)
    and base[0].sum() + base[-1].sum() > dropped[0].sum() + dropped[-1].sum()
  )
  ego = agg.labels(token, ol.LabelOptions(true_lidar_to_ego=True))
  # In the ego frame the ground is at z = 0: cell floor(5 / 0.5333) = 9 instead of 5.
  assert ego[90:110, 90:110, 9].mean() > 0.5 and base[90:110, 90:110, 5].mean() > 0.5
  assert ego[90:110, 90:110, 5].sum() == 0
  assert not np.array_equal(agg.labels(token, ol.LabelOptions(interval_range_over_size=True)), base)


def test_dataset_command_writes_then_skips(small_world, tmp_path):
  root, nusc = small_world
  dataroot = str(root / 'nuscenes')
  assert ol.main(['--dataroot', dataroot, '--version', 'v1.0-mini', '--workers', '1']) == 0
  token = nusc.sample[1]['token']
  path = ol.label_path(dataroot, nusc.scene[0]['name'], token)
  with np.load(path) as f:
    assert sorted(f.files) == ['mask_camera', 'mask_lidar', 'semantics']
    np.testing.assert_array_equal(f['semantics'], ol.SampleAggregator(nusc).labels(token))
    assert f['mask_lidar'].sum() == 0
  assert ol.write_dataset_labels(dataroot, 'v1.0-mini') == (0, len(nusc.sample))
  assert ol.main(['--dataroot', dataroot, '--version', 'v1.0-trainval']) == 2


def _own_gts(root, dst):
  """A dataroot sharing the world's tables and scans (symlinks) with its own, empty gts/."""
  dst.mkdir()
  for entry in (root / 'nuscenes').iterdir():
    if entry.name != 'gts':
      (dst / entry.name).symlink_to(entry)
  return str(dst)


def _label_files(dataroot, nusc):
  return {
    s['token']: ol.label_path(dataroot, nusc.get('scene', s['scene_token'])['name'], s['token'])
    for s in nusc.sample
  }


def test_dataset_command_worker_pool_writes_the_same_files(small_world, tmp_path):
  root, nusc = small_world
  one, two = _own_gts(root, tmp_path / 'one'), _own_gts(root, tmp_path / 'two')
  for dataroot, workers in ((one, '1'), (two, '2')):  # '2': the spawned process pool
    assert ol.main(['--dataroot', dataroot, '--version', 'v1.0-mini', '--workers', workers]) == 0
  files_one, files_two = _label_files(one, nusc), _label_files(two, nusc)
  for token, path in files_two.items():
    with open(path, 'rb') as a, open(files_one[token], 'rb') as b:
      assert a.read() == b.read(), token
  token = nusc.sample[2]['token']
  with np.load(files_two[token]) as f:
    np.testing.assert_array_equal(f['semantics'], ol.SampleAggregator(nusc).labels(token))


@pytest.mark.parametrize(
  'flag', ['true_lidar_to_ego', 'drop_out_of_range', 'interval_range_over_size']
)
def test_dataset_command_flags_change_the_labels(small_world, tmp_path, capsys, flag):
  root, nusc = small_world
  dataroot = _own_gts(root, tmp_path / 'nuscenes')
  argv = ['--dataroot', dataroot, '--version', 'v1.0-mini', '--workers', '1', f'--{flag}']
  assert ol.main(argv) == 0
  assert f'options: {flag}=True' in capsys.readouterr().out
  agg = ol.SampleAggregator(nusc)
  options = ol.LabelOptions(**{flag: True})
  changed = 0
  for token, path in _label_files(dataroot, nusc).items():
    with np.load(path) as f:
      assert sorted(f.files) == ['mask_camera', 'mask_lidar', 'semantics']
      np.testing.assert_array_equal(f['semantics'], agg.labels(token, options))
      changed += not np.array_equal(f['semantics'], agg.labels(token))
  assert changed == len(nusc.sample)


def test_builder_config_label_options(small_world, tmp_path):
  import tensorflow_datasets as tfds

  from data_builders.nuscenes_occ import nuscenes_occ_dataset_builder as nbuilder

  root, nusc = small_world
  ol.write_dataset_labels(str(root / 'nuscenes'), 'v1.0-mini')  # reference files, to be ignored
  options = ol.LabelOptions(drop_out_of_range=True)
  config = nbuilder.NuScenesOccConfig(
    name='mini_drop', nuscenes_version='v1.0-mini', label_options=options
  )
  builder = nbuilder.Builder(data_dir=str(tmp_path), config=config)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(root)))
  assert builder.info.config_description == 'labels: drop_out_of_range=True'
  agg = ol.SampleAggregator(nusc)
  records = [r for split in builder.info.splits for r in builder.as_data_source(split=split)]
  assert len(records) == len(nusc.sample)
  for r in records:
    token = r['sample_token']
    token = token.decode() if isinstance(token, bytes) else token
    np.testing.assert_array_equal(r['occ_binary'], agg.labels(token, options))
