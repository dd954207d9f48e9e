"""The shared constants agree with each other and with the dataset formats."""

import numpy as np

from configs import common
from uniscene_jax.data import nuscenes_meta as meta


def test_grids_match_their_ranges():
  x0, y0, z0, x1, y1, z1 = common.PC_RANGE
  # BEV cell 0.512 m; the occupancy grid spans the same range.
  assert np.isclose((x1 - x0) / common.BEV_W, 0.512) and np.isclose((y1 - y0) / common.BEV_H, 0.512)
  assert common.OCC_SHAPE == (200, 200, 16)
  lo, hi = np.array(common.OCC3D_RANGE[:3]), np.array(common.OCC3D_RANGE[3:])
  np.testing.assert_allclose((hi - lo) / np.array(common.OCC3D_SHAPE), common.OCC3D_VOXEL_SIZE)


def test_class_and_camera_lists():
  assert common.CAMERA_NAMES[0] == 'CAM_FRONT' and len(set(common.CAMERA_NAMES)) == 6
  assert len(common.DETECTION_CLASSES) == 10
  assert len(common.OCC3D_CLASSES) == 18 and common.OCC3D_CLASSES[common.OCC3D_FREE] == 'free'
  # Every evaluated category maps to a detection class and to the Occ3D class of the same name.
  for category, det in meta.CATEGORY_TO_DETECTION.items():
    assert det in common.DETECTION_CLASSES
    assert common.OCC3D_CLASSES[meta.CATEGORY_TO_OCC3D[category]] == det
  assert set(meta.CATEGORY_TO_OCC3D) <= set(meta.CATEGORIES)
  assert common.IMAGE_MEAN_BGR == (103.530, 116.280, 123.675)
