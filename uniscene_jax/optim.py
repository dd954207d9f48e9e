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


def _path_name(path) -> str:
  """'a/b/c' of a tree path."""
  return '/'.join(str(getattr(k, 'key', k)) for k in path)


def path_labels(params, frozen_patterns: Sequence[str] = FROZEN_PATTERNS):
  """Tree of 'frozen' | 'backbone' | 'head' per parameter, from its '/'-joined path."""
  frozen = [re.compile(p) for p in frozen_patterns]
  backbone = re.compile(BACKBONE_PATTERN)

  def label(path, _):
    name = _path_name(path) + '/'
    if any(p.search(name) for p in frozen):
      return 'frozen'
    return 'backbone' if backbone.search(name) else 'head'

  return jax.tree_util.tree_map_with_path(label, params)


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """torch AdamW over the trainable parameters, its moments kept as one flat vector per group.

  Frozen tensors are not differentiated at all: the train step takes gradients of
  `trainable(params)` only ({path: array}), so no backward pass runs through the frozen stem and
  layer1. The state is {'count', 'mu': {group: [n]}, 'nu': {group: [n]}} (float32) for the groups
  'backbone' and 'head', each the concatenation of its tensors in tree order: the clipping and
  the moments are a few large element-wise kernels, and only the parameter update itself stays
  one kernel per tensor (an optax chain compiled to several per tensor).

  update(grads, state, params) -> (new params, new state, gradient norm before clipping), with
  torch's formulas: clip_grad_norm_ (coefficient max_norm / (norm + 1e-6), at most 1), then per
  tensor p * (1 - lr * wd) - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps), the learning
  rate lr_schedule(count) (x backbone_lr_mult for the backbone) with count the updates so far.
  """

  config: OptimConfig
  steps_per_epoch: int
  groups: dict  # group -> tuple of (path, shape)

  @classmethod
  def create(cls, config: OptimConfig, steps_per_epoch: int, params) -> 'Optimizer':
    labels = path_labels(params, config.frozen_patterns)
    groups = {'backbone': [], 'head': []}
    for (path, leaf), label in zip(
      jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(labels), strict=True
    ):
      if label != 'frozen':
        groups[label].append((_path_name(path), tuple(leaf.shape)))
    return cls(config, steps_per_epoch, {g: tuple(v) for g, v in groups.items()})

  def schedule(self, step):
    c = self.config
    return lr_schedule(
      c.learning_rate,
      self.steps_per_epoch,
      c.num_epochs,
      c.warmup_steps,
      c.warmup_ratio,
      c.min_lr_ratio,
    )(step)

  def sizes(self) -> dict:
    return {g: sum(math.prod(s) for _, s in v) for g, v in self.groups.items()}

  def init(self, params) -> dict:
    del params  # the layout is fixed by the tree given to create()
    zeros = {g: jnp.zeros((n,), jnp.float32) for g, n in self.sizes().items()}
    return {'count': jnp.zeros((), jnp.int32), 'mu': zeros, 'nu': dict(zeros)}

  def trainable(self, params) -> dict:
    """{path: array} of the trainable tensors, the argument to differentiate."""
    want = {p for v in self.groups.values() for p, _ in v}
    named = ((_path_name(path), x) for path, x in jax.tree_util.tree_leaves_with_path(params))
    out = {name: x for name, x in named if name in want}
    if len(out) != len(want):
      missing = sorted(want - set(out))[:3]
      raise ValueError(f'params: missing trainable tensors {missing} (tree changed since create)')
    return out

  def merge(self, params, trainable: dict):
    """params with the tensors named in `trainable` replaced."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    return jax.tree.unflatten(treedef, [trainable.get(_path_name(path), x) for path, x in leaves])

  def update(self, grads: dict, state: dict, params):
    c = self.config
    flat = {
      g: jnp.concatenate([grads[p].reshape(-1).astype(jnp.float32) for p, _ in v])
      for g, v in self.groups.items()
      if v
    }
    norm = jnp.sqrt(sum(jnp.sum(jnp.square(v)) for v in flat.values()))
    if c.grad_clip_norm > 0:
      coef = jnp.minimum(c.grad_clip_norm / (norm + 1e-6), 1.0)
      flat = {g: v * coef for g, v in flat.items()}
    count = state['count']
    t = (count + 1).astype(jnp.float32)
    bc1 = 1.0 - c.b1**t
    bc2 = 1.0 - c.b2**t
    lr = self.schedule(count)
    current = self.trainable(params)
    mu, nu, new = dict(state['mu']), dict(state['nu']), {}
    for g, v in flat.items():
      mu[g] = c.b1 * state['mu'][g] + (1.0 - c.b1) * v
      nu[g] = c.b2 * state['nu'][g] + (1.0 - c.b2) * jnp.square(v)
      lr_g = lr * (c.backbone_lr_mult if g == 'backbone' else 1.0)
      step = (lr_g / bc1) * mu[g] / (jnp.sqrt(nu[g]) / jnp.sqrt(bc2) + c.eps)
      offset = 0
      for path, shape in self.groups[g]:
        n = math.prod(shape)
        p = current[path]
        delta = step[offset : offset + n].reshape(shape)
        new[path] = (p * (1.0 - lr_g * c.weight_decay) - delta).astype(p.dtype)
        offset += n
    return self.merge(params, new), {'count': count + 1, 'mu': mu, 'nu': nu}, norm


def make_optimizer(config: OptimConfig, steps_per_epoch: int, params) -> Optimizer:
  """The reference's optimiser for a params tree (its paths decide frozen / backbone / head)."""
  return Optimizer.create(config, steps_per_epoch, params)
