r"""An orbax checkpoint -> a PyTorch `.pth` for the reference code.

    python -m uniscene_jax.convert.to_torch --workdir W [--step N] --output M.pth [--arch occ|det]

writes `{'state_dict': ..., 'meta': {...}}` whose keys, shapes and dtypes are those of the
reference's BEVFormerOcc (`--arch occ`, the pre-training model) or BEVFormer-base (`--arch det`,
the detector; its MultiheadAttention q | k | v projections are one packed `in_proj_weight` and
`code_weights` is written as the frozen tensor it is), so `load_state_dict(..., strict=True)`
passes: float32 tensors (bfloat16 cast up) and int64 `num_batches_tracked`. The file is written to
a temporary name, then renamed.
"""

import argparse
import json
import os
import sys

import numpy as np

from uniscene_jax.convert import key_map

MANIFESTS = {'occ': 'bevformer_occ_keys.json', 'det': 'bevformer_base_keys.json'}


def state_dict_from_variables(variables: dict, arch: str = 'occ', manifest: dict | None = None):
  """{'params', 'batch_stats'} -> {torch key: torch.Tensor}, checked against `manifest` if given.

  manifest: {key: {'shape': [...], 'dtype': 'float32' | 'int64'}} (the reference's key list).
  """
  import torch

  if arch not in MANIFESTS:
    raise ValueError(f'--arch must be one of {sorted(MANIFESTS)}, got {arch!r}')
  is_det = 'query_embedding' in dict(variables.get('params', {}).get('pts_bbox_head', {}))
  if is_det != (arch == 'det'):
    kind = 'the detector' if is_det else 'the pre-training model'
    raise ValueError(
      f'--arch {arch}: the variables are those of {kind} '
      f'(pts_bbox_head/query_embedding {"present" if is_det else "absent"}); '
      f'use --arch {"det" if is_det else "occ"}'
    )
  arrays = key_map.to_torch_arrays(variables)
  if manifest is not None:
    check_against_manifest({k: (v.shape, str(v.dtype)) for k, v in arrays.items()}, manifest)
  return {k: torch.from_numpy(v) for k, v in arrays.items()}


def check_against_manifest(got: dict, manifest: dict) -> None:
  """got: {key: (shape, dtype)}. Raises ValueError naming every difference."""
  missing = sorted(set(manifest) - set(got))
  extra = sorted(set(got) - set(manifest))
  wrong = [
    f'{k}: {tuple(got[k][0])} {got[k][1]}, expected {tuple(v["shape"])} {v["dtype"]}'
    for k, v in manifest.items()
    if k in got and (tuple(got[k][0]) != tuple(v['shape']) or got[k][1] != v['dtype'])
  ]
  if missing or extra or wrong:
    raise ValueError(
      'state dict does not match the reference keys: '
      + '; '.join(
        part
        for part in (
          f'missing {missing[:5]}{"..." if len(missing) > 5 else ""}' if missing else '',
          f'unexpected {extra[:5]}{"..." if len(extra) > 5 else ""}' if extra else '',
          '; '.join(wrong[:5]),
        )
        if part
      )
    )


def load_manifest(arch: str, reference_dir: str | None = None) -> dict | None:
  """The reference key manifest if a copy is at hand (reference_dir or $UNISCENE_JAX_MANIFESTS)."""
  directory = reference_dir or os.environ.get('UNISCENE_JAX_MANIFESTS')
  if not directory:
    return None
  with open(os.path.join(directory, MANIFESTS[arch])) as f:
    return json.load(f)


def save_pth(state_dict: dict, path: str, meta: dict) -> None:
  import torch

  tmp = f'{path}.tmp-{os.getpid()}'
  torch.save({'state_dict': state_dict, 'meta': meta}, tmp)
  os.replace(tmp, path)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description='Writes a PyTorch .pth from an orbax checkpoint.')
  p.add_argument('--workdir', required=True)
  p.add_argument('--step', type=int, default=None, help='default: the latest checkpoint')
  p.add_argument('--output', required=True)
  p.add_argument('--arch', default='occ', choices=sorted(MANIFESTS))
  p.add_argument('--manifest_dir', default=None, help='check keys against the reference manifest')
  args = p.parse_args(argv)
  from uniscene_jax.evaluate import load_variables

  try:
    variables, step = load_variables(args.workdir, args.step)
    manifest = load_manifest(args.arch, args.manifest_dir)
    state_dict = state_dict_from_variables(variables, args.arch, manifest)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  meta = {'step': int(step), 'source': os.path.abspath(args.workdir), 'arch': args.arch}
  save_pth(state_dict, args.output, meta)
  elements = sum(int(np.prod(t.shape)) for t in state_dict.values())
  print(f'wrote {args.output}: {len(state_dict)} tensors, {elements:,} elements (step {step})')
  return 0


if __name__ == '__main__':
  sys.exit(main())
