"""PyTorch state dicts (FCOS3D, BEVFormer, UniScene) -> this project's Flax variables.

Every tensor of the Flax model is looked up under its PyTorch key (key_map's rules); present
tensors are moved to the Flax layout and must have the right shape (an error names the key);
absent ones keep their initial values and are reported. PyTorch keys that the model has no place
for (an FCOS3D `fpn_convs.4`, a detector's decoder) are reported as skipped.
"""

import dataclasses

import numpy as np

from uniscene_jax.convert import key_map


@dataclasses.dataclass
class ImportReport:
  loaded: list
  missing: list  # Flax tensors without a PyTorch key in the file (left as initialised)
  skipped: dict  # PyTorch key -> reason

  def summary(self) -> str:
    return (
      f'{len(self.loaded)} tensors loaded, {len(self.missing)} kept as initialised, '
      f'{len(self.skipped)} PyTorch keys skipped'
    )


def load_state_dict(path: str) -> dict:
  """The state dict of a .pth (mmcv {'state_dict': ...} or bare; 'module.' prefixes stripped)."""
  import torch

  try:
    obj = torch.load(path, map_location='cpu', weights_only=True)
  except FileNotFoundError:
    raise
  except Exception as e:
    raise ValueError(f'{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})') from e
  if isinstance(obj, dict) and 'state_dict' in obj:
    obj = obj['state_dict']
  if not isinstance(obj, dict):
    raise ValueError(f'{path}: expected a dict of tensors, found {type(obj).__name__}')
  return {k.removeprefix('module.'): v for k, v in obj.items()}


def variables_from_state_dict(
  state_dict: dict, variables: dict, fresh: tuple[str, ...] = ()
) -> tuple[dict, ImportReport]:
  """New {'params', 'batch_stats'} with every tensor found in state_dict (laid out for Flax).

  Flax tensors whose '/'-joined path contains any of `fresh` are not loaded (new layers); their
  PyTorch tensors are reported as skipped.
  """
  out, loaded, missing, used, kept_fresh = {}, [], [], set(), set()
  for collection in ('params', 'batch_stats'):
    flat = key_map.flatten(dict(variables.get(collection, {})))
    new = {}
    for path, leaf in flat.items():
      key = key_map.torch_key(path, collection)
      if key in state_dict and any(f in '/'.join(path) for f in fresh):
        kept_fresh.add(key)
        missing.append(key)
        new[path] = leaf
        continue
      if key not in state_dict:
        missing.append(key)
        new[path] = leaf
        continue
      value = state_dict[key]
      value = (
        value.detach().cpu().float().numpy() if hasattr(value, 'detach') else np.asarray(value)
      )
      perm = key_map.inverse_permutation(path, value.ndim) if collection == 'params' else None
      if perm is not None:
        value = value.transpose(perm)
      if tuple(value.shape) != tuple(leaf.shape):
        raise ValueError(
          f'{key}: shape {tuple(state_dict[key].shape)} in the checkpoint does not fit '
          f'{"/".join(path)} of shape {tuple(leaf.shape)} (after the layout change)'
        )
      new[path] = np.asarray(value, np.asarray(leaf).dtype if hasattr(leaf, 'dtype') else None)
      loaded.append(key)
      used.add(key)
    out[collection] = _unflatten(new)
  skipped = {}
  for k in state_dict:
    if k in used:
      continue
    if k in kept_fresh:
      skipped[k] = 'listed as fresh (config.init_fresh): kept as initialised'
    elif k.endswith('num_batches_tracked'):
      skipped[k] = 'step counter (Flax BatchNorm keeps none)'
    else:
      skipped[k] = 'no such tensor in this model'
  return out, ImportReport(loaded, missing, skipped)


def _unflatten(flat: dict) -> dict:
  out = {}
  for path, value in flat.items():
    node = out
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = value
  return out
