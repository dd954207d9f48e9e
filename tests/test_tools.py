"""Researcher tools: the visualiser's pictures and the parameters/FLOPs report."""

import json
import math
import pathlib

import numpy as np
import pytest
from PIL import Image

from configs import pretrain
from uniscene_jax import optim
from uniscene_jax.tools import flops
from uniscene_jax.tools import visualize as vis


@pytest.fixture(scope='module')
def tiny_workdir(tfds_dir, tmp_path_factory):
  """A workdir of the :tiny preset trained for two steps (config.json and a checkpoint)."""
  from uniscene_jax import train

  workdir = tmp_path_factory.mktemp('tiny_run')
  cfg = pretrain.get_config('tiny')
  cfg.num_steps = 2
  cfg.eval_at_end = False
  train.train_and_evaluate(cfg, str(workdir), str(tfds_dir))
  return workdir


# Layout of a frame's picture with the synthetic world's 400 x 225 images: header 28, cameras
# (title 22 + 2 rows of 320 x 180), top views (title 22 + 320), legend 28, 3D views (22 + 360).
PICTURE_SIZE = (960, 28 + 22 + 2 * 180 + 22 + 320 + 28 + 22 + 360)


@pytest.mark.slow(seconds=90)
def test_pictures_of_a_tiny_run_and_of_its_pth(tiny_workdir, tfds_dir, tmp_path):
  from uniscene_jax.convert import to_torch
  from uniscene_jax.data import input_pipeline as ip

  cfg = vis.config_from_workdir(str(tiny_workdir))
  saved = json.loads((tiny_workdir / 'config.json').read_text())['config']
  assert json.loads(cfg.to_json_best_effort()) == saved  # the run's config, rebuilt
  paths = vis.visualize(
    cfg, str(tmp_path / 'a'), workdir=str(tiny_workdir), data_dir=str(tfds_dir), num_samples=2,
    start=1, every=2,
  )  # fmt: skip
  assert [pathlib.Path(p).name for p in paths] == ['val_00001.png', 'val_00003.png']
  pictures = [np.asarray(Image.open(p).convert('RGB')) for p in paths]
  for p, picture in zip(paths, pictures, strict=True):
    assert Image.open(p).size == PICTURE_SIZE and pathlib.Path(p).stat().st_size > 50_000
    assert len(np.unique(picture.reshape(-1, 3), axis=0)) > 1000  # real content, not a blank
  # The back camera (records' index 3) sits in the middle of the lower row, in RGB.
  record = ip.open_source(str(tfds_dir), cfg.data.name, 'val')[3]
  back = vis.rig_picture(record['images'])[180 + 30 :, 320:640]  # below its label
  np.testing.assert_array_equal(pictures[1][28 + 22 + 180 + 30 : 28 + 22 + 360, 320:640], back)
  # The same weights through a .pth and the importer give the same pictures below the header.
  pth = str(tmp_path / 'tiny.pth')
  assert to_torch.main(['--workdir', str(tiny_workdir), '--output', pth]) == 0
  again = vis.visualize(
    cfg, str(tmp_path / 'b'), weights=pth, data_dir=str(tfds_dir), num_samples=1, start=3
  )
  np.testing.assert_array_equal(np.asarray(Image.open(again[0]))[28:], pictures[1][28:])


def test_bad_visualiser_arguments_are_refused(tmp_path):
  with pytest.raises(ValueError, match='config.json: not found'):
    vis.config_from_workdir(str(tmp_path))
  with pytest.raises(ValueError, match='--num_samples 0'):
    vis.visualize(pretrain.get_config('tiny'), str(tmp_path), num_samples=0)
  with pytest.raises(ValueError, match=r'boxes must be \[K, 7\+\]'):
    vis.draw_boxes(np.zeros((8, 8, 3), np.uint8), np.zeros((2, 5)), (-1, -1, -1, 1, 1, 1))


def test_rig_layout_and_colours():
  # camera n is a flat BGR image of value (n, 10 n, 100): its tile shows RGB (100, 10 n, n)
  images = [np.broadcast_to(np.uint8([n, 10 * n, 100]), (90, 160, 3)) for n in range(6)]
  rig = vis.rig_picture(images, width=160)
  assert rig.shape == (180, 480, 3)
  layout = [[2, 0, 1], [4, 3, 5]]  # front-left, front, front-right / back-left, back, back-right
  for r, row in enumerate(layout):
    for c, n in enumerate(row):
      np.testing.assert_array_equal(rig[r * 90 + 60, c * 160 + 80], [100, 10 * n, n])


def test_top_view_orientation_height_and_classes():
  grid = np.zeros((10, 8, 4), np.uint8)
  grid[9, 7, :3] = 1  # front (largest x), left (largest y), top at z = 2
  grid[0, 0, 0] = 1  # back right, on the floor
  occupied, colors = vis.voxel_colors(grid, 0, semantic=False)
  pic = vis.top_view(occupied, colors)
  assert pic.shape == (10, 8, 3)
  np.testing.assert_array_equal(pic[0, 0], vis.height_colors(np.array(2), 4))  # top left
  np.testing.assert_array_equal(pic[9, 7], vis.height_colors(np.array(0), 4))  # bottom right
  assert (pic[1:9] == vis.BACKGROUND).all()
  assert vis.height_colors(np.array(3), 4).sum() > vis.height_colors(np.array(0), 4).sum()
  sem = np.full((10, 8, 4), 17, np.uint8)
  sem[4, 3, 0], sem[4, 3, 2] = 11, 4  # driveable surface under a car: the car is seen
  occupied, colors = vis.voxel_colors(sem, 17, semantic=True)
  np.testing.assert_array_equal(vis.top_view(occupied, colors)[5, 4], vis.OCC3D_PALETTE[4])


def test_bev_pca_recovers_the_principal_patterns():
  bev_h, bev_w, c = 12, 20, 16  # h along y, w along x
  y, x = np.meshgrid(np.linspace(-1, 1, bev_h), np.linspace(-1, 1, bev_w), indexing='ij')
  patterns = np.stack([3 * x, 2 * y, x * y], -1).reshape(-1, 3)  # decreasing variance
  patterns -= patterns.mean(0)
  loadings = np.linalg.qr(np.random.default_rng(0).normal(size=(c, 3)))[0].T  # orthonormal
  noise = np.random.default_rng(1).normal(0, 1e-3, (bev_h * bev_w, c))
  rgb = vis.bev_pca(patterns @ loadings + noise, bev_h, bev_w)
  assert rgb.shape == (bev_w, bev_h, 3) and rgb.min() == 0.0 and rgb.max() == 1.0
  expected = vis.orient(patterns.reshape(bev_h, bev_w, 3).transpose(1, 0, 2))
  for k in range(3):
    r = np.corrcoef(rgb[..., k].ravel(), expected[..., k].ravel())[0, 1]
    assert abs(r) > 0.99, (k, r)
  # red follows x: larger at the top of the picture (forward) for one sign, monotone by rows
  red = rgb[..., 0].mean(1)
  assert np.all(np.diff(red) < 0) or np.all(np.diff(red) > 0)


def test_bev_pca_of_a_lidar_frame_bev_turns_to_the_ego_axes():
  bev_h, bev_w = 6, 10  # lidar frame: h along lidar y = forward, w along lidar x = right
  h, w = np.meshgrid(np.arange(bev_h), np.arange(bev_w), indexing='ij')
  noise = np.random.default_rng(0).normal(0, 0.01, h.shape)
  features = np.stack([h * 10.0, w * 1.0, noise], -1).reshape(-1, 3)
  rgb = vis.bev_pca(features, bev_h, bev_w, frame='lidar')
  assert rgb.shape == (bev_h, bev_w, 3)  # rows forward (lidar y), columns left-right
  red = rgb[..., 0]  # the first component follows h = forward: changes down the rows only
  assert np.ptp(red, 1).max() < 1e-2 and abs(red[0, 0] - red[-1, 0]) > 0.99
  green = rgb[..., 1]  # lidar x = right: left column (most negative x) at one end
  assert np.ptp(green, 0).max() < 1e-2 and abs(green[0, 0] - green[0, -1]) > 0.99
  with pytest.raises(ValueError, match="frame must be 'ego' or 'lidar'"):
    vis.bev_pca(features, bev_h, bev_w, frame='camera')


def test_detections_become_grid_boxes_and_are_drawn_over_the_dimmed_target():
  from uniscene_jax.data.occupancy_labels import FIXED_ROTATION

  record_box = [5.0, -3.0, 0.2, 2.0, 4.5, 1.6, -0.7 - np.pi / 2, 0.0, 0.0]
  aux = {
    'detections': {
      'boxes': np.array([[record_box, record_box, record_box]]),
      'scores': np.array([[0.9, 0.2, 0.8]]),
      'valid': np.array([[True, True, False]]),
    }
  }
  boxes = vis.predicted_boxes(aux, FIXED_ROTATION, 0.3)
  np.testing.assert_allclose(boxes, vis.boxes_from_record(np.array([record_box]), FIXED_ROTATION))
  assert vis.predicted_boxes({'sca_overflow': 0}, FIXED_ROTATION, 0.3) is None
  grid = np.zeros((20, 20, 4), np.uint8)
  grid[5:15, 5:15, 0] = 1
  images = [np.full((45, 80, 3), 100, np.uint8)] * 6
  kwargs = dict(free=0, semantic=False, pc_range=(-10, -10, -2, 10, 10, 2), bev_hw=(4, 4))
  bev = np.random.default_rng(0).normal(size=(16, 8))
  with_head = vis.frame_picture(images, grid, grid, bev, **kwargs)
  detector = vis.frame_picture(images, grid, None, bev, predicted_boxes=boxes, **kwargs)
  assert detector.shape == with_head.shape
  top = 28 + 22 + 2 * 180 + 22  # the top views' first row
  target, dimmed = (detector[top : top + 320, x : x + 320].astype(int) for x in (0, 320))
  occupied = target.sum(-1) > 3 * 60
  box = (np.abs(dimmed - vis.PREDICTED_BOX).sum(-1) < 60).sum()
  assert box > 50 and (dimmed[occupied] < target[occupied]).all(-1).mean() > 0.9


def test_oblique_view_occludes_and_shades():
  blue, red = np.uint8([0, 0, 255]), np.uint8([255, 0, 0])
  grid = np.zeros((12, 12, 6), bool)
  colors = np.zeros((12, 12, 6, 3), np.uint8)
  grid[8, 4:8, 0], colors[8, 4:8, 0] = True, blue  # a low block
  size = (1.0, 1.0, 1.0)
  alone = vis.oblique_view(grid, colors, size, (200, 200), fit=np.ones_like(grid))
  bluish = (alone[..., 2] > 100) & (alone[..., 0] < 60)
  assert (alone == blue).all(-1).sum() > 50  # its top face, at full brightness
  assert (bluish & (alone[..., 2] < 200)).sum() > 50  # the darker side faces
  # A wall nearer to the viewer (behind-left-above: smaller x, larger y) hides it entirely.
  grid[3:7, 2:11, :6], colors[3:7, 2:11, :6] = True, red
  hidden = vis.oblique_view(grid, colors, size, (200, 200), fit=np.ones_like(grid))
  assert not ((hidden[..., 2] > 100) & (hidden[..., 0] < 60)).any()
  assert ((hidden[..., 0] > 100) & (hidden[..., 2] < 60)).sum() > 1000


def test_draw_boxes_position_and_heading():
  pc_range = (-50.0, -50.0, -5.0, 50.0, 50.0, 3.0)  # 100 m over 100 pixels
  blank = np.zeros((100, 100, 3), np.uint8)
  box = np.array([[20.0, 10.0, 0.0, 8.0, 4.0, 1.5, 0.0]])  # 20 m ahead, 10 m left, facing +x
  drawn = vis.draw_boxes(blank, box, pc_range).any(-1)
  rows, cols = np.nonzero(drawn)
  # picture row = 50 - x, column = 50 - y: x in [16, 24] -> rows 26..34, y in [8, 12] -> 38..42
  assert 25 <= rows.min() <= 27 and 33 <= rows.max() <= 35
  assert 37 <= cols.min() <= 39 and 41 <= cols.max() <= 43
  assert drawn[27:30, 40].all()  # the heading line from the centre towards the front edge
  turned = box.copy()
  turned[0, 3:5], turned[0, 6] = (4.0, 8.0), np.pi / 2  # same outline, facing +y
  turned_mask = vis.draw_boxes(blank, turned, pc_range).any(-1)
  outline = ~(drawn & ~turned_mask)  # the heading lines differ; the outlines agree
  assert outline.mean() > 0.995 and turned_mask[30, 38:41].all()  # heading to the left
  assert not vis.draw_boxes(blank, np.zeros((0, 7)), pc_range).any()


def test_record_boxes_in_the_grid_frame_match_the_devkit_corners():
  from nuscenes.utils.data_classes import Box
  from pyquaternion import Quaternion

  from uniscene_jax.data.occupancy_labels import FIXED_ROTATION

  yaw = 0.7
  box = Box([5.0, -3.0, 1.0], [2.0, 4.5, 1.6], Quaternion(axis=[0, 0, 1], angle=yaw))  # w, l, h
  record = np.array([[5.0, -3.0, 1.0 - 0.8, 2.0, 4.5, 1.6, -yaw - np.pi / 2, 0.0, 0.0]])
  x, y, z, dx, dy, dz, heading = vis.boxes_from_record(record, FIXED_ROTATION)[0]
  c, s = math.cos(heading), math.sin(heading)
  ours = [(x + c * u * dx / 2 - s * v * dy / 2, y + s * u * dx / 2 + c * v * dy / 2)
          for u in (-1, 1) for v in (-1, 1)]  # fmt: skip
  theirs = (FIXED_ROTATION @ box.corners())[:2, [2, 3, 6, 7]].T  # bottom corners, grid frame
  assert z == pytest.approx(0.2) and dz == pytest.approx(1.6)
  np.testing.assert_allclose(
    sorted(map(tuple, np.round(ours, 6))), sorted(map(tuple, np.round(theirs, 6)))
  )


def test_annotated_boxes_land_on_voxels_of_their_class(tfds_dir):
  """The records' boxes, moved into the Occ3D grid's frame, cover voxels of their own class."""
  from uniscene_jax.data import input_pipeline as ip
  from uniscene_jax.data.nuscenes_meta import DETECTION_CLASSES, OCC3D_CLASSES, OCC3D_RANGE

  source = ip.open_source(str(tfds_dir), 'nuscenes_occ/mini', 'val')
  centres = np.linspace(OCC3D_RANGE[0], OCC3D_RANGE[3], 201)[:-1] + 0.2  # 0.4 m cells
  x, y = np.meshgrid(centres, centres, indexing='ij')
  agree = total = 0
  for i in range(len(source)):
    record = source[i]
    valid = record['gt_valid'] & (record['gt_labels'] >= 0)
    boxes = vis.boxes_from_record(record['gt_boxes'][valid], record['lidar2ego'])
    for box, label in zip(boxes, record['gt_labels'][valid], strict=True):  # tens per frame
      c, s = np.cos(box[6]), np.sin(box[6])
      along, across = (x - box[0]) * c + (y - box[1]) * s, (y - box[1]) * c - (x - box[0]) * s
      inside = (np.abs(along) < box[3] / 2) & (np.abs(across) < box[4] / 2)
      classes = record['occ_semantics'][inside].ravel()
      classes = classes[(classes != 17) & (classes != OCC3D_CLASSES.index('driveable_surface'))]
      if len(classes):
        total += 1
        agree += OCC3D_CLASSES[np.bincount(classes).argmax()] == DETECTION_CLASSES[label]
  assert total > 100 and agree == total


# ----------------------------------------------------------------------------------------------


def _manifest_rows(path) -> dict:
  """{module: [parameters, trainable]} of a reference key manifest."""
  rows = {}
  for key, v in json.loads(path.read_text()).items():
    if v['kind'] == 'parameter':
      row = rows.setdefault(flops.module_of(key), [0, 0])
      row[0] += math.prod(v['shape'])
      row[1] += math.prod(v['shape']) * v['requires_grad']
  return rows


def test_parameter_report_equals_the_manifest_per_module():
  from tests.test_uniscene import MANIFEST

  params = flops.abstract_variables(pretrain.get_config())['params']
  rows = flops.parameter_rows(params)
  assert sum(r['params'] for r in rows.values()) == 62_897_984
  assert sum(r['trainable'] for r in rows.values()) == 62_570_240
  # The optimiser's moments cover exactly the tensors with requires_grad in the reference.
  assert sum(optim.make_optimizer(optim.OptimConfig(), 10, params).sizes().values()) == 62_570_240
  want = _manifest_rows(pathlib.Path(MANIFEST))
  assert {k: [r['params'], r['trainable']] for k, r in rows.items()} == want
  assert len(want) == 14 and want['img_neck'] == [3_278_592, 3_278_592]
  table = flops.format_parameters(rows)
  assert '62,897,984' in table and 'img_backbone' in table.splitlines()[2]


def test_detector_parameter_report_equals_the_bevformer_base_manifest():
  from configs import finetune_det
  from tests.test_uniscene import MANIFEST

  rows = flops.parameter_rows(flops.abstract_variables(finetune_det.get_config())['params'])
  want = _manifest_rows(pathlib.Path(MANIFEST).with_name('bevformer_base_keys.json'))
  assert sum(r['params'] for r in rows.values()) == 69_034_947
  assert {k: [r['params'], r['trainable']] for k, r in rows.items()} == want


def test_flops_grow_with_the_image_area():
  cfg = pretrain.get_config('tiny')
  cfg.model.bev_h = cfg.model.bev_w = 20
  cfg.data.target_pool = 10
  small = flops.forward_costs(flops.experiment(cfg, 1, 'float32', False, (64, 96), None))
  large = flops.forward_costs(
    flops.experiment(cfg, 1, 'float32', False, (128, 192), None), (flops.FEATURES, flops.FRAME)
  )
  ratio = large[flops.FEATURES]['flops'] / small[flops.FEATURES]['flops']
  assert 3.5 < ratio < 4.5, ratio  # convolutions: proportional to the pixels
  assert large[flops.FRAME]['flops'] > small[flops.FRAME]['flops'] + 0.8 * (
    large[flops.FEATURES]['flops'] - small[flops.FEATURES]['flops']
  )
  parts = sum(small[k]['flops'] for k in (flops.FEATURES, flops.ENCODER, 'occupancy head'))
  assert small[flops.FRAME]['flops'] == pytest.approx(parts, rel=0.05)
  assert all(c['peak'] > 0 for c in small.values())
  assert large[flops.FEATURES]['peak'] > small[flops.FEATURES]['peak']
