r"""Benchmark: binary occupancy labels per second, vectorised vs the literal reference, one run.

    python -m uniscene_jax.tools.bench_labels [--world DIR] [--samples N]

Without --world it writes the default synthetic world to a temporary directory. The reference
lives in tests/reference/, so run this from the repository root.
"""

import argparse
import os
import tempfile
import time

import numpy as np


def _time(fn, tokens):
  start = time.perf_counter()
  out = [fn(t) for t in tokens]
  return (time.perf_counter() - start) / len(tokens), out


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--world', help='root written by uniscene_jax.data.synthetic_world')
  p.add_argument('--samples', type=int, default=6)
  args = p.parse_args(argv)
  from nuscenes.nuscenes import NuScenes

  from tests.reference import occupancy_labels_reference as ref
  from uniscene_jax.data import occupancy_labels as ol
  from uniscene_jax.data import synthetic_world

  root = args.world
  if root is None:
    root = os.path.join(tempfile.mkdtemp(), 'world')
    synthetic_world.write_world(root)
  nusc = NuScenes('v1.0-mini', os.path.join(root, 'nuscenes'), verbose=False)
  # Middle samples have the full window (4 key frames and 4 sweep intervals).
  tokens = [s['token'] for s in nusc.sample if s['prev'] and s['next']][: args.samples]
  agg = ol.SampleAggregator(nusc)
  clouds = [agg.points(t) for t in tokens]  # warm the page cache for both
  points = np.mean([c.shape[1] for c in clouds])
  fast, fast_labels = _time(agg.labels, tokens)
  slow, slow_labels = _time(lambda t: ref.reference_binary_labels(nusc, t), tokens)
  same = all(np.array_equal(a, b) for a, b in zip(fast_labels, slow_labels, strict=True))
  print(f'{len(tokens)} key frames, {points / 1e6:.2f} M aggregated points each')
  print(f'vectorised: {fast:.3f} s/label ({1 / fast:.2f} labels/s)')
  print(f'reference:  {slow:.3f} s/label ({1 / slow:.2f} labels/s)')
  print(f'speed-up:   {slow / fast:.1f}x; labels identical: {same}')
  down_fast, _ = _time(lambda c: ol.voxel_downsample(c[:3].T.astype(np.float64)), clouds)
  down_slow, _ = _time(lambda c: ref.reference_downsample(c[:3].T.astype(np.float64)), clouds)
  print(f'down-sampling alone: {down_fast:.3f} vs {down_slow:.3f} s ({down_slow / down_fast:.1f}x)')


if __name__ == '__main__':
  main()
