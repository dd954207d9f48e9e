"""Decoded lidar-frame boxes -> nuScenes detection results (global frame) -> DetectionEval.

The conversion inverts what the records hold (data/nuscenes_records.py): record boxes are in
the LIDAR_TOP frame of the key frame, bottom centre, size (w, l, h) as the annotation's wlh,
yaw_record = -yaw_box - pi/2 with yaw_box the heading of the annotation quaternion seen from the
lidar frame, and velocity the annotation's global xy velocity rotated into the lidar frame. As in
the reference's result formatting (mmdet3d 0.17 `output_to_nusc_box` then
`lidar_nusc_box_to_global`), a box becomes: gravity centre; orientation = rotation about the
lidar z axis by -yaw_record - pi/2; velocity (vx, vy, 0); all moved by the record's lidar2ego,
dropped if its ego-frame xy distance exceeds the class range of the evaluation config, then
moved by ego2global. Attributes follow the reference's rule on the global velocity.

Every box's transform is vectorised (numpy): a split's 6019 x 300 boxes take seconds.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping

import numpy as np

from uniscene_jax.data.nuscenes_meta import DETECTION_CLASSES

EVAL_CONFIG = 'detection_cvpr_2019'
# The reference evaluates each version on its predefined validation split.
EVAL_SETS = {'v1.0-mini': 'mini_val', 'v1.0-trainval': 'val'}
# The reference's attribute per class: a moving box (|v| > 0.2 m/s) of a vehicle class is
# 'vehicle.moving', of a cycle class 'cycle.with_rider'; a still pedestrian is
# 'pedestrian.standing' and a still bus 'vehicle.stopped'; every other case takes the default.
MOVING_SPEED = 0.2
DEFAULT_ATTRIBUTE = {
  'car': 'vehicle.parked',
  'pedestrian': 'pedestrian.moving',
  'trailer': 'vehicle.parked',
  'truck': 'vehicle.parked',
  'bus': 'vehicle.moving',
  'motorcycle': 'cycle.without_rider',
  'construction_vehicle': 'vehicle.parked',
  'bicycle': 'cycle.without_rider',
  'barrier': '',
  'traffic_cone': '',
}
_VEHICLES = ('car', 'construction_vehicle', 'bus', 'truck', 'trailer')
_CYCLES = ('bicycle', 'motorcycle')
META = {
  'use_camera': True,
  'use_lidar': False,
  'use_radar': False,
  'use_map': False,
  'use_external': True,  # the reference's input_modality sets it (CAN bus)
}


def attribute_name(name: str, speed: float) -> str:
  """The reference's attribute for a box of class `name` moving at `speed` m/s (global xy)."""
  if speed > MOVING_SPEED:
    if name in _VEHICLES:
      return 'vehicle.moving'
    if name in _CYCLES:
      return 'cycle.with_rider'
    return DEFAULT_ATTRIBUTE[name]
  if name == 'pedestrian':
    return 'pedestrian.standing'
  if name == 'bus':
    return 'vehicle.stopped'
  return DEFAULT_ATTRIBUTE[name]


def matrix_to_quaternion(rot: np.ndarray) -> np.ndarray:
  """[..., 3, 3] rotation matrices -> [..., 4] unit quaternions (w, x, y, z), w >= 0."""
  m = np.asarray(rot, np.float64)
  m00, m01, m02 = m[..., 0, 0], m[..., 0, 1], m[..., 0, 2]
  m10, m11, m12 = m[..., 1, 0], m[..., 1, 1], m[..., 1, 2]
  m20, m21, m22 = m[..., 2, 0], m[..., 2, 1], m[..., 2, 2]
  trace = m00 + m11 + m22
  # Shepperd's method: build from the largest of 4 |components| to avoid dividing by ~0.
  diag = np.stack([trace, m00, m11, m22], axis=-1)
  s = 2.0 * np.sqrt(np.maximum(1.0 + 2.0 * diag - trace[..., None], 1e-12))  # 4|q_k|
  candidates = np.stack(
    [
      np.stack(
        [s[..., 0] / 4, (m21 - m12) / s[..., 0], (m02 - m20) / s[..., 0], (m10 - m01) / s[..., 0]],
        -1,
      ),
      np.stack(
        [(m21 - m12) / s[..., 1], s[..., 1] / 4, (m01 + m10) / s[..., 1], (m02 + m20) / s[..., 1]],
        -1,
      ),
      np.stack(
        [(m02 - m20) / s[..., 2], (m01 + m10) / s[..., 2], s[..., 2] / 4, (m12 + m21) / s[..., 2]],
        -1,
      ),
      np.stack(
        [(m10 - m01) / s[..., 3], (m02 + m20) / s[..., 3], (m12 + m21) / s[..., 3], s[..., 3] / 4],
        -1,
      ),
    ],
    axis=-2,
  )  # [..., 4 cases, 4]
  case = np.argmax(diag, axis=-1)
  q = np.take_along_axis(candidates, case[..., None, None], axis=-2)[..., 0, :]
  q /= np.linalg.norm(q, axis=-1, keepdims=True)
  return np.where(q[..., :1] < 0, -q, q)


def lidar_boxes_to_global(
  boxes: np.ndarray, lidar2ego: np.ndarray, ego2global: np.ndarray
) -> dict[str, np.ndarray]:
  """Decoder boxes of one key frame -> nuScenes box fields in the global frame.

  Args:
    boxes: [K, 9] lidar frame, bottom centre, (x, y, z, w, l, h, yaw_record, vx, vy).
    lidar2ego, ego2global: [4, 4] of the record (lidar key-frame time).

  Returns:
    translation [K, 3] (gravity centre), size [K, 3] (w, l, h), rotation [K, 4] (w, x, y, z),
    velocity [K, 2] global xy, ego_distance [K] (xy distance from the ego origin, for the class
    range filter).
  """
  b = np.asarray(boxes, np.float64).reshape(-1, 9)
  lidar2ego = np.asarray(lidar2ego, np.float64)
  lidar2global = np.asarray(ego2global, np.float64) @ lidar2ego
  centre = b[:, :3].copy()
  centre[:, 2] += b[:, 5] / 2  # bottom -> gravity centre
  yaw = -b[:, 6] - np.pi / 2
  cos, sin, zero, one = np.cos(yaw), np.sin(yaw), np.zeros_like(yaw), np.ones_like(yaw)
  box_rot = np.stack(
    [
      np.stack([cos, -sin, zero], -1),
      np.stack([sin, cos, zero], -1),
      np.stack([zero, zero, one], -1),
    ],
    axis=-2,
  )  # [K, 3, 3] rotation about the lidar z axis
  r = lidar2global[:3, :3]
  velocity = np.stack([b[:, 7], b[:, 8], np.zeros(len(b))], -1) @ r.T
  ego_centre = centre @ lidar2ego[:3, :3].T + lidar2ego[:3, 3]
  return {
    'translation': centre @ r.T + lidar2global[:3, 3],
    'size': b[:, 3:6],
    'rotation': matrix_to_quaternion(r[None] @ box_rot),
    'velocity': velocity[:, :2],
    'ego_distance': np.linalg.norm(ego_centre[:, :2], axis=-1),
  }


def class_ranges(config_name: str = EVAL_CONFIG) -> dict[str, float]:
  """Per-class evaluation radius (m) of a devkit detection config."""
  from nuscenes.eval.common.config import config_factory

  return dict(config_factory(config_name).class_range)


def sample_results(
  sample_token: str,
  boxes: np.ndarray,
  scores: np.ndarray,
  labels: np.ndarray,
  lidar2ego: np.ndarray,
  ego2global: np.ndarray,
  valid: np.ndarray | None = None,
  class_range: Mapping[str, float] | None = None,
  class_names: tuple[str, ...] = DETECTION_CLASSES,
) -> list[dict]:
  """One key frame's detections as nuScenes result dicts (global frame), in input order.

  Args:
    boxes: [K, 9] decoder output (lidar frame, bottom centre); scores [K]; labels [K] int.
    valid: [K] bool from the decoder (False = dropped by its range filter).
    class_range: boxes farther (ego xy) than their class's range are dropped, as the
      reference's formatting does; None keeps them.
  """
  boxes = np.asarray(boxes)
  scores = np.asarray(scores, np.float64).reshape(-1)
  labels = np.asarray(labels).reshape(-1)
  if not (len(boxes) == len(scores) == len(labels)):
    raise ValueError(
      f'sample {sample_token}: boxes {boxes.shape}, scores {scores.shape}, labels '
      f'{labels.shape}: expected K boxes of 9 values with K scores and labels'
    )
  keep = np.ones(len(boxes), bool) if valid is None else np.array(valid, bool).reshape(-1)
  if np.any(keep & ((labels < 0) | (labels >= len(class_names)))):
    raise ValueError(f'sample {sample_token}: labels outside [0, {len(class_names)})')
  g = lidar_boxes_to_global(boxes, lidar2ego, ego2global)
  names = [class_names[int(k)] if keep[i] else '' for i, k in enumerate(labels)]
  if class_range is not None:
    limit = np.array([class_range[n] if n else np.inf for n in names])
    keep &= g['ego_distance'] <= limit
  speed = np.linalg.norm(g['velocity'], axis=-1)
  out = []
  for i in np.flatnonzero(keep):  # building the JSON objects is per box anyway
    out.append(
      {
        'sample_token': sample_token,
        'translation': g['translation'][i].tolist(),
        'size': g['size'][i].tolist(),
        'rotation': g['rotation'][i].tolist(),
        'velocity': g['velocity'][i].tolist(),
        'detection_name': names[i],
        'detection_score': float(scores[i]),
        'attribute_name': attribute_name(names[i], float(speed[i])),
      }
    )
  return out


def write_results(path: str, results: Mapping[str, list[dict]], meta: dict | None = None) -> str:
  """Writes {'meta', 'results'} as the devkit reads it (temporary file, then rename)."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix='.results-', suffix='.json', dir=directory)
  try:
    with os.fdopen(fd, 'w') as f:
      json.dump({'meta': dict(meta or META), 'results': dict(results)}, f)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return path


def format_summary(summary: Mapping) -> str:
  """mAP, the mean TP errors, NDS and the per-class table of a DetectionEval summary."""
  names = {
    'trans_err': 'mATE',
    'scale_err': 'mASE',
    'orient_err': 'mAOE',
    'vel_err': 'mAVE',
    'attr_err': 'mAAE',
  }
  lines = [f'mAP: {summary["mean_ap"]:.4f}']
  lines += [f'{names[k]}: {v:.4f}' for k, v in summary['tp_errors'].items()]
  lines += [f'NDS: {summary["nd_score"]:.4f}', '']
  lines.append(f'{"class":<22}{"AP":>7}{"ATE":>7}{"ASE":>7}{"AOE":>7}{"AVE":>7}{"AAE":>7}')
  for name, ap in summary['mean_dist_aps'].items():
    tp = summary['label_tp_errors'][name]
    errs = ''.join(f'{tp[k]:>7.3f}' for k in names)
    lines.append(f'{name:<22}{ap:>7.3f}{errs}')
  return '\n'.join(lines)


def evaluate(
  nusc,
  result_path: str,
  output_dir: str,
  eval_set: str | None = None,
  config_name: str = EVAL_CONFIG,
  print_fn: Callable[[str], None] | None = print,
) -> dict:
  """Runs nuscenes-devkit DetectionEval on a result file.

  Args:
    nusc: a loaded `nuscenes.nuscenes.NuScenes`.
    result_path: written by `write_results`; it must hold every sample of the split (an empty
      list for samples without detections), or the devkit refuses it.
    output_dir: gets metrics_summary.json.
    eval_set: devkit split name; default from the version (EVAL_SETS).

  Returns:
    The devkit's summary dict: 'mean_ap', 'nd_score', 'tp_errors', 'mean_dist_aps',
    'label_tp_errors', ...
  """
  from nuscenes.eval.common.config import config_factory
  from nuscenes.eval.detection.evaluate import DetectionEval

  if eval_set is None:
    if nusc.version not in EVAL_SETS:
      raise ValueError(
        f'nuScenes version {nusc.version}: no default eval_set; expected one of '
        f'{sorted(EVAL_SETS)} or an explicit eval_set'
      )
    eval_set = EVAL_SETS[nusc.version]
  if not os.path.isfile(result_path):
    raise ValueError(f'{result_path}: no such result file (write it with write_results)')
  os.makedirs(output_dir, exist_ok=True)
  try:
    evaluator = DetectionEval(
      nusc, config_factory(config_name), result_path, eval_set, output_dir, verbose=False
    )
  except AssertionError as e:
    # The devkit asserts that the results cover exactly the split's samples.
    raise ValueError(
      f'{result_path}: rejected by DetectionEval for eval_set {eval_set} ({e}); the results '
      'must hold every sample of the split, an empty list where nothing was detected'
    ) from e
  metrics, _ = evaluator.evaluate()
  summary = metrics.serialize()
  summary['meta'] = evaluator.meta.copy()
  fd, tmp = tempfile.mkstemp(prefix='.metrics-', suffix='.json', dir=output_dir)
  with os.fdopen(fd, 'w') as f:
    json.dump(summary, f, indent=2)
  os.replace(tmp, os.path.join(output_dir, 'metrics_summary.json'))
  if print_fn is not None:
    print_fn(format_summary(summary))
  return summary


def results_of_split(
  detections: Iterable[tuple[str, Mapping[str, np.ndarray], np.ndarray, np.ndarray]],
  class_range: Mapping[str, float] | None = None,
) -> dict[str, list[dict]]:
  """{sample_token: result dicts} from (sample_token, decoded, lidar2ego, ego2global) tuples.

  `decoded` holds one sample's `boxes.decode` output as numpy (boxes, scores, labels, valid).
  """
  results = {}
  for token, decoded, lidar2ego, ego2global in detections:
    results[token] = sample_results(
      token,
      decoded['boxes'],
      decoded['scores'],
      decoded['labels'],
      lidar2ego,
      ego2global,
      valid=decoded.get('valid'),
      class_range=class_range,
    )
  return results
