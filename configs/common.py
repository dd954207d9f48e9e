"""Constants shared by every config: frames, grids, camera order, class names, image statistics."""

from uniscene_jax.data import nuscenes_meta as _meta

# Camera order everywhere (it also indexes the per-camera embedding).
CAMERA_NAMES = _meta.CAMERA_NAMES
NUM_CAMERAS = len(CAMERA_NAMES)

# Perception range (x_min, y_min, z_min, x_max, y_max, z_max) in metres.
PC_RANGE = (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0)
# BEV grid: query q = h * BEV_W + w; row h runs along y, column w along x.
BEV_H = 200
BEV_W = 200
# UniScene occupancy grid [X, Y, Z] over PC_RANGE.
OCC_SHAPE = (200, 200, 16)
# Occ3D semantic occupancy grid (ego frame of the key frame).
OCC3D_RANGE = _meta.OCC3D_RANGE
OCC3D_SHAPE = _meta.OCC3D_SHAPE
OCC3D_VOXEL_SIZE = _meta.OCC3D_VOXEL_SIZE

DETECTION_CLASSES = _meta.DETECTION_CLASSES
OCC3D_CLASSES = _meta.OCC3D_CLASSES
OCC3D_FREE = _meta.OCC3D_FREE

# Images are consumed in BGR order; normalisation subtracts this mean (std 1, no /255).
IMAGE_MEAN_BGR = (103.530, 116.280, 123.675)
IMAGE_STD_BGR = (1.0, 1.0, 1.0)
# Images are zero-padded bottom/right to a multiple of this.
IMAGE_PAD_DIVISOR = 32
