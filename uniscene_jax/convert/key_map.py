"""Flax variable paths <-> PyTorch state_dict keys, with the layout change of each tensor.

Module names mirror the PyTorch attribute paths with '.' -> '/' for nesting and '.N' -> '_N' for
indices (`pts_bbox_head/transformer/encoder/layers_0/attentions_1/output_proj`), so the key of a
tensor follows from its path by a few rules:

| Flax leaf | PyTorch | layout |
|---|---|---|
| Dense `kernel` [in, out] | `weight` [out, in] | transpose |
| Conv `kernel` HWIO / DHWIO | `weight` OIHW / OIDHW | permute |
| `embedding` | `weight` | as is |
| LayerNorm / BatchNorm `scale` | `weight` | as is |
| batch_stats `mean`, `var` | `running_mean`, `running_var` (+ `num_batches_tracked`) | as is |
| bare parameters (level_embeds, cams_embeds, code_weights) | same name | as is |
| MultiheadAttention `in_proj_kernel` [C, 3C] (q, k, v) | `in_proj_weight` [3C, C] | transpose |

Named exceptions (a name that is not an index) are listed in RENAMES.
"""

import re

import numpy as np

# Flax module names whose PyTorch attribute is not '<name>.<index>'.
RENAMES = {'can_bus_mlp_norm': 'can_bus_mlp.norm'}
# Prefixes of this project's keys -> the same modules in an mmdet3d single-stage detector (a raw
# FCOS3D `FCOSMono3D` checkpoint: `backbone.`, `neck.`, `bbox_head.` instead of the multi-view
# detectors' `img_backbone.`, `img_neck.`, `pts_bbox_head.`). Its head has no counterpart here.
SINGLE_STAGE_PREFIXES = {'img_backbone.': 'backbone.', 'img_neck.': 'neck.'}
_INDEX = re.compile(r'_(\d+)(?=_|$)')
# Flax kernel leaves (transposed to PyTorch) and the names of their PyTorch tensors.
_KERNEL_LEAVES = {'kernel': 'weight', 'in_proj_kernel': 'in_proj_weight'}


def torch_module_path(flax_names) -> str:
  """('transformer', 'can_bus_mlp_0') -> 'transformer.can_bus_mlp.0'."""
  parts = []
  for name in flax_names:
    name = RENAMES.get(name, name)
    parts.append(_INDEX.sub(lambda m: '.' + m.group(1), name))
  return '.'.join(parts)


# Flax kernel rank -> the transpose that gives the PyTorch layout (Linear, Conv2d, Conv3d).
_KERNEL_PERMUTATIONS = {2: (1, 0), 4: (3, 2, 0, 1), 5: (4, 3, 0, 1, 2)}
_STATS = {'mean': 'running_mean', 'var': 'running_var'}


def torch_key(path: tuple, collection: str = 'params') -> str:
  """PyTorch key of the Flax leaf at `path` in `collection` ('params' or 'batch_stats')."""
  leaf = path[-1]
  if collection == 'batch_stats':
    name = _STATS[leaf]
  else:
    name = 'weight' if leaf in ('embedding', 'scale') else _KERNEL_LEAVES.get(leaf, leaf)
  module = torch_module_path(path[:-1])
  return f'{module}.{name}' if module else name


def permutation(path: tuple, ndim: int) -> tuple[int, ...] | None:
  """The Flax -> PyTorch transpose of a parameter (None: same layout)."""
  if path[-1] not in _KERNEL_LEAVES:
    return None
  if ndim not in _KERNEL_PERMUTATIONS:
    raise ValueError(f'{"/".join(path)}: kernel of rank {ndim} has no PyTorch layout rule')
  return _KERNEL_PERMUTATIONS[ndim]


def inverse_permutation(path: tuple, ndim: int) -> tuple[int, ...] | None:
  """The PyTorch -> Flax transpose of a parameter (None: same layout)."""
  perm = permutation(path, ndim)
  return None if perm is None else tuple(int(i) for i in np.argsort(perm))


def _counter_key(path: tuple) -> str:
  return f'{torch_module_path(path[:-1])}.num_batches_tracked'


def flatten(tree, prefix=()):
  """Nested dict -> {(names...): leaf}."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def to_torch_arrays(variables: dict) -> dict[str, np.ndarray]:
  """{'params', 'batch_stats'} -> {torch key: numpy array in PyTorch layout} (float32, int64)."""
  out = {}
  for path, leaf in flatten(dict(variables.get('params', {}))).items():
    value = np.asarray(leaf, np.float32)
    perm = permutation(path, value.ndim)
    out[torch_key(path)] = np.array(value if perm is None else value.transpose(perm), order='C')
  for path, leaf in flatten(dict(variables.get('batch_stats', {}))).items():
    out[torch_key(path, 'batch_stats')] = np.array(leaf, np.float32)
    out[_counter_key(path)] = np.asarray(0, np.int64)
  return out


def to_torch_shapes(variables: dict) -> dict[str, tuple[tuple[int, ...], str]]:
  """{torch key: (shape, dtype name)} from variables of arrays or ShapeDtypeStructs."""
  out = {}
  for path, leaf in flatten(dict(variables.get('params', {}))).items():
    shape = tuple(leaf.shape)
    perm = permutation(path, len(shape))
    out[torch_key(path)] = (shape if perm is None else tuple(shape[i] for i in perm), 'float32')
  for path, leaf in flatten(dict(variables.get('batch_stats', {}))).items():
    out[torch_key(path, 'batch_stats')] = (tuple(leaf.shape), 'float32')
    out[_counter_key(path)] = ((), 'int64')
  return out
