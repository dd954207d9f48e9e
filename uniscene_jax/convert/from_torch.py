"""PyTorch state dicts (FCOS3D, BEVFormer, UniScene) -> this project's Flax variables.

Every tensor of the Flax model is looked up under its PyTorch key (key_map's rules); present
tensors are moved to the Flax layout and must have the right shape (an error names the key);
absent ones keep their initial values and are reported. PyTorch keys that the model has no place
for (an FCOS3D `fpn_convs.4` and head, a detector's decoder) are reported as skipped. A raw FCOS3D
checkpoint's `backbone.` / `neck.` are read as `img_backbone.` / `img_neck.`. A file of which
(almost) nothing maps onto the model is an error naming it (see MIN_SHARE).
"""

import dataclasses

import numpy as np

from uniscene_jax.convert import key_map

# A checkpoint is refused as one of another architecture when the tensors that map onto the model
# are fewer than this share of the file's tensors and of the model's. Legitimate imports are far
# above it on one side at least: FCOS3D's backbone + neck are ~90% of its file and 57-76% of the
# model (small test configs to full size); a BEVFormer detector gives the pre-training model 99% of
# its tensors (76% of the file's).
MIN_SHARE = 0.25


@dataclasses.dataclass
class ImportReport:
  loaded: list  # PyTorch keys of the file whose tensors were loaded
  missing: list  # Flax tensors without a PyTorch key in the file (left as initialised)
  skipped: dict  # PyTorch key -> reason
  renamed: dict = dataclasses.field(default_factory=dict)  # prefix in the file -> ours

  def summary(self) -> str:
    read_as = ''.join(f', {a}* read as {b}*' for a, b in self.renamed.items())
    return (
      f'{len(self.loaded)} tensors loaded, {len(self.missing)} kept as initialised, '
      f'{len(self.skipped)} PyTorch keys skipped{read_as}'
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
  state_dict: dict, variables: dict, fresh: tuple[str, ...] = (), source: str = 'state dict'
) -> tuple[dict, ImportReport]:
  """New {'params', 'batch_stats'} with every tensor found in state_dict (laid out for Flax).

  Flax tensors whose '/'-joined path contains any of `fresh` are not loaded (new layers); their
  PyTorch tensors are reported as skipped. A raw single-stage detector's `backbone.*` / `neck.*`
  (FCOS3D) are read as `img_backbone.*` / `img_neck.*` when the file has none of those. Raises
  ValueError naming the key on a shape mismatch, and naming `source` (the file) when (almost)
  nothing of the file maps onto the model: a checkpoint of another architecture.
  """
  file_key, renamed = _file_keys(state_dict)
  leaves = {}  # collection -> {Flax path: (our PyTorch key, leaf)}
  for c in ('params', 'batch_stats'):
    flat = key_map.flatten(dict(variables.get(c, {})))
    leaves[c] = {path: (key_map.torch_key(path, c), leaf) for path, leaf in flat.items()}
  expected = [key for tree in leaves.values() for key, _ in tree.values()]
  matched = {file_key[k] for k in expected if k in file_key}
  _check_architecture(state_dict, matched, expected, source)
  out, loaded, missing, used, kept_fresh = {}, [], [], set(), set()
  for collection, tree in leaves.items():
    new = {}
    for path, (key, leaf) in tree.items():
      src = file_key.get(key)
      if src is not None and any(f in '/'.join(path) for f in fresh):
        kept_fresh.add(src)
        missing.append(key)
        new[path] = leaf
        continue
      if src is None:
        missing.append(key)
        new[path] = leaf
        continue
      value = state_dict[src]
      value = (
        value.detach().cpu().float().numpy() if hasattr(value, 'detach') else np.asarray(value)
      )
      perm = key_map.inverse_permutation(path, value.ndim) if collection == 'params' else None
      if perm is not None:
        value = value.transpose(perm)
      if tuple(value.shape) != tuple(leaf.shape):
        raise ValueError(
          f'{src}: shape {tuple(state_dict[src].shape)} in the checkpoint does not fit '
          f'{"/".join(path)} of shape {tuple(leaf.shape)} (after the layout change)'
        )
      new[path] = np.asarray(value, np.asarray(leaf).dtype if hasattr(leaf, 'dtype') else None)
      loaded.append(src)
      used.add(src)
    out[collection] = _unflatten(new)
  skipped = {}
  for k in state_dict:
    if k in used:
      continue
    if k in kept_fresh:
      skipped[k] = 'listed as fresh (config.init_fresh): kept as initialised'
    elif _is_counter(k):
      skipped[k] = 'step counter (Flax BatchNorm keeps none)'
    else:
      skipped[k] = 'no such tensor in this model'
  return out, ImportReport(loaded, missing, skipped, renamed)


def _file_keys(state_dict: dict) -> tuple[dict, dict]:
  """({our key: the file's key}, {the file's prefix: ours} for the prefixes read under our name)."""
  file_key = {k: k for k in state_dict}
  renamed = {}
  for ours, theirs in key_map.SINGLE_STAGE_PREFIXES.items():
    if any(k.startswith(ours) for k in state_dict):
      continue
    for k in state_dict:
      if k.startswith(theirs):
        file_key.setdefault(ours + k.removeprefix(theirs), k)
        renamed[theirs] = ours
  return file_key, renamed


def _is_counter(key: str) -> bool:
  return key.endswith('num_batches_tracked')


def _check_architecture(state_dict: dict, matched: set, expected: list, source: str) -> None:
  """Raises ValueError when too little of the file maps onto the model (see MIN_SHARE).

  matched: the file's keys that have a place in the model; expected: the model's keys.
  """
  tensors = [k for k in state_dict if not _is_counter(k)]
  n = len(matched)
  if n and (n >= MIN_SHARE * len(tensors) or n >= MIN_SHARE * len(expected)):
    return
  if n:
    names = ', '.join(sorted(matched)[:3]) + (', ...' if n > 3 else '')
    what = (
      f'only {n} of its {len(tensors)} tensors map onto this model ({names}), under '
      f"{MIN_SHARE:.0%} of the file and of the model's {len(expected)}"
    )
  else:
    what = f'none of its {len(tensors)} tensors maps onto this model'
  prefixes = list(dict.fromkeys(k.split('.')[0] + '.' for k in expected))
  aliases = [(b, a) for a, b in key_map.SINGLE_STAGE_PREFIXES.items() if a in prefixes]
  note = ''
  if aliases:
    theirs, ours = (' and '.join(x) for x in zip(*aliases, strict=True))
    note = f"; an FCOS3D file's {theirs} count as {ours}"
  others = [k for k in tensors if k not in matched] or list(state_dict)
  found = ', '.join(others[:4]) + (f' ... ({len(others) - 4} more)' if len(others) > 4 else '')
  raise ValueError(
    f'{source}: {what}: is it a checkpoint of another architecture? The model expects keys '
    f'under {", ".join(prefixes)} (e.g. {expected[0]}'
    + f'{note}); the file has {found or "no keys"}'
  )


def _unflatten(flat: dict) -> dict:
  out = {}
  for path, value in flat.items():
    node = out
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = value
  return out
