"""Facts of the nuScenes, Occ3D and detection-benchmark formats, shared by writers and readers.

These are properties of the datasets, not settings: configs/common.py re-exports them beside the
model's grids so that a config file has everything in one place.
"""

# The camera order of BEVFormer/UniScene; it also indexes the per-camera embedding.
CAMERA_NAMES = (
  'CAM_FRONT',
  'CAM_FRONT_RIGHT',
  'CAM_FRONT_LEFT',
  'CAM_BACK',
  'CAM_BACK_LEFT',
  'CAM_BACK_RIGHT',
)
LIDAR_NAME = 'LIDAR_TOP'

# The 10 classes of the nuScenes detection benchmark, in mmdet3d's label order.
DETECTION_CLASSES = (
  'car',
  'truck',
  'construction_vehicle',
  'bus',
  'trailer',
  'barrier',
  'motorcycle',
  'bicycle',
  'pedestrian',
  'traffic_cone',
)

# nuScenes categories in nuScenes-lidarseg index order (category.index = position here).
CATEGORIES = (
  'noise',
  'animal',
  'human.pedestrian.adult',
  'human.pedestrian.child',
  'human.pedestrian.construction_worker',
  'human.pedestrian.personal_mobility',
  'human.pedestrian.police_officer',
  'human.pedestrian.stroller',
  'human.pedestrian.wheelchair',
  'movable_object.barrier',
  'movable_object.debris',
  'movable_object.pushable_pullable',
  'movable_object.trafficcone',
  'static_object.bicycle_rack',
  'vehicle.bicycle',
  'vehicle.bus.bendy',
  'vehicle.bus.rigid',
  'vehicle.car',
  'vehicle.construction',
  'vehicle.emergency.ambulance',
  'vehicle.emergency.police',
  'vehicle.motorcycle',
  'vehicle.trailer',
  'vehicle.truck',
  'flat.driveable_surface',
  'flat.other',
  'flat.sidewalk',
  'flat.terrain',
  'static.manmade',
  'static.other',
  'static.vegetation',
  'vehicle.ego',
)

# Category -> detection class (the devkit's mapping; other categories are not evaluated).
CATEGORY_TO_DETECTION = {
  'movable_object.barrier': 'barrier',
  'vehicle.bicycle': 'bicycle',
  'vehicle.bus.bendy': 'bus',
  'vehicle.bus.rigid': 'bus',
  'vehicle.car': 'car',
  'vehicle.construction': 'construction_vehicle',
  'vehicle.motorcycle': 'motorcycle',
  'human.pedestrian.adult': 'pedestrian',
  'human.pedestrian.child': 'pedestrian',
  'human.pedestrian.construction_worker': 'pedestrian',
  'human.pedestrian.police_officer': 'pedestrian',
  'movable_object.trafficcone': 'traffic_cone',
  'vehicle.trailer': 'trailer',
  'vehicle.truck': 'truck',
}

ATTRIBUTES = (
  'vehicle.moving',
  'vehicle.stopped',
  'vehicle.parked',
  'cycle.with_rider',
  'cycle.without_rider',
  'pedestrian.sitting_lying_down',
  'pedestrian.standing',
  'pedestrian.moving',
)

# Visibility tokens are the strings '1'..'4'.
VISIBILITY_LEVELS = (
  ('1', 'v0-40', 'visibility of whole object is between 0 and 40%'),
  ('2', 'v40-60', 'visibility of whole object is between 40 and 60%'),
  ('3', 'v60-80', 'visibility of whole object is between 60 and 80%'),
  ('4', 'v80-100', 'visibility of whole object is between 80 and 100%'),
)

# Occ3D-nuScenes semantic classes; 17 is free space.
OCC3D_CLASSES = (
  'others',
  'barrier',
  'bicycle',
  'bus',
  'car',
  'construction_vehicle',
  'motorcycle',
  'pedestrian',
  'traffic_cone',
  'trailer',
  'truck',
  'driveable_surface',
  'other_flat',
  'sidewalk',
  'terrain',
  'manmade',
  'vegetation',
  'free',
)
OCC3D_FREE = 17
# Occ3D grid: [x_min, y_min, z_min, x_max, y_max, z_max] in the key frame's ego frame, 0.4 m voxels.
OCC3D_RANGE = (-40.0, -40.0, -1.0, 40.0, 40.0, 5.4)
OCC3D_SHAPE = (200, 200, 16)
OCC3D_VOXEL_SIZE = 0.4

# nuScenes category -> Occ3D class (the lidarseg 16-class grouping; unlisted -> 0 'others').
CATEGORY_TO_OCC3D = {
  'movable_object.barrier': 1,
  'vehicle.bicycle': 2,
  'vehicle.bus.bendy': 3,
  'vehicle.bus.rigid': 3,
  'vehicle.car': 4,
  'vehicle.construction': 5,
  'vehicle.motorcycle': 6,
  'human.pedestrian.adult': 7,
  'human.pedestrian.child': 7,
  'human.pedestrian.construction_worker': 7,
  'human.pedestrian.police_officer': 7,
  'movable_object.trafficcone': 8,
  'vehicle.trailer': 9,
  'vehicle.truck': 10,
  'flat.driveable_surface': 11,
  'flat.other': 12,
  'flat.sidewalk': 13,
  'flat.terrain': 14,
  'static.manmade': 15,
  'static.vegetation': 16,
}

# Messages of the CAN bus expansion (the devkit's NuScenesCanBus names).
CAN_MESSAGES = (
  'ms_imu',
  'pose',
  'steeranglefeedback',
  'vehicle_monitor',
  'zoesensors',
  'zoe_veh_info',
)

# Scene numbers the CAN bus API refuses ("no CAN bus data").
CAN_BLACKLIST = tuple(range(161, 169)) + tuple(range(170, 177)) + tuple(range(309, 315))

# The devkit's predefined mini splits (nuscenes.utils.splits): DetectionEval selects by scene name.
MINI_TRAIN_SCENES = (
  'scene-0061',
  'scene-0553',
  'scene-0655',
  'scene-0757',
  'scene-0796',
  'scene-1077',
  'scene-1094',
  'scene-1100',
)
MINI_VAL_SCENES = ('scene-0103', 'scene-0916')
