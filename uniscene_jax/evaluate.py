"""Occupancy evaluation on a split, frame by frame in time order (the reference's video mode).

    python main.py --config=configs/pretrain.py --mode=eval --workdir=W [--data_dir=D]

Each frame reuses the previous frame's BEV when both are in the same scene (can_bus deltas to
that frame), else starts without history. Binary targets give the IoU of occupied and free voxels
over the whole grid (and the all-free prediction's as a baseline); Occ3D targets give the
benchmark's mIoU over camera-visible voxels with its per-class table. Results are printed and
written to <workdir>/eval_<split>_step<N>.json.
"""

import dataclasses
import math
import os
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from uniscene_jax import metrics, summary, targets
from uniscene_jax.data import augment
from uniscene_jax.data import input_pipeline as ip


def load_variables(workdir: str, step: int | None = None) -> tuple[dict, int]:
  """({'params', 'batch_stats'}, step) of a workdir's checkpoint (the latest by default)."""
  from uniscene_jax.checkpoint import Checkpoints

  ckpt = Checkpoints(workdir)
  step = ckpt.latest_step() if step is None else step
  if step is None:
    raise ValueError(f'{ckpt.directory}: no checkpoint to evaluate')
  state = ckpt.restore_raw(step)
  ckpt.close()
  return {'params': state['params'], 'batch_stats': state['batch_stats']}, step


INPUTS = ('img', 'lidar2img', 'ego2lidar', 'can_bus')


def make_frame_step(model, config):
  """(variables, inputs, prev_bev, prev_exists) -> (bev [1, HW, C] float32, logits, aux).

  logits: [1, X, Y, Z, classes] float32 on the model's grid (None for the detector); aux: the
  frame's named outputs (`sca_overflow`; the detector's `detections`: the NMS-free coder's
  boxes [1, K, 9] in the lidar frame with scores, labels and valid flags).
  """
  valid_hw = tuple(config.data.image_size)

  def step(variables, inputs, prev_bev, prev_exists):
    img = augment.normalize(inputs['img'].astype(jnp.float32), valid_hw)
    bev, aux = model.apply(
      variables,
      img,
      inputs['lidar2img'],
      inputs['ego2lidar'],
      inputs['can_bus'],
      prev_bev,
      prev_exists,
      method=model.frame,
    )
    if not hasattr(model, 'detect'):
      logits = model.apply(variables, bev, method=model.occupancy)
      return bev.astype(jnp.float32), logits, aux
    from uniscene_jax.detection import boxes as box_lib

    outputs = model.apply(variables, bev, method=model.detect)
    threshold = config.get('eval_score_threshold', 0.0)
    aux = dict(aux)
    aux['detections'] = box_lib.decode_batch(  # the last decoder layer, NMS-free
      outputs['cls'][-1], outputs['box'][-1], score_threshold=threshold or None
    )
    return bev.astype(jnp.float32), None, aux

  return step


def make_confusion_update(config):
  """(confusion, logits, frame) -> (confusion, prediction [X, Y, Z], target [X, Y, Z]).

  The target (and Occ3D camera mask) are pooled onto the model's grid (`data.target_pool`).
  """
  classes = config.model.num_classes

  def update(confusion, logits, frame):
    pred = jnp.argmax(logits, -1)
    target, mask = targets.model_targets(
      frame['occ_target'], frame.get('occ_mask_camera'), config.data.target_pool, config.data.target
    )
    if classes != metrics.NUM_CLASSES:
      mask = None  # binary occupancy: every voxel of the grid
    confusion = metrics.confusion_update(confusion, pred, target, mask)
    return confusion, pred[0], target[0]

  return update


@dataclasses.dataclass
class FramePrediction:
  """One frame of a split in video mode.

  record: the split's record (host arrays; images BGR); frame: the step's inputs and target (a
  batch of 1); bev [1, HW, C] float32, logits [1, X, Y, Z, classes] float32 and aux stay on
  the device; continues: whether the frame started from the previous frame's BEV.
  """

  index: int
  record: dict
  frame: dict
  bev: jax.Array
  logits: jax.Array
  aux: dict
  continues: bool


def predict_frames(
  config, model, variables, source, start: int = 0, stop: int | None = None
) -> Iterator[FramePrediction]:
  """Frames start .. stop - 1 of `source` in (scene, time) order, each reusing the previous
  frame's BEV when both are in the same scene (frame `start` begins without history)."""
  enc = model.config.head.encoder
  frame_step = jax.jit(make_frame_step(model, config))
  prev_bev = jnp.zeros((1, enc.bev_h * enc.bev_w, enc.embed_dims), jnp.float32)
  previous = None
  for i in range(start, len(source) if stop is None else stop):
    record = source[i]
    frame, same = _frame(record, previous, config.data.target)
    bev, logits, aux = frame_step(
      variables, {k: frame[k] for k in INPUTS}, prev_bev, jnp.asarray([same])
    )
    yield FramePrediction(i, record, frame, bev, logits, aux, same)
    prev_bev, previous = bev, record


def _frame(record, previous, target: str) -> tuple[dict, bool]:
  """Host inputs of one frame (batch of 1) and whether it continues the previous frame."""
  frames = [record] if previous is None else [previous, record]
  can, exists = ip.queue_deltas(
    np.stack([f['can_bus'] for f in frames]), [f['scene_token'] for f in frames]
  )
  can, same = can[-1], bool(exists[-1])
  frame = {
    'img': ip.pad_images(record['images'])[None],
    'lidar2img': record['lidar2img'][None].astype(np.float32),
    'ego2lidar': record['ego2lidar'][None].astype(np.float32),
    'can_bus': can[None].astype(np.float32),
  }
  if target in ('binary', 'occ3d'):
    frame['occ_target'] = record['occ_binary' if target == 'binary' else 'occ_semantics'][None]
  if target == 'occ3d':
    frame['occ_mask_camera'] = record['occ_mask_camera'][None]
  return frame, same


def evaluate(config, workdir: str, data_dir: str | None = None, step: int | None = None) -> dict:
  from uniscene_jax.models import build_model, model_config_from
  from uniscene_jax.train import prepare_data, write_json

  data_dir = prepare_data(config, data_dir)
  model = build_model(model_config_from(config))
  variables, step = load_variables(workdir, step)
  split = config.data.val_split
  source = ip.open_source(data_dir, config.data.name, split)
  if hasattr(model, 'detect'):
    return evaluate_detection(config, model, variables, source, workdir, step)
  classes = config.model.num_classes
  update = jax.jit(make_confusion_update(config))
  confusion = metrics.SplitConfusion(classes)
  for p in predict_frames(config, model, variables, source):
    pred, target = confusion.update(update, math.prod(p.logits.shape[:-1]), p.logits, p.frame)
  result = summarize(confusion.total(), classes)
  result.update(step=step, split=split, frames=len(source))
  sep = '\n' if '\n' in result['table'] else ' '
  print(f'{split} ({len(source)} frames, step {step}):{sep}{result["table"]}', flush=True)
  write_json(os.path.join(workdir, f'eval_{split}_step{step}.json'), result)
  free = 0 if classes != metrics.NUM_CLASSES else metrics.NUM_CLASSES - 1
  gap = np.full((np.asarray(pred).shape[1], 4, 3), 255, np.uint8)
  result['picture'] = np.concatenate(  # last frame: target | prediction
    [summary.top_view(np.asarray(target), free), gap, summary.top_view(np.asarray(pred), free)], 1
  )
  return result


NUSCENES_VERSIONS = {'mini': 'v1.0-mini', 'trainval': 'v1.0-trainval'}


def evaluate_detection(config, model, variables, source, workdir: str, step: int) -> dict:
  """nuScenes detection metrics (mAP, NDS, per class) of the split with the devkit's
  DetectionEval; the devkit reads the ground truth from `config.data.nuscenes_root`."""
  from nuscenes.nuscenes import NuScenes

  from uniscene_jax.detection import nusc_eval
  from uniscene_jax.train import write_json

  version = NUSCENES_VERSIONS.get(config.data.name.split('/')[-1])
  root = config.data.nuscenes_root
  if version is None:
    raise ValueError(
      f'config.data.name={config.data.name!r}: expected nuscenes_occ/mini or /trainval'
    )
  if not os.path.isdir(os.path.join(root, version)):
    raise ValueError(
      f'config.data.nuscenes_root={root!r}: no {version}/ tables there (DetectionEval reads the '
      f'ground truth from the nuScenes tables)'
    )
  split = config.data.val_split
  detections = []
  for p in predict_frames(config, model, variables, source):
    decoded = {k: np.asarray(v[0]) for k, v in p.aux['detections'].items()}
    token = p.record['sample_token'].decode()  # Text features read back as bytes
    detections.append((token, decoded, p.record['lidar2ego'], p.record['ego2global']))
  results = nusc_eval.results_of_split(detections, nusc_eval.class_ranges())
  out_dir = os.path.join(workdir, f'eval_{split}_step{step}')
  result_path = nusc_eval.write_results(os.path.join(out_dir, 'results_nusc.json'), results)
  nusc = NuScenes(version=version, dataroot=root, verbose=False)
  summary_ = nusc_eval.evaluate(nusc, result_path, out_dir, print_fn=None)
  result = {
    'mAP': summary_['mean_ap'],
    'NDS': summary_['nd_score'],
    'tp_errors': summary_['tp_errors'],
    'per_class_ap': summary_['mean_dist_aps'],
    'table': nusc_eval.format_summary(summary_),
    'step': step,
    'split': split,
    'frames': len(source),
    'boxes': sum(len(r) for r in results.values()),
  }
  print(f'{split} ({len(source)} frames, step {step}):\n{result["table"]}', flush=True)
  write_json(os.path.join(workdir, f'eval_{split}_step{step}.json'), result)
  return result


def summarize(confusion: np.ndarray, classes: int) -> dict:
  iou = metrics.per_class_iou(confusion)
  if classes == metrics.NUM_CLASSES:
    return {
      'miou': metrics.occ3d_miou(confusion),
      'iou': [None if np.isnan(v) else float(v) for v in iou],
      'table': metrics.miou_table(confusion),
    }
  total = confusion.sum()
  free_fraction = confusion[0].sum() / max(total, 1)  # IoU of free when predicting all free
  result = {
    'iou_occupied': float(iou[1]),
    'iou_free': float(iou[0]),
    'miou': float(np.nanmean(iou) * 100),
    'all_free_miou': float(free_fraction / 2 * 100),
  }
  result['table'] = (
    f'occupied IoU {result["iou_occupied"] * 100:.2f}  free IoU {result["iou_free"] * 100:.2f}  '
    f'mIoU {result["miou"]:.2f} (all-free prediction: {result["all_free_miou"]:.2f})'
  )
  return result
