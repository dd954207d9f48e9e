"""The reference recipe: AdamW, backbone lr x 0.1, frozen tensors, clip, cosine by epoch.

torch AdamW (lr 2e-4, betas 0.9 / 0.999, eps 1e-8, weight decay 0.01 on every trainable tensor),
`img_backbone` parameters at 0.1 x the learning rate, frozen tensors (stem, layer1, every backbone
BatchNorm, the detector's code_weights) neither updated nor decayed nor counted in the gradient
norm, global-norm clipping at 35, and mmcv's schedule: cosine annealing stepped per epoch down to
1e-3 x base, with a linear warm-up over the first 500 iterations starting at base / 3.
"""

import dataclasses
import math
import re
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import optax

# Parameter paths ('a/b/c') that the reference never trains.
FROZEN_PATTERNS = (
  r'^img_backbone/(conv1|bn1)/',
  r'^img_backbone/layer1_\d+/',
  r'^img_backbone/.*(^|/)(bn\d*|downsample_1)/',
  r'^pts_bbox_head/code_weights/',  # the detection loss's per-code weights (requires_grad False)
)
BACKBONE_PATTERN = r'^img_backbone/'


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  learning_rate: float = 2e-4
  weight_decay: float = 0.01
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  backbone_lr_mult: float = 0.1
  grad_clip_norm: float = 35.0  # 0 disables
  num_epochs: int = 24
  warmup_steps: int = 500
  warmup_ratio: float = 1.0 / 3.0
  min_lr_ratio: float = 1e-3
  frozen_patterns: Sequence[str] = FROZEN_PATTERNS


def lr_schedule(
  base_lr: float,
  steps_per_epoch: int,
  num_epochs: int,
  warmup_steps: int = 500,
  warmup_ratio: float = 1.0 / 3.0,
  min_lr_ratio: float = 1e-3,
) -> Callable[[jnp.ndarray], jnp.ndarray]:
  """mmcv CosineAnnealing(by_epoch) + linear warm-up by iteration, as a function of the step."""
  eta_min = base_lr * min_lr_ratio

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    epoch = jnp.floor(step / steps_per_epoch)
    regular = eta_min + 0.5 * (base_lr - eta_min) * (1.0 + jnp.cos(math.pi * epoch / num_epochs))
    if warmup_steps <= 0:
      return regular
    k = (1.0 - step / warmup_steps) * (1.0 - warmup_ratio)
    return jnp.where(step < warmup_steps, regular * (1.0 - k), regular)

  return schedule


def path_labels(params, frozen_patterns: Sequence[str] = FROZEN_PATTERNS):
  """Tree of 'frozen' | 'backbone' | 'head' per parameter, from its '/'-joined path."""
  frozen = [re.compile(p) for p in frozen_patterns]
  backbone = re.compile(BACKBONE_PATTERN)

  def label(path, _):
    name = '/'.join(str(getattr(k, 'key', k)) for k in path) + '/'
    if any(p.search(name) for p in frozen):
      return 'frozen'
    return 'backbone' if backbone.search(name) else 'head'

  return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(
  config: OptimConfig, steps_per_epoch: int, params
) -> optax.GradientTransformation:
  """The full transformation for a params tree (its paths decide frozen / backbone / head)."""
  labels = path_labels(params, config.frozen_patterns)
  frozen = jax.tree.map(lambda label: label == 'frozen', labels)
  schedule = lr_schedule(
    config.learning_rate,
    steps_per_epoch,
    config.num_epochs,
    config.warmup_steps,
    config.warmup_ratio,
    config.min_lr_ratio,
  )

  def adamw(mult):
    return optax.adamw(
      lambda step: schedule(step) * mult,
      b1=config.b1,
      b2=config.b2,
      eps=config.eps,
      weight_decay=config.weight_decay,
    )

  parts = [optax.masked(optax.set_to_zero(), frozen)]  # frozen grads leave the clip norm too
  if config.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
  parts.append(
    optax.multi_transform(
      {
        'head': adamw(1.0),
        'backbone': adamw(config.backbone_lr_mult),
        'frozen': optax.set_to_zero(),
      },
      labels,
    )
  )
  return optax.chain(*parts)
