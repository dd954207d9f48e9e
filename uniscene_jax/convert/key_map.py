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
| bare parameters (level_embeds, cams_embeds) | same name | as is |

Named exceptions (a name that is not an index) are listed in RENAMES.
"""

import re

import numpy as np

# Flax module names whose PyTorch attribute is not '<name>.<index>'.
RENAMES = {'can_bus_mlp_norm': 'can_bus_mlp.norm'}
_INDEX = re.compile(r'_(\d+)(?=_|$)')


def torch_module_path(flax_names) -> str:
  """('transformer', 'can_bus_mlp_0') -> 'transformer.can_bus_mlp.0'."""
  parts = []
  for name in flax_names:
    name = RENAMES.get(name, name)
    parts.append(_INDEX.sub(lambda m: '.' + m.group(1), name))
  return '.'.join(parts)


def _to_torch_layout(leaf_name: str, value: np.ndarray) -> tuple[str, np.ndarray]:
  if leaf_name == 'kernel':
    if value.ndim == 2:
      return 'weight', value.T
    if value.ndim == 4:
      return 'weight', value.transpose(3, 2, 0, 1)
    if value.ndim == 5:
      return 'weight', value.transpose(4, 3, 0, 1, 2)
    raise ValueError(f'kernel of rank {value.ndim} has no PyTorch layout rule')
  if leaf_name in ('embedding', 'scale'):
    return 'weight', value
  return leaf_name, value


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
    name, value = _to_torch_layout(path[-1], np.asarray(leaf, np.float32))
    key = f'{torch_module_path(path[:-1])}.{name}' if len(path) > 1 else name
    out[key] = np.array(value, order='C')  # a writable copy
  for path, leaf in flatten(dict(variables.get('batch_stats', {}))).items():
    module = torch_module_path(path[:-1])
    stat = {'mean': 'running_mean', 'var': 'running_var'}[path[-1]]
    out[f'{module}.{stat}'] = np.array(leaf, np.float32)
    out[f'{module}.num_batches_tracked'] = np.asarray(0, np.int64)
  return out


_PERMUTATIONS = {('kernel', 2): (1, 0), ('kernel', 4): (3, 2, 0, 1), ('kernel', 5): (4, 3, 0, 1, 2)}


def to_torch_shapes(variables: dict) -> dict[str, tuple[tuple[int, ...], str]]:
  """{torch key: (shape, dtype name)} from variables of arrays or ShapeDtypeStructs."""
  out = {}
  for path, leaf in flatten(dict(variables.get('params', {}))).items():
    shape = tuple(leaf.shape)
    perm = _PERMUTATIONS.get((path[-1], len(shape)))
    if path[-1] == 'kernel' and perm is None:
      raise ValueError(f'kernel of rank {len(shape)} has no PyTorch layout rule')
    name = 'weight' if path[-1] in ('kernel', 'embedding', 'scale') else path[-1]
    key = f'{torch_module_path(path[:-1])}.{name}' if len(path) > 1 else name
    out[key] = (tuple(shape[i] for i in perm) if perm else shape, 'float32')
  for path, leaf in flatten(dict(variables.get('batch_stats', {}))).items():
    module = torch_module_path(path[:-1])
    stat = {'mean': 'running_mean', 'var': 'running_var'}[path[-1]]
    out[f'{module}.{stat}'] = (tuple(leaf.shape), 'float32')
    out[f'{module}.num_batches_tracked'] = ((), 'int64')
  return out
