"""3-D detection fine-tuning: box coding and NMS-free decoding, Hungarian matching on device,
the head's losses, and nuScenes result files with the devkit's DetectionEval."""

from uniscene_jax.detection.boxes import (
  CODE_WEIGHTS,
  decode,
  decode_batch,
  denormalize_bbox,
  gravity_center,
  normalize_bbox,
)
from uniscene_jax.detection.losses import detection_loss
from uniscene_jax.detection.matching import hungarian_assign, linear_sum_assignment, match_cost

__all__ = [
  'CODE_WEIGHTS',
  'decode',
  'decode_batch',
  'denormalize_bbox',
  'detection_loss',
  'gravity_center',
  'hungarian_assign',
  'linear_sum_assignment',
  'match_cost',
  'normalize_bbox',
]
