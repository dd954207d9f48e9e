"""nuscenes_occ: one record per nuScenes key frame with cameras, geometry, CAN bus and occupancy.

    tfds build data_builders/nuscenes_occ --config=mini --manual_dir=DIR --data_dir=OUT
    # per-sample work (JPEG checks, occupancy labels) on a Beam runner:
    tfds build ... --beam_pipeline_options="runner=DirectRunner,direct_num_workers=2,\
direct_running_mode=multi_processing"

Records are array_record (random access, read with `tfds.data_source` without TensorFlow), in
(scene, timestamp) order with scenes in time order, so the temporal queue finds a frame's
predecessors at the previous indices. The devkit tables are read once on the driver
(`uniscene_jax.data.nuscenes_records.SplitPlanner`); each record is then made from plain data by
`make_example`, in this process or on Beam workers.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from uniscene_jax.data import nuscenes_records as records
from uniscene_jax.data import occupancy_labels

_OCC = (200, 200, 16)

_INSTRUCTIONS = """\
Pass --manual_dir=DIR where DIR holds:

  DIR/nuscenes/v1.0-trainval/*.json   the 13 nuScenes tables (v1.0-mini/ for --config=mini)
  DIR/nuscenes/samples/CAM_*/*.jpg    key-frame images of the six cameras
  DIR/nuscenes/samples/LIDAR_TOP/*.pcd.bin, DIR/nuscenes/sweeps/LIDAR_TOP/*.pcd.bin
                                      key-frame scans and sweeps (for the occupancy labels)
  DIR/nuscenes/maps/*.png             map masks (the devkit checks they exist)
  DIR/can_bus/scene-NNNN_pose.json    the CAN bus expansion (a scene without a file gets
                                      can_bus zeros and has_can_bus=False)
  DIR/nuscenes/annotations.json, DIR/nuscenes/gts/<scene>/<sample>/labels.npz
                                      Occ3D-nuScenes (optional: without annotations.json every
                                      record has has_occ3d=False)
  DIR/nuscenes/gts/<scene>/<sample>/labels_binary_sweep2.npz
                                      UniScene binary occupancy (optional: computed when absent;
                                      precompute with python -m uniscene_jax.data.occupancy_labels)

Scenes are split into train and val by the devkit's lists (mini_train/mini_val for mini). The
embedded synthetic world (python -m uniscene_jax.data.synthetic_world --out DIR) has this layout
and builds with --config=mini.
"""


class NuScenesOccConfig(tfds.core.BuilderConfig):
  """A nuScenes release: `nuscenes_version` is its table folder.

  `label_options` are the binary occupancy label choices (the reference's by default). Other options
  need a config of their own name, e.g. `Builder(config=NuScenesOccConfig(name='mini_ego',
  nuscenes_version='v1.0-mini', label_options=LabelOptions(true_lidar_to_ego=True)))`; they are
  appended to the description (dataset_info.json), and the labels are then always computed, since
  the label files on disk do not record the options that made them.
  """

  def __init__(
    self,
    *,
    nuscenes_version: str,
    label_options: occupancy_labels.LabelOptions | None = None,
    **kwargs,
  ):
    self.label_options = label_options or occupancy_labels.LabelOptions()
    if self.label_options != occupancy_labels.LabelOptions():
      labels = 'labels: ' + occupancy_labels.describe_options(self.label_options)
      description = kwargs.get('description')
      kwargs['description'] = f'{description}; {labels}' if description else labels
    super().__init__(**kwargs)
    self.nuscenes_version = nuscenes_version


def _occ(doc: str) -> tfds.features.Tensor:
  return tfds.features.Tensor(
    shape=_OCC, dtype=np.uint8, encoding=tfds.features.Encoding.ZLIB, doc=doc
  )


def features() -> tfds.features.FeaturesDict:
  # float64 tensors are stored as raw bytes: without an encoding TFDS writes tf.Example
  # float_lists, which are float32 and would round global poses to about 1e-4 m.
  f = tfds.features
  return f.FeaturesDict(
    {
      'sample_token': f.Text(),
      'scene_token': f.Text(),
      'scene_name': f.Text(),
      'timestamp': f.Scalar(np.int64, doc='microseconds (lidar key frame)'),
      'frame_index': f.Scalar(np.int64, doc='position of the key frame in its scene'),
      'scene_index': f.Scalar(np.int64, doc='position of the scene in this split'),
      'images': f.Sequence(
        f.Image(shape=(None, None, 3), encoding_format='jpeg'),
        length=6,
        doc='original JPEG bytes: CAM_FRONT, _FRONT_RIGHT, _FRONT_LEFT, _BACK, _BACK_LEFT, '
        '_BACK_RIGHT',
      ),
      'lidar2img': f.Tensor(
        shape=(6, 4, 4),
        dtype=np.float64,
        encoding=f.Encoding.BYTES,
        doc='lidar -> image pixels, camera-time ego poses',
      ),
      'ego2lidar': f.Tensor(shape=(4, 4), dtype=np.float64, encoding=f.Encoding.BYTES),
      'lidar2ego': f.Tensor(shape=(4, 4), dtype=np.float64, encoding=f.Encoding.BYTES),
      'ego2global': f.Tensor(
        shape=(4, 4), dtype=np.float64, encoding=f.Encoding.BYTES, doc='ego pose at the lidar time'
      ),
      'cam_intrinsic': f.Tensor(shape=(6, 3, 3), dtype=np.float64, encoding=f.Encoding.BYTES),
      'can_bus': f.Tensor(
        shape=(18,),
        dtype=np.float64,
        encoding=f.Encoding.BYTES,
        doc='absolute: ego translation, quaternion, CAN accel, rotation rate, velocity, '
        'yaw rad, yaw deg',
      ),
      'has_can_bus': f.Scalar(np.bool_),
      'occ_binary': _occ('UniScene multi-sweep binary occupancy, lidar-origin grid'),
      'has_occ_binary': f.Scalar(np.bool_),
      'occ_semantics': _occ('Occ3D class 0..17 (17 = free)'),
      'occ_mask_lidar': _occ('Occ3D voxels observed by lidar'),
      'occ_mask_camera': _occ('Occ3D voxels visible from the cameras'),
      'has_occ3d': f.Scalar(np.bool_),
      'gt_boxes': f.Tensor(
        shape=(None, 9),
        dtype=np.float32,
        doc='lidar frame: bottom centre x, y, z, size w, l, h, yaw (-box yaw - pi/2), vx, vy',
      ),
      'gt_labels': f.Tensor(shape=(None,), dtype=np.int64, doc='0..9 detection class, -1 other'),
      'gt_valid': f.Tensor(shape=(None,), dtype=np.bool_, doc='lidar + radar points > 0'),
    }
  )


class Builder(tfds.core.GeneratorBasedBuilder):
  """nuScenes key frames with CAN bus, Occ3D and UniScene binary occupancy labels."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS
  BUILDER_CONFIGS = [
    NuScenesOccConfig(
      name=name, nuscenes_version=version, description=f'nuScenes {version} (train, val)'
    )
    for name, version in records.VERSIONS.items()
  ]

  def __init__(self, *, file_format=None, **kwargs):
    super().__init__(file_format=file_format or 'array_record', **kwargs)
    self._use_beam = False

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
      features=features(),
      disable_shuffling=True,
      homepage='https://www.nuscenes.org/',
    )

  def _download_and_prepare(self, dl_manager, download_config):
    # Beam is used only when the build asks for it (runner or pipeline options).
    self._use_beam = bool(download_config.beam_runner or download_config.beam_options)
    return super()._download_and_prepare(dl_manager, download_config)

  def _split_generators(self, dl_manager):
    options = self.builder_config.label_options
    planner = records.SplitPlanner(
      os.fspath(dl_manager.manual_dir), self.builder_config.nuscenes_version, options
    )
    left_out = planner.unassigned_scenes()
    if left_out:
      logging.warning('scenes in no split list, left out: %s', ', '.join(left_out))
    splits = {}
    for split in ('train', 'val'):
      items = planner.plan(split)
      if options != occupancy_labels.LabelOptions():
        # A precomputed file may hold other options' labels (the reference's, say): recompute.
        items = [
          dataclasses.replace(
            item,
            label_path=None,
            label_job=item.label_job or planner.aggregator.job(item.sample_token),
          )
          for item in items
        ]
      if not items:
        continue  # e.g. a world with only training scenes
      splits[split] = self._generate_examples(items, split, dl_manager)
    if not splits:
      raise records.DataError(
        f'{os.fspath(dl_manager.manual_dir)}: no scene of the tables is in the '
        f'{self.builder_config.name} split lists'
      )
    return splits

  def _generate_examples(self, items, split, dl_manager):
    if not self._use_beam:
      return map(records.make_example, items)
    beam = tfds.core.lazy_imports.apache_beam
    shard_dir = os.path.join(os.fspath(dl_manager.download_dir), 'nuscenes_occ_items')
    shards = records.write_item_shards(items, shard_dir, f'{self.builder_config.name}-{split}')
    return (
      beam.Create(shards)
      | 'ReadItems' >> beam.FlatMap(records.read_item_shard)
      | 'Spread' >> beam.Reshuffle()
      | 'MakeExample' >> beam.Map(records.make_example)
    )
